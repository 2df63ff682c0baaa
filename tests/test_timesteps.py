"""Independent float64 checks of megatron_anyflow.anyflow.timesteps."""
import math

import pytest
import torch

from megatron_anyflow.anyflow.timesteps import (
    KIND_BOUNDARY,
    KIND_FREE,
    KIND_R_ZERO,
    NUM_TRAIN_TIMESTEPS,
    TimeSamplerConfig,
    flow_map_time_grid,
    logit_normal_t,
    loss_weight,
    loss_weight_grid,
    sample_t_r,
    shift_time,
    split_counts,
    to_model_scale,
)


def _shift64(x, s):
    x = torch.as_tensor(x, dtype=torch.float64)
    return s * x / (1.0 + (s - 1.0) * x)


def _unshift64(y, s):
    # inverse of y = s x / (1 + (s - 1) x)  ->  x = y / (s - (s - 1) y)
    y = torch.as_tensor(y, dtype=torch.float64)
    return y / (s - (s - 1.0) * y)


# ---------------------------------------------------------------- shift_time
@pytest.mark.parametrize("s", [0.5, 1.0, 2.0, 5.0, 8.0])
def test_shift_time_formula(s):
    x = torch.rand(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shift_time(x, s), _shift64(x, s), rtol=0, atol=1e-15)
    assert shift_time(x, s).dtype == torch.float64
    assert shift_time(0.0, s) == 0.0 and shift_time(1.0, s) == 1.0
    assert isinstance(shift_time(0.3, s), float)
    assert abs(shift_time(0.3, s) - float(_shift64(0.3, s))) < 1e-15
    x32 = x.float()
    assert shift_time(x32, s).dtype == torch.float32
    # monotone
    xs = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert bool((shift_time(xs, s).diff() > 0).all())


def test_shift_time_inverse_roundtrip():
    x = torch.linspace(0, 1, 57, dtype=torch.float64)
    torch.testing.assert_close(_unshift64(shift_time(x, 5.0), 5.0), x, rtol=0, atol=1e-14)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "x"])
def test_shift_time_bad_shift(bad):
    with pytest.raises(ValueError):
        shift_time(0.5, bad)


# ---------------------------------------------------------------- sample_t_r
@pytest.mark.parametrize("n", [1, 2, 4, 7, 8, 32])
def test_sample_t_r_split(n):
    cfg = TimeSamplerConfig()
    t, r, kind = sample_t_r(n, torch.Generator().manual_seed(n), cfg)
    assert t.shape == (n,) and r.shape == (n,) and kind.shape == (n,)
    assert t.dtype == torch.float32 and r.dtype == torch.float32
    assert kind.dtype in (torch.int64, torch.int8)
    nb, nr0 = math.floor(0.5 * n), math.floor(0.25 * n)
    assert split_counts(n, cfg) == (nb, nr0, n - nb - nr0)
    expected = [KIND_BOUNDARY] * nb + [KIND_R_ZERO] * nr0 + [KIND_FREE] * (n - nb - nr0)
    assert kind.tolist() == expected
    assert bool((t >= r).all())
    assert bool((t >= 0).all() and (t <= 1).all() and (r >= 0).all() and (r <= 1).all())
    b = kind == KIND_BOUNDARY
    assert torch.equal(r[b], t[b])
    assert bool((r[kind == KIND_R_ZERO] == 0).all())
    free = kind == KIND_FREE
    assert bool((r[free] < t[free]).all())
    assert bool((r[free] > 0).all())


def _ref_counts(n, boundary_fraction=0.5, r_zero_fraction=0.25):
    """The reference split: ``n_b = floor(0.5 n)`` boundary, ``n_r0 = floor(0.25 n)`` r = 0, the rest free.
    The floor is taken of ``fraction * n + 1e-9``: a fraction that is not exact in binary (0.29 * 100 =
    28.999999999999996) must still give 29; 1e-9 is far below the 1/n steps of any real batch."""
    n_b = math.floor(boundary_fraction * n + 1e-9)
    n_r0 = math.floor(r_zero_fraction * n + 1e-9)
    return n_b, n_r0, n - n_b - n_r0


@pytest.mark.parametrize("fractions", [(0.5, 0.25), (0.29, 0.0), (0.3, 0.3), (0.1, 0.7), (1 / 3, 1 / 3)])
def test_sample_t_r_counts_and_layout_follow_the_rule(fractions):
    """For every n in 1..300 the counts are the rule's and the layout is by index: [0, n_b) boundary
    (r = t bitwise), [n_b, n_b + n_r0) r = 0, the rest free (0 < r < t)."""
    bf, rf = fractions
    cfg = TimeSamplerConfig(boundary_fraction=bf, r_zero_fraction=rf)
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 301):
        nb, nr0, nfree = _ref_counts(n, bf, rf)
        assert split_counts(n, cfg) == (nb, nr0, nfree), n
        t, r, kind = sample_t_r(n, gen, cfg)
        idx = torch.arange(n)
        assert torch.equal(kind, torch.where(idx < nb, KIND_BOUNDARY, torch.where(idx < nb + nr0, KIND_R_ZERO,
                                                                                    KIND_FREE))), n
        assert torch.equal(r[:nb], t[:nb]), n
        assert bool((r[nb:nb + nr0] == 0).all()), n
        assert bool((r[nb + nr0:] < t[nb + nr0:]).all() and (r[nb + nr0:] > 0).all()), n
    # the guard matters: without it, 0.29 * 100 floors to 28
    assert math.floor(0.29 * 100) == 28 and split_counts(100, TimeSamplerConfig(boundary_fraction=0.29)) == (29, 25, 46)
    # the documented consequences of the default rule: n = 1 is free, n = 8 gives 4 / 2 / 2
    assert split_counts(1) == (0, 0, 1) and split_counts(8) == (4, 2, 2)


def test_sample_t_r_reproduces_formula():
    """Reproduce the draw independently in float64 from the same generator state."""
    n, s = 64, 5.0
    t, r, kind = sample_t_r(n, torch.Generator().manual_seed(123), TimeSamplerConfig(shift=s))
    u = torch.rand((2, n), generator=torch.Generator().manual_seed(123), dtype=torch.float32).double()
    t_ref = _shift64(torch.maximum(u[0], u[1]), s)
    r_ref = _shift64(torch.minimum(u[0], u[1]), s)
    r_ref[: n // 2] = t_ref[: n // 2]
    r_ref[n // 2: n // 2 + n // 4] = 0.0
    torch.testing.assert_close(t.double(), t_ref, rtol=0, atol=2e-7)
    torch.testing.assert_close(r.double(), r_ref, rtol=0, atol=2e-7)


def test_sample_t_r_determinism():
    cfg = TimeSamplerConfig()
    a = sample_t_r(16, torch.Generator().manual_seed(7), cfg)
    b = sample_t_r(16, torch.Generator().manual_seed(7), cfg)
    c = sample_t_r(16, torch.Generator().manual_seed(8), cfg)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0])
    # one generator advanced twice gives different draws
    g = torch.Generator().manual_seed(7)
    d1, d2 = sample_t_r(16, g, cfg), sample_t_r(16, g, cfg)
    assert not torch.equal(d1[0], d2[0])


def test_sample_t_r_marginals():
    n, s = 200_000, 5.0
    cfg = TimeSamplerConfig(shift=s, boundary_fraction=0.0, r_zero_fraction=0.0)
    t, r, kind = sample_t_r(n, torch.Generator().manual_seed(0), cfg)
    assert bool((kind == KIND_FREE).all())
    tu, ru = _unshift64(t, s), _unshift64(r, s)
    # max / min of two uniforms: means 2/3 and 1/3, variance 1/18 each (std err ~5e-4)
    assert abs(tu.mean().item() - 2 / 3) < 3e-3
    assert abs(ru.mean().item() - 1 / 3) < 3e-3
    assert abs(tu.var().item() - 1 / 18) < 2e-3
    # P(max <= 1/2) = 1/4
    assert abs((tu <= 0.5).double().mean().item() - 0.25) < 5e-3
    # with the default split, boundary samples keep the same t marginal
    t2, _, kind2 = sample_t_r(n, torch.Generator().manual_seed(1), TimeSamplerConfig(shift=s))
    tb = _unshift64(t2[kind2 == KIND_BOUNDARY], s)
    assert abs(tb.mean().item() - 2 / 3) < 5e-3


def test_sample_t_r_device_arg():
    t, r, kind = sample_t_r(4, torch.Generator().manual_seed(0), device="cpu")
    assert t.device.type == "cpu" and kind.device.type == "cpu"


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_sample_t_r_bad_n(n):
    with pytest.raises(ValueError):
        sample_t_r(n, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(shift=0.0),
        dict(shift=-5.0),
        dict(boundary_fraction=-0.1),
        dict(boundary_fraction=1.1),
        dict(r_zero_fraction=1.5),
        dict(boundary_fraction=0.6, r_zero_fraction=0.5),
        dict(loss_weight="gaussian"),
        dict(beta_a=0.5),
        dict(beta_b=float("nan")),
    ],
)
def test_config_errors(kwargs):
    with pytest.raises(ValueError):
        TimeSamplerConfig(**kwargs)


def test_config_edge_fractions():
    t, r, kind = sample_t_r(8, torch.Generator().manual_seed(0), TimeSamplerConfig(boundary_fraction=1.0,
                                                                                    r_zero_fraction=0.0))
    assert torch.equal(t, r) and bool((kind == KIND_BOUNDARY).all())
    _, r, kind = sample_t_r(8, torch.Generator().manual_seed(0), TimeSamplerConfig(boundary_fraction=0.0,
                                                                                   r_zero_fraction=1.0))
    assert bool((r == 0).all()) and bool((kind == KIND_R_ZERO).all())


# ---------------------------------------------------------------- loss weight
def _ref_weight(t, s=5.0, a=2.0, b=1.5):
    """Reference beta08, written out: descending grid on 0..1000, argmin of |grid - T|."""
    x = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)
    grid = s * x / (1 + (s - 1) * x)
    y = grid ** (a - 1) * (1 - grid) ** (b - 1)
    w = y * (1000.0 / y.sum())
    T = t.double().reshape(-1) * 1000.0
    idx = torch.argmin((grid.unsqueeze(1) * 1000.0 - T.unsqueeze(0)).abs(), dim=0)
    return w[idx].reshape(t.shape), grid, w


def test_loss_weight_grid_normalisation():
    grid, w = loss_weight_grid(TimeSamplerConfig())
    assert grid.dtype == torch.float64 and grid.shape == (1001,)
    assert abs(w.sum().item() - 1000.0) < 1e-9
    _, grid_ref, w_ref = _ref_weight(torch.zeros(1))
    torch.testing.assert_close(grid, grid_ref.flip(0), rtol=0, atol=1e-15)
    torch.testing.assert_close(w, w_ref.flip(0), rtol=1e-13, atol=1e-13)
    assert w[0].item() == 0.0 and w[-1].item() == 0.0
    # uniform
    g2, w2 = loss_weight_grid(TimeSamplerConfig(loss_weight="uniform"))
    assert bool((w2 == 1).all())
    # copies: modifying does not poison the cache
    w[:] = 0
    assert abs(loss_weight_grid(TimeSamplerConfig())[1].sum().item() - 1000.0) < 1e-9


def test_loss_weight_values_vs_reference():
    gen = torch.Generator().manual_seed(0)
    cfg = TimeSamplerConfig()
    t, _, _ = sample_t_r(4096, gen, cfg)
    t = torch.cat([t, torch.tensor([0.0, 1.0, 0.5, 0.999999, 1e-7])])
    w = loss_weight(t, cfg)
    assert w.dtype == torch.float32 and w.shape == t.shape
    w_ref, grid_ref, _ = _ref_weight(t)
    torch.testing.assert_close(w.double(), w_ref, rtol=1e-6, atol=1e-6)
    # exactly at grid points
    wg = loss_weight(grid_ref, cfg)
    torch.testing.assert_close(wg.double(), _ref_weight(grid_ref)[0], rtol=1e-6, atol=1e-6)
    # [b, f] shape kept, float64 input ok
    tb = torch.rand(3, 5, dtype=torch.float64, generator=gen)
    wb = loss_weight(tb, cfg)
    assert wb.shape == (3, 5) and wb.dtype == torch.float32
    torch.testing.assert_close(wb.double(), _ref_weight(tb)[0], rtol=1e-6, atol=1e-6)


def test_loss_weight_other_params_and_uniform():
    cfg = TimeSamplerConfig(shift=3.0, beta_a=3.0, beta_b=2.0)
    t = torch.rand(500, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss_weight(t, cfg).double(), _ref_weight(t, 3.0, 3.0, 2.0)[0], rtol=1e-6, atol=1e-6)
    u = loss_weight(t.view(20, 25), TimeSamplerConfig(loss_weight="uniform"))
    assert u.shape == (20, 25) and u.dtype == torch.float32 and bool((u == 1).all())


def test_loss_weight_shape_of_density():
    # t (1 - t)^0.5 peaks at t = 2/3
    t = torch.linspace(0, 1, 2001)
    w = loss_weight(t)
    assert abs(t[w.argmax()].item() - 2 / 3) < 0.01
    with pytest.raises(ValueError):
        loss_weight(torch.tensor([1, 2]))


# ---------------------------------------------------------------- grids and scales
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 16, 50])
@pytest.mark.parametrize("s", [1.0, 5.0])
def test_flow_map_time_grid(n, s):
    g = flow_map_time_grid(n, s)
    assert g.dtype == torch.float64 and g.shape == (n + 1,)
    assert g[0].item() == 1.0 and g[-1].item() == 0.0
    assert bool((g.diff() < 0).all())
    x = torch.tensor([1.0 - i / n for i in range(n + 1)], dtype=torch.float64)
    torch.testing.assert_close(g, _shift64(x, s), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [0, -1, 1.5, "4", None])
def test_flow_map_time_grid_errors(n):
    with pytest.raises(ValueError):
        flow_map_time_grid(n)


def test_flow_map_time_grid_bad_shift():
    with pytest.raises(ValueError):
        flow_map_time_grid(4, 0.0)


def test_to_model_scale():
    t = torch.tensor([0.0, 0.25, 0.123456789, 1.0], dtype=torch.float64)
    T = to_model_scale(t)
    assert T.dtype == torch.float32
    torch.testing.assert_close(T, (t * 1000).float(), rtol=0, atol=0)
    assert NUM_TRAIN_TIMESTEPS == 1000
    assert to_model_scale(0.5).dtype == torch.float32 and to_model_scale(0.5).item() == 500.0
    t32 = torch.rand(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_model_scale(t32), t32 * 1000)
    assert to_model_scale(t32.to(torch.bfloat16)).dtype == torch.float32


def test_logit_normal_t():
    n, s = 50_000, 5.0
    t = logit_normal_t(n, torch.Generator().manual_seed(3), shift=s)
    assert t.dtype == torch.float32 and t.shape == (n,)
    assert bool((t > 0).all() and (t < 1).all())
    eps = torch.randn(n, generator=torch.Generator().manual_seed(3), dtype=torch.float32).double()
    ref = _shift64(1 / (1 + torch.exp(-eps)), s)
    torch.testing.assert_close(t.double(), ref, rtol=0, atol=2e-7)
    # unshifted median of sigmoid(N(0, 1)) is 1/2
    assert abs(_unshift64(t, s).median().item() - 0.5) < 0.01
    t2 = logit_normal_t(8, torch.Generator().manual_seed(3), shift=1.0, mean=1.0, std=0.5)
    e2 = torch.randn(8, generator=torch.Generator().manual_seed(3)).double()
    torch.testing.assert_close(t2.double(), torch.sigmoid(1.0 + 0.5 * e2), rtol=0, atol=2e-7)
    for bad in (dict(n=0), dict(n=4, shift=0.0), dict(n=4, std=0.0)):
        with pytest.raises(ValueError):
            logit_normal_t(bad.pop("n"), None, **bad)
