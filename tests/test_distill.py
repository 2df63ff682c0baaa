"""Stage-2 building blocks (megatron_anyflow.anyflow.distill): rollouts, DMD, critic, plans, config."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from megatron_anyflow.anyflow.distill import (
    DistillConfig,
    FrameCondition,
    SimulationPlan,
    backward_simulation,
    consistency_backward_simulation,
    critic_loss,
    dmd_loss,
    flow_map_backward_simulation,
    generator_loss,
    real_score_velocity,
    sample_simulation_plan,
)
from megatron_anyflow.anyflow.gaussian import GaussianData
from megatron_anyflow.anyflow.timesteps import flow_map_time_grid, logit_normal_t

SHAPE = (2, 2, 3, 3)  # [f, c, h, w]


def _gauss():
    mu = torch.linspace(-1.0, 1.0, math.prod(SHAPE), dtype=torch.float64).reshape(SHAPE)
    return GaussianData(mu, 0.6)


class Counting:
    """Wraps a model callable; records each call's (T, R) and counts calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, z, T, R, text):
        assert T.dtype == torch.float32 and R.dtype == torch.float32
        assert T.shape == z.shape[:2] and R.shape == z.shape[:2]
        self.calls.append((T[0, 0].item(), R[0, 0].item()))
        return self.fn(z, T, R, text)


class TinyFlowMap(nn.Module):
    """``u = a(t, r) * z + b(t, r)`` with ``a, b`` from a 2-layer MLP of ``(t, r)`` (per sample, frame)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(2, 16)
        self.l2 = nn.Linear(16, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, z, T, R, text=None):
        h = self.l2(torch.tanh(self.l1(torch.stack([T / 1000.0, R / 1000.0], dim=-1))))  # [b, f, 2]
        a, b = h[..., 0], h[..., 1]
        return a[..., None, None, None] * z + b[..., None, None, None]


# --------------------------------------------------------------------------------------------------
# flow-map backward simulation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [2, 4, 8, 16, 50])
def test_flow_map_rollout_is_exact_for_every_plan(N):
    gd = _gauss()
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(N), dtype=torch.float64)
    expect = gd.flow_map(noise, 1.0, 0.0)
    noise32 = noise.to(torch.float32)
    times = flow_map_time_grid(N, 5.0).tolist()
    for k in range(N):
        plan = SimulationPlan.make(N, k)
        model = Counting(gd.exact_model())
        x0, info = flow_map_backward_simulation(model, noise, None, plan)
        assert x0.dtype == torch.float64
        # float32 model times (1000 t rounded) are the only error: ~1e-7 relative
        torch.testing.assert_close(x0, expect, rtol=0, atol=2e-6)
        x32, _ = flow_map_backward_simulation(gd.exact_model(), noise32, None, plan)
        torch.testing.assert_close(x32, expect.to(torch.float32), rtol=0, atol=1e-5)
        n_calls = 3 - (k == 0) - (k == N - 1)
        assert len(model.calls) == n_calls == info["calls"], (N, k)
        # the three segments: 1 -> t_k (if k > 0), t_k -> t_k+1, t_k+1 -> 0 (if k < N - 1)
        expect_calls = ([(1.0, times[k])] if k > 0 else []) + [(times[k], times[k + 1])]
        expect_calls += [(times[k + 1], 0.0)] if k < N - 1 else []
        got = [x / 1000.0 for call in model.calls for x in call]
        assert got == pytest.approx([x for call in expect_calls for x in call], abs=1e-6)
        assert (info["N"], info["k"]) == (N, k)


def test_one_step_plan():
    gd = _gauss()
    noise = torch.randn(2, *SHAPE, dtype=torch.float64)
    model = Counting(gd.exact_model())
    x0, info = flow_map_backward_simulation(model, noise, None, SimulationPlan.make(1, 0))
    assert info["calls"] == 1 and len(model.calls) == 1
    torch.testing.assert_close(x0, gd.flow_map(noise, 1.0, 0.0), rtol=0, atol=2e-6)


class Probed:
    """Multiplies the i-th call's output by a probe scalar s_i = 1 (requires grad): after backward,
    ``s_i.grad`` tells whether (and how much) call i's output received gradient."""

    def __init__(self, model):
        self.model, self.probes = model, []

    def __call__(self, z, T, R, text):
        s = torch.ones((), requires_grad=True)
        self.probes.append(s)
        return self.model(z, T, R, text) * s


def _manual_rollout(model, noise, plan, detach_first):
    t = plan.times.tolist()
    k, N = plan.k, plan.N
    b, f = noise.shape[:2]
    full = lambda x: torch.full((b, f), 1000.0 * x, dtype=torch.float32)  # noqa: E731
    z = noise
    if k > 0:
        z = z - (1.0 - t[k]) * model(z, full(1.0), full(t[k]), None)
        if detach_first:
            z = z.detach()
    z = z - (t[k] - t[k + 1]) * model(z, full(t[k]), full(t[k + 1]), None)
    if k < N - 1:
        z = z - t[k + 1] * model(z, full(t[k + 1]), full(0.0), None)
    return z


def test_grad_through_options():
    net = TinyFlowMap()
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    plan = SimulationPlan.make(8, 3)
    w = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))

    grads = {}
    for mode in ("chain", "no_grad_prefix"):
        probed = Probed(net)
        x0, info = flow_map_backward_simulation(probed, noise, None, plan, grad_through=mode)
        net.zero_grad()
        (x0 * w).sum().backward()
        g = [s.grad for s in probed.probes]
        assert len(g) == 3
        if mode == "chain":
            assert all(x is not None and x.abs() > 0 for x in g)
            assert [seg[2] for seg in info["segments"]] == [True, True, True]
        else:
            assert g[0] is None  # the first segment is outside the graph
            assert g[1] is not None and g[1].abs() > 0 and g[2] is not None and g[2].abs() > 0
            assert [seg[2] for seg in info["segments"]] == [False, True, True]
        grads[mode] = [p.grad.clone() for p in net.parameters()]
    # each option equals a hand-written rollout (with / without detaching the first segment's output)
    for mode, detach in (("chain", False), ("no_grad_prefix", True)):
        net.zero_grad()
        ref = _manual_rollout(net, noise, plan, detach_first=detach)
        (ref * w).sum().backward()
        for p, g in zip(net.parameters(), grads[mode]):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)
    # and the two differ (the first segment's parameter gradient)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(grads["chain"], grads["no_grad_prefix"]))


def test_rollout_runs_under_outer_no_grad():
    net = TinyFlowMap()
    with torch.no_grad():
        x0, info = flow_map_backward_simulation(net, torch.randn(1, *SHAPE), None, SimulationPlan.make(4, 1))
    assert not x0.requires_grad and [s[2] for s in info["segments"]] == [False, False, False]


# --------------------------------------------------------------------------------------------------
# consistency backward simulation
# --------------------------------------------------------------------------------------------------
def test_consistency_rollout_calls_shape_determinism():
    gd = _gauss()
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    for N, k in ((4, 0), (4, 3), (8, 5), (50, 17)):
        plan = SimulationPlan.make(N, k)
        model = Counting(gd.exact_model())
        x0, info = consistency_backward_simulation(model, noise, None, plan, torch.Generator().manual_seed(5))
        assert x0.shape == noise.shape and x0.dtype == noise.dtype
        assert len(model.calls) == k + 1 == info["calls"]
        times = plan.times.tolist()
        assert [c[0] / 1000.0 for c in model.calls] == pytest.approx(times[:k + 1], abs=1e-6)
        assert all(c[1] == 0.0 for c in model.calls)
        again, _ = consistency_backward_simulation(gd.exact_model(), noise, None, plan,
                                                   torch.Generator().manual_seed(5))
        torch.testing.assert_close(x0, again, rtol=0, atol=0)
    # k = 0: the exact one-jump flow map
    x0, _ = consistency_backward_simulation(gd.exact_model(), noise.double(), None, SimulationPlan.make(4, 0))
    torch.testing.assert_close(x0, gd.flow_map(noise.double(), 1.0, 0.0), rtol=0, atol=2e-6)


def test_consistency_rollout_re_noises_with_generator_draws():
    """Step k's input is (1 - t_k) x0_hat_{k-1} + t_k eps_{k-1}, eps drawn from the generator in order."""
    gd = _gauss()
    noise = torch.randn(2, *SHAPE, dtype=torch.float64)
    plan = SimulationPlan.make(8, 2)
    t = plan.times.tolist()
    g = torch.Generator().manual_seed(9)
    x0, _ = consistency_backward_simulation(gd.exact_model(), noise, None, plan, g)
    g2 = torch.Generator().manual_seed(9)
    z = noise
    for i in range(2):
        xh = gd.flow_map(z, t[i], 0.0)
        z = (1 - t[i + 1]) * xh + t[i + 1] * torch.randn(noise.shape, generator=g2).double()
    torch.testing.assert_close(x0, gd.flow_map(z, t[2], 0.0), rtol=0, atol=2e-6)


def test_consistency_rollout_gradient_only_at_step_k():
    net = TinyFlowMap()
    probed = Probed(net)
    x0, _ = consistency_backward_simulation(probed, torch.randn(2, *SHAPE), None, SimulationPlan.make(8, 3),
                                            torch.Generator().manual_seed(0))
    x0.sum().backward()
    assert [s.grad is not None for s in probed.probes] == [False, False, False, True]


def test_consistency_rollout_exact_model_gives_data_distribution():
    """With the exact flow map, x0_hat at any step k is a sample of the data distribution."""
    gd = GaussianData(0.7, 0.4, shape=(1, 1, 1, 2))
    noise = torch.randn(20000, 1, 1, 1, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0, _ = consistency_backward_simulation(gd.exact_model(), noise, None, SimulationPlan.make(16, 9),
                                            torch.Generator().manual_seed(1))
    assert abs(x0.mean().item() - 0.7) < 0.01 and abs(x0.std().item() - 0.4) < 0.01


# --------------------------------------------------------------------------------------------------
# plans and config
# --------------------------------------------------------------------------------------------------
def test_sample_simulation_plan():
    cfg = DistillConfig()
    seen = {}
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        p = sample_simulation_plan(g, cfg)
        assert p.N in cfg.num_steps_choices and 0 <= p.k < p.N
        torch.testing.assert_close(p.times, flow_map_time_grid(p.N, 5.0), rtol=0, atol=0)
        seen.setdefault(p.N, set()).add(p.k)
    assert set(seen) == set(cfg.num_steps_choices)
    assert seen[2] == {0, 1} and seen[4] == {0, 1, 2, 3} and len(seen[8]) == 8
    a = [sample_simulation_plan(torch.Generator().manual_seed(3), cfg) for _ in range(2)]
    assert (a[0].N, a[0].k) == (a[1].N, a[1].k)


def test_config_defaults_and_errors():
    cfg = DistillConfig()
    assert cfg.num_steps_choices == (2, 4, 8, 16, 50) and cfg.shift == 5.0 and cfg.real_guidance == 3.0
    assert cfg.real_guidance_convention == "dmd" and cfg.simulation == "flow_map" and cfg.grad_through == "chain"
    assert cfg.betas == (0.0, 0.999) and cfg.generator_lr == 2e-6 and cfg.critic_lr == 2e-6
    assert cfg.ema_decay == 0.99 and cfg.ema_start == 200 and cfg.clip_grad == 1.0
    assert cfg.critic_updates_per_generator == 1 and cfg.cotrain_stage1
    assert not cfg.guidance_is_identity
    assert DistillConfig(real_guidance=0.0).guidance_is_identity
    assert DistillConfig(real_guidance=1.0, real_guidance_convention="cfg").guidance_is_identity
    for bad, match in ((dict(num_steps_choices=()), "num_steps_choices"), (dict(num_steps_choices=(0,)), "num_steps"),
                       (dict(shift=0), "shift"), (dict(simulation="x"), "simulation"),
                       (dict(grad_through="middle"), "no_grad_prefix"), (dict(real_guidance=math.nan), "finite"),
                       (dict(real_guidance_convention="x"), "convention"), (dict(betas=(0.9, 1.0)), "betas"),
                       (dict(ema_decay=1.5), "ema_decay"), (dict(critic_updates_per_generator=0), "critic_updates")):
        with pytest.raises(ValueError, match=match):
            DistillConfig(**bad)
    with pytest.raises(ValueError, match="k must be"):
        SimulationPlan.make(4, 4)
    with pytest.raises(ValueError, match="noise"):
        flow_map_backward_simulation(TinyFlowMap(), torch.randn(2, 3), None, SimulationPlan.make(2, 0))
    with pytest.raises(ValueError, match="grad_through"):
        flow_map_backward_simulation(TinyFlowMap(), torch.randn(1, *SHAPE), None, SimulationPlan.make(2, 0), "x")
    with pytest.raises(ValueError, match="generator returned shape"):
        flow_map_backward_simulation(lambda z, t, r, c: z[:, :1], torch.randn(1, *SHAPE), None,
                                     SimulationPlan.make(2, 0))


# --------------------------------------------------------------------------------------------------
# DMD
# --------------------------------------------------------------------------------------------------
def _score(a, b, c):
    """A deterministic single-time score with a text dependence: v = a z + b t + c * mean(text)."""

    def fn(z, T, R, text):
        assert torch.equal(T, R)
        t = (T / 1000.0)[..., None, None, None].to(z.dtype)
        m = 0.0 if text is None else text.mean(dim=(1, 2)).to(z.dtype)[:, None, None, None, None]
        return a * z + b * t * torch.cos(z) + c * m

    return fn


def _dmd_reference(x0, real, fake, text, neg, seed, cfg):
    """Independent float64 implementation from the formulas (same draws from a re-seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    b, f = x0.shape[:2]
    u = torch.rand((b,), generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float32)
    s = cfg.dmd_tau_shift
    tau = s * u / (1 + (s - 1) * u)
    t5 = tau.to(torch.float32).view(b, 1, 1, 1, 1)
    z = ((1 - t5) * x0.detach().float() + t5 * eps).to(x0.dtype)
    T = (tau * 1000).to(torch.float32)[:, None].expand(b, f)
    vc, vu, vf = (m(z, T, T, c).double() for m, c in ((real, text), (real, neg), (fake, text)))
    g_ = cfg.real_guidance
    vr = vc + g_ * (vc - vu) if cfg.real_guidance_convention == "dmd" else vu + g_ * (vc - vu)
    t6 = tau.view(b, 1, 1, 1, 1)
    x_real, x_fake = z.double() - t6 * vr, z.double() - t6 * vf
    norm = (x0.detach().double() - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    grad = torch.nan_to_num((x_fake - x_real) / norm)
    loss = ((x0.detach().double() - (x0.detach().double() - grad)) ** 2).mean()
    return loss, grad, tau


@pytest.mark.parametrize("convention", ["dmd", "cfg"])
def test_dmd_loss_value_and_gradient(convention):
    cfg = DistillConfig(real_guidance=3.0, real_guidance_convention=convention)
    x0 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    text = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(2)).expand(3, 4, 5)
    real, fake = _score(0.9, 0.3, 0.5), _score(0.7, -0.2, 0.1)
    loss, info = dmd_loss(x0, real, fake, text, neg, torch.Generator().manual_seed(7), cfg)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    ref_loss, ref_grad, ref_tau = _dmd_reference(x0, real, fake, text, neg, 7, cfg)
    torch.testing.assert_close(info["tau"], ref_tau, rtol=0, atol=0)
    torch.testing.assert_close(info["grad"], ref_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    (dx,) = torch.autograd.grad(loss, x0)
    # d/dx0 mean((x0 - sg(x0 - grad))^2) = 2 grad / numel
    torch.testing.assert_close(dx.double(), 2 * ref_grad / x0.numel(), rtol=1e-6, atol=1e-12)
    assert info["normalizer"].shape == (3,)


def test_dmd_guidance_conventions():
    """'dmd' with g is 'cfg' with g + 1; the DMD form cond + 3 (cond - uncond) is dmd g = 3."""
    z = torch.randn(2, *SHAPE)
    T = torch.full((2, SHAPE[0]), 400.0)
    text, neg = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    real = _score(0.9, 0.3, 0.5)
    v_dmd = real_score_velocity(real, z, T, text, neg, DistillConfig(real_guidance=3.0))
    v_cfg = real_score_velocity(real, z, T, text, neg, DistillConfig(real_guidance=4.0, real_guidance_convention="cfg"))
    torch.testing.assert_close(v_dmd, v_cfg, rtol=1e-12, atol=1e-12)
    vc, vu = real(z, T, T, text).double(), real(z, T, T, neg).double()
    torch.testing.assert_close(v_dmd, vc + 3 * (vc - vu), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="negative_text"):
        real_score_velocity(real, z, T, text, None, DistillConfig())
    calls = Counting(real)
    real_score_velocity(calls, z, T, text, None, DistillConfig(real_guidance=0.0))
    assert len(calls.calls) == 1


def test_dmd_zero_when_real_equals_fake():
    """Same callable for both scores (text-independent, so guidance is a no-op): grad == 0 exactly and the
    generator's parameter gradient through a full rollout is exactly zero."""
    net = TinyFlowMap()
    score = _score(0.8, 0.4, 0.0)
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    x0, _ = flow_map_backward_simulation(net, noise, None, SimulationPlan.make(8, 3))
    text, neg = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    loss, info = dmd_loss(x0, score, score, text, neg, torch.Generator().manual_seed(0), DistillConfig())
    assert torch.count_nonzero(info["grad"]) == 0 and loss.item() == 0.0
    net.zero_grad()
    loss.backward()
    for p in net.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_dmd_exact_scores_descend_toward_data():
    """Real = exact teacher, fake = exact score of the generator's (shifted) distribution: -grad points
    from the generated sample toward the data on average (the sign of eq. 5)."""
    gd = GaussianData(0.0, 1.0, shape=SHAPE)
    gen_dist = GaussianData(1.5, 1.0, shape=SHAPE)
    x0 = gen_dist.sample(256, generator=torch.Generator().manual_seed(0))
    real = lambda z, T, R, c: gd.velocity(z, T.double() / 1000)  # noqa: E731
    fake = lambda z, T, R, c: gen_dist.velocity(z, T.double() / 1000)  # noqa: E731
    _, info = dmd_loss(x0, real, fake, None, None, torch.Generator().manual_seed(1), DistillConfig(real_guidance=0.0))
    assert info["grad"].mean() > 0.1  # gradient descent moves x0 by -grad: toward mean 0


# --------------------------------------------------------------------------------------------------
# critic and generator loss
# --------------------------------------------------------------------------------------------------
def test_critic_loss_matches_formula():
    cfg = DistillConfig(critic_time_shift=3.0)
    x0 = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    fake_net = TinyFlowMap(seed=2)
    fake = lambda z, T, R, c: fake_net(z, T, R, c)  # noqa: E731
    loss, info = critic_loss(fake, x0.requires_grad_(True), None, torch.Generator().manual_seed(4), cfg)
    g = torch.Generator().manual_seed(4)
    t = logit_normal_t(4, g, shift=3.0)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float32)
    torch.testing.assert_close(info["t"], t, rtol=0, atol=0)
    tt = t.view(4, 1, 1, 1, 1)
    z = (1 - tt) * x0.detach() + tt * eps
    T = (t.double() * 1000).float()[:, None].expand(4, SHAPE[0])
    v = fake_net(z, T, T, None).double()
    ref = ((v - (eps.double() - x0.detach().double())) ** 2).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    loss.backward()
    assert x0.grad is None  # x0 is detached inside
    assert all(p.grad is not None for p in fake_net.parameters())


def test_generator_loss_combines_and_checks():
    gd = _gauss()
    net = TinyFlowMap()
    cfg = DistillConfig(real_guidance=0.0)
    noise = torch.randn(2, *SHAPE)
    real = _score(0.9, 0.3, 0.0)
    fake = _score(0.7, 0.1, 0.0)
    plan = SimulationPlan.make(4, 2)
    stage1 = torch.tensor(0.25, requires_grad=True)
    loss, info = generator_loss(net, real, fake, noise, None, None, plan, cfg,
                                tau_generator=torch.Generator().manual_seed(0), stage1=stage1)
    x0, _ = flow_map_backward_simulation(net, noise, None, plan)
    dmd, _ = dmd_loss(x0, real, fake, None, None, torch.Generator().manual_seed(0), cfg)
    torch.testing.assert_close(loss, dmd + 0.25, rtol=1e-12, atol=0)
    torch.testing.assert_close(info["dmd_loss"], dmd.detach(), rtol=1e-12, atol=0)
    loss.backward()
    assert stage1.grad == 1.0
    with pytest.raises(ValueError, match="cotrain_stage1"):
        generator_loss(net, real, fake, noise, None, None, plan, DistillConfig(real_guidance=0.0, cotrain_stage1=False),
                       stage1=stage1)
    # consistency dispatch through backward_simulation
    ccfg = DistillConfig(real_guidance=0.0, simulation="consistency")
    m = Counting(gd.exact_model())
    backward_simulation(m, noise.double(), None, plan, ccfg, generator=torch.Generator().manual_seed(0))
    assert len(m.calls) == plan.k + 1


# --------------------------------------------------------------------------------------------------
# image-to-video condition frames (FrameCondition, Wan2.2 TI2V)
# --------------------------------------------------------------------------------------------------
MASK = torch.tensor([[True, False], [False, False], [True, False]])  # frame 0 of samples 0 and 2 held clean


def _condition(dtype=torch.float32, seed=5):
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return FrameCondition(x, MASK.clone())


@pytest.mark.parametrize("simulation", ["flow_map", "consistency"])
def test_conditioned_rollout_of_the_exact_gaussian_map(simulation):
    """Gaussian closed form: with the exact flow map (elementwise, so frames are independent) every plan's
    conditioned rollout returns the condition frames exactly and the other frames at the exact ODE map
    ``f(noise, 1, 0)``; the generator sees T = 0 on the condition frames and R the segment's r."""
    gd = _gauss()
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expect = gd.flow_map(noise, 1.0, 0.0)
    cond = _condition(torch.float64)
    seen = []

    def model(z, T, R, text):
        seen.append((T.clone(), R.clone(), z[MASK].clone()))
        return gd.exact_model()(z, T, R, text)

    cfg = DistillConfig(simulation=simulation)
    for k in range(4):
        x0, _ = backward_simulation(model, noise, None, SimulationPlan.make(4, k), cfg,
                                    generator=torch.Generator().manual_seed(2), condition=cond)
        assert torch.equal(x0[MASK], cond.latents[MASK])
        if simulation == "flow_map":  # float32 model times are the only error (as the unconditioned test)
            torch.testing.assert_close(x0[~MASK], expect[~MASK], rtol=0, atol=2e-6)
    for T, R, z_cond in seen:
        assert torch.all(T[MASK] == 0) and torch.all(T[~MASK] > 0)
        assert torch.equal(R[MASK], R[~MASK][:2])  # R: the segment's r on every frame
        assert torch.equal(z_cond, cond.latents[MASK])  # the input holds the clean latents


def test_conditioned_rollout_gradient_skips_the_condition_frames():
    """The condition frames of x0 are constants (no graph to the generator); the others keep theirs, and
    without a condition the rollout is bitwise the unconditioned one."""
    net = TinyFlowMap()
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    cond = _condition()
    plan = SimulationPlan.make(4, 1)
    x0, _ = flow_map_backward_simulation(net, noise, None, plan, condition=cond)
    held = torch.autograd.grad(x0[MASK].sum(), list(net.parameters()), allow_unused=True, retain_graph=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in held)
    grads = torch.autograd.grad(x0[~MASK].sum(), list(net.parameters()))
    assert all(torch.count_nonzero(g) > 0 for g in grads)
    a, _ = flow_map_backward_simulation(net, noise, None, plan)
    b, _ = flow_map_backward_simulation(net, noise, None, plan, condition=None)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="condition mask must be bool"):
        flow_map_backward_simulation(net, noise, None, plan, condition=FrameCondition(cond.latents, MASK[:, :1]))
    with pytest.raises(ValueError, match="condition latents"):
        flow_map_backward_simulation(net, noise, None, plan, condition=FrameCondition(cond.latents[:2], MASK))

    class Causal:
        def causal_rollout(self, *a):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="no frame condition"):
        backward_simulation(Causal(), noise, None, plan, DistillConfig(), condition=cond)


def test_conditioned_dmd_matches_float64_reference():
    """DMD with condition frames: tau = 0 (z = x0, T = R = 0) there, grad 0 there, the normaliser and the loss
    per-sample means over the other frames (float64 reference written from those rules)."""
    cfg = DistillConfig(real_guidance=3.0)
    cond = _condition()
    x0 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    x0 = torch.where(MASK[..., None, None, None], cond.latents, x0).requires_grad_(True)  # as the rollout returns
    text = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1))
    neg = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(2)).expand(3, 4, 5)
    real, fake = _score(0.9, 0.3, 0.5), _score(0.7, -0.2, 0.1)
    loss, info = dmd_loss(x0, real, fake, text, neg, torch.Generator().manual_seed(7), cfg, condition=cond)

    g = torch.Generator().manual_seed(7)
    b, f = 3, SHAPE[0]
    u = torch.rand((b,), generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float32)
    tau = 5 * u / (1 + 4 * u)
    tau_f = tau[:, None].repeat(1, f)
    tau_f[MASK] = 0.0
    t5 = tau_f.to(torch.float32)[..., None, None, None]
    z = (1 - t5) * x0.detach() + t5 * eps
    assert torch.equal(z[MASK], cond.latents[MASK])
    T = (tau_f * 1000).to(torch.float32)
    vc, vu, vf = (m(z, T, T, c).double() for m, c in ((real, text), (real, neg), (fake, text)))
    vr = vc + 3.0 * (vc - vu)
    t6 = tau_f[..., None, None, None]
    x_real, x_fake = z.double() - t6 * vr, z.double() - t6 * vf
    keep = (~MASK).double()
    n_el = math.prod(SHAPE[1:])
    diff = (x0.detach().double() - x_real).abs().reshape(b, f, -1).sum(2)
    norm = (diff * keep).sum(1) / (keep.sum(1) * n_el)
    grad = torch.nan_to_num((x_fake - x_real) / norm[:, None, None, None, None]) * keep[..., None, None, None]
    per = (grad.square().reshape(b, f, -1).sum(2) * keep).sum(1) / (keep.sum(1) * n_el)
    torch.testing.assert_close(info["grad"], grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, per.mean(), rtol=1e-12, atol=0)
    assert torch.count_nonzero(info["grad"][MASK]) == 0 and torch.count_nonzero(info["grad"][~MASK]) > 0
    (dx,) = torch.autograd.grad(loss, x0)
    # d/dx0 of mean_i [sum_e(kept) grad^2 / n_i]: 2 grad / (b n_i), n_i the sample's kept elements
    torch.testing.assert_close(dx.double(), 2 * grad / (b * keep.sum(1) * n_el)[:, None, None, None, None],
                               rtol=1e-6, atol=1e-12)


def test_conditioned_critic_matches_formula():
    cfg = DistillConfig(critic_time_shift=3.0)
    cond = _condition()
    x0 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    fake_net = TinyFlowMap(seed=2)
    loss, info = critic_loss(fake_net, x0, None, torch.Generator().manual_seed(4), cfg, condition=cond)
    g = torch.Generator().manual_seed(4)
    t = logit_normal_t(3, g, shift=3.0)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float32)
    xc = torch.where(MASK[..., None, None, None], cond.latents, x0)  # condition frames: the clean latents
    tf = t[:, None].repeat(1, SHAPE[0])
    tf[MASK] = 0.0
    tt = tf[..., None, None, None]
    z = (1 - tt) * xc + tt * eps
    T = (tf.double() * 1000).float()
    v = fake_net(z, T, T, None).double()
    keep = (~MASK).double()
    per = ((v - (eps.double() - xc.double())) ** 2).mean(dim=(2, 3, 4))
    ref = ((per * keep).sum(1) / keep.sum(1)).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
