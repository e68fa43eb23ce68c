"""One rank of tests/test_bench_baselines.py's CPU run of `asyncdiff-rt bench
--context-parallel` (launched with torchrun's environment variables): the command as it
runs on the CPU (its Ulysses and ring rows empty, with the reason), then, in the same
group, the Ulysses row emulated on the CPU: diffusers' rank-to-accelerator mapping is told
there are 2 devices and the attention backend is "native" (SDPA; ring needs one that
returns the log-sum-exp, which no CPU backend does). The emulation only exercises the
row's wiring (fresh transformer, enable_parallelism, timing, agreement of the ranks);
the bench itself never patches diffusers.

    python tests/context_parallel_worker.py OUT_DIR
"""
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from asyncdiff_rt import parallelize
from asyncdiff_rt.cli import main
from asyncdiff_rt.commands import bench_context_parallel as cp

warnings.filterwarnings("ignore")
out = Path(sys.argv[1])
code = main(["bench", "--context-parallel", "--device", "cpu", "--steps", "2", "--repeats", "1", "--out", str(out)])
torch.accelerator.device_count = lambda: cp.WORLD
cp.CP_BACKEND = "native"
cp.ROWS = [row for row in cp.ROWS if row[0] in ("one process (eager diffusers)", cp.ULYSSES)]
rows = cp.measure("tiny", torch.device("cpu"), 2, 1, 1, None, parallelize)
if dist.get_rank() == 0:
    (out / "emulated_ulysses.json").write_text(json.dumps(rows, indent=1))
sys.exit(code)
