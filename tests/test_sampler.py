"""Samplers vs diffusers' FlowMapEulerDiscreteScheduler, and the Gaussian closed-form ground truth."""
import pytest
import torch

from megatron_anyflow.anyflow.gaussian import GaussianData
from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler, TeacherEulerSampler
from megatron_anyflow.anyflow.timesteps import flow_map_time_grid, to_model_scale

SHAPE = (3, 2, 4, 4)  # [f, c, h, w]


def _gauss(seed=0, s=0.5):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    return GaussianData(mu, s)


def _noise(b=4, seed=1, dtype=torch.float64):
    return torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _toy_model(z, t, r, text):
    """Deterministic nonlinear stand-in for a network (depends on z, t, r and text)."""
    assert t.dtype == torch.float32 and r.dtype == torch.float32
    assert t.shape == z.shape[:2] and r.shape == z.shape[:2]
    tt = t.to(z.dtype)[..., None, None, None] / 1000.0
    rr = r.to(z.dtype)[..., None, None, None] / 1000.0
    out = torch.tanh(z) * (1.0 + tt) - 0.3 * rr * z + 0.1 * torch.sin(3.0 * tt)
    if text is not None:
        out = out + text.to(z.dtype).mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    return out


# ---------------------------------------------------------------- diffusers scheduler grid
def _diffusers_scheduler(shift):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_flow_map_euler_discrete import FlowMapEulerDiscreteScheduler

    return FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 32, 50])
def test_grid_matches_diffusers(n):
    sched = _diffusers_scheduler(5.0)
    sched.set_timesteps(n, device="cpu")
    grid = flow_map_time_grid(n, 5.0)
    # diffusers: sigmas = [shift(linspace(1, 0, n + 1)[:-1]), 0] (n + 1 values in [0, 1], float64);
    # timesteps = sigmas[:-1] * 1000 (n values, the terminal 0 is only the last step's r).
    assert sched.sigmas.shape == grid.shape
    torch.testing.assert_close(grid.float(), sched.sigmas.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(grid, sched.sigmas.double(), rtol=0, atol=1e-12)
    assert sched.timesteps.shape == (n,)
    torch.testing.assert_close(to_model_scale(grid[:-1]), sched.timesteps.float(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_flow_map_sampler_matches_diffusers_step_loop(n):
    """Our rollout == the diffusers AnyFlowPipeline loop: model(t_i, r = sigmas[i+1]) + scheduler.step."""
    sched = _diffusers_scheduler(5.0)
    sched.set_timesteps(n, device="cpu")
    noise = _noise(b=2, dtype=torch.float32)
    text = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(2))

    latents = noise.clone()
    for i, t in enumerate(sched.timesteps):
        r = sched.sigmas[i + 1] * sched.config.num_train_timesteps
        b, f = latents.shape[:2]
        T = t.expand(b).unsqueeze(-1).repeat((1, f)).float()
        R = r.expand(b).unsqueeze(-1).repeat((1, f)).float()
        u = _toy_model(latents, T, R, text)
        latents = sched.step(u, t, latents, return_dict=False)[0]

    ours = FlowMapEulerSampler(n, shift=5.0)(_toy_model, noise, text)
    assert ours.dtype == torch.float32
    # the update is formed in float64 and rounded once, as the scheduler does: bitwise equal
    torch.testing.assert_close(ours, latents, rtol=0, atol=0)


# ---------------------------------------------------------------- FlowMapEulerSampler
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_flow_map_sampler_exact_with_gaussian_model(n):
    data = _gauss()
    noise = _noise()
    exact = data.flow_map(noise, 1.0, 0.0)
    x0 = FlowMapEulerSampler(n)(data.exact_model(), noise, None)
    assert x0.dtype == torch.float64
    torch.testing.assert_close(x0, exact, rtol=0, atol=1e-5)
    x0_32 = FlowMapEulerSampler(n)(data.exact_model(), noise.float(), None)
    assert x0_32.dtype == torch.float32
    torch.testing.assert_close(x0_32.double(), exact, rtol=0, atol=1e-4)


def test_flow_map_sampler_trajectory_on_exact_path():
    data = _gauss()
    noise = _noise()
    sampler = FlowMapEulerSampler(4, shift=5.0)
    x0, states = sampler(data.exact_model(), noise, None, trajectory=True)
    assert len(states) == 5
    assert torch.equal(states[0], noise) and torch.equal(states[-1], x0)
    for tau, z in zip(sampler.times.tolist(), states):
        torch.testing.assert_close(z, data.flow_map(noise, 1.0, tau), rtol=0, atol=1e-5)


def test_flow_map_sampler_feeds_float32_model_scale_times():
    calls = []

    def rec(z, t, r, text):
        calls.append((t.clone(), r.clone()))
        return torch.zeros_like(z)

    noise = _noise(b=2, dtype=torch.bfloat16)
    out = FlowMapEulerSampler(3, shift=5.0)(rec, noise, None)
    assert out.dtype == torch.bfloat16 and torch.equal(out, noise)
    grid = flow_map_time_grid(3, 5.0)
    assert len(calls) == 3
    for i, (t, r) in enumerate(calls):
        assert t.dtype == torch.float32 and r.dtype == torch.float32 and t.shape == (2, SHAPE[0])
        assert bool((t == to_model_scale(grid[i])).all()) and bool((r == to_model_scale(grid[i + 1])).all())


def test_flow_map_sampler_condition_frames():
    data = _gauss()
    noise = _noise(b=2)
    cond = torch.randn(2, 1, *SHAPE[1:], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    seen = []

    def rec(z, t, r, text):
        seen.append((z[:, :1].clone(), t.clone(), r.clone()))
        return data.exact_model()(z, t, r, text)

    grid = flow_map_time_grid(4, 5.0)
    for mode in ("step", "zero"):  # the condition frames' r: the step's (default: reference, diffusers) or 0
        seen.clear()
        x0 = FlowMapEulerSampler(4)(rec, noise, None, condition_frames=cond,
                                    **({} if mode == "step" else {"condition_r": "zero"}))
        assert torch.equal(x0[:, :1], cond)
        assert len(seen) == 4
        for i, (z0, t, r) in enumerate(seen):
            assert torch.equal(z0, cond)
            assert bool((t[:, 0] == 0).all())
            expected_r = to_model_scale(grid[i + 1]) if mode == "step" else 0.0
            assert bool((r[:, 0] == expected_r).all()), (mode, i, r[:, 0])
            assert bool((t[:, 1:] == to_model_scale(grid[i])).all())
        # other frames follow the exact flow map (the Gaussian has independent coordinates)
        torch.testing.assert_close(x0[:, 1:], data.flow_map(noise, 1.0, 0.0)[:, 1:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        FlowMapEulerSampler(2)(rec, noise, None, condition_frames=cond[:, :, :1])
    with pytest.raises(ValueError, match="condition_r"):
        FlowMapEulerSampler(2)(rec, noise, None, condition_frames=cond, condition_r="reference")


def test_sampler_input_errors():
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError):
            FlowMapEulerSampler(bad)
        with pytest.raises(ValueError):
            TeacherEulerSampler(bad)
    with pytest.raises(ValueError):
        FlowMapEulerSampler(4, shift=0.0)
    with pytest.raises(ValueError):
        TeacherEulerSampler(4, guidance_scale=float("nan"))
    with pytest.raises(ValueError):
        FlowMapEulerSampler(2)(_toy_model, torch.zeros(2, 3, 4), None)
    with pytest.raises(ValueError):
        TeacherEulerSampler(2, guidance_scale=3.0)(_toy_model, _noise(b=1), None, None)


# ---------------------------------------------------------------- TeacherEulerSampler
def test_teacher_sampler_converges_with_exact_velocity():
    data = _gauss()
    noise = _noise()
    exact = data.flow_map(noise, 1.0, 0.0)
    model = data.exact_model()
    errs = {}
    for n in (4, 16, 50):
        x0 = TeacherEulerSampler(n, guidance_scale=1.0)(model, noise, None)
        errs[n] = (x0 - exact).abs().max().item()
    assert errs[50] < errs[16] < errs[4]
    assert errs[16] / errs[50] > 2.5  # first-order convergence (50 / 16 = 3.1)
    assert errs[50] < 0.05 * noise.abs().max().item()
    # with CFG and a text-independent model the result is unchanged
    x_cfg = TeacherEulerSampler(16, guidance_scale=3.0)(model, noise, torch.zeros(4, 2, 3), torch.ones(4, 2, 3))
    torch.testing.assert_close(x_cfg, TeacherEulerSampler(16, guidance_scale=1.0)(model, noise, None))


def test_teacher_sampler_cfg_formula_and_calls():
    noise = _noise(b=2, dtype=torch.float32)
    text = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    neg = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    calls = []

    def model(z, t, r, txt):
        calls.append(txt)
        assert torch.equal(t, r) and t.dtype == torch.float32
        return _toy_model(z, t, r, txt)

    g, n = 3.0, 3
    out = TeacherEulerSampler(n, guidance_scale=g)(model, noise, text, neg)
    assert len(calls) == 2 * n
    grid = flow_map_time_grid(n, 5.0).tolist()
    z = noise.clone()
    for i in range(n):
        T = to_model_scale(grid[i]).expand(2, SHAPE[0])
        vc, vu = _toy_model(z, T, T, text), _toy_model(z, T, T, neg)
        z = z - (grid[i] - grid[i + 1]) * (vu + g * (vc - vu))
    torch.testing.assert_close(out, z, rtol=0, atol=1e-6)
    calls.clear()
    TeacherEulerSampler(n, guidance_scale=1.0)(model, noise, text)
    assert len(calls) == n and all(c is text for c in calls)


# ---------------------------------------------------------------- GaussianData ground truth
def test_gaussian_velocity_is_derivative_of_flow_map():
    data = _gauss()
    z = _noise()
    h = 1e-5
    for t in (0.05, 0.3, 0.7, 0.95):
        fd = (data.flow_map(z, t, t + h) - data.flow_map(z, t, t - h)) / (2 * h)
        torch.testing.assert_close(data.velocity(z, t), fd, rtol=1e-6, atol=1e-6)


def test_gaussian_velocity_closed_form_checks():
    data = _gauss()
    z = _noise()
    # t = 1: E[eps - x | z_1 = z] = z - mu;  t = 0: E[eps - x | x = z] = -z
    torch.testing.assert_close(data.velocity(z, 1.0), z - data.mu)
    torch.testing.assert_close(data.velocity(z, 0.0), -z)
    # x0-prediction equals the Gaussian posterior mean mu + (1-t) s^2 / sd_t^2 (z - m_t)
    s = data.s
    for t in (0.2, 0.6, 0.9):
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        post = data.mu + (1 - t) * s ** 2 / var * (z - (1 - t) * data.mu)
        torch.testing.assert_close(data.x0_prediction(z, t), post, rtol=1e-12, atol=1e-12)


def test_gaussian_flow_map_identity_and_composition():
    data = _gauss()
    z = _noise()
    for t in (1.0, 0.6, 0.0):
        torch.testing.assert_close(data.flow_map(z, t, t), z, rtol=0, atol=1e-14)
    for t, r, q in ((1.0, 0.5, 0.0), (0.9, 0.4, 0.1), (0.7, 0.69, 0.2)):
        torch.testing.assert_close(data.flow_map(data.flow_map(z, t, r), r, q), data.flow_map(z, t, q),
                                   rtol=0, atol=1e-12)


def test_gaussian_endpoint_statistics():
    data = _gauss(s=0.7)
    eps = torch.randn((20000, *SHAPE), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = data.flow_map(eps, 1.0, 0.0)
    assert (x.mean(0) - data.mu).abs().max().item() < 0.04
    assert abs(x.std(0).mean().item() - 0.7) < 0.01
    # and sample() draws from the same law
    xs = data.sample(20000, torch.Generator().manual_seed(10), dtype=torch.float64)
    assert xs.shape == (20000, *SHAPE)
    assert (xs.mean(0) - data.mu).abs().max().item() < 0.04
    assert abs(xs.std(0).mean().item() - 0.7) < 0.01


def test_gaussian_euler_integration_matches_flow_map():
    data = _gauss()
    z = _noise()
    exact = data.flow_map(z, 1.0, 0.0)

    def euler(n):
        ts = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64).tolist()
        y = z.clone()
        for i in range(n):
            y = y + (ts[i + 1] - ts[i]) * data.velocity(y, ts[i])
        return y

    e1, e2 = euler(2000), euler(4000)
    err1, err2 = (e1 - exact).abs().max().item(), (e2 - exact).abs().max().item()
    assert err1 < 3e-3 and 1.8 < err1 / err2 < 2.2  # first order
    # Richardson extrapolation of the two Euler runs: second order, well under 1e-4
    torch.testing.assert_close(2 * e2 - e1, exact, rtol=0, atol=1e-4)

    # RK4 on the same velocity: 200 steps are enough for 1e-8
    ts = torch.linspace(1.0, 0.0, 201, dtype=torch.float64).tolist()
    y = z.clone()
    for i in range(200):
        t, h = ts[i], ts[i + 1] - ts[i]
        k1 = data.velocity(y, t)
        k2 = data.velocity(y + h / 2 * k1, t + h / 2)
        k3 = data.velocity(y + h / 2 * k2, t + h / 2)
        k4 = data.velocity(y + h * k3, t + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(y, exact, rtol=0, atol=1e-8)


def test_gaussian_average_velocity_and_model():
    data = _gauss()
    z = _noise(b=2)
    t = torch.tensor([[0.9, 0.5, 0.3], [1.0, 0.7, 0.2]], dtype=torch.float64)  # [b, f]
    r = torch.tensor([[0.2, 0.5, 0.0], [0.4, 0.7, 0.1]], dtype=torch.float64)
    u = data.average_velocity(z, t, r)
    dt = (t - r)[..., None, None, None]
    torch.testing.assert_close(z - dt * u, data.flow_map(z, t, r), rtol=0, atol=1e-12)
    same = (t == r)
    torch.testing.assert_close(u[same], data.velocity(z, t)[same])
    # per-frame times agree with per-frame scalar calls
    torch.testing.assert_close(u[0, 0], data.average_velocity(z[:1], 0.9, 0.2)[0, 0])
    # [b] times
    tb = torch.tensor([0.8, 0.6], dtype=torch.float64)
    torch.testing.assert_close(data.average_velocity(z, tb, 0.1)[1], data.average_velocity(z[1:], 0.6, 0.1)[0])
    # the model callable: 0..1000 scale float32 [b, f] times, text ignored, z's dtype out
    model = data.exact_model()
    T, R = to_model_scale(t), to_model_scale(r)
    out = model(z.float(), T, R, torch.zeros(2, 3, 4))
    assert out.dtype == torch.float32 and out.shape == z.shape
    torch.testing.assert_close(out.double(), u, rtol=0, atol=1e-4)
    torch.testing.assert_close(model(z, T, T, None), data.velocity(z, T.double() / 1000), rtol=0, atol=1e-12)


def test_gaussian_scalar_mu_and_errors():
    d = GaussianData(0.5, 2.0, shape=SHAPE)
    x = d.sample(3, torch.Generator().manual_seed(0))
    assert x.shape == (3, *SHAPE) and x.dtype == torch.float32
    z = _noise(b=3)
    torch.testing.assert_close(d.flow_map(z, 1.0, 0.0), 0.5 + 2.0 * z)
    with pytest.raises(ValueError):
        GaussianData(0.0, 1.0).sample(2)
    with pytest.raises(ValueError):
        GaussianData(0.0, 0.0)
    with pytest.raises(ValueError):
        GaussianData(torch.zeros(SHAPE), 1.0, shape=(1, 2))
    with pytest.raises(ValueError):
        d.sample(0)
