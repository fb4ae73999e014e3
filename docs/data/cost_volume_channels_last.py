"""Prototype: a channels-last ssd_cost_volume (contiguous channel reduction, no stack) against the shipped one, 2 threads.

    python docs/data/cost_volume_channels_last.py   (17:21 UTC: level 0 0.632 vs 0.629 s, level 1 0.107 vs 0.089 s,
    level 2 0.014 vs 0.010 s; identical to 3e-7) -> not adopted: level 0 dominates and does not change
"""
import time, statistics, torch
import torch.nn.functional as F
torch.set_num_threads(2)
from deepabdominalreg.networks import ssd_cost_volume, _shift_offsets
def ssd_cl(fixed, moving, r):
    C = fixed.shape[1]
    padded = F.pad(moving, (r,)*6, mode="replicate")
    psq = padded.pow(2).mean(1)
    fsq = fixed.pow(2).mean(1)
    fcl = fixed.permute(0, 2, 3, 4, 1).contiguous()
    pcl = padded.permute(0, 2, 3, 4, 1).contiguous()
    d, h, w = fixed.shape[2:]
    out = fixed.new_empty((fixed.shape[0], (2*r+1)**3, d, h, w))
    for k, (a, b, c) in enumerate(_shift_offsets(r)):
        win = pcl[:, r+a:r+a+d, r+b:r+b+h, r+c:r+c+w]
        cross = torch.linalg.vecdot(fcl, win, dim=-1)
        torch.add(fsq + psq[:, r+a:r+a+d, r+b:r+b+h, r+c:r+c+w], cross, alpha=-2.0/C, out=out[:, k])
    return out.clamp_min_(0.0)
def bench(fn, *a):
    ts=[]
    for _ in range(3):
        t=time.perf_counter(); y=fn(*a); ts.append(time.perf_counter()-t)
    return statistics.median(ts), y
for shape, r in [((1,17,96,76,92),1), ((1,17,48,38,46),2), ((1,17,24,19,23),2)]:
    x = torch.rand(*shape); y = torch.rand(*shape)
    with torch.inference_mode():
        t0, a = bench(ssd_cost_volume, x, y, r)
        t1, b = bench(ssd_cl, x, y, r)
    print(shape, r, "old %.3f new %.3f maxdiff %.2e" % (t0, t1, (a-b).abs().max()))
