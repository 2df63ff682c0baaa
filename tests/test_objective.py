"""Stage-1 flow-map objective and teacher flow-matching loss vs independent float64 implementations.

The references below are written straight from the paper (AnyFlow Alg. 1; eq. 3 MeanFlow objective, eq. 4
central difference, eq. 6 guidance-fused prediction, eq. 7 adaptive reweighting) and the reference loss
weight ``beta08`` (``t (1 - t)^0.5`` on the shift-5 1001-point grid, normalised to sum 1000), in float64,
without the kernels. They re-create the generators with the same seeds to draw the same t, r, eps and
masks (draw order documented in :func:`stage1_loss`); the (t, r) draw is re-implemented here from the
reference rule (:func:`ref_sample_t_r`), not taken from the code under test. Image-to-video condition frames
follow the reference trainer / diffusers ``AnyFlowPipeline``: t = 0, r = the sample's r.
"""
import copy
import math

import pytest
import torch

import megatron_anyflow_kernels as K
from megatron_anyflow.anyflow import (
    FlowMapObjectiveConfig,
    TeacherObjectiveConfig,
    TimeSamplerConfig,
    flow_matching_loss,
    stage1_loss,
)
from megatron_anyflow.testing.toy import ToyFlowMapNet

SHAPE = (3, 2, 3, 2)  # [f, c, h, w]
L, D = 5, 4  # text tokens, text width


# --------------------------------------------------------------------------------------------------
# A deterministic callable model (any float dtype), nonlinear in t and r, text-dependent
# --------------------------------------------------------------------------------------------------
class LinearTimeModel:
    """``u = W z + sin(3 t) A + t^2 r B + cos(2 r) C + (1 + t) (mean text @ P)``, t = T/1000, r = R/1000."""

    def __init__(self, shape=SHAPE, d_text=D, seed=0):
        g = torch.Generator().manual_seed(seed)
        f, c, h, w = shape
        n = f * c * h * w
        self.shape = shape
        self.W = torch.randn(n, n, generator=g, dtype=torch.float64) * (0.7 / math.sqrt(n))
        self.A = torch.randn(shape, generator=g, dtype=torch.float64)
        self.B = torch.randn(shape, generator=g, dtype=torch.float64)
        self.C = torch.randn(shape, generator=g, dtype=torch.float64)
        self.P = torch.randn(d_text, c * h * w, generator=g, dtype=torch.float64)
        self.calls = []

    def __call__(self, z, T, R, text):
        assert T.dtype in (torch.float32, torch.float64) and R.dtype == T.dtype, (T.dtype, R.dtype)
        assert tuple(T.shape) == tuple(z.shape[:2]) and tuple(R.shape) == tuple(z.shape[:2])
        self.calls.append(dict(z=z.detach().clone(), T=T.clone(), R=R.clone(), text=text.clone()))
        dt = z.dtype if z.dtype != torch.bfloat16 else torch.float32
        b, f = z.shape[:2]
        t = (T.to(dt) / 1000.0)[..., None, None, None]
        r = (R.to(dt) / 1000.0)[..., None, None, None]
        lin = (z.to(dt).reshape(b, -1) @ self.W.to(dt).T).reshape(z.shape)
        txt = (text.to(dt).mean(dim=1) @ self.P.to(dt)).reshape(b, 1, *self.shape[1:])
        u = lin + torch.sin(3 * t) * self.A.to(dt) + t * t * r * self.B.to(dt) + torch.cos(2 * r) * self.C.to(dt)
        u = u + (1 + t) * txt
        return u.to(z.dtype)


# --------------------------------------------------------------------------------------------------
# Independent float64 references
# --------------------------------------------------------------------------------------------------
def _shift(x, s):
    return s * x / (1 + (s - 1) * x)


def ref_sample_t_r(n, seed, tcfg):
    """The reference stage-1 time rule, in float64: ``u1, u2 ~ U(0, 1)`` as one float32 ``[2, n]`` draw from a
    generator seeded ``seed``; ``t = max``, ``r = min``; by index, the first ``floor(0.5 n)`` samples are
    boundary (r = t), the next ``floor(0.25 n)`` have r = 0, the rest are free (fractions from ``tcfg``;
    the floor guarded against binary fractions like 0.29 * 100 = 28.999...); then the shift
    ``t -> s t / (1 + (s - 1) t)`` on t and on the free samples' r. Returns ``(t, r, kind)``."""
    u = torch.rand((2, n), generator=torch.Generator().manual_seed(seed), dtype=torch.float32).double()
    t, r = torch.maximum(u[0], u[1]), torch.minimum(u[0], u[1])
    n_b = math.floor(tcfg.boundary_fraction * n + 1e-9)
    n_r0 = math.floor(tcfg.r_zero_fraction * n + 1e-9)
    kind = torch.full((n,), 2, dtype=torch.int64)
    kind[:n_b], kind[n_b:n_b + n_r0] = 0, 1
    t = _shift(t, tcfg.shift)
    r = torch.where(kind == 0, t, torch.where(kind == 1, torch.zeros_like(r), _shift(r, tcfg.shift)))
    return t, r, kind


# The code draws and shifts in float32: s t / (1 + (s - 1) t) is four roundings of at most 2^-24 relative
# each (products, sum, quotient), i.e. <= 4 * 2^-24 relative (+ the 2^-24 of the float32 draw, which both
# share exactly). Bound used: 5 * 2^-24 relative to the float64 value.
T_REL_TOL = 5 * 2.0 ** -24


def _assert_times_close(t32, t64):
    assert bool(((t32.double() - t64).abs() <= T_REL_TOL * t64.abs()).all()), (t32.double() - t64).abs().max()


def ref_beta08_weight(t, shift=5.0):
    grid = _shift(torch.linspace(0, 1, 1001, dtype=torch.float64), shift)
    y = grid * (1 - grid).clamp_min(0).sqrt()
    w = y * 1000.0 / y.sum()
    idx = (grid[None, :] - t.double()[:, None]).abs().argmin(dim=1)
    return w[idx]


def ref_stage1(model, x, text, neg, cfg, time_seed, noise_seed, global_batch, offset, noise=None):
    """Float64 stage-1 loss from the paper's equations. ``model`` is called in float64; its first call
    (conditional) keeps the autograd graph, the other three run without grad."""
    b, f = x.shape[:2]
    t_all, r_all, kind_all = ref_sample_t_r(global_batch, time_seed, cfg.time)
    t = t_all[offset:offset + b]
    r = r_all[offset:offset + b]
    kind = kind_all[offset:offset + b]
    ng = torch.Generator().manual_seed(noise_seed)
    if noise is None:
        eps = torch.randn(x.shape, generator=ng, dtype=x.dtype).double()
    else:
        eps = noise.double()
    drop = torch.rand(b, generator=ng) < cfg.text_dropout
    i2v = torch.rand(b, generator=ng) < cfg.i2v_prob

    tf = t[:, None].repeat(1, f)
    rf = r[:, None].repeat(1, f)
    cond = torch.zeros(b, f, dtype=torch.bool)
    if cfg.i2v_prob > 0:
        cond[:, 0] = i2v
    tf[cond] = 0.0  # condition frame: t = 0, r stays the sample's r (reference trainer, diffusers AnyFlowPipeline)
    keep = (~cond).double()
    e, g = cfg.fd_eps, cfg.guidance
    bc = lambda a: a[..., None, None, None]  # noqa: E731

    xd = x.double()
    z = (1 - bc(tf)) * xd + bc(tf) * eps  # z_t = (1 - t) x + t eps
    v = eps - xd  # v = eps - x
    c = torch.where(drop[:, None, None], neg.double().expand(b, -1, -1), text.double())
    nul = neg.double().expand(b, -1, -1)
    T, R = 1000.0 * tf, 1000.0 * rf
    u_c = model(z, T, R, c)
    with torch.no_grad():
        u_n = model(z, T, R, nul)
        u_p = model(z + v * (e / 1000.0) * bc(keep), T + e * keep, R, c)
        u_m = model(z - v * (e / 1000.0) * bc(keep), T - e * keep, R, c)
    u = (u_c - (1 - g) * u_n) / g  # eq. 6
    dudt = (u_p - u_m) / (2 * e * g)  # eq. 4 / Alg. 1 (per timestep unit, conditional outputs / g)
    u_tgt = (v - bc(T - R) * dudt).detach()  # Alg. 1 (t - r on the 1000 scale)
    w = ref_beta08_weight(t, cfg.time.shift) if cfg.time.loss_weight == "beta" else torch.ones(b, dtype=torch.float64)
    per_frame = ((u - u_tgt) ** 2).mean(dim=(2, 3, 4))  # [b, f]
    per_sample = w * (keep * per_frame).sum(1) / keep.sum(1).clamp_min(1e-12)
    boundary = kind == 0
    if cfg.adaptive_reweight and boundary.any():
        bm = per_sample.detach()[boundary].mean()
        scales = torch.where(boundary, torch.ones_like(per_sample), bm / (per_sample.detach() + cfg.reweight_eps))
    else:
        bm = None
        scales = torch.ones_like(per_sample)
    loss = (scales * per_sample).mean()
    return dict(loss=loss, per_sample=per_sample, scales=scales, bm=bm, u=u, u_tgt=u_tgt, t=t, r=r, kind=kind,
                drop=drop, i2v=i2v, eps=eps)


def _inputs(b=6, seed=0, dtype=torch.float32, neg_batch=1):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(b, *SHAPE, generator=g).to(dtype)
    text = torch.randn(b, L, D, generator=g)
    neg = torch.randn(neg_batch, L, D, generator=g)
    return x, text, neg


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(model, x, text, neg, cfg, time_seed=7, noise_seed=11, global_batch=10, offset=2, **kw):
    return stage1_loss(model, x, text, neg, cfg, time_generator=torch.Generator().manual_seed(time_seed),
                       noise_generator=torch.Generator().manual_seed(noise_seed), global_batch=global_batch,
                       global_offset=offset, **kw)


# --------------------------------------------------------------------------------------------------
# stage1_loss vs the float64 reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    dict(cfg=dict(text_dropout=0.5), gb=10, off=2),  # rows 2..7: 3 boundary, 2 r=0, 1 free
    dict(cfg=dict(text_dropout=0.3, i2v_prob=0.5, guidance=2.0, fd_eps=3.0), gb=12, off=0),
    dict(cfg=dict(text_dropout=0.0, time=TimeSamplerConfig(shift=3.0, loss_weight="uniform")), gb=6, off=0),
    dict(cfg=dict(text_dropout=0.5, adaptive_reweight=False), gb=8, off=1),
])
def test_stage1_matches_float64_reference(case):
    cfg = FlowMapObjectiveConfig(**case["cfg"])
    x, text, neg = _inputs()
    model = LinearTimeModel()
    loss, st = _run(model, x, text, neg, cfg, global_batch=case["gb"], offset=case["off"], return_tensors=True)
    ref = ref_stage1(LinearTimeModel(), x, text, neg, cfg, 7, 11, case["gb"], case["off"])

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.equal(st["kind"], ref["kind"]) and torch.equal(st["text_dropped"], ref["drop"])
    _assert_times_close(st["t"], ref["t"])
    _assert_times_close(st["r"], ref["r"])
    assert _rel(st["u_pred"], ref["u"]) < 1e-5  # guidance fusion (eq. 6)
    assert _rel(st["u_target"], ref["u_tgt"]) < 1e-5  # finite-difference target (eq. 4, Alg. 1)
    assert _rel(st["sample_weight"], ref_beta08_weight(ref["t"], cfg.time.shift)
                if cfg.time.loss_weight == "beta" else torch.ones(6)) < 1e-6
    assert _rel(st["per_sample_loss"], ref["per_sample"]) < 1e-5
    assert _rel(st["scales"], ref["scales"]) < 1e-5
    assert abs(loss.item() - ref["loss"].item()) <= 1e-5 * abs(ref["loss"].item())
    n_b = int((ref["kind"] == 0).sum())
    if cfg.adaptive_reweight:
        assert int(st["num_boundary"]) == n_b
        if n_b:
            assert abs(st["boundary_mean"].item() - ref["bm"].item()) <= 1e-4 * ref["bm"].item()
    # The case list covers dropped and kept prompts, every kind, and (case 2) condition frames.
    if case["cfg"].get("text_dropout", 0.1) >= 0.3:
        assert 0 < int(st["text_dropped"].sum()) < 6
    if case["cfg"].get("i2v_prob", 0.0) > 0:
        assert 0 < int(st["i2v"].sum()) < 6


def test_reweight_scales_formula():
    """Boundary samples scale 1, the others boundary_mean / (loss + 1e-5); loss = mean(scales * loss)."""
    cfg = FlowMapObjectiveConfig(text_dropout=0.0)
    x, text, neg = _inputs(b=8)
    loss, st = _run(LinearTimeModel(), x, text, neg, cfg, global_batch=8, offset=0)
    ps, kind = st["per_sample_loss"].double(), st["kind"]
    assert int((kind == 0).sum()) == 4 and int(st["num_boundary_local"]) == 4
    bm = ps[kind == 0].mean()
    expect = torch.where(kind == 0, torch.ones_like(ps), bm / (ps + 1e-5))
    assert _rel(st["scales"], expect) < 1e-6
    assert abs(loss.item() - (expect * ps).mean().item()) < 1e-6 * loss.item()
    # non-boundary contributions are each ~ boundary_mean
    assert torch.allclose((st["scales"] * st["per_sample_loss"])[kind != 0].double(),
                          bm.expand(4), rtol=1e-3)


def test_no_boundary_samples_gives_unit_scales():
    cfg = FlowMapObjectiveConfig(text_dropout=0.0)
    x, text, neg = _inputs(b=4)
    loss, st = _run(LinearTimeModel(), x, text, neg, cfg, global_batch=8, offset=4)  # rows 4..7: r=0 / free
    assert int(st["num_boundary"]) == 0
    assert torch.equal(st["scales"], torch.ones(4))
    assert abs(loss.item() - st["per_sample_loss"].mean().item()) < 1e-7


def test_time_rows_follow_global_offset():
    cfg = FlowMapObjectiveConfig()
    x, text, neg = _inputs(b=3)
    t_all, r_all, kind_all = ref_sample_t_r(9, 7, cfg.time)  # 4 boundary, 2 r = 0, 3 free
    for off in (0, 3, 6):
        _, st = _run(LinearTimeModel(), x, text, neg, cfg, global_batch=9, offset=off)
        assert torch.equal(st["kind"], kind_all[off:off + 3])
        _assert_times_close(st["t"], t_all[off:off + 3])
        _assert_times_close(st["r"], r_all[off:off + 3])


# --------------------------------------------------------------------------------------------------
# gradients vs float64 autograd
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i2v_prob", [0.0, 0.5, 1.0])
def test_stage1_gradient_matches_float64_autograd(i2v_prob):
    torch.manual_seed(0)
    net = ToyFlowMapNet(SHAPE, hidden=16, n_freq=2, use_text=True)
    with torch.no_grad():  # give the zero-initialised correction head weights, so every parameter has a gradient
        for p in net.corr_net[-1].parameters():
            p.normal_(0, 0.1)
    net64 = copy.deepcopy(net).double()
    cfg = FlowMapObjectiveConfig(text_dropout=0.4, i2v_prob=i2v_prob)
    x, text, neg = _inputs()
    loss, st = _run(net, x, text, neg, cfg)
    loss.backward()
    ref = ref_stage1(net64, x, text, neg, cfg, 7, 11, 10, 2)
    ref["loss"].backward()
    assert abs(loss.item() - ref["loss"].item()) <= 1e-5 * ref["loss"].item()
    n = 0
    for (name, p), p64 in zip(net.named_parameters(), net64.parameters()):
        assert p.grad is not None and p64.grad is not None, name
        assert _rel(p.grad, p64.grad) < 1e-5, (name, _rel(p.grad, p64.grad))  # observed <= 4e-7
        n += 1
    assert n == len(list(net.parameters()))


# --------------------------------------------------------------------------------------------------
# text dropout, image-to-video, dtypes, the noise argument, the kernel backends
# --------------------------------------------------------------------------------------------------
def test_text_dropout_replaces_exactly_the_chosen_prompts():
    x, text, neg = _inputs(b=8)
    for p in (0.0, 0.5, 1.0):
        cfg = FlowMapObjectiveConfig(text_dropout=p)
        model = LinearTimeModel()
        _, st = _run(model, x, text, neg, cfg, global_batch=8, offset=0)
        ng = torch.Generator().manual_seed(11)
        torch.randn(x.shape, generator=ng)  # eps
        drop = torch.rand(8, generator=ng) < p
        assert torch.equal(st["text_dropped"], drop)
        if p == 0.5:
            assert 0 < int(drop.sum()) < 8
        cond, null, plus, minus = model.calls
        expected = torch.where(drop[:, None, None], neg.expand(8, -1, -1), text)
        for call in (cond, plus, minus):
            assert torch.equal(call["text"], expected)
        assert torch.equal(null["text"], neg.expand(8, -1, -1))


def test_i2v_condition_frame():
    cfg = FlowMapObjectiveConfig(i2v_prob=0.5, text_dropout=0.0)
    x, text, neg = _inputs(b=8)
    model = LinearTimeModel()
    _, st = _run(model, x, text, neg, cfg, global_batch=8, offset=0)
    i2v = st["i2v"]
    assert 0 < int(i2v.sum()) < 8
    cond, null, plus, minus = model.calls
    e = cfg.fd_eps
    for call in model.calls:
        # condition frame: T = 0, R the sample's (the reference / diffusers AnyFlowPipeline convention)
        assert torch.all(call["T"][i2v, 0] == 0) and torch.equal(call["R"][:, 0], call["R"][:, 1])
        assert torch.equal(call["R"][:, 0], (st["r"] * 1000).float())
        assert torch.equal(call["z"][i2v, 0], x[i2v, 0])  # z = x at t = 0, unperturbed
        assert torch.all(call["T"][:, 1:] > 0)
    assert bool((cond["R"][i2v, 0] > 0).any())  # a condition frame with r > 0: the convention is exercised
    t_model = (st["t"] * 1000).float()
    assert torch.allclose(cond["T"][~i2v, 0], t_model[~i2v])
    assert torch.allclose(plus["T"][:, 1:], cond["T"][:, 1:] + e) and torch.allclose(minus["T"][:, 1:], cond["T"][:, 1:] - e)
    assert not torch.allclose(plus["z"][:, 1:], cond["z"][:, 1:])
    assert torch.allclose(plus["T"][~i2v, 0], cond["T"][~i2v, 0] + e)

    # The condition frame's output does not enter the loss: corrupt frame 0 of every output and compare
    # (it changes the loss of the other samples, whose frame 0 is trained).
    class Corrupt(LinearTimeModel):
        def __call__(self, z, T, R, text):
            u = super().__call__(z, T, R, text).clone()
            u[:, 0] = u[:, 0] + 100.0
            return u

    _, st2 = _run(Corrupt(), x, text, neg, cfg, global_batch=8, offset=0)
    assert torch.allclose(st2["per_sample_loss"][i2v], st["per_sample_loss"][i2v], rtol=1e-6)
    assert not torch.allclose(st2["per_sample_loss"][~i2v], st["per_sample_loss"][~i2v], rtol=1e-3)


def test_stage1_all_conditioned_does_not_depend_on_frame_zero_noise():
    """i2v_prob = 1: frame 0's noise reaches neither the four forwards nor the loss (bitwise)."""
    cfg = FlowMapObjectiveConfig(i2v_prob=1.0, text_dropout=0.3)
    x, text, neg = _inputs(b=8)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    eps0 = eps.clone()
    eps0[:, 0] = torch.randn(eps[:, 0].shape, generator=torch.Generator().manual_seed(4)) * 3.0
    runs = []
    for noise in (eps, eps0):
        model = LinearTimeModel()
        loss, st = _run(model, x, text, neg, cfg, global_batch=8, offset=0, noise=noise)
        runs.append((loss, st, model.calls))
    assert bool(runs[0][1]["i2v"].all())
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1]["per_sample_loss"], runs[1][1]["per_sample_loss"])
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a["z"], b["z"]) and torch.equal(a["T"], b["T"])


def test_i2v_off_does_not_touch_frame_zero():
    cfg = FlowMapObjectiveConfig(i2v_prob=0.0)
    x, text, neg = _inputs()
    model = LinearTimeModel()
    _, st = _run(model, x, text, neg, cfg)
    assert not st["i2v"].any()
    assert torch.all(model.calls[0]["T"][:, 0] > 0)


def test_bf16_latents_keep_float32_timesteps_and_match_float64_within_rounding():
    """bf16 latents: float32 timesteps, and every quantity within a rounding bound of the float64 reference.

    The reference runs the paper's equations in float64 on the same bf16 inputs (x, text and the bf16 eps
    drawn from the same generator), so the only differences are the code's roundings. Elementwise bound
    (first order, ``ub = 2^-8`` the bf16 unit roundoff, ``rho`` a float32 slack of 1e-5 relative that
    covers the float32 arithmetic, the float32 t, r and 1000 t):

    * ``z`` and ``z +/- v e/1000`` are formed in float32 and rounded once to bf16: ``dz <= ub |z|``;
    * the model (linear in z: ``u = W z + ...``) computes in float32 and rounds its output to bf16:
      ``du <= ub |u| + (1 + ub) |W| dz + rho (|W| |z| + |A| + |B| + |C| + 2 |text term|)``;
    * ``v = eps - x`` is rounded to bf16: ``dv <= ub |v|``;
    * eq. 6 ``u = (u_c - (1 - g) u_null) / g``: ``(du_c + |1 - g| du_null) / g``;
    * the target ``v - (T - R) (u_+ - u_-) / (2 e g)``: ``dv + |T - R| (du_+ + du_-) / (2 e g)`` (the
      finite difference amplifies bf16 rounding by up to 1000 / (2 e g) = 33 at e = 5, g = 3, hence the
      advice in objective.py to pass float32 latents);
    * per sample ``w mean (d + dd)^2`` with ``d = u - u_tgt``: ``|d ps| <= w mean(2 |d| dd + dd^2)``,
      ``dd`` the sum of the two bounds above;
    * the loss ``(1/b) [sum_B ps + bm sum_NB ps / (ps + c)]`` (eq. 7, bm the boundary mean) is increasing
      in every ``ps``, so it lies between its values at ``ps_ref -/+ d ps``.
    A bf16 time grid (T rounded to 4 near 1000) or bf16 arithmetic in z would break these bounds.
    """
    cfg = FlowMapObjectiveConfig(text_dropout=0.5)
    x, text, neg = _inputs()
    xb, tb, nb = x.bfloat16(), text.bfloat16(), neg.bfloat16()
    model = LinearTimeModel()
    loss16, st16 = _run(model, xb, tb, nb, cfg, return_tensors=True)
    for call in model.calls:
        assert call["T"].dtype == torch.float32 and call["R"].dtype == torch.float32
        assert call["z"].dtype == torch.bfloat16
    assert torch.isfinite(loss16) and loss16.dtype == torch.float32

    ref_model = LinearTimeModel()
    ref = ref_stage1(ref_model, xb, tb, nb, cfg, 7, 11, 10, 2)
    assert torch.equal(st16["kind"], ref["kind"]) and torch.equal(st16["text_dropped"], ref["drop"])
    _assert_times_close(st16["t"], ref["t"])
    ub, rho, g, e = 2.0 ** -8, 1e-5, cfg.guidance, cfg.fd_eps
    b, f = x.shape[:2]
    bc = lambda a: a[..., None, None, None]  # noqa: E731
    xd, eps, v = xb.double(), ref["eps"], ref["eps"] - xb.double()
    tf = ref["t"][:, None].expand(b, f)
    T, R = 1000.0 * tf, 1000.0 * ref["r"][:, None].expand(b, f)
    z = (1 - bc(tf)) * xd + bc(tf) * eps
    absW = ref_model.W.abs()
    c = torch.where(ref["drop"][:, None, None], nb.double().expand(b, -1, -1), tb.double())
    nul = nb.double().expand(b, -1, -1)

    def model_bound(zz, text_):
        """Bound on |bf16 model output - float64 model output| at the bf16-rounded ``zz``."""
        with torch.no_grad():
            u = ref_model(zz, 1000.0 * tf, R, text_)
        dz = ub * zz.abs()
        lin = lambda a: (a.reshape(b, -1) @ absW.T).reshape(zz.shape)  # noqa: E731
        txt = (text_.mean(dim=1) @ ref_model.P).abs().reshape(b, 1, *SHAPE[1:])
        slack = rho * (lin(zz.abs()) + ref_model.A.abs() + ref_model.B.abs() + ref_model.C.abs() + 2 * txt)
        return u, ub * u.abs() + (1 + ub) * lin(dz) + slack

    step = v * (e / 1000.0)
    _, du_c = model_bound(z, c)
    _, du_n = model_bound(z, nul)
    u_p, du_p = model_bound(z + step, c)
    u_m, du_m = model_bound(z - step, c)
    # the model's own t-dependence at T +/- e is the reference's; only the z rounding is bounded above
    du_pred = (du_c + abs(1 - g) * du_n) / g + rho * ref["u"].detach().abs()
    du_tgt = ub * v.abs() + bc(T - R).abs() * (du_p + du_m) / (2 * e * g) + rho * (ref["u_tgt"].abs() + (
        bc(T - R).abs() * (u_p - u_m).abs() / (2 * e * g)))
    assert bool(((st16["u_pred"].double() - ref["u"].detach()).abs() <= du_pred).all())
    assert bool(((st16["u_target"].double() - ref["u_tgt"]).abs() <= du_tgt).all())
    d = (ref["u"] - ref["u_tgt"]).detach()
    dd = du_pred + du_tgt
    w = ref_beta08_weight(ref["t"], cfg.time.shift)
    assert _rel(st16["sample_weight"], w) < 1e-6
    dps = w * (2 * d.abs() * dd + dd ** 2).mean(dim=(1, 2, 3, 4)) + rho * ref["per_sample"].detach()
    ps_ref = ref["per_sample"].detach()
    assert bool(((st16["per_sample_loss"].double() - ps_ref).abs() <= dps).all())

    boundary = ref["kind"] == 0

    def reweighted(ps):
        bm = ps[boundary].mean()
        return torch.where(boundary, ps, bm * ps / (ps + cfg.reweight_eps)).mean()

    lo, hi = reweighted((ps_ref - dps).clamp_min(0)), reweighted(ps_ref + dps)
    assert lo.item() <= loss16.item() <= hi.item(), (lo.item(), loss16.item(), hi.item())
    # how much of the bound is used (printed with -s; the bound is a worst case over aligned roundings)
    print("bf16 vs float64: loss", loss16.item(), "ref", ref["loss"].item(), "bound", (lo.item(), hi.item()),
          "per-sample error / bound", ((st16["per_sample_loss"].double() - ps_ref).abs() / dps).max().item())


def test_noise_argument_reproduces_generator_draw():
    cfg = FlowMapObjectiveConfig(text_dropout=0.5)
    x, text, neg = _inputs()
    loss_a, st_a = _run(LinearTimeModel(), x, text, neg, cfg)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    # With noise given, the generator is used for the masks only: skip the eps draw by hand.
    ng = torch.Generator().manual_seed(11)
    torch.randn(x.shape, generator=ng)
    loss_b, st_b = stage1_loss(LinearTimeModel(), x, text, neg, cfg, time_generator=torch.Generator().manual_seed(7),
                               noise_generator=ng, global_batch=10, global_offset=2, noise=eps)
    assert torch.equal(st_a["text_dropped"], st_b["text_dropped"])
    assert loss_a.item() == loss_b.item()


def test_negative_text_per_sample():
    cfg = FlowMapObjectiveConfig(text_dropout=0.5)
    x, text, neg = _inputs(neg_batch=6)
    loss, st = _run(LinearTimeModel(), x, text, neg, cfg, return_tensors=True)
    ref = ref_stage1(LinearTimeModel(), x, text, neg, cfg, 7, 11, 10, 2)
    assert abs(loss.item() - ref["loss"].item()) <= 1e-4 * ref["loss"].item()


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")
def test_triton_backend_matches_torch(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, text, neg = _inputs()
    out = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        net = ToyFlowMapNet(SHAPE, hidden=16, use_text=True)
        cfg = FlowMapObjectiveConfig(text_dropout=0.3, kernel_backend=backend)
        loss, st = _run(net, x, text, neg, cfg)
        loss.backward()
        out[backend] = (loss.detach(), st["scales"], [p.grad.clone() for p in net.parameters()])
    assert abs(out["torch"][0].item() - out["triton"][0].item()) <= 1e-5 * out["torch"][0].item()
    assert _rel(out["triton"][1], out["torch"][1]) < 1e-5
    for a, b in zip(out["triton"][2], out["torch"][2]):
        assert _rel(a, b) < 1e-4


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_stage1_errors():
    cfg = FlowMapObjectiveConfig()
    x, text, neg = _inputs()
    m = LinearTimeModel()
    with pytest.raises(ValueError, match="5-D"):
        _run(m, x[0], text, neg, cfg)
    with pytest.raises(ValueError, match="text batch"):
        _run(m, x, text[:4], neg, cfg)
    with pytest.raises(ValueError, match="negative_text"):
        _run(m, x, text, neg[:, :3], cfg)
    with pytest.raises(ValueError, match="negative_text"):
        _run(m, x, text, torch.randn(2, L, D), cfg)
    with pytest.raises(ValueError, match="global_offset"):
        _run(m, x, text, neg, cfg, global_batch=7, offset=2)
    with pytest.raises(ValueError, match="global_offset"):
        _run(m, x, text, neg, cfg, global_batch=10, offset=-1)
    with pytest.raises(ValueError, match="global_batch"):
        _run(m, x, text, neg, cfg, global_batch=10.0, offset=0)
    with pytest.raises(ValueError, match="noise"):
        _run(m, x, text, neg, cfg, noise=torch.randn(2, 3))
    with pytest.raises(ValueError, match="frames"):
        _run(m, x[:, :1], text, neg, FlowMapObjectiveConfig(i2v_prob=0.5))
    with pytest.raises(ValueError, match="model output"):
        _run(lambda z, T, R, c: z[:, :1], x, text, neg, cfg)
    with pytest.raises(ValueError, match="cfg"):
        _run(m, x, text, neg, TeacherObjectiveConfig())
    for bad in (dict(guidance=0.0), dict(fd_eps=0.0), dict(text_dropout=1.5), dict(i2v_prob=-0.1),
                dict(kernel_backend="cuda"), dict(time="beta"), dict(reweight_eps=-1.0)):
        with pytest.raises(ValueError):
            FlowMapObjectiveConfig(**bad)
    for bad in (dict(shift=0.0), dict(logit_std=0.0), dict(text_dropout=2.0)):
        with pytest.raises(ValueError):
            TeacherObjectiveConfig(**bad)


# --------------------------------------------------------------------------------------------------
# teacher flow matching
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("i2v_prob", [0.0, 0.5, 1.0])
def test_flow_matching_loss_matches_float64(i2v_prob):
    """The teacher objective, its per-sample losses and gradients against float64 autograd. With
    ``i2v_prob > 0`` (TI2V) the reference holds frame 0 of the conditioned samples clean (z = x) at
    t = r = 0 and averages the squared error over the other frames only."""
    cfg = TeacherObjectiveConfig(text_dropout=0.5, i2v_prob=i2v_prob)
    x, text, neg = _inputs()
    torch.manual_seed(0)
    net = ToyFlowMapNet(SHAPE, hidden=16, use_text=True)
    with torch.no_grad():
        for p in net.corr_net[-1].parameters():
            p.normal_(0, 0.1)
    net64 = copy.deepcopy(net).double()
    model = LinearTimeModel()
    loss, st = flow_matching_loss(net, x, text, neg, cfg, noise_generator=torch.Generator().manual_seed(5))
    loss.backward()

    # float64 reference: t = shift(sigmoid(m + s n)), z = (1 - t) x + t eps, mse(model(z, t, t), eps - x)
    g = torch.Generator().manual_seed(5)
    n = torch.randn(6, generator=g).double()
    t = _shift(torch.sigmoid(cfg.logit_mean + cfg.logit_std * n), cfg.shift)
    eps = torch.randn(x.shape, generator=g).double()
    drop = torch.rand(6, generator=g) < cfg.text_dropout
    # TI2V: drawn after the dropout uniforms, only when i2v_prob > 0 (so 0 keeps the old stream)
    i2v = torch.rand(6, generator=g) < i2v_prob if i2v_prob > 0 else torch.zeros(6, dtype=torch.bool)
    assert torch.equal(st["text_dropped"], drop) and 0 < int(drop.sum()) < 6
    assert torch.equal(st["i2v"], i2v)
    if i2v_prob == 0.5:
        assert 0 < int(i2v.sum()) < 6
    assert torch.allclose(st["t"].double(), t, rtol=1e-6)
    tf = t[:, None].repeat(1, SHAPE[0])
    tf[:, 0] = torch.where(i2v, torch.zeros_like(t), t)  # condition frame: t = 0 (and r = t = 0)
    keep = torch.ones(6, SHAPE[0], dtype=torch.float64)
    keep[:, 0] = (~i2v).double()  # condition frame: not in the loss
    tt = tf[..., None, None, None]
    z = (1 - tt) * x.double() + tt * eps
    c = torch.where(drop[:, None, None], neg.double().expand(6, -1, -1), text.double())
    T = 1000 * tf
    pred = net64(z, T, T, c)
    per = (keep * ((pred - (eps - x.double())) ** 2).mean(dim=(2, 3, 4))).sum(1) / keep.sum(1)
    ref = per.mean()
    ref.backward()
    assert _rel(st["per_sample_loss"], per) < 1e-5
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    for p, p64 in zip(net.parameters(), net64.parameters()):
        assert _rel(p.grad, p64.grad) < 1e-4

    # model called once, with r = t (single-time teacher), float32 timesteps
    flow_matching_loss(model, x, text, neg, cfg, noise_generator=torch.Generator().manual_seed(5))
    assert len(model.calls) == 1
    call = model.calls[0]
    assert call["T"].dtype == torch.float32 and torch.equal(call["T"], call["R"])
    with pytest.raises(ValueError, match="5-D"):
        flow_matching_loss(model, x[0], text, neg, cfg, noise_generator=None)


def test_flow_matching_condition_frame_is_clean_and_out_of_the_loss():
    """i2v_prob = 1: every sample's frame 0 is the clean latent at T = R = 0, so the loss and gradients do
    not depend on frame 0's noise (bitwise); the other frames' noise does change them."""
    cfg = TeacherObjectiveConfig(text_dropout=0.0, i2v_prob=1.0)
    x, text, neg = _inputs()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    eps0 = eps.clone()
    eps0[:, 0] = torch.randn(eps[:, 0].shape, generator=torch.Generator().manual_seed(4)) * 3.0
    eps1 = eps.clone()
    eps1[:, 1] = eps1[:, 1] + 0.5
    torch.manual_seed(0)
    net = ToyFlowMapNet(SHAPE, hidden=16, use_text=True)
    with torch.no_grad():
        for p in net.corr_net[-1].parameters():
            p.normal_(0, 0.1)
    out = []
    for noise in (eps, eps0, eps1):
        net.zero_grad()
        loss, st = flow_matching_loss(net, x, text, neg, cfg, noise_generator=torch.Generator().manual_seed(5),
                                      noise=noise)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    assert bool(st["i2v"].all())
    assert torch.equal(out[0][0], out[1][0]) and all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    assert not torch.equal(out[0][0], out[2][0])
    model = LinearTimeModel()
    flow_matching_loss(model, x, text, neg, cfg, noise_generator=torch.Generator().manual_seed(5), noise=eps0)
    call = model.calls[0]
    assert torch.equal(call["z"][:, 0], x[:, 0]) and torch.all(call["T"][:, 0] == 0) and torch.all(call["R"][:, 0] == 0)
    assert torch.all(call["T"][:, 1:] > 0)
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        flow_matching_loss(model, x[:, :1], text, neg, cfg, noise_generator=None)
    with pytest.raises(ValueError, match="i2v_prob"):
        TeacherObjectiveConfig(i2v_prob=1.5)
