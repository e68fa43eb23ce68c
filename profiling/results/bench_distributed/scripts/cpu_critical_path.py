"""Per-rank CPU per step of the user's run, partitions interleaved generation by generation
(a busy machine's drift hits each alike): torchrun --nproc-per-node 2 crit2.py ROUNDS"""
import os, sys, time, statistics, json, collections
import torch, torch.distributed as dist
torch.set_num_threads(1)
import asyncdiff_rt
from asyncdiff_rt.models.tiny_t2i import load_tiny
from asyncdiff_rt.engine import distributed as D
from asyncdiff_rt.engine.process_group import join_group
from asyncdiff_rt.partition import resolve_partition
join_group(None, 2, "cpu", 120)
rank = dist.get_rank()
rec = collections.defaultdict(list)
def wrap(name):
    f = getattr(D.DistributedExecutor, name)
    def w(self, *a, **k):
        c0 = time.thread_time()
        try: return f(self, *a, **k)
        finally: rec[name].append(time.thread_time() - c0)
    setattr(D.DistributedExecutor, name, w)
wrap("step"); wrap("_run")
pipe = load_tiny()
gen = lambda: pipe(["a red cube on a blue ball"], num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="pt").images
h = asyncdiff_rt.parallelize(pipe, n_components=2, executor="distributed", partition="auto"); gen()
graph = h.plan.graph; h.remove()
parts = {"flops (before)": [list(c) for c in resolve_partition(graph, 2, "auto").components], "auto (after)": "auto", "measured": "measured"}
res = collections.defaultdict(lambda: collections.defaultdict(list))
base = []
for r in range(int(sys.argv[1])):
    if rank == 0:
        c0 = time.process_time(); gen(); base.append(time.process_time() - c0)
    dist.barrier()
    for name, part in parts.items():
        h = asyncdiff_rt.parallelize(pipe, n_components=2, executor="distributed", partition=part)
        gen(); rec.clear(); gen()
        res[name]["units"] = [len(c) for c in h.plan.partition.components]
        h.remove()
        for key in ("step", "_run"):
            t = torch.tensor(rec[key][:150] + [0.0] * (150 - len(rec[key][:150])), dtype=torch.float64)
            both = [torch.zeros_like(t) for _ in range(2)]; dist.all_gather(both, t)
            res[name][key + "_sums"].append([round(b.sum().item() * 1e3) for b in both])
            res[name][key + "_crit"].append(round(torch.maximum(both[0], both[1]).sum().item() * 1e3))
if rank == 0:
    print("one process CPU ms/gen", [round(b * 1e3) for b in base])
    for name, d in res.items():
        print(name, json.dumps(dict(d)))
dist.destroy_process_group()
