"""Forward-pass profile of the shipped network on the real CT pair as the pipeline prepares it (2 threads), and the
level-0 cost volume and box filters alone.

    python docs/data/network_profile_real_ct.py   (17:20 UTC, idle: avg_pool3d 25 %, mul (cost products) 24 % +
    vecdot/sum, mkldnn convolutions 21 % + slow_conv3d 5 %, grid_sampler 10 %; ssd level 0: 0.59 s, 2 box passes 0.37 s)
"""
import time, statistics, torch
from deepabdominalreg.models import load_model
from deepabdominalreg.registration import network_inputs
from deepabdominalreg.image import read_image
from deepabdominalreg.synthetic import make_synthetic_pair
from deepabdominalreg import networks
torch.set_num_threads(2)
img = read_image("/work/shared/data/totalsegmentator/example_ct.nii.gz", "CT")
pair = make_synthetic_pair(img, None, {}, seed=0, amplitude_mm=10.0, noise_hu=15.0)
net, card = load_model("abdomen-ct-4mm-v3", "cpu")
f, m, _, _ = network_inputs(pair.fixed_image, pair.moving_image, card, 160, "cpu")
from torch.profiler import profile, ProfilerActivity
with torch.inference_mode():
    net.predict(f, m)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        net.predict(f, m)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
# time the cost volume alone at level-0 size
x = torch.rand(1, 17, 96, 76, 92); y = torch.rand(1, 17, 96, 76, 92)
with torch.inference_mode():
    ts = []
    for _ in range(3):
        t = time.perf_counter(); c = networks.ssd_cost_volume(x, y, 1); ts.append(time.perf_counter() - t)
    print("ssd level0", statistics.median(ts))
    ts = []
    for _ in range(3):
        t = time.perf_counter(); networks.box_filter3(networks.box_filter3(c)); ts.append(time.perf_counter() - t)
    print("2 box passes level0", statistics.median(ts))
