"""One rank for tests/test_distributed_settings.py's affinity test: parallelize the shipped
tiny model with executor="distributed" (no generation) and write OUT/rank<r>.json: the CPU
affinity of every thread of the process afterwards, the intra-op thread count and what
handle.stats() says was done.

    python tests/affinity_worker.py OUT [--own-affinity]

`--own-affinity` first restricts this process to the first core it may use, as a user
who pins their ranks themselves would (the runtime must leave that alone)."""
import json
import os
import sys
from pathlib import Path


def main():
    out, own = Path(sys.argv[1]), "--own-affinity" in sys.argv[2:]
    if own:
        os.sched_setaffinity(0, [min(os.sched_getaffinity(0))])
    import torch

    from asyncdiff_rt import parallelize
    from asyncdiff_rt.models.tiny_t2i import load_tiny

    # torch's default in a fresh process without OMP_NUM_THREADS (a forked rank inherits the suite's 1)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    threads_before = torch.get_num_threads()
    handle = parallelize(load_tiny(), n_components=2, executor="distributed")
    threads = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
    record = {"rank": int(os.environ["RANK"]), "threads": threads, "process": sorted(os.sched_getaffinity(0)),
              "intra_op_threads_before": threads_before, "intra_op_threads": torch.get_num_threads(),
              "cpu_affinity": handle.stats()["cpu_affinity"]}
    handle.remove()
    (out / f"rank{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
