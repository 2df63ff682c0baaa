"""The "mini" stage-1 quality set-up (issue #17): the README job's model (the ``tiny-video`` preset) on small
video-like latents, a teacher trained from scratch on them, and the teacher's 50-step samples as the
stage-1 training set. It reproduces the README job's stage-1 decline in a few minutes of CPU instead of tens,
so it backs both the suite's guard (``tests/test_stage1_quality.py``) and the seed sweeps
(``tools/seed_sweep.py`` on its output; ``benchmarks/results/stage1_sweep/``).

    python -m megatron_anyflow.testing.quality OUT_DIR      # OUT_DIR/{data, teacher, synthetic}

Not imported by runtime code.
"""
from __future__ import annotations

import os
import subprocess
import sys

# [f, c, h, w]: the tiny-video preset's 48 channels (the README job's model), 2 x 2 x 2 = 8 tokens per sample
SHAPE = (2, 48, 4, 4)
PROMPTS = 4
NUM_SAMPLES = 256
TEACHER_ITERS = 500
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_video_like_dataset(path: str, seed: int = 0) -> None:
    """Write ``NUM_SAMPLES`` latents ``[f, c, h, w] = SHAPE`` (float32) in the `LatentDataset` format.

    ``PROMPTS`` prompts (random MiniLM-sized embeddings ``[4, 384]``), each a smooth random pattern
    (bilinear upsampling of a 2 x 2 field, drifting linearly over frames) plus pixel noise of sd 0.25.
    Samples are stored in prompt blocks (sample ``i`` has prompt ``i * PROMPTS // NUM_SAMPLES``), so the
    evenly spread evaluation prompts of ``tools/evaluate_anyflow.py`` cover every prompt equally.
    """
    import torch

    from megatron_anyflow.data.latent_dataset import write_latent_dataset

    g = torch.Generator().manual_seed(seed)
    f, c, h, w = SHAPE
    coarse = torch.randn(PROMPTS, c, 2, 2, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[:, None]
    drift = 0.3 * torch.randn(PROMPTS, 1, c, 1, 1, generator=g)
    patterns = torch.cat([patterns + k * drift for k in range(f)], dim=1)  # [P, f, c, h, w]
    prompts = torch.randn(PROMPTS, 4, 384, generator=g)
    k = torch.arange(NUM_SAMPLES) * PROMPTS // NUM_SAMPLES
    x = patterns[k] + 0.25 * torch.randn(NUM_SAMPLES, *SHAPE, generator=g)
    write_latent_dataset(path, x, prompts[k], torch.zeros(1, 4, 384), {}, dtype=torch.float32)


# The Gaussian data set of the trainer-level flow-map checks: one (1, 2, 2) patch of the tiny preset, 64 data dims
GAUSSIAN_SHAPE = (1, 16, 2, 2)
GAUSSIAN_S = 0.5
GAUSSIAN_N = 1024


def write_gaussian_dataset(path: str, seed: int = 0):
    """Write ``GAUSSIAN_N`` samples of ``x ~ N(mu, GAUSSIAN_S^2 I)`` (``mu`` random, ``[f, c, h, w] =
    GAUSSIAN_SHAPE``, float32) with one prompt in the `LatentDataset` format; its exact flow map is known.

    Returns:
        ``(data, text)``: the `anyflow.gaussian.GaussianData` (float64 mean) and the prompt ``[1, 4, 384]``.
    """
    import torch

    from megatron_anyflow.anyflow.gaussian import GaussianData
    from megatron_anyflow.data.latent_dataset import write_latent_dataset

    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(GAUSSIAN_SHAPE, generator=g, dtype=torch.float64)
    data = GaussianData(mu, GAUSSIAN_S)
    x = data.sample(GAUSSIAN_N, g, dtype=torch.float32)
    text = torch.randn(1, 4, 384, generator=g).expand(GAUSSIAN_N, -1, -1).contiguous()
    write_latent_dataset(str(path), x, text, torch.zeros(1, 4, 384), {"gaussian": {"s": GAUSSIAN_S, "seed": seed}},
                         dtype=torch.float32)
    return data, text[:1]


def build_mini_teacher(root: str, *, timeout: float | None = None, env: dict | None = None) -> dict:
    """Write the data set, train the teacher (flow matching from scratch, the README job's teacher recipe,
    ``TEACHER_ITERS`` iterations) and synthesise its 50-step ODE samples, all under ``root``.

    Returns ``{"data": ..., "teacher": ..., "synthetic": ...}`` (paths). Steps whose output is complete are
    skipped (a data set counts once its ``index.json`` is written, which is last; the teacher once its
    tracker names iteration ``TEACHER_ITERS``) and the teacher resumes from its newest checkpoint, so an
    interrupted build resumes. ``timeout``: seconds per step (None: no limit). Raises
    ``subprocess.CalledProcessError`` (or ``subprocess.TimeoutExpired``) when a step fails, with its output on
    stderr.
    """
    paths = {k: os.path.join(root, k) for k in ("data", "teacher", "synthetic")}
    os.makedirs(root, exist_ok=True)
    if not os.path.exists(os.path.join(paths["data"], "index.json")):
        write_video_like_dataset(paths["data"])
    env = dict(os.environ if env is None else env, PYTHONWARNINGS="ignore")
    from megatron_anyflow.checkpoint.store import read_tracker, tag_for

    if read_tracker(paths["teacher"]) != tag_for(TEACHER_ITERS):
        subprocess.run([sys.executable, os.path.join(REPO, "pretrain_anyflow.py"), "--stage", "teacher",
                        "--model-preset", "tiny-video", "--data-path", paths["data"], "--lora-rank", "0",
                        "--micro-batch-size", "8", "--train-iters", str(TEACHER_ITERS), "--lr", "1e-3",
                        "--lr-warmup-iters", "20", "--lr-decay-style", "cosine", "--min-lr", "1e-4",
                        "--text-dropout", "0.1", "--log-interval", "100", "--seed", "1234",
                        "--save", paths["teacher"], "--load", paths["teacher"]], check=True, timeout=timeout, env=env)
    if not os.path.exists(os.path.join(paths["synthetic"], "index.json")):
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "synthesize_dataset.py"), "--teacher",
                        paths["teacher"], "--data-path", paths["data"], "--output", paths["synthetic"],
                        "--steps", "50", "--guidance", "1"], check=True, timeout=timeout, env=env)
    return paths


if __name__ == "__main__":  # pragma: no cover - the CLI of the docstring
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m megatron_anyflow.testing.quality OUT_DIR (got {sys.argv[1:]})")
    print(build_mini_teacher(sys.argv[1]))
