"""How well the stage-1 central difference resolves a model's time derivative (issue #17).

    python benchmarks/results/stage1_sweep/fd_profile.py CKPT DATA [generator]

For 16 samples of DATA, at a few (t, r), prints ||(T - R) (u(z + v e/1000, T + e, R) - u(z - v e/1000, T - e, R))
/ (2 e)|| / ||v|| for e = 0.25 ... 80 timestep units (on the boundary r = t: T du/dT). For a model that is
smooth in T the column barely changes with e; when it grows as e shrinks, the model's output carries
high-frequency T content (the sinusoidal timestep features reach 1 rad per timestep unit) that the e = 5
difference of the stage-1 target aliases, and (T - R) / (2 e) (up to 100) amplifies it into the target.
CKPT: a teacher (full model) or, with ``generator``, a stage-1 checkpoint (EMA adapter merged).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
from megatron_anyflow.parallel.state import initialize_parallel
from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
from megatron_anyflow.checkpoint.model_io import load_for_inference
from megatron_anyflow.data.latent_dataset import LatentDataset
enable_megatron_cpu_compat(); initialize_parallel(1)
d, data = sys.argv[1], sys.argv[2]
adapter = sys.argv[3] if len(sys.argv) > 3 else None
m = load_for_inference(d, adapter=adapter, ema=adapter is not None)
ds = LatentDataset(data)
n = 16
x = torch.stack([ds[i * (len(ds) // n)][0] for i in range(n)]).float()
text = torch.stack([ds[i * (len(ds) // n)][1] for i in range(n)]).float()
g = torch.Generator().manual_seed(0)
eps = torch.randn(x.shape, generator=g)
v = eps - x
f = x.shape[1]
print("t     r   " + " ".join(f"e={e:<6g}" for e in (0.25, 1, 5, 20, 80)) + "   (||(T-R) du/dT_e|| / ||v||)")
for t, r in ((0.9, 0.0), (0.7, 0.0), (0.5, 0.0), (0.3, 0.0), (0.9, 0.5), (0.7, 0.7)):
    z = (1 - t) * x + t * eps
    T = torch.full((n, f), 1000 * t); R = torch.full((n, f), 1000 * r)
    row = []
    for e in (0.25, 1, 5, 20, 80):
        with torch.no_grad():
            up = m(z + v * e / 1000, T + e, R, text); um = m(z - v * e / 1000, T - e, R, text)
        dudt = (up - um) / (2 * e)
        scale = (1000 * (t - r)) if t > r else 1000 * t  # show (T-R) du/dT, or T du/dT on the boundary
        row.append((scale * dudt).norm() / v.norm())
    print(f"{t:.1f}  {r:.1f}  " + " ".join(f"{float(v_):8.3f}" for v_ in row))
