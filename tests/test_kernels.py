"""Tests of the AnyFlow stage-1 loss kernels (``megatron_anyflow_kernels``).

Without CUDA the Triton kernels run through the Triton interpreter: this module sets
``TRITON_INTERPRET=1`` at its top, before triton is imported, and the setting stays for the rest of the
pytest process (harmless on a CPU-only machine, where Triton cannot run any other way). The kernels
``triton.jit`` themselves lazily at launch time, so this also works when another test module imported
triton first. With CUDA the variable is left alone and the Triton kernels run on the GPU.

Checks: Triton vs the torch reference (forward and gradient, fp32 to 1e-6 relative, bf16 to 1e-2) over
ragged sizes; the reference vs an independent float64 formula written inline; adaptive reweighting
values and gradients (mixed, no and all boundary samples); input validation.
"""
import os

import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the triton import below

import pytest  # noqa: E402

import megatron_anyflow_kernels as K  # noqa: E402

DEVICE = "cuda" if _CUDA else "cpu"
needs_triton = pytest.mark.skipif(not K.HAS_TRITON, reason="triton is not installed")

G, EPS_FD = 3.0, 5.0
# (B, F, per-frame shape): M = 1000, 77, 3*5*7 = 105 and a multi-chunk row (M = 4500 > BLOCK 4096).
SHAPES = [(1, 1, (1000,)), (3, 5, (77,)), (3, 5, (3, 5, 7)), (1, 5, (1000,)), (3, 1, (4500,))]


@pytest.fixture(autouse=True)
def _interpret_on_cpu(monkeypatch):
    if not _CUDA:  # in case another module changed it after import
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(B, F, frame_shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lat = [torch.randn(B, F, *frame_shape, generator=gen).to(dtype).to(DEVICE) for _ in range(5)]
    dt = (torch.rand(B, F, generator=gen) * 1000.0).to(DEVICE)
    fw = torch.rand(B, F, generator=gen) + 0.25
    fw[0, 0] = 0.0  # a zero-weight frame (for F = 1: a sample with all frame weights zero)
    if F > 2:
        fw[-1, 1] = 1.0
    sw = (torch.rand(B, generator=gen) + 0.5).to(DEVICE)
    grad_out = (torch.rand(B, generator=gen) + 0.5).to(DEVICE)
    return lat, dt, fw.to(DEVICE), sw, grad_out


def _loss_and_grad(fn, lat, dt, fw, sw, grad_out, **kw):
    uc = lat[0].clone().requires_grad_(True)
    loss = fn(uc, *lat[1:], dt, fw, sw, guidance=G, fd_eps=EPS_FD, **kw)
    loss.backward(grad_out)
    return loss.detach(), uc.grad


def _assert_rel(actual, expected, rtol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= rtol, f"{what}: max relative error {err:.3e} > {rtol:.0e}"
    return err


# --------------------------------------------------------------------------------------------------
# Kernel (a): flow-map loss
# --------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,F,frame_shape", SHAPES)
def test_flow_map_loss_triton_matches_reference(B, F, frame_shape, dtype, rtol):
    lat, dt, fw, sw, go = _inputs(B, F, frame_shape, dtype, seed=B * 100 + F)
    loss_t, grad_t = _loss_and_grad(K.flow_map_loss, lat, dt, fw, sw, go, backend="triton")
    loss_r, grad_r = _loss_and_grad(K.flow_map_loss_reference, lat, dt, fw, sw, go)
    assert loss_t.shape == (B,) and loss_t.dtype == torch.float32
    assert grad_t.shape == lat[0].shape and grad_t.dtype == dtype
    # Forward: per-sample relative error (fp32 accumulation in both, so fp32 tolerance even for bf16).
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-6, atol=0.0)
    _assert_rel(grad_t, grad_r, rtol, f"grad {dtype}")
    if fw[0].sum() == 0:
        assert loss_t[0] == 0 and bool((grad_t[0] == 0).all())
    else:
        assert bool((grad_t[0, 0] == 0).all())  # zero-weight frame gets no gradient


def _f64_formula(lat, dt, fw, sw, go):
    """Loss and d loss / d u_cond straight from the equations, in float64."""
    uc, un, up, um, v = (x.detach().double().reshape(x.shape[0], x.shape[1], -1) for x in lat)
    B, F, M = uc.shape
    dt, fw, sw, go = (x.double() for x in (dt, fw, sw, go))
    u = (uc - (1 - G) * un) / G
    du_dt = (up - um) / (2 * EPS_FD * G)
    u_tgt = v - dt[:, :, None] * du_dt
    denom = fw.sum(1).clamp_min(1e-12)
    loss = sw * (fw[:, :, None] * (u - u_tgt) ** 2).sum((1, 2)) / (M * denom)
    grad = (go * sw / (G * M * denom))[:, None, None] * fw[:, :, None] * 2 * (u - u_tgt)
    return loss, grad.reshape(lat[0].shape)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,F,frame_shape", [(3, 5, (3, 5, 7)), (1, 1, (1000,)), (3, 1, (77,))])
def test_reference_matches_float64_formula(B, F, frame_shape, dtype, rtol):
    lat, dt, fw, sw, go = _inputs(B, F, frame_shape, dtype, seed=7 + B + F)
    loss_r, grad_r = _loss_and_grad(K.flow_map_loss_reference, lat, dt, fw, sw, go)
    loss_64, grad_64 = _f64_formula(lat, dt, fw, sw, go)
    torch.testing.assert_close(loss_r.double(), loss_64, rtol=1e-5, atol=0.0)
    _assert_rel(grad_r, grad_64, rtol, f"reference grad {dtype}")
    assert grad_r.dtype == dtype


def test_flow_map_target_matches_formula():
    lat, dt, _, _, _ = _inputs(2, 3, (4, 5), torch.float32, seed=3)
    u, u_tgt = K.flow_map_target(*lat, dt, guidance=G, fd_eps=EPS_FD)
    assert u.shape == lat[0].shape and u_tgt.shape == lat[0].shape and not u_tgt.requires_grad
    uc, un, up, um, v = (x.double() for x in lat)
    dt64 = dt.double()[:, :, None, None]
    torch.testing.assert_close(u.double(), (uc - (1 - G) * un) / G, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(u_tgt.double(), v - dt64 * (up - um) / (2 * EPS_FD * G), rtol=1e-5, atol=1e-4)


@needs_triton
def test_only_u_cond_receives_gradient():
    lat, dt, fw, sw, go = _inputs(3, 5, (77,), torch.float32, seed=11)
    for backend in ("triton", "torch"):
        xs = [x.clone().requires_grad_(True) for x in lat]
        small = [x.clone().requires_grad_(True) for x in (dt, fw, sw)]
        K.flow_map_loss(*xs, *small, backend=backend).sum().backward()
        assert xs[0].grad is not None
        assert all(x.grad is None for x in xs[1:] + small), backend


def test_auto_backend_on_cpu_is_reference():
    """"auto" dispatches on the tensors' device: CPU tensors take the reference even on a GPU machine."""
    lat, dt, fw, sw, _ = _inputs(3, 5, (77,), torch.float32, seed=5)
    lat, dt, fw, sw = [x.cpu() for x in lat], dt.cpu(), fw.cpu(), sw.cpu()
    a = K.flow_map_loss(*lat, dt, fw, sw, backend="auto")
    b = K.flow_map_loss_reference(*lat, dt, fw, sw)
    assert torch.equal(a, b)


def test_flow_map_loss_validation():
    lat, dt, fw, sw, _ = _inputs(2, 3, (10,), torch.float32, seed=1)
    with pytest.raises(ValueError, match="u_null shape"):
        K.flow_map_loss(lat[0], lat[1][:, :, :5], *lat[2:], dt, fw, sw)
    with pytest.raises(ValueError, match="velocity dtype"):
        K.flow_map_loss(*lat[:4], lat[4].bfloat16(), dt, fw, sw)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        K.flow_map_loss(*(x.double() for x in lat), dt, fw, sw)
    with pytest.raises(ValueError, match="frame_weight"):
        K.flow_map_loss(*lat, dt, fw[:, :2], sw)
    with pytest.raises(ValueError, match="dt dtype"):
        K.flow_map_loss(*lat, dt.double(), fw, sw)
    with pytest.raises(ValueError, match="u_cond must have shape"):
        K.flow_map_loss(*lat, dt[:1], fw[:1], sw[:1])
    with pytest.raises(ValueError, match="backend"):
        K.flow_map_loss(*lat, dt, fw, sw, backend="cuda")


# --------------------------------------------------------------------------------------------------
# Kernel (b): adaptive reweighting
# --------------------------------------------------------------------------------------------------
def _reweight_case(B, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    loss = (torch.rand(B, generator=gen) * 2.0 + 1e-3).to(DEVICE)
    if kind == "mixed":
        bnd = torch.rand(B, generator=gen) < 0.5
        bnd[0], bnd[-1] = True, False
    else:
        bnd = torch.full((B,), kind == "all", dtype=torch.bool)
    bm = torch.tensor(0.4 + torch.rand((), generator=gen).item(), dtype=torch.float32)
    return loss, bnd.to(DEVICE), bm.to(DEVICE), (torch.rand((), generator=gen) + 0.5).to(DEVICE)


@pytest.mark.parametrize("B,kind", [(1, "none"), (1, "all"), (7, "mixed"), (7, "none"), (7, "all"),
                                    (2500, "mixed"), (2500, "all")])  # 2500 > one 1024-wide block
def test_adaptive_reweight(B, kind):
    loss, bnd, bm, go = _reweight_case(B, kind, seed=B)
    backends = ["torch"] + (["triton"] if K.HAS_TRITON else [])
    l_ref = loss.clone().requires_grad_(True)
    out_r, scales_r = K.adaptive_reweight_reference(l_ref, bnd, bm)
    out_r.backward(go)
    # Independent float64 check of the reference.
    l64, bm64 = loss.double(), bm.double()
    s64 = torch.where(bnd, torch.ones_like(l64), bm64 / (l64 + 1e-5))
    torch.testing.assert_close(scales_r.double(), s64, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(out_r.double(), (s64 * l64).sum() / B, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(l_ref.grad.double(), s64 / B * go.double(), rtol=1e-6, atol=0.0)
    assert not scales_r.requires_grad
    for backend in backends:
        lt = loss.clone().requires_grad_(True)
        out, scales = K.adaptive_reweight(lt, bnd, bm, backend=backend)
        assert out.shape == () and out.dtype == torch.float32 and scales.shape == (B,)
        assert not scales.requires_grad
        out.backward(go)
        torch.testing.assert_close(scales, scales_r, rtol=1e-6, atol=0.0)
        torch.testing.assert_close(out, out_r.detach(), rtol=1e-6, atol=0.0)
        torch.testing.assert_close(lt.grad, l_ref.grad, rtol=1e-6, atol=0.0)
        if kind == "all":
            assert torch.equal(scales, torch.ones_like(scales))


def test_adaptive_reweight_float_boundary_mean_and_validation():
    loss, bnd, bm, _ = _reweight_case(5, "mixed", seed=2)
    a, sa = K.adaptive_reweight(loss, bnd, bm.item(), backend="torch")
    b, sb = K.adaptive_reweight_reference(loss, bnd, bm)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(sa, sb)
    with pytest.raises(ValueError, match="is_boundary dtype"):
        K.adaptive_reweight(loss, bnd.float(), bm)
    with pytest.raises(ValueError, match="per_sample_loss"):
        K.adaptive_reweight(loss[:, None], bnd, bm)
    with pytest.raises(ValueError, match="boundary_mean"):
        K.adaptive_reweight(loss, bnd, loss[:2])
