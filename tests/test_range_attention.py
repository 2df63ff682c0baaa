"""FAR attention without K / V copies: several key ranges attended separately and merged exactly by the
log-sum-exp (`models.wan.range_attention.multi_range_attention`, `TorchCoreAttention.forward_ranges`,
`FarAttention.attend`), outputs AND gradients against the dense-mask reference.

Tolerance (fp32, max abs error < 1e-6 against a float64 evaluation of the dense mask). Inputs are
q, k, v ~ 0.5 N(0, 1), d = 16, scale 1/4, so |s| = |q.k| / 4 <~ 2.5 and |v| <~ 2.5 over these sizes.
The fp32 path rounds each score with error ~ sqrt(d) u |q||k| / 4 <~ 4 u (u = 2^-24 ~ 6e-8, random-walk
accumulation of d products), which perturbs each softmax weight by that relative amount; the merge
adds a few roundings (exp, one multiply-add per range, relative u each). Output error ~ (4 + c) u max|v|
+ sqrt(m) u max|v| (m <= 200 keys summed) ~ 4e-7 at most, typically ~1e-7. Gradients: dv_j = sum_i
p_ij dO_i and dq, dk are sums of p (dP - D) terms of the same sizes (dO ~ N(0, 1), at most 200 terms
each weighted by p <= 1 and summing to 1 per query), so the same relative error applies to values of
magnitude <~ 3: < 1e-6. The merge itself is exact algebra (exp(lse_i - lse) are the per-range shares
of the softmax normaliser), so there is no approximation error to add, only rounding; float64 agrees to
~1e-15 (checked below too).
"""

import pytest
import torch

from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.far import FarAttention, FarKVCache, FarLayout
from megatron_anyflow.models.wan.layer import TorchCoreAttention
from megatron_anyflow.models.wan.range_attention import multi_range_attention

ATOL = 1e-6  # fp32, derived in the module docstring


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dense_reference(q, k, v, mask):
    """float64 masked softmax attention by explicit formulas ([b, n, s, d] layout, mask [sq, sk])."""
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v.double())


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ranges", [[(0, 7), (12, 30), (33, 40)], [(20, 40), (0, 5)], [(3, 19)]],
                         ids=["three", "two-unordered", "one"])
def test_multi_range_attention_equals_dense_mask_with_gradients(dtype, ranges):
    b, n, sq, L, d = 2, 3, 10, 40, 16
    g = _gen(11)
    q, k, v = (0.5 * torch.randn(b, n, s, d, generator=g, dtype=torch.float64) for s in (sq, L, L))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = multi_range_attention(q, [k[:, :, a:e] for a, e in ranges], [v[:, :, a:e] for a, e in ranges])
    mask = torch.zeros(sq, L, dtype=torch.bool)
    for a, e in ranges:
        mask[:, a:e] = True
    ref = _dense_reference(q, k, v, mask)
    tol = ATOL if dtype == torch.float32 else 1e-12
    assert out.dtype == dtype and out.shape == (b, n, sq, d)
    assert (out.double() - ref).abs().max() < tol
    # the lse is the log-sum-exp of the scaled scores over the allowed keys
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) / d ** 0.5
    assert (lse.double() - s.masked_fill(~mask, float("-inf")).logsumexp(-1)).abs().max() < tol
    dout = torch.randn(b, n, sq, d, generator=_gen(12), dtype=torch.float64)
    got = _grads(out, (q, k, v), dout.to(dtype))
    want = _grads(ref, (q, k, v), dout)
    for name, a, e in zip("qkv", got, want):
        assert (a.double() - e).abs().max() < tol, (name, (a.double() - e).abs().max().item())
    # keys outside every range get exactly zero gradient (no pair outside the mask is computed)
    outside = ~mask[0]
    assert not got[1][:, :, outside].any() and not got[2][:, :, outside].any()


@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("cp,clean", [((1, 1, 2, 1, 1), True), ((1, 1, 2, 1, 1), False), ((2, 1, 3, 1), True)])
def test_far_grouped_attention_equals_dense_mask_with_gradients(cp, clean, impl):
    """FarAttention's grouped attention through the model's core (`TorchCoreAttention.forward` for one
    key range, `.forward_ranges` for several) against the dense mask in float64: outputs and the
    gradients of q, k, v, fp32 < 1e-6 (module docstring)."""
    H, W = 8, 12
    lay = FarLayout.train(cp, H, W, clean=clean)
    # teacher forcing (clean copies) has multi-range groups; plain block-causal has one range per group
    assert any(len(r) > 1 for _, _, r in lay.attention_groups()) == clean
    L, b, n, d = lay.length, 2, 4, 16
    g = _gen(20 + len(cp))
    q, k, v = (0.5 * torch.randn(L, b, n, d, generator=g) for _ in range(3))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    core = TorchCoreAttention(wan_config("tiny", attention_impl=impl))
    out = FarAttention(lay).attend(core, q, k, v, 0, core_ranges=core.forward_ranges)
    ref = _dense_reference(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), lay.dense_mask())
    ref = ref.permute(2, 0, 1, 3).reshape(L, b, n * d)
    assert (out.double() - ref).abs().max() < ATOL
    dout = torch.randn(L, b, n * d, generator=_gen(3), dtype=torch.float64)
    for name, a, e in zip("qkv", _grads(out, (q, k, v), dout.float()), _grads(ref, (q, k, v), dout)):
        assert (a.double() - e).abs().max() < ATOL, (name, (a.double() - e).abs().max().item())


def test_cached_step_attends_cache_and_chunk_without_concatenating():
    """The generation step: keys = the KV cache + the current chunk, merged by the lse (no cat), equal
    to one dense attention over the concatenation; gradients reach q and the chunk's k / v only (the
    cache is detached)."""
    cp, H, W = (1, 2, 1), 8, 12
    st = FarLayout.step(cp, H, W)
    hist = FarLayout.prefill(cp[:-1], H, W).valid_length
    b, n, d = 1, 4, 16
    g = _gen(5)
    ck, cv = (0.5 * torch.randn(hist, b, n, d, generator=g) for _ in range(2))
    cache = FarKVCache(cp[:-1], ((ck, cv),), H, W)
    q, k, v = (0.5 * torch.randn(st.length, b, n, d, generator=g).requires_grad_() for _ in range(3))
    cats = []
    real_cat = torch.cat
    core = TorchCoreAttention(wan_config("tiny"))

    def spy(tensors, *a, **kw):
        cats.append([t.shape for t in tensors])
        return real_cat(tensors, *a, **kw)

    torch.cat = spy
    try:
        out = FarAttention(st, cache).attend(core, q, k, v, 0, core_ranges=core.forward_ranges)
    finally:
        torch.cat = real_cat
    assert not any(s[0][0] == hist for s in cats), cats  # no cat(cache, k / v)
    keys, vals = torch.cat([ck, k]), torch.cat([cv, v])
    mask = torch.ones(st.length, hist + st.length, dtype=torch.bool)
    ref = _dense_reference(*(t.permute(1, 2, 0, 3) for t in (q, keys, vals)), mask)
    ref = ref.permute(2, 0, 1, 3).reshape(st.length, b, n * d)
    assert (out.double() - ref).abs().max() < ATOL
    dout = torch.randn(out.shape, generator=_gen(6), dtype=torch.float64)
    for name, a, e in zip("qkv", _grads(out, (q, k, v), dout.float()), _grads(ref, (q, k, v), dout)):
        assert (a.double() - e).abs().max() < ATOL, name


def test_default_core_ranges_and_bf16_within_rounding():
    """Without ``core_ranges`` (a core with no ``forward_ranges``, e.g. Transformer Engine's) the op runs
    directly; bf16 stays within bf16 rounding of the fp32 result (2^-8 relative per element, norm-wise
    ~4e-3 after the softmax-weighted sums)."""
    cp, H, W = (1, 1, 2, 1, 1), 8, 12
    lay = FarLayout.train(cp, H, W, clean=True)
    g = _gen(8)
    q, k, v = (0.5 * torch.randn(lay.length, 1, 4, 16, generator=g) for _ in range(3))
    core = TorchCoreAttention(wan_config("tiny"))
    ref = FarAttention(lay, dense_mask=True).attend(core, q, k, v, 0)
    out = FarAttention(lay).attend(core, q, k, v, 0)
    assert (out - ref).abs().max() < ATOL
    low = FarAttention(lay).attend(core, *(t.bfloat16() for t in (q, k, v)), 0)
    assert low.dtype == torch.bfloat16 and (low.float() - ref).norm() / ref.norm() < 1e-2


def test_errors_name_the_bad_input():
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="equally many"):
        multi_range_attention(q, [k, k], [k])
    with pytest.raises(ValueError, match="key range 1: 0 keys"):
        multi_range_attention(q, [k, k[:, :, :0]], [k, k[:, :, :0]])
    with pytest.raises(ValueError, match="key range 0: torch.float64"):
        multi_range_attention(q, [k.double()], [k.double()])
    out, lse = multi_range_attention(q.requires_grad_(), [k, k], [k, k])
    assert out.requires_grad and not lse.requires_grad  # the lse is for inspection, not differentiable


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_multi_range_attention_equals_dense_mask(dtype):
    """CUDA (FlashAttention-2 for bf16, memory-efficient attention for fp32): outputs and gradients
    against the float64 dense mask; fp32 < 1e-5 (TF32 off; the efficient kernel's exp2 / block order
    differ from the CPU's), bf16 within bf16 rounding norm-wise (1e-2)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    b, n, sq, L, d = 2, 4, 200, 700, 128
    ranges = [(0, 130), (250, 500), (600, 700)]
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (0.5 * torch.randn(b, n, s, d, generator=g, device="cuda") for s in (sq, L, L))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out, _ = multi_range_attention(q, [k[:, :, a:e] for a, e in ranges], [v[:, :, a:e] for a, e in ranges])
    mask = torch.zeros(sq, L, dtype=torch.bool, device="cuda")
    for a, e in ranges:
        mask[:, a:e] = True
    ref = _dense_reference(q, k, v, mask)
    dout = torch.randn(ref.shape, generator=g, device="cuda", dtype=torch.float64)
    pairs = [(out, ref)] + list(zip(_grads(out, (q, k, v), dout.to(dtype)), _grads(ref, (q, k, v), dout)))
    for a, e in pairs:
        if dtype == torch.float32:
            assert (a.double() - e).abs().max() < 1e-5
        else:
            assert (a.double() - e).norm() / e.norm() < 1e-2


@pytest.mark.parametrize("policy", ["save-attention", "core_attn"])
def test_far_teacher_forcing_recomputation_gives_the_gradients_of_no_recompute(policy):
    """The custom op under selective recomputation: the save-attention policy keeps its merged output
    and lse (one op), the ``core_attn`` checkpoint replays it; both give bit-identical gradients to
    the run without recomputation (CPU kernels are deterministic)."""
    from megatron_anyflow.models.wan.model import WanModel

    cp, H, W, b = (1, 2, 2, 2, 1), 8, 12, 1
    over = (dict(recompute_granularity="selective", recompute_policy="save-attention") if policy == "save-attention"
            else dict(recompute_granularity="selective", recompute_policy="modules", recompute_modules=["core_attn"]))
    g = _gen(40)
    x = torch.randn(b, sum(cp), 16, H, W, generator=g)
    clean = torch.randn(b, 5, 16, H, W, generator=g)  # the last full_chunk_limit = 3 chunks: 5 frames
    t = torch.cat([torch.zeros(b, 3), torch.full((b, 5), 700.0)], 1)
    txt = torch.randn(b, 7, 384, generator=g)
    grads = []
    for kw in ({}, over):
        torch.manual_seed(0)
        model = WanModel(wan_config("tiny", far=True, chunk_partition=cp, **kw))
        out = model(x, t, t * 0.5, txt, chunk_partition=cp, clean_latents=clean)
        (out ** 2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_traces_under_torch_compile_and_passes_opcheck():
    """The op is one node for ``torch.compile`` (``--compile``): its fake implementation and schema pass
    ``torch.library.opcheck``, and a full graph through it (aot_eager: the traced forward and backward,
    no code generation) gives the eager output and gradients bitwise."""
    def f(q, k, v):
        return multi_range_attention(q, [k[:, :, :5], k[:, :, 9:]], [v[:, :, :5], v[:, :, 9:]])[0]

    g = _gen(30)
    q, k, v = (torch.randn(1, 2, s, 8, generator=g, requires_grad=True) for s in (4, 16, 16))
    torch.library.opcheck(torch.ops.megatron_anyflow.multi_range_attention.default,
                          (q.detach(), [k.detach()[:, :, :5], k.detach()[:, :, 9:]],
                           [v.detach()[:, :, :5], v.detach()[:, :, 9:]]),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    a, b = compiled(q, k, v), f(q, k, v)
    assert torch.equal(a, b)
    for x, y in zip(torch.autograd.grad(a.sum(), (q, k, v)), torch.autograd.grad(b.sum(), (q, k, v))):
        assert torch.equal(x, y)
