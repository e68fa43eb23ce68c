"""The new user's run (defaults: partition auto, gloo, the runtime's pinning), one
generation per rank under cProfile after a warm-up one:
    torchrun --nproc-per-node 2 profile_user_run.py OUT_DIR
writes OUT_DIR/user_run_rank<r>.txt (own time, then the runtime's functions by cumulative)."""
import cProfile, io, os, pstats, sys, time
import torch
import torch.distributed as dist
import asyncdiff_rt
from asyncdiff_rt.models.tiny_t2i import load_tiny

out = sys.argv[1]
pipe = load_tiny()
handle = asyncdiff_rt.parallelize(pipe, n_components=2, executor="distributed")
rank = dist.get_rank()
gen = lambda: pipe(["a red cube on a blue ball"], num_inference_steps=50, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
gen()
dist.barrier()
profile = cProfile.Profile()
w0, c0 = time.perf_counter(), time.process_time()
profile.enable()
gen()
profile.disable()
wall, cpu = time.perf_counter() - w0, time.process_time() - c0
text = io.StringIO()
load = os.getloadavg()
text.write(f"rank {rank}: one generation {wall * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms process CPU (under cProfile); "
           f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {handle.stats()['cpu_affinity']}; "
           f"units per rank {[len(c) for c in handle.plan.partition.components]}\n")
stats = pstats.Stats(profile, stream=text)
stats.sort_stats("tottime").print_stats(25)
stats.sort_stats("cumulative").print_stats("asyncdiff_rt/", 30)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, f"user_run_rank{rank}.txt"), "w") as f:
    f.write(text.getvalue().replace(os.getcwd() + "/", ""))
handle.remove()
