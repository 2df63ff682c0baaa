"""Adaptive reweighting under data parallelism: DP = 2 (torchrun, gloo) reproduces DP = 1.

Runs ``tests/distributed/dp_reweight_check.py`` under ``torch.distributed.run --nproc_per_node 2`` (each
rank 4 samples at offsets 0 and 4, the same time-generator seed, its slice of one global noise tensor) and
compares with its ``reference()`` computed in this process (DP = 1: global batch 8 at offset 0, local
reweighting, no process group needed). Rank 0 then holds all 4 boundary
samples and rank 1 none, so rank 1's eq.-7 scales need the boundary mean all-reduced over the DP group.
Checks (float32, relative error < 1e-6): the DP-mean loss equals the DP = 1 loss; the DP-averaged gradient
of every parameter equals the DP = 1 gradient (per tensor to 1e-6 of the whole gradient's norm, and
relatively for tensors holding >= 10 % of it: see the comment in the test); per-sample losses, scales and
the boundary mean agree.
Negative control: reweighting with local boundary samples only (``dp_group=None``) changes the loss.
"""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "distributed" / "dp_reweight_check.py"
TIMEOUT = 300


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_dp2_matches_dp1(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out2 = tmp_path / "dp2.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           str(out2)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # DP = 1 reference in this process while the two ranks start up.
        spec = importlib.util.spec_from_file_location("dp_reweight_check", SCRIPT)
        check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(check)
        ref = check.reference()
        output = proc.communicate(timeout=TIMEOUT)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"

    dp = torch.load(out2)
    assert ref["world"] == 1 and dp["world"] == 2
    # rank 0 holds all boundary samples, rank 1 none; the gathered count is global
    assert dp["num_boundary_local"].tolist() == [4.0, 0.0]
    assert float(dp["num_boundary"]) == float(ref["num_boundary"]) == 4.0
    assert abs(dp["boundary_mean"].item() - ref["boundary_mean"].item()) <= 1e-6 * ref["boundary_mean"].item()
    assert _rel(dp["per_sample_loss"], ref["per_sample_loss"]) < 1e-6
    assert _rel(dp["scales"], ref["scales"]) < 1e-6
    assert not torch.allclose(ref["scales"][4:], torch.ones(4))
    assert abs(dp["loss"].item() - ref["loss"].item()) <= 1e-6 * abs(ref["loss"].item())
    assert len(dp["grads"]) == len(ref["grads"]) > 0
    # Gradients: DP = 2 sums the per-sample contributions in another order (two means of 4, averaged by the
    # all-reduce, vs one mean of 8), so each element differs by a few float32 roundings (u = 6e-8) of the
    # magnitudes summed into it, which the whole gradient sets, not the element's result: a tensor whose
    # gradient nearly cancels could differ by O(1) of itself on another CPU (issue 11 item 10). Per tensor
    # the error is therefore bounded against the whole gradient's norm, and relative only for tensors
    # holding >= 10 % of it (1e-6 = ~16 u; measured on an Intel Xeon: <= 1.5e-8 of the norm, <= 1.1e-7
    # relative per tensor).
    total = math.sqrt(sum(float(g.double().square().sum()) for g in ref["grads"]))
    large = 0
    for i, (g2, g1) in enumerate(zip(dp["grads"], ref["grads"])):
        assert g1.norm() > 0, i
        err = float((g2.double() - g1.double()).norm())
        assert err <= 1e-6 * total, (i, err / total)
        if g1.double().norm() >= 0.1 * total:
            large += 1
            assert _rel(g2, g1) < 1e-6, (i, _rel(g2, g1))
    assert large > 0
    # without the gather, rank 1 reweights with no boundary sample (scales 1) and the loss differs
    assert abs(ref["loss_local_only"].item() - ref["loss"].item()) < 1e-7 * abs(ref["loss"].item())
    assert abs(dp["loss_local_only"].item() - ref["loss"].item()) > 1e-3 * abs(ref["loss"].item())
