"""tools/seed_sweep.py end to end at a tiny size: cells evaluated and recorded, the metric equal to its
definition recomputed here, a re-launch that resumes instead of retraining, and the FAR stage-1 path (chunk
by chunk with the KV cache)."""
import json
import math
import os
import sys

import torch

from conftest import REPO, run_cmd

TRAINER = os.path.join(REPO, "pretrain_anyflow.py")
SWEEP = os.path.join(REPO, "tools", "seed_sweep.py")
TINY = ["--model-preset", "tiny-video", "--lora-rank", "4", "--lora-alpha", "4", "--micro-batch-size", "2",
        "--lr", "1e-3", "--guidance", "1", "--log-interval", "1"]


def _teacher(root):
    from megatron_anyflow.data.latent_dataset import write_latent_dataset

    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 2, 48, 4, 4, generator=g)  # [n, f, c, h, w]: 2 frames of 2 x 2 patches (FAR: one 4 x 4 compressed patch)
    write_latent_dataset(str(root / "data"), x, torch.randn(8, 4, 384, generator=g), torch.zeros(1, 4, 384), {},
                         dtype=torch.float32)
    run_cmd([sys.executable, TRAINER, "--stage", "teacher", "--model-preset", "tiny-video", "--lora-rank", "0",
             "--micro-batch-size", "2", "--train-iters", "2", "--data-path", root / "data", "--save", root / "teacher"],
            timeout=300)


def test_seed_sweep_records_resumes_and_evaluates_far(tmp_path):
    _teacher(tmp_path)
    out = tmp_path / "sweep"
    cmd = [sys.executable, SWEEP, "--recipe", "none", "--teacher", tmp_path / "teacher", "--data-path", tmp_path / "data",
           "--output", out, "--seeds", "1", "2", "--iters", "1", "2", "--steps", "1", "2", "--num-samples", "3",
           "--reference-steps", "4", "--no-progress", "--", *TINY]
    first = run_cmd(cmd, timeout=600)
    res = json.load(open(out / "results.json"))
    assert sorted(res["cells"]) == ["1/1", "1/2", "2/1", "2/2"], sorted(res["cells"])
    for cell in res["cells"].values():
        for n in ("1", "2"):
            m = cell[n]
            assert math.isfinite(m["latent_mse"]) and m["latent_mse"] > 0
            assert abs(m["latent_psnr"] - 10 * math.log10(4.0 / m["latent_mse"])) < 1e-9, m
    # the two seeds trained different students
    assert res["cells"]["1/2"]["1"]["latent_mse"] != res["cells"]["2/2"]["1"]["latent_mse"]
    table = open(out / "table.md").read()
    assert "latent PSNR (dB, peak 2)" in table and "| 2 | 1 | 2 |" in table, table
    assert os.path.getsize(out / "psnr_vs_iters.png") > 0
    # a re-launch finds every cell done: nothing retrained, the same results
    again = run_cmd(cmd, timeout=600)
    assert "4 of 4 cells done; 0 to go" in again.stdout, again.stdout
    assert json.load(open(out / "results.json"))["cells"] == res["cells"]
    assert "trained" in first.stdout and "trained" not in again.stdout

    # AnyFlow-FAR stage 1: trained with --model far, evaluated chunk by chunk (2 chunks of 1 frame)
    far = tmp_path / "far"
    run_cmd([sys.executable, SWEEP, "--stage", "far-stage1", "--recipe", "none", "--teacher", tmp_path / "teacher",
             "--data-path", tmp_path / "data", "--output", far, "--seeds", "1", "--iters", "1", "--steps", "1", "2",
             "--num-samples", "3", "--reference-steps", "4", "--no-progress", "--", *TINY, "--model", "far",
             "--chunk-partition", "1", "1"], timeout=600)
    cells = json.load(open(far / "results.json"))["cells"]
    assert set(cells) == {"1/1"} and all(math.isfinite(cells["1/1"][n]["latent_psnr"]) for n in ("1", "2")), cells
    meta = json.load(open(far / "runs" / "seed_1" / "ckpt" / "iter_0000001" / "anyflow_meta.json"))
    assert meta["wan_config"].get("far") is True, meta["wan_config"]


def test_a_stopped_sweep_leaves_no_trainer_behind(tmp_path):
    """SIGTERM to the sweep alone (as `kill` or a scheduler sends it, unlike Ctrl-C, which reaches the whole
    process group) must stop its trainer too, not leave it training unobserved. The sweep runs in its own
    session, so its process group holds exactly the sweep, the trainer and the trainer's children."""
    import signal
    import subprocess
    import time

    _teacher(tmp_path)
    out = tmp_path / "sweep"
    cmd = [sys.executable, SWEEP, "--recipe", "none", "--teacher", str(tmp_path / "teacher"), "--data-path",
           str(tmp_path / "data"), "--output", str(out), "--seeds", "1", "--iters", "100000", "--steps", "1",
           "--num-samples", "2", "--reference-steps", "2", "--no-progress", "--", *TINY]
    sweep = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = out / "runs" / "seed_1" / "train.log"
    try:
        # wait (no time assumption beyond a generous limit) until the trainer logs an iteration: it is running
        deadline = time.monotonic() + 600
        while not (log.exists() and " iteration " in log.read_text()):
            assert sweep.poll() is None, "the sweep ended before its trainer started"
            assert time.monotonic() < deadline, "the trainer logged no iteration in 600 s"
            time.sleep(0.5)
        sweep.send_signal(signal.SIGTERM)
        sweep.wait(timeout=120)
        deadline = time.monotonic() + 120
        while True:  # every process of the group gone (the trainer may take a moment to exit)
            try:
                os.killpg(sweep.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "the trainer outlived the stopped sweep"
            time.sleep(0.5)
        assert sweep.returncode == 128 + signal.SIGTERM, sweep.returncode  # stopped like Ctrl-C, by its handler
    finally:
        try:
            os.killpg(sweep.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
