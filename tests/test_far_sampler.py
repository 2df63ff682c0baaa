"""AnyFlow-FAR chunked sampler and stage-2 causal rollout (``anyflow/causal.py``), without a network.

Ground truth (docs/design/far.md 5.2, closed-form toy for the chunked sampler): a causal Gaussian AR process,
chunk k given its clean history ~ N(mu_k, s^2 I) with mu_k a deterministic function of the history. The toy
model's ``step`` returns the exact average velocity of that conditional Gaussian, computed from the **cached**
history only, so the chunked sampler must return ``x_k = mu_k(x_{<k}) + s eps_k`` for every chunk and every N.
Parity with diffusers' ``AnyFlowFARPipeline`` loop is checked with its real scheduler and a replica of the
loop (pipeline_anyflow_far.py, ``use_kv_cache=True``) around a nonlinear causal toy.
"""
import math

import pytest
import torch

from megatron_anyflow.anyflow.causal import (
    CausalFlowMapModel,
    causal_flow_map_backward_simulation,
    check_chunk_partition,
    chunk_schedule,
    condition_chunks,
    sample_chunked,
)
from megatron_anyflow.anyflow.distill import SimulationPlan
from megatron_anyflow.anyflow.gaussian import GaussianData
from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler
from megatron_anyflow.anyflow.timesteps import flow_map_time_grid, to_model_scale

B, C, H, W = 2, 3, 2, 3
S = 0.6  # data std of every chunk
# float64 rollouts of the exact flow map: each step is exact up to rounding (~1e-16 relative), 50 steps and
# 4 chunks of a contracting recursion (|a| + |c| < 1) stay far below this.
TOL = 1e-10


def _randn(*shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _ends(cp):
    return [sum(cp[:i + 1]) for i in range(len(cp))]


class _Cache:
    """The toy KV cache: the clean prefix it was prefilled with (``None`` when empty)."""

    def __init__(self, prefix):
        self.prefix = prefix

    @property
    def frames(self):
        return 0 if self.prefix is None else self.prefix.shape[1]


class _CachedToy:
    """Protocol implementation with strict checks and a record of every call.

    ``velocity(z, T, R, text, cp, history)`` is the subclass's model; ``history`` is the cached clean prefix
    ``[b, sum(cp[:-1]), c, h, w]`` or None.
    """

    def __init__(self, text=None):
        self.text = text
        self.steps = []     # (k, T, R, grad enabled)
        self.prefills = []  # (j, prefix clone, grad enabled, prefix.requires_grad)

    def new_cache(self, batch_size):
        assert batch_size == B
        return _Cache(None)

    def step(self, z, t, r, text, chunk_partition, cache):
        cp = tuple(chunk_partition)
        k = len(cp) - 1
        assert text is self.text
        assert z.shape == (B, cp[k], C, H, W), (z.shape, cp)
        assert t.dtype == torch.float32 and r.dtype == torch.float32
        assert t.shape == (B, cp[k]) and r.shape == (B, cp[k])
        assert cache.frames == sum(cp[:k]), f"chunk {k}: cache holds {cache.frames} frames, expected {sum(cp[:k])}"
        self.steps.append((k, t.clone(), r.clone(), torch.is_grad_enabled()))
        return self.velocity(z, t, r, text, cp, cache.prefix)

    def prefill(self, prefix, text, chunk_partition, cache):
        cp = tuple(chunk_partition)
        assert text is self.text
        assert prefix.shape == (B, sum(cp), C, H, W), (prefix.shape, cp)
        assert cache.frames == sum(cp[:-1])
        if cache.prefix is not None:  # the history never changes once cached
            assert torch.equal(prefix[:, :cache.frames], cache.prefix)
        self.prefills.append((len(cp) - 1, prefix.detach().clone(), torch.is_grad_enabled(), prefix.requires_grad))
        return _Cache(prefix.clone())  # functional: the old cache object is left as it was

    def velocity(self, z, t, r, text, cp, history):
        raise NotImplementedError


class GaussianAR(_CachedToy):
    """Causal Gaussian AR process, per sample and channel:
    ``mu_k = a * mean(x_{k-1}) + c * mean(x_{<k}) + beta`` (means over f, h, w), ``mu_0 = beta``.

    ``step`` returns ``u = (z - f(z, t, r)) / (t - r)`` with ``f = GaussianData(mu_k, S).flow_map``. The model
    times are mapped back to the float64 grid times exactly (a lookup of the float32 ``to_model_scale`` values
    of ``grid``; an unknown time fails), so the rollout is exact to rounding instead of the ~1e-5 of a float32
    time round trip.
    """

    def __init__(self, grid, seed=0, text=None, a=0.55, c=-0.3):
        super().__init__(text)
        self.a, self.c = a, c
        self.beta = _randn(C, seed=seed) * 2.0
        self.lookup = {}
        for t in grid.tolist():
            key = float(to_model_scale(t))
            assert self.lookup.get(key, t) == t, "two grid times share a float32 model time"
            self.lookup[key] = t

    def time(self, T):
        values = set(T.flatten().tolist())
        assert len(values) == 1, f"one time per chunk expected, got {sorted(values)}"
        value = values.pop()
        assert value in self.lookup, f"model time {value} is not to_model_scale of a grid time"
        return self.lookup[value]

    def mu(self, history, cp):
        """``mu_k`` ``[b, 1, c, 1, 1]`` float64 from the clean history of chunks ``0..k-1``."""
        k = len(cp) - 1
        beta = self.beta.view(1, 1, C, 1, 1)
        if k == 0:
            assert history is None
            return beta.expand(B, 1, C, 1, 1)
        prev = history[:, sum(cp[:k - 1]):sum(cp[:k])]
        mean = lambda x: x.to(torch.float64).mean(dim=(1, 3, 4), keepdim=True)  # noqa: E731
        return self.a * mean(prev) + self.c * mean(history) + beta

    def flow_map(self, z, mu, t, r):
        return GaussianData(mu, S).flow_map(z, t, r)

    def velocity(self, z, T, R, text, cp, history):
        t, r = self.time(T), self.time(R)
        assert t > r, (t, r)
        mu = self.mu(history, cp)
        z64 = z.to(torch.float64)
        return ((z64 - self.flow_map(z64, mu, t, r)) / (t - r)).to(z.dtype)

    def expected(self, history_source, noise, cp, n_ctx=0):
        """``x_k = mu_k(history_source[:, :s_k]) + S eps_k`` for the generated chunks ``k >= n_ctx``."""
        out = []
        for k in range(n_ctx, len(cp)):
            s_k, e_k = sum(cp[:k]), sum(cp[:k + 1])
            mu = self.mu(history_source[:, :s_k] if k else None, cp[:k + 1])
            out.append(mu + S * noise[:, s_k:e_k].to(torch.float64))
        return out

    def recursion(self, noise, cp, condition=None):
        """The whole AR process from the noise alone (and the given prefix)."""
        x = condition.clone() if condition is not None else noise[:, :0].clone()
        n_ctx = condition_chunks(cp, x.shape[1])
        for k in range(n_ctx, len(cp)):
            s_k, e_k = sum(cp[:k]), sum(cp[:k + 1])
            mu = self.mu(x if k else None, cp[:k + 1])
            x = torch.cat([x, mu + S * noise[:, s_k:e_k]], dim=1)
        return x


class GradGaussianAR(GaussianAR):
    """``mu_k + theta[k]`` with a learnable scalar per chunk and a differentiable flow map."""

    def __init__(self, grid, num_chunks, seed=0):
        super().__init__(grid, seed)
        self.theta = torch.nn.Parameter(_randn(num_chunks, seed=seed + 100))

    def mu(self, history, cp):
        return super().mu(history, cp) + self.theta[len(cp) - 1]

    def flow_map(self, z, mu, t, r):
        # GaussianData.flow_map (it detaches mu), written out: m_r + (sd_r / sd_t)(z - m_t)
        sd = lambda tau: math.sqrt((1.0 - tau) ** 2 * S ** 2 + tau ** 2)  # noqa: E731
        return (1.0 - r) * mu + (sd(r) / sd(t)) * (z - (1.0 - t) * mu)


class NonlinearCausal(_CachedToy):
    """A nonlinear stand-in for the network that depends on z, T, R, text, the chunk index and the cache."""

    def velocity(self, z, T, R, text, cp, history):
        tt = T.to(z.dtype)[..., None, None, None] / 1000.0
        rr = R.to(z.dtype)[..., None, None, None] / 1000.0
        out = torch.tanh(z) * (1.0 + tt) - 0.3 * rr * z + 0.1 * torch.sin(3.0 * tt) + 0.05 * len(cp)
        if history is not None:
            out = out + 0.5 * torch.tanh(history.mean(dim=(1, 3, 4), keepdim=True))
        if text is not None:
            out = out + text.to(z.dtype).mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return out


# ------------------------------------------------------------------------------ partition / alignment
def test_check_chunk_partition():
    assert check_chunk_partition([1, 3, 3, 2], 9) == (1, 3, 3, 2)
    with pytest.raises(ValueError, match=r"\[1, 3, 3\] sums to 7, expected num_frames = 9"):
        check_chunk_partition((1, 3, 3), 9)
    for bad in [(), (1, 0, 8), (1, -1, 9), (1, 2.0, 6), (True, 8)]:
        with pytest.raises(ValueError, match="positive ints"):
            check_chunk_partition(bad, 9)


def test_condition_chunks():
    cp = (1, 3, 3, 2)
    assert [condition_chunks(cp, T) for T in (0, 1, 4, 7, 9)] == [0, 1, 2, 3, 4]
    for T in (2, 3, 5, 8, 10):
        with pytest.raises(ValueError, match=rf"prefix of {T} latent frames .* expected one of \[1, 4, 7, 9\]"):
            condition_chunks(cp, T)
    with pytest.raises(ValueError, match="int >= 0"):
        condition_chunks(cp, -1)


# ------------------------------------------------------------------------------ diffusers parity
def _scheduler():
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_flow_map_euler_discrete import FlowMapEulerDiscreteScheduler

    return FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)


def _diffusers_steps(sched):
    """The per-chunk inner loop of AnyFlowFARPipeline: ``r = sigmas[i + 1] * 1000``, ``if t == r: continue``."""
    kept = []
    for i, t in enumerate(sched.timesteps):
        r = sched.sigmas[i + 1] * sched.config.num_train_timesteps
        if t == r:
            continue
        kept.append((t, r))
    return kept


@pytest.mark.parametrize("n", [1, 3, 4, 50])
def test_chunk_grid_and_skip_rule_match_diffusers(n):
    sched = _scheduler()
    sched.set_timesteps(n, device="cpu")
    grid = flow_map_time_grid(n, 5.0)
    assert torch.equal(grid, sched.sigmas)  # bitwise, float64
    ours = chunk_schedule(grid)
    theirs = _diffusers_steps(sched)
    assert len(ours) == len(theirs) == n
    for (t, r), (t_d, r_d) in zip(ours, theirs):
        assert t * 1000.0 == t_d.item() and r * 1000.0 == r_d.item()  # float64, bitwise
        assert torch.equal(to_model_scale(t), t_d.float()) and torch.equal(to_model_scale(r), r_d.float())


def test_skip_rule_matches_diffusers_on_a_grid_with_repeats():
    sched = _scheduler()
    sched.set_timesteps(sigmas=[1.0, 0.7, 0.7, 0.3, 0.3, 0.1], device="cpu")
    theirs = _diffusers_steps(sched)
    ours = chunk_schedule(sched.sigmas)
    assert len(theirs) == 4 and len(ours) == 4  # the two repeats are skipped
    assert [(t * 1000.0, r * 1000.0) for t, r in ours] == [(t.item(), r.item()) for t, r in theirs]
    with pytest.raises(ValueError, match="non-increasing"):
        chunk_schedule(torch.tensor([1.0, 0.5, 0.6, 0.0], dtype=torch.float64))


def _diffusers_far_loop(model, noise, text, cp, n, video_latents=None):
    """Replica of AnyFlowFARPipeline.__call__ steps 7-8 (use_kv_cache=True), the transformer replaced by the
    protocol's step / prefill; the scheduler is diffusers' own."""
    sched = _scheduler()
    b = noise.shape[0]
    output = torch.zeros_like(noise)
    if video_latents is not None:
        output[:, :video_latents.shape[1]] = video_latents
        n_ctx = next(i + 1 for i in range(len(cp)) if sum(cp[:i + 1]) >= video_latents.shape[1])
    else:
        n_ctx = 0
    cache = model.new_cache(b)
    for k in range(len(cp)):
        s_k, e_k = sum(cp[:k]), sum(cp[:k + 1])
        if k >= n_ctx:
            z = noise[:, s_k:e_k]
            sched.set_timesteps(n, device="cpu")
            for i, t in enumerate(sched.timesteps):
                r = sched.sigmas[i + 1] * sched.config.num_train_timesteps
                if t == r:
                    continue
                T = t.expand(b).unsqueeze(-1).repeat((1, cp[k])).float()  # the transformer runs its times in fp32
                R = r.expand(b).unsqueeze(-1).repeat((1, cp[k])).float()
                u = model.step(z, T, R, text, cp[:k + 1], cache)
                z = sched.step(u, t, z, return_dict=False)[0]
            output[:, s_k:e_k] = z
        if k < len(cp) - 1:
            cache = model.prefill(output[:, :e_k], text, cp[:k + 1], cache)
    return output


@pytest.mark.parametrize("n", [1, 3, 4])
@pytest.mark.parametrize("num_cond", [0, 1, 4])
def test_sample_chunked_matches_diffusers_loop(n, num_cond):
    cp = (1, 3, 3, 2)
    noise = _randn(B, sum(cp), C, H, W, seed=1, dtype=torch.float32)
    text = _randn(B, 5, 4, seed=2, dtype=torch.float32)
    cond = _randn(B, num_cond, C, H, W, seed=3, dtype=torch.float32) if num_cond else None
    theirs = _diffusers_far_loop(NonlinearCausal(text), noise, text, cp, n, cond)
    model = NonlinearCausal(text)
    ours = sample_chunked(model, noise, text, cp, n, shift=5.0, condition=cond)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs)  # bitwise: same times, same float64 update rounded once
    assert len(model.steps) == n * (len(cp) - condition_chunks(cp, num_cond))
    assert len(model.prefills) == len(cp) - 1


def test_single_chunk_is_the_bidirectional_sampler():
    cp = (5,)
    noise = _randn(B, 5, C, H, W, seed=4, dtype=torch.float32)
    model = NonlinearCausal()
    ours = sample_chunked(model, noise, None, cp, 4)
    ref = FlowMapEulerSampler(4)(lambda z, T, R, text: model.step(z, T, R, text, cp, _Cache(None)), noise, None)
    assert torch.equal(ours, ref)
    assert model.prefills == []


# ------------------------------------------------------------------------------ Gaussian AR closed form
PARTITIONS = [(1, 2, 3, 1), (1, 3, 3, 2)]


@pytest.mark.parametrize("cp", PARTITIONS)
@pytest.mark.parametrize("n", [1, 2, 4, 50])
def test_sample_chunked_gaussian_ar(cp, n):
    noise = _randn(B, sum(cp), C, H, W, seed=10 + n)
    model = GaussianAR(flow_map_time_grid(n, 5.0), seed=n)
    x = sample_chunked(model, noise, None, cp, n)
    assert x.dtype == torch.float64 and x.shape == noise.shape
    # conditional on the sampler's own history, every chunk is mu_k(x_{<k}) + S eps_k ...
    for k, want in enumerate(model.expected(x, noise, cp)):
        torch.testing.assert_close(x[:, sum(cp[:k]):sum(cp[:k + 1])], want, rtol=0, atol=TOL)
    # ... and the whole video is the AR process driven by the noise slices
    torch.testing.assert_close(x, model.recursion(noise, cp), rtol=0, atol=TOL)
    # calls: N steps per chunk, chunk k against the cache of chunks 0..k-1; n - 1 prefills of the clean prefix
    assert [k for k, *_ in model.steps] == [k for k in range(len(cp)) for _ in range(n)]
    assert all(not torch.equal(t, r) for _, t, r, _ in model.steps)
    assert [j for j, *_ in model.prefills] == list(range(len(cp) - 1))
    for j, prefix, _, _ in model.prefills:
        assert torch.equal(prefix, x[:, :_ends(cp)[j]])


def test_sample_chunked_any_step_invariance():
    cp = (1, 3, 3, 2)
    noise = _randn(B, sum(cp), C, H, W, seed=20)
    outs = [sample_chunked(GaussianAR(flow_map_time_grid(n, 5.0)), noise, None, cp, n) for n in (1, 2, 4, 50)]
    for x in outs[1:]:
        torch.testing.assert_close(x, outs[0], rtol=0, atol=TOL)
    # the toy is not trivial: a different history law gives a different video
    other = sample_chunked(GaussianAR(flow_map_time_grid(4, 5.0), a=0.1), noise, None, cp, 4)
    assert (other - outs[0]).abs().max() > 1e-2


@pytest.mark.parametrize("num_cond", [1, 4])  # I2V (chunk 0) and V2V (chunks 0, 1)
@pytest.mark.parametrize("n", [1, 4])
def test_sample_chunked_conditioning_prefix(num_cond, n):
    cp = (1, 3, 3, 2)
    noise = _randn(B, sum(cp), C, H, W, seed=30)
    cond = _randn(B, num_cond, C, H, W, seed=31) * 1.5 + 0.5
    model = GaussianAR(flow_map_time_grid(n, 5.0))
    x = sample_chunked(model, noise, None, cp, n, condition=cond)
    n_ctx = condition_chunks(cp, num_cond)
    assert torch.equal(x[:, :num_cond], cond)  # copied bit-exactly, never denoised
    for i, want in enumerate(model.expected(x, noise, cp, n_ctx)):
        k = n_ctx + i
        torch.testing.assert_close(x[:, sum(cp[:k]):sum(cp[:k + 1])], want, rtol=0, atol=TOL)
    torch.testing.assert_close(x, model.recursion(noise, cp, cond), rtol=0, atol=TOL)
    assert sorted({k for k, *_ in model.steps}) == list(range(n_ctx, len(cp)))
    assert len(model.steps) == n * (len(cp) - n_ctx)
    assert len(model.prefills) == len(cp) - 1  # context chunks are prefilled too
    assert torch.equal(model.prefills[0][1], cond[:, :cp[0]])
    # the noise of context chunks is not used
    noise2 = noise.clone()
    noise2[:, :num_cond] = _randn(B, num_cond, C, H, W, seed=32)
    assert torch.equal(sample_chunked(GaussianAR(flow_map_time_grid(n, 5.0)), noise2, None, cp, n,
                                      condition=cond), x)


def test_sample_chunked_all_context():
    cp = (1, 3)
    noise = _randn(B, 4, C, H, W, seed=33)
    cond = _randn(B, 4, C, H, W, seed=34)
    model = GaussianAR(flow_map_time_grid(2, 5.0))
    assert torch.equal(sample_chunked(model, noise, None, cp, 2, condition=cond), cond)
    assert model.steps == [] and len(model.prefills) == 1


def test_sample_chunked_callback_and_progress():
    cp = (1, 2, 3, 1)
    noise = _randn(B, sum(cp), C, H, W, seed=40)
    seen = []
    model = GaussianAR(flow_map_time_grid(3, 5.0))
    x = sample_chunked(model, noise, None, cp, 3, progress=True,
                       callback=lambda k, i, t, r, z: seen.append((k, i, t, r, z.clone())))
    grid = flow_map_time_grid(3, 5.0).tolist()
    want = [(k, i, grid[i], grid[i + 1]) for k in range(4) for i in range(3)]
    assert [(k, i, t, r) for k, i, t, r, _ in seen] == want
    for k, i, _, _, z in seen:
        if i == 2:
            assert torch.equal(z, x[:, sum(cp[:k]):sum(cp[:k + 1])])


def test_sample_chunked_errors():
    cp = (1, 3, 3, 2)
    noise = _randn(B, 9, C, H, W, seed=50)
    model = GaussianAR(flow_map_time_grid(2, 5.0))
    with pytest.raises(ValueError, match=r"noise must be a floating-point \[b, f, c, h, w\]"):
        sample_chunked(model, noise[0], None, cp, 2)
    with pytest.raises(ValueError, match=r"\[1, 3, 3\] sums to 7, expected num_frames = 9"):
        sample_chunked(model, noise, None, (1, 3, 3), 2)
    with pytest.raises(ValueError, match=r"prefix of 2 latent frames .* expected one of \[1, 4, 7, 9\]"):
        sample_chunked(model, noise, None, cp, 2, condition=noise[:, :2])
    with pytest.raises(ValueError, match="matching noise"):
        sample_chunked(model, noise, None, cp, 2, condition=noise[:, :1, :2])
    with pytest.raises(ValueError, match="num_steps"):
        sample_chunked(model, noise, None, cp, 0)

    class WrongShape(NonlinearCausal):
        def velocity(self, z, *args):
            return z[..., :1]

    with pytest.raises(ValueError, match=r"chunk 0 returned shape \(2, 1, 3, 2, 1\), expected \(2, 1, 3, 2, 3\)"):
        sample_chunked(WrongShape(), noise, None, cp, 2)

    class NoReturn(NonlinearCausal):
        def prefill(self, *args):
            super().prefill(*args)

    with pytest.raises(ValueError, match="prefill returned None"):
        sample_chunked(NoReturn(), noise, None, cp, 2)
    assert isinstance(model, CausalFlowMapModel)


# ------------------------------------------------------------------------------ stage-2 causal rollout
def _expected_calls(n, k):
    return 1 if n == 1 else (2 if k in (0, n - 1) else 3)


PLANS = [(1, 0), (2, 0), (2, 1), (4, 0), (4, 2), (4, 3), (50, 17)]


@pytest.mark.parametrize("cp", PARTITIONS)
def test_backward_simulation_composition(cp):
    noise = _randn(B, sum(cp), C, H, W, seed=60)
    reference = sample_chunked(GaussianAR(flow_map_time_grid(4, 5.0)), noise, None, cp, 4)
    for n, k in PLANS:
        plan = SimulationPlan.make(n, k, shift=5.0)
        model = GaussianAR(plan.times)
        x, info = causal_flow_map_backward_simulation(model, noise, None, cp, plan)
        torch.testing.assert_close(x, reference, rtol=0, atol=TOL, msg=f"(N, k) = ({n}, {k})")
        calls = _expected_calls(n, k)
        assert info["calls_per_chunk"] == [calls] * len(cp) and info["calls"] == calls * len(cp)
        assert info["prefills"] == len(cp) - 1 and info["context_chunks"] == 0
        assert (info["N"], info["k"], info["t_k"], info["t_next"]) == (n, k, plan.t_k, plan.t_next)
        assert [kk for kk, *_ in model.steps] == [kk for kk in range(len(cp)) for _ in range(calls)]
        assert all(not torch.equal(t, r) for _, t, r, _ in model.steps)
        assert len(model.prefills) == len(cp) - 1
        for j, (jj, prefix, grad_on, requires_grad) in enumerate(model.prefills):
            assert jj == j and not grad_on and not requires_grad
            assert torch.equal(prefix, x[:, :_ends(cp)[j]])


def test_backward_simulation_n1_is_the_one_step_sampler():
    cp = (1, 3, 3, 2)
    noise = _randn(B, sum(cp), C, H, W, seed=61, dtype=torch.float32)
    x, _ = causal_flow_map_backward_simulation(NonlinearCausal(), noise, None, cp, SimulationPlan.make(1, 0))
    assert torch.equal(x, sample_chunked(NonlinearCausal(), noise, None, cp, 1))


@pytest.mark.parametrize("grad_through", ["chain", "no_grad_prefix"])
def test_backward_simulation_gradient_isolation(grad_through):
    cp = (1, 2, 3, 1)
    noise = _randn(B, sum(cp), C, H, W, seed=70)
    plan = SimulationPlan.make(4, 2)
    model = GradGaussianAR(plan.times, len(cp))
    x, info = causal_flow_map_backward_simulation(model, noise, None, cp, plan, grad_through=grad_through)
    assert [seg[2] for seg in info["chunks"][0]["segments"]] == [grad_through == "chain", True, True]
    with torch.no_grad():
        torch.testing.assert_close(x, model.recursion(noise, cp), rtol=0, atol=TOL)
    for k in range(len(cp)):
        s_k, e_k = sum(cp[:k]), sum(cp[:k + 1])
        (g,) = torch.autograd.grad(x[:, s_k:e_k].sum(), model.theta, retain_graph=True)
        # "chain": x_k = mu_k + S eps_k with mu_k = ... + theta_k, so d sum(x_k) / d theta_k = numel.
        # "no_grad_prefix": z_{t_k} is a constant and x_k = f(z_{t_k}, t_k, 0), so d x_k / d mu_k =
        # 1 - (S / sd_{t_k})(1 - t_k). The history is detached, so the earlier chunks' parameters (which do
        # move x_{<k}, hence mu_k) get exactly zero.
        t_k = plan.t_k
        own = 1.0 if grad_through == "chain" else 1.0 - S * (1.0 - t_k) / math.sqrt((1 - t_k) ** 2 * S ** 2 + t_k ** 2)
        want = torch.zeros_like(g)
        want[k] = B * cp[k] * C * H * W * own
        torch.testing.assert_close(g, want, rtol=0, atol=1e-8)
    # without the detached history the gradient into earlier chunks would not vanish: d mu_1 / d theta_0 != 0
    theta = model.theta.detach().clone().requires_grad_(True)
    model.theta = theta
    x_full = model.recursion(noise, cp)
    (g_full,) = torch.autograd.grad(x_full[:, 1:3].sum(), theta)
    assert g_full[0].abs() > 1.0


@pytest.mark.parametrize("num_cond", [1, 4])
def test_backward_simulation_with_condition(num_cond):
    cp = (1, 3, 3, 2)
    noise = _randn(B, sum(cp), C, H, W, seed=80)
    cond = _randn(B, num_cond, C, H, W, seed=81)
    plan = SimulationPlan.make(4, 1)
    model = GaussianAR(plan.times)
    x, info = causal_flow_map_backward_simulation(model, noise, None, cp, plan, condition=cond)
    n_ctx = condition_chunks(cp, num_cond)
    assert torch.equal(x[:, :num_cond], cond)
    want = sample_chunked(GaussianAR(flow_map_time_grid(2, 5.0)), noise, None, cp, 2, condition=cond)
    torch.testing.assert_close(x, want, rtol=0, atol=TOL)
    assert info["context_chunks"] == n_ctx and info["chunks"][:n_ctx] == [None] * n_ctx
    assert info["calls_per_chunk"] == [0] * n_ctx + [3] * (len(cp) - n_ctx)
    assert info["prefills"] == len(model.prefills) == len(cp) - 1
    with pytest.raises(ValueError, match=r"prefix of 2 latent frames .* expected one of \[1, 4, 7, 9\]"):
        causal_flow_map_backward_simulation(model, noise, None, cp, plan, condition=noise[:, :2])
    with pytest.raises(ValueError, match="grad_through"):
        causal_flow_map_backward_simulation(model, noise, None, cp, plan, grad_through="middle")
