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
from megatron_anyflow.testing.quality import GAUSSIAN_SHAPE as G_SHAPE
from megatron_anyflow.testing.quality import write_gaussian_dataset

TRAINER = os.path.join(REPO, "pretrain_anyflow.py")

# --------------------------------------------------------------------------------------------------------
# (a) Gaussian data through the real trainer
# --------------------------------------------------------------------------------------------------------
G_ITERS = 600
G_EARLY = 200
# (t, r) at which the learned map is compared with the exact one: the one-step jump, an inner jump, a short one
G_PAIRS = ((1.0, 0.0), (0.8, 0.2))


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
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    enable_megatron_cpu_compat()
    initialize_parallel(1)
    return load_for_inference(str(ckpt_dir), ema=True)


def test_trainer_stage1_learns_the_gaussian_flow_map(tmp_path):
    data, text = write_gaussian_dataset(tmp_path / "data")
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
S1_ITERS = 400
S1_EARLY = 150
S1_SEEDS = (1234, 1236)
EVAL_N, EVAL_SEED, EVAL_STEPS = 16, 7, 4


def _seed_sweep():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import seed_sweep

    return seed_sweep


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    """The mini set-up (megatron_anyflow/testing/quality.py: data, teacher, its synthetic set) and the seed
    sweep's evaluator on it: the guard measures exactly what the sweeps in
    benchmarks/results/stage1_sweep/ measure (16 evenly spread prompts, noise seed 7, latent PSNR)."""
    import argparse

    from megatron_anyflow.testing.quality import build_mini_teacher

    root = tmp_path_factory.mktemp("tiny_teacher")
    paths = build_mini_teacher(str(root), timeout=400)
    sweep = _seed_sweep()
    args = argparse.Namespace(teacher=paths["teacher"], eval_data_path=paths["data"], num_samples=EVAL_N,
                              eval_seed=EVAL_SEED, reference_steps=50, guidance=1.0, shift=5.0, no_ema=False)
    ev = sweep.Evaluator(args, str(root), print)
    teacher_psnr = ev.teacher_metrics([EVAL_STEPS])[str(EVAL_STEPS)]["latent_psnr"]
    return dict(paths=paths, ev=ev, teacher_psnr=teacher_psnr, recipe=sweep.RECIPES["stage1"])


# 4-step latent PSNR (peak 2) the final checkpoint must reach. The sweep of the fixed recipe on this set-up
# (benchmarks/results/stage1_sweep/README.md, "mini_fix") gave 23.97 +- 0.15 dB at iteration 400 over 8
# seeds (min 23.68; the teacher's own 4 steps: 22.98). Another CPU's rounding changes a run's trajectory
# the way another seed does, so the bound sits 6.5 sd below the mean; the recipe before the fix gave
# 19.97 / 22.86 / 23.27 / 23.07 at 400 for seeds 1234-1237 (from 24.07 / 24.01 / 23.53 / 24.10 at 150): both
# asserts fail on seed 1234, and on two of the three others at least one does.
S1_MIN_PSNR = 23.0


@pytest.mark.parametrize("seed", S1_SEEDS)
def test_tiny_teacher_stage1_does_not_decline(tiny_teacher, seed, tmp_path):
    tt = tiny_teacher
    ckpt = tmp_path / "stage1"
    # the README job's stage-1 recipe with its issue-#17 fix (tools/seed_sweep.py RECIPES["stage1"])
    cmd = [sys.executable, TRAINER, "--stage", "stage1", *tt["recipe"], "--data-path", tt["paths"]["synthetic"],
           "--pretrained", tt["paths"]["teacher"], "--train-iters", S1_ITERS, "--seed", seed,
           "--save", ckpt, "--load", ckpt]
    run_cmd(cmd + ["--exit-after-iters", S1_EARLY], timeout=200)
    run_cmd(cmd, timeout=200)
    psnr = lambda it: tt["ev"].student_metrics(str(ckpt / f"iter_{it:07d}"), [EVAL_STEPS])[str(EVAL_STEPS)]["latent_psnr"]  # noqa: E731
    early, final = psnr(S1_EARLY), psnr(S1_ITERS)
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
