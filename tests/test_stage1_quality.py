"""Stage-1 quality guards (issue #17: "stage 1 must not get worse with more training"), each on the real
trainer (``pretrain_anyflow.py`` run as a subprocess) and each under 4 minutes on 2 CPU cores.

(a) ``test_trainer_stage1_learns_the_gaussian_flow_map``: the trainer's stage 1 on a Gaussian data set
    written in the `LatentDataset` format (``x ~ N(mu, s^2 I)``, one prompt), full fine-tuning of the ``tiny``
    preset from its random initialisation. The exact flow map is known
    (:class:`~megatron_anyflow.anyflow.gaussian.GaussianData`), so the learned map ``f = z - (t - r) u`` is
    compared with it at a few (t, r) on fresh samples of the exact marginal ``z_t``. Asserted: the error
    falls between an early and the final checkpoint, and the final error is below a bound derived in the
    test from the exact one-step Euler map of the exact velocity, ``z - (t - r) v(z, t)``: what a model that
    learned only the instantaneous velocity (the boundary samples) gives at best. Beating it means the
    trainer learned the flow map, not the velocity.
(b) ``test_tiny_teacher_stage1_does_not_decline``: a tiny teacher (flow matching on a small synthetic
    video-latent set, in the test), its 50-step ODE samples as the stage-1 training set, then the README's
    tiny stage-1 recipe at 2 seeds; the student's 4-step PSNR against the teacher's 50-step samples must
    not decline between two checkpoints of one run and must end above a threshold.

Both fail on deliberately broken builds (documented in benchmarks/results/stage1_sweep/README.md).
"""
import math
import os
import sys

import pytest
import torch

from conftest import REPO, run_cmd

TRAINER = os.path.join(REPO, "pretrain_anyflow.py")

# --------------------------------------------------------------------------------------------------------
# (a) Gaussian data through the real trainer
# --------------------------------------------------------------------------------------------------------
G_SHAPE = (1, 16, 2, 2)  # [f, c, h, w] of the tiny preset: one (1, 2, 2) patch, 64 data dimensions
G_S = 0.5
G_N = 1024
G_ITERS = 600
G_EARLY = 200
# (t, r) at which the learned map is compared with the exact one: the one-step jump, an inner jump, a short one
G_PAIRS = ((1.0, 0.0), (0.8, 0.2))


def _write_gaussian_dataset(path, seed=0):
    from megatron_anyflow.anyflow.gaussian import GaussianData
    from megatron_anyflow.data.latent_dataset import write_latent_dataset

    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(G_SHAPE, generator=g, dtype=torch.float64)
    data = GaussianData(mu, G_S)
    x = data.sample(G_N, g, dtype=torch.float32)
    text = torch.randn(1, 4, 384, generator=g).expand(G_N, -1, -1).contiguous()
    write_latent_dataset(str(path), x, text, torch.zeros(1, 4, 384), {"gaussian": {"s": G_S, "seed": seed}},
                         dtype=torch.float32)
    return data, text[:1]


def _map_errors(model, data, text, n=512, seed=123):
    """{(t, r): RMSE of the model's flow map z - (t - r) u(z, t, r) against the exact one} on fresh
    samples of the exact marginal z_t, and the same for the exact-velocity Euler step."""
    g = torch.Generator().manual_seed(seed)
    x = data.sample(n, g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    out, euler = {}, {}
    for t, r in G_PAIRS:
        z = (1 - t) * x + t * eps
        exact = data.flow_map(z, t, r)
        T = torch.full((n, G_SHAPE[0]), 1000.0 * t)
        R = torch.full((n, G_SHAPE[0]), 1000.0 * r)
        with torch.no_grad():
            u = model(z.float(), T, R, text.expand(n, -1, -1)).double()
        out[(t, r)] = ((z - (t - r) * u - exact).pow(2).mean().sqrt()).item()
        euler[(t, r)] = ((z - (t - r) * data.velocity(z, t) - exact).pow(2).mean().sqrt()).item()
    return out, euler


def _load(ckpt_dir):
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.testing.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.training.model_io import load_for_inference

    enable_megatron_cpu_compat()
    initialize_parallel(1)
    return load_for_inference(str(ckpt_dir), ema=True)


def test_trainer_stage1_learns_the_gaussian_flow_map(tmp_path):
    data, text = _write_gaussian_dataset(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    common = [sys.executable, TRAINER, "--stage", "stage1", "--model-preset", "tiny", "--data-path", str(tmp_path / "data"),
              "--lora-rank", "0", "--micro-batch-size", "128", "--train-iters", str(G_ITERS), "--lr", "3e-3",
              "--lr-warmup-iters", "20", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--guidance", "1",
              "--text-dropout", "0", "--ema-decay", "0.95", "--ema-start-iter", "0", "--log-interval", "100",
              "--seed", "1", "--save", str(ckpt), "--load", str(ckpt)]
    run_cmd(common + ["--exit-after-iters", str(G_EARLY)], timeout=200)
    run_cmd(common, timeout=200)
    early, euler = _map_errors(_load(ckpt / f"iter_{G_EARLY:07d}"), data, text)
    final, _ = _map_errors(_load(ckpt / f"iter_{G_ITERS:07d}"), data, text)
    print("early", early, "final", final, "euler", euler)
    for tr in G_PAIRS:
        assert final[tr] < 0.95 * early[tr], (tr, early, final)
        assert final[tr] < 0.85 * euler[tr], (tr, final, euler)


# --------------------------------------------------------------------------------------------------------
# (b) tiny teacher -> teacher-synthesised data -> stage 1 at 2 seeds
# --------------------------------------------------------------------------------------------------------
V_SHAPE = (2, 48, 4, 4)  # [f, c, h, w]: the tiny-video preset's 48 channels (the README job's model), 8 tokens
V_PROMPTS = 4
V_N = 256
TEACHER_ITERS = 500
S1_ITERS = 400
S1_EARLY = 150
S1_SEEDS = (1234, 1236)
EVAL_N, EVAL_STEPS = 16, 4


def _write_video_like_dataset(path, seed=0):
    """V_PROMPTS prompts, each a smooth random pattern (low-frequency in space and time) plus pixel noise."""
    from megatron_anyflow.data.latent_dataset import write_latent_dataset

    g = torch.Generator().manual_seed(seed)
    f, c, h, w = V_SHAPE
    coarse = torch.randn(V_PROMPTS, c, 2, 2, generator=g)
    patterns = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)[:, None]
    drift = 0.3 * torch.randn(V_PROMPTS, 1, c, 1, 1, generator=g)
    patterns = torch.cat([patterns + k * drift for k in range(f)], dim=1)  # [P, f, c, h, w]
    prompts = torch.randn(V_PROMPTS, 4, 384, generator=g)
    k = torch.arange(V_N) % V_PROMPTS
    x = patterns[k] + 0.25 * torch.randn(V_N, *V_SHAPE, generator=g)
    write_latent_dataset(str(path), x, prompts[k], torch.zeros(1, 4, 384), {}, dtype=torch.float32)


def _latent_psnr(student_dir, ref, noise, text, ema=True):
    from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler
    from megatron_anyflow.training.model_io import load_for_inference

    student = load_for_inference(str(student_dir), adapter="generator", ema=ema)
    with torch.no_grad():
        out = FlowMapEulerSampler(EVAL_STEPS)(student, noise, text)
    return 10 * math.log10(4.0 / (out.double() - ref.double()).pow(2).mean().item())


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """(teacher checkpoint, synthetic data set, evaluation noise, prompts, the teacher's 50-step reference)."""
    root = tmp_path_factory.mktemp("tiny_teacher")
    _write_video_like_dataset(root / "data")
    run_cmd([sys.executable, TRAINER, "--stage", "teacher", "--model-preset", "tiny-video", "--data-path", root / "data",
             "--lora-rank", "0", "--micro-batch-size", "8", "--train-iters", TEACHER_ITERS, "--lr", "1e-3",
             "--lr-warmup-iters", "20", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--text-dropout", "0.1",
             "--log-interval", "100", "--seed", "1234", "--save", root / "teacher"], timeout=200)
    run_cmd([sys.executable, os.path.join(REPO, "tools", "synthesize_dataset.py"), "--teacher", root / "teacher",
             "--data-path", root / "data", "--output", root / "synthetic", "--steps", "50", "--guidance", "1"],
            timeout=200)
    from megatron_anyflow.anyflow.sampler import TeacherEulerSampler
    from megatron_anyflow.data.latent_dataset import LatentDataset
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.testing.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.training.model_io import load_for_inference

    enable_megatron_cpu_compat()
    initialize_parallel(1)
    ds = LatentDataset(str(root / "data"))
    text = torch.stack([ds[i % V_PROMPTS][1] for i in range(EVAL_N)]).float()
    noise = torch.randn((EVAL_N, *V_SHAPE), generator=torch.Generator().manual_seed(7))
    teacher = load_for_inference(str(root / "teacher"))
    with torch.no_grad():
        ref = TeacherEulerSampler(50, guidance_scale=1.0)(teacher, noise, text, ds.negative_text.float().expand(EVAL_N, -1, -1))
        t4 = TeacherEulerSampler(EVAL_STEPS, guidance_scale=1.0)(teacher, noise, text, ds.negative_text.float().expand(EVAL_N, -1, -1))
    teacher_psnr = 10 * math.log10(4.0 / (t4.double() - ref.double()).pow(2).mean().item())
    return dict(root=root, noise=noise, text=text, ref=ref, teacher_psnr=teacher_psnr)


# The README job's stage-1 recipe (examples/pretrain_anyflow_tiny.sh step 5), with its issue-#17 fix.
STAGE1_RECIPE = ["--lora-rank", "32", "--lora-alpha", "32", "--micro-batch-size", "8", "--lr", "1e-3",
                 "--lr-warmup-iters", "50", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--ema-decay", "0.99",
                 "--ema-start-iter", "0", "--guidance", "1", "--log-interval", "100",
                 "--lora-exclude", "condition_embedder.*"]
# 4-step latent PSNR (peak 2) the final checkpoint must reach: with the fixed recipe seeds 1234 / 1236 reached
# 23.38 / 23.79 dB at 400 (the teacher's own 4 steps: 23.04 dB); without the fix 14.61 / 19.64 dB (from
# 23.64 / 23.89 at 150). 1.4 dB below the worst fixed run.
S1_MIN_PSNR = 22.0


@pytest.mark.parametrize("seed", S1_SEEDS)
def test_tiny_teacher_stage1_does_not_decline(tiny_teacher, seed, tmp_path):
    tt = tiny_teacher
    ckpt = tmp_path / "stage1"
    cmd = [sys.executable, TRAINER, "--stage", "stage1", "--model-preset", "tiny-video", "--data-path", tt["root"] / "synthetic",
           "--pretrained", tt["root"] / "teacher", *STAGE1_RECIPE, "--train-iters", S1_ITERS, "--seed", seed,
           "--save", ckpt, "--load", ckpt]
    run_cmd(cmd + ["--exit-after-iters", S1_EARLY], timeout=200)
    run_cmd(cmd, timeout=200)
    early = _latent_psnr(ckpt / f"iter_{S1_EARLY:07d}", tt["ref"], tt["noise"], tt["text"])
    final = _latent_psnr(ckpt / f"iter_{S1_ITERS:07d}", tt["ref"], tt["noise"], tt["text"])
    print(f"seed {seed}: 4-step latent PSNR {early:.2f} dB at {S1_EARLY}, {final:.2f} dB at {S1_ITERS}; "
          f"teacher 4-step {tt['teacher_psnr']:.2f} dB")
    assert final >= early - 0.5, f"the 4-step PSNR declined: {early:.2f} dB at {S1_EARLY} -> {final:.2f} dB at {S1_ITERS}"
    assert final >= S1_MIN_PSNR, f"4-step PSNR {final:.2f} dB at {S1_ITERS} < {S1_MIN_PSNR} dB"


# --------------------------------------------------------------------------------------------------------
# the diagnostics the guards and the sweep read (fast)
# --------------------------------------------------------------------------------------------------------
def test_stage1_diagnostics_match_their_definitions():
    """The per-iteration stage-1 diagnostics (`MetricAccumulator.add_stage1_diagnostics` + `stage1_diagnostics`)
    over two micro-batches equal float64 recomputations from the per-sample stats, and `family_norms`
    equals per-family norms computed by hand."""
    from megatron_anyflow.anyflow import FlowMapObjectiveConfig, stage1_loss
    from megatron_anyflow.testing.toy import ToyFlowMapNet
    from megatron_anyflow.training.stages import MetricAccumulator, stage1_diagnostics
    from megatron_anyflow.training.trainer import family_norms, param_family

    torch.manual_seed(0)
    net = ToyFlowMapNet((1, 2, 2, 2), hidden=16, n_freq=1, correction=False)
    cfg = FlowMapObjectiveConfig(guidance=1.0, text_dropout=0.0)
    acc, stats_all, vs = MetricAccumulator(torch.device("cpu")), [], []
    carry = None
    for j in range(2):
        x, eps = torch.randn(8, 1, 2, 2, 2), torch.randn(8, 1, 2, 2, 2)
        _, st = stage1_loss(net, x, torch.zeros(8, 2, 4), torch.zeros(1, 2, 4), cfg,
                            time_generator=torch.Generator().manual_seed(1), noise_generator=torch.Generator().manual_seed(2),
                            global_batch=16, global_offset=8 * j, boundary_carry=carry, noise=eps, return_tensors=True)
        carry = (st["boundary_sum"], st["boundary_count"])
        acc.add_stage1_diagnostics(st)
        stats_all.append(st)
        vs.append((eps - x).double())
    red = stage1_diagnostics({**acc.means, **acc.sums, **acc.maxes})
    cat = lambda k: torch.cat([s[k].double() for s in stats_all])  # noqa: E731
    kind, loss, scales = cat("kind"), cat("per_sample_loss"), cat("scales")
    for k, name in enumerate(("boundary", "r0", "free")):
        assert torch.isclose(red[f"loss_{name}"], loss[kind == k].mean())
    nb = kind != 0
    assert torch.isclose(red["rw_mean"], scales[nb].mean()) and torch.isclose(red["rw_max"], scales[nb].max())
    # the finite-difference term (T - R)(u+ - u-)/(2 e g) is v - u_target (eq. 3 / 4): its norm against v's
    v = torch.cat(vs)
    fd = v - cat("u_target")
    for k, name in ((1, "r0"), (2, "free")):
        m = kind == k
        want = math.sqrt(float(fd[m].pow(2).sum() / v[m].pow(2).sum()))
        assert math.isclose(float(red[f"fd/v_{name}"]), want, rel_tol=1e-4), (name, float(red[f"fd/v_{name}"]), want)
    assert not any(k.startswith("_s1/") for k in red)
    # family norms
    params = {"condition_embedder.time_embedder.linear_1.adapters.g.lora_B": torch.nn.Parameter(torch.ones(2, 2)),
              "blocks.0.self_attention.linear_qkv.adapters.g.lora_A": torch.nn.Parameter(torch.ones(3)),
              "blocks.0.mlp.linear_fc1.weight": torch.nn.Parameter(torch.ones(4))}
    for i, p in enumerate(params.values()):
        p.grad = torch.full_like(p, float(i + 1))
    out = family_norms(params, "g")
    assert [param_family(n) for n in params] == ["temb", "attn", "ffn"]
    assert torch.isclose(out["g/gn_temb"], torch.tensor(2.0)) and torch.isclose(out["g/B_temb"], torch.tensor(2.0))
    assert torch.isclose(out["g/gn_attn"], torch.tensor(2.0 * math.sqrt(3))) and "g/B_attn" not in out
    assert torch.isclose(out["g/gn_ffn"], torch.tensor(6.0)) and "g/gn_mod" not in out
