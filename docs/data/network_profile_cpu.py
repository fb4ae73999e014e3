"""Forward-pass profile of the shipped network on this CPU, and whether channels_last_3d pays (1 thread).

    python docs/data/network_profile_cpu.py 1   (random 93x76x92 inputs: content at every face, so the boundary
    padding mirrors 4 voxels on all six; 6.38 s contiguous, 6.15 s channels_last_3d weights, 16:38 UTC)
"""
import sys, time, statistics
import torch
from deepabdominalreg.models import load_model
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
net, card = load_model("abdomen-ct-4mm-v3", "cpu")
g = torch.Generator().manual_seed(0)
f = torch.rand(1, 1, 93, 76, 92, generator=g); m = torch.rand(1, 1, 93, 76, 92, generator=g)
def run(n=3):
    ts = []
    with torch.inference_mode():
        net.predict(f, m)
        for _ in range(n):
            t = time.perf_counter(); net.predict(f, m); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
print("contiguous", run())
# per-op profile
from torch.profiler import profile, ProfilerActivity
with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
    net.predict(f, m)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
net = net.to(memory_format=torch.channels_last_3d)
print("channels_last (weights)", run())
