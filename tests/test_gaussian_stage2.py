"""Stage 2 end to end on Gaussian data: the paper's central claim at toy scale, with the exact answer known.

Set-up (all CPU, float32, one thread; about 15-30 s):

* data ``x ~ N(mu, s^2 I)`` on a latent ``[1, 2, 2, 2]`` (:class:`GaussianData`), whose exact flow map
  ``f(noise, 1, 0)`` is the reference every sampler is scored against;
* generator: :class:`AffineFlowMap`, ``u(z, t, r) = a(t, r) z + b(t, r)`` with a scalar ``a`` and a vector
  ``b`` from a small MLP of Fourier features of ``(t, r)``. This affine family contains the exact
  Gaussian average velocity, and every Euler rollout of it is ``x0 = A noise + B`` with a scalar ``A``, so
  matching the data *distribution* (what DMD trains) also matches the deterministic map (what we score);
* "stage 1" start: the generator is first fitted to the teacher's instantaneous velocity for every
  ``(t, r)`` (the state of a pretrained model whose delta embedder is a copy of the time embedder), then
  trained for a short while with the real stage-1 objective (``objective.stage1_loss``, guidance 1,
  no text dropout). This gives a deliberately imperfect flow map (1-step error ~0.25);
* real score: the exact teacher velocity ``GaussianData.velocity`` (``exact_model()`` at ``r = t``). There
  is no text, so conditional and unconditional scores coincide and guidance is the identity: the test sets
  ``real_guidance=0.0`` in the DMD convention ``v_c + g (v_c - v_u)`` (= 1.0 in the CFG convention
  ``v_u + g (v_c - v_u)``) and passes no negative text;
* fake score: :class:`AffineVelocity` ``v(z, t) = a(t) z + b(t)`` (holds the exact velocity of any
  isotropic Gaussian), fitted to the teacher first (the reference initialises the critic from the teacher),
  then warmed up on generator samples;
* stage 2: generator step (rollout + DMD + the stage-1 co-training loss) and critic step (its own no-grad
  rollout + flow matching) alternating 1:1, Adam with betas (0, 0.999), grad clip 1, linear LR decay.

Numbers below: RMSE vs the exact map over 4096 fixed noises (Euler samplers are deterministic), or, for
the stochastic consistency sampler, the distribution error of ``_dist_err``; ranges over seeds 1-8 at the
default 600 stage-2 iterations (seed 1 is the default; it was fixed before any result was seen).
Stage-1 start: 1 / 2 / 4 / 8 / 16 steps = 0.247 / 0.252 / 0.191 / 0.172 / 0.102.

What it asserts (held in 8 of 8 seeds):

1. stage 2 reduces the 1- and 2-step error of the flow-map generator: after 0.023-0.054 / 0.023-0.057;
2. the flow-map-trained generator improves on the start at 4, 8 and 16 steps as well
   (0.031-0.059 / 0.099-0.118 / 0.063-0.072);
3. at few steps the flow-map-trained generator beats the one trained with ``simulation="consistency"``
   from the same start, both sampled with Euler: 1 step 0.023-0.054 vs 0.039-0.077, 4 steps 0.031-0.059
   vs 0.058-0.093 (at 8 / 16 steps they are level: consistency-trained 0.105-0.133 / 0.063-0.090);
4. the *consistency sampler* (jump to t = 0, re-noise to the next time with fresh noise) applied to the
   consistency-trained generator gets worse with more steps (0.067-0.101 at 4 steps, 0.129-0.174 at 16)
   while Euler sampling of the same model gives 0.063-0.090 at 16 steps.

What it records without asserting:

* "the flow-map generator does not get worse from 4 to 16 steps" does NOT reproduce: at 600 iterations
  its 16-step error (0.063-0.072) is above its 4-step error (0.031-0.059) in 7 of 8 seeds. (At 300
  iterations it held in 8 of 8, only because the 4-step error had not come down yet: 0.066-0.103.) Both
  generators have their largest error at 8 steps (~0.10-0.13); training on N = 8 plans only still leaves
  0.08 at 8 steps vs 0.03 at 4 (seed 1), so this is a limit of this tiny model / short training on the
  finer grids, not of one simulation;
* the consistency sampler degrades the flow-map-trained generator the same way (0.038-0.066 at 4 steps,
  0.131-0.149 at 16): at this scale the multi-step degradation comes from the sampler;
* without the stage-1 co-training term (seed 1, DMD only, all N) the multi-step errors blow up
  (4 / 8 / 16 steps 0.36 / 0.22 / 0.22): in this toy the co-training is what keeps the flow map consistent.

The full table is printed (``pytest -s``) and kept in ``RESULTS``.
"""
from __future__ import annotations

import copy
import math
import os
import time
from typing import Dict

import pytest
import torch
from torch import nn

from megatron_anyflow.anyflow.distill import (
    DistillConfig,
    backward_simulation,
    critic_loss,
    generator_loss,
    sample_simulation_plan,
)
from megatron_anyflow.anyflow.gaussian import GaussianData
from megatron_anyflow.anyflow.objective import FlowMapObjectiveConfig, stage1_loss
from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler
from megatron_anyflow.anyflow.timesteps import flow_map_time_grid, to_model_scale

SHAPE = (1, 2, 2, 2)
D = math.prod(SHAPE)
MU = torch.tensor([0.8, -0.5, 0.3, 1.2, -1.0, 0.1, 0.6, -0.7]).reshape(SHAPE)
S = 0.5
BATCH = 256
ITERS = int(os.environ.get("ANYFLOW_GAUSS_STAGE2_ITERS", "600"))
SEED = int(os.environ.get("ANYFLOW_GAUSS_STAGE2_SEED", "1"))
EVAL_STEPS = (1, 2, 4, 8, 16)
RESULTS: Dict[str, Dict] = {}


def _features(t: torch.Tensor, n_freq: int = 4) -> torch.Tensor:
    k = torch.arange(1, n_freq + 1, dtype=t.dtype) * math.pi
    return torch.cat([t[:, None], torch.sin(t[:, None] * k), torch.cos(t[:, None] * k)], dim=-1)


class _Affine(nn.Module):
    def __init__(self, two_time: bool, hidden: int = 64, seed: int = 0):
        super().__init__()
        self.two_time = two_time
        d_in = (2 if two_time else 1) * 9 + (1 if two_time else 0)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1 + D))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0 * p)

    def forward(self, z, T, R, text=None):
        b = z.shape[0]
        t = T[:, 0].float() / 1000.0
        feats = _features(t)
        if self.two_time:
            r = R[:, 0].float() / 1000.0
            feats = torch.cat([feats, _features(r), (t - r)[:, None]], dim=-1)
        h = self.net(feats)
        return (h[:, :1] * z.reshape(b, -1).float() + h[:, 1:]).reshape(z.shape).to(z.dtype)


class AffineFlowMap(_Affine):
    """Generator ``u(z, t, r) = a(t, r) z + b(t, r)`` (model signature, times on 0..1000)."""

    def __init__(self, seed: int = 0):
        super().__init__(two_time=True, seed=seed)


class AffineVelocity(_Affine):
    """Single-time score ``v(z, t) = a(t) z + b(t)`` (``R`` ignored)."""

    def __init__(self, seed: int = 0):
        super().__init__(two_time=False, seed=seed)


def _noisy(gd, B, g):
    t = torch.rand(B, generator=g)
    x = gd.sample(B, generator=g)
    eps = torch.randn(x.shape, generator=g)
    tt = t.view(-1, 1, 1, 1, 1)
    return (1 - tt) * x + tt * eps, t


def _fit_teacher(model, exact, steps, seed, two_time):
    """Regress ``model(z, t, r)`` onto the teacher's instantaneous velocity ``v(z, t)`` (any ``r <= t``)."""
    gd = GaussianData(MU, S)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        z, t = _noisy(gd, BATCH, g)
        r = torch.rand(BATCH, generator=g) * t if two_time else t
        T, R = (1000 * t)[:, None], (1000 * r)[:, None]
        loss = (model(z, T, R, None) - exact(z, T, T, None)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


_TEXT = torch.zeros(1, 1, 1)
_S1CFG = FlowMapObjectiveConfig(guidance=1.0, text_dropout=0.0, kernel_backend="torch")


def _stage1(model, gd, time_gen, noise_gen):
    x = gd.sample(BATCH, generator=noise_gen)
    loss, _ = stage1_loss(model, x, _TEXT.expand(BATCH, 1, 1), _TEXT, _S1CFG, time_generator=time_gen,
                          noise_generator=noise_gen, global_batch=BATCH, global_offset=0)
    return loss


def _euler_rmse(model, noise, target, n):
    x = FlowMapEulerSampler(n, 5.0)(model, noise, None)
    return (x - target).square().mean().sqrt().item()


def _dist_err(x):
    """RMS distance of the fitted (per-element mean, std) to (mu, s): a distribution error usable for
    stochastic samplers (W2 between the per-element Gaussian fits, divided by sqrt(D))."""
    m, sd = x.mean(0), x.std(0)
    return math.sqrt((((m - MU) ** 2).sum() + ((sd - S) ** 2).sum()).item() / D)


@torch.no_grad()
def _consistency_sample(model, noise, n, seed=7):
    """N-step consistency sampler: ``x0 = f(z, t_i, 0)``, re-noise to ``t_{i+1}`` with fresh noise."""
    g = torch.Generator().manual_seed(seed)
    times = flow_map_time_grid(n, 5.0).tolist()
    z, b = noise, noise.shape[0]
    for i in range(n):
        x0 = z - times[i] * model(z, to_model_scale(times[i]).expand(b, 1), torch.zeros(b, 1), None)
        if i < n - 1:
            z = (1 - times[i + 1]) * x0 + times[i + 1] * torch.randn(z.shape, generator=g)
    return x0


def _evaluate(model, noise, target):
    with torch.no_grad():
        return {
            "euler_rmse": {n: _euler_rmse(model, noise, target, n) for n in EVAL_STEPS},
            "euler_dist": {n: _dist_err(FlowMapEulerSampler(n, 5.0)(model, noise, None)) for n in EVAL_STEPS},
            "consistency_dist": {n: _dist_err(_consistency_sample(model, noise, n)) for n in EVAL_STEPS},
        }


def _stage2(gen_start, fake_start, gd, exact, simulation, iters, seed):
    gen, fake = copy.deepcopy(gen_start), copy.deepcopy(fake_start)
    cfg = DistillConfig(real_guidance=0.0, simulation=simulation, cotrain_stage1=True)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=cfg.betas)
    opt_c = torch.optim.Adam(fake.parameters(), lr=3e-3, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_g, lambda i: max(0.0, 1.0 - i / iters))
    gens = [torch.Generator().manual_seed(100 * seed + i) for i in range(6)]
    plan_g, tau_g, noise_g, critic_g, s1_time_g, s1_noise_g = gens

    def critic_step():
        plan = sample_simulation_plan(plan_g, cfg)
        noise = torch.randn(BATCH, *SHAPE, generator=noise_g)
        with torch.no_grad():
            x0, _ = backward_simulation(gen, noise, None, plan, cfg, generator=noise_g)
        loss, _ = critic_loss(fake, x0, None, critic_g, cfg)
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()

    for _ in range(50):  # critic warm-up on the starting generator's samples
        critic_step()
    for _ in range(iters):
        plan = sample_simulation_plan(plan_g, cfg)
        noise = torch.randn(BATCH, *SHAPE, generator=noise_g)
        s1 = _stage1(gen, gd, s1_time_g, s1_noise_g)
        loss, _ = generator_loss(gen, exact, fake, noise, None, None, plan, cfg, tau_generator=tau_g,
                                 rollout_generator=noise_g, stage1=s1)
        opt_g.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.clip_grad)
        opt_g.step()
        sched.step()
        for _ in range(cfg.critic_updates_per_generator):
            critic_step()
    return gen


@pytest.fixture(scope="module")
def experiment():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster and immune to other processes' load
    try:
        return _run_experiment()
    finally:
        torch.set_num_threads(threads)


def _run_experiment():
    torch.manual_seed(0)
    t0 = time.time()
    gd = GaussianData(MU, S)
    exact = gd.exact_model()
    noise = torch.randn(4096, *SHAPE, generator=torch.Generator().manual_seed(123))
    target = gd.flow_map(noise, 1.0, 0.0)

    gen_start = AffineFlowMap(seed=0)
    _fit_teacher(gen_start, exact, 200, seed=0, two_time=True)
    opt = torch.optim.Adam(gen_start.parameters(), lr=1e-3, betas=(0.0, 0.999))
    tg, ng = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for _ in range(100):
        loss = _stage1(gen_start, gd, tg, ng)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fake_start = AffineVelocity(seed=1)
    _fit_teacher(fake_start, exact, 200, seed=3, two_time=False)

    RESULTS["start"] = _evaluate(gen_start, noise, target)
    for sim in ("flow_map", "consistency"):
        t1 = time.time()
        gen = _stage2(gen_start, fake_start, gd, exact, sim, ITERS, SEED)
        RESULTS[sim] = _evaluate(gen, noise, target)
        RESULTS[sim]["seconds"] = time.time() - t1
    RESULTS["seconds"] = time.time() - t0

    fmt = lambda d: "  ".join(f"{n}:{v:.4f}" for n, v in d.items())  # noqa: E731
    print(f"\nGaussian stage 2 (seed {SEED}, {ITERS} iterations, {RESULTS['seconds']:.1f} s)")
    for name in ("start", "flow_map", "consistency"):
        for metric in ("euler_rmse", "euler_dist", "consistency_dist"):
            print(f"  {name:12s} {metric:17s} {fmt(RESULTS[name][metric])}")
    return RESULTS


def test_stage2_reduces_few_step_error(experiment):
    before, after = experiment["start"]["euler_rmse"], experiment["flow_map"]["euler_rmse"]
    for n in (1, 2):
        assert after[n] < 0.6 * before[n], (
            f"{n}-step RMSE vs the exact flow map did not decrease enough: before {before[n]:.4f}, after "
            f"{after[n]:.4f} (seen: 0.247 -> 0.023..0.054 at 1 step, 0.252 -> 0.023..0.057 at 2)")
    for n in (4, 8, 16):
        assert after[n] < before[n], f"{n}-step RMSE {after[n]:.4f} not below the stage-1 start {before[n]:.4f}"


def test_flow_map_simulation_beats_consistency_at_few_steps(experiment):
    fm, cs = experiment["flow_map"]["euler_rmse"], experiment["consistency"]["euler_rmse"]
    for n in (1, 4):
        assert fm[n] < cs[n], (
            f"{n} steps: flow-map-trained {fm[n]:.4f} vs consistency-trained {cs[n]:.4f} (Euler sampling; "
            f"all: flow-map {fm}, consistency {cs})")


def test_consistency_sampler_degrades_with_more_steps(experiment):
    cons = experiment["consistency"]
    d = cons["consistency_dist"]
    assert d[16] > 1.2 * d[4], (
        f"consistency-trained generator, consistency sampler: distribution error 16 steps {d[16]:.4f} vs "
        f"4 steps {d[4]:.4f} (seen 0.129-0.174 vs 0.067-0.101)")
    assert cons["euler_dist"][16] < d[16], (
        f"Euler sampling of the same model at 16 steps ({cons['euler_dist'][16]:.4f}) should beat its "
        f"consistency sampler ({d[16]:.4f})")
