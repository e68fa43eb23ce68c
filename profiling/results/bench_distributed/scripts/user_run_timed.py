"""The new user's run, instrumented: torchrun --nproc-per-node 2 user.py [partition] [transport] [gens]"""
import os, sys, time, statistics, collections, json
import torch
import torch.distributed as dist
import asyncdiff_rt
from asyncdiff_rt.models.tiny_t2i import load_tiny
from asyncdiff_rt.engine import distributed as D

part = sys.argv[1] if len(sys.argv) > 1 else "auto"
transport = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
gens = int(sys.argv[3]) if len(sys.argv) > 3 else 3
acc = collections.defaultdict(list)

def wrap(name):
    f = getattr(D.DistributedExecutor, name)
    def w(self, *a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return f(self, *a, **k)
        finally:
            acc[name].append((time.perf_counter() - t0, time.thread_time() - c0))
    setattr(D.DistributedExecutor, name, w)
for n in ("_step", "_run", "_receive", "_emit", "_lockstep", "_post", "_begin"):
    wrap(n)
pipe = load_tiny()
t0 = time.perf_counter()
handle = asyncdiff_rt.parallelize(pipe, n_components=2, executor="distributed", partition=part, transport=transport)
setup = time.perf_counter() - t0
rank = dist.get_rank()
gen = lambda: pipe(["a red cube on a blue ball"], num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="pt").images
gen()
walls, cpus = [], []
acc.clear()
for _ in range(gens):
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    gen()
    walls.append(time.perf_counter() - t0); cpus.append(time.process_time() - c0)
out = {"rank": rank, "threads": torch.get_num_threads(), "affinity": sorted(os.sched_getaffinity(0)), "setup_s": round(setup, 2),
       "gen_wall_ms": [round(w*1e3) for w in walls], "gen_proc_cpu_ms": [round(c*1e3) for c in cpus]}
for n, v in acc.items():
    ws = [a for a, b in v]; cs = [b for a, b in v]
    out[n] = f"n={len(v)} wall med {statistics.median(ws)*1e3:.2f} sum/gen {sum(ws)*1e3/gens:.0f}  cpu med {statistics.median(cs)*1e3:.2f} sum/gen {sum(cs)*1e3/gens:.0f}"
out["components"] = [len(c) for c in handle.plan.partition.components]
print(json.dumps(out, indent=0), flush=True)
handle.remove()
