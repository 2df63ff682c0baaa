"""TE's fused RoPE kernel (te backend) = this project's `apply_rotary` (the diffusers layout)."""

import pytest
import torch

from megatron_anyflow.models.wan.rope import RotaryCache, apply_rotary, apply_rotary_te, te_fused_rope


def test_angles_recovered_for_the_fused_kernel():
    """The TE path hands the kernel atan2(sin, cos) repeated per channel pair: a reference kernel that
    rotates interleaved pairs by those angles (TE's documented interleaved semantics) reproduces
    `apply_rotary` (CPU, float32; the angles are exact to float32 rounding, ~1e-7)."""
    cos, sin = RotaryCache((4, 6, 6), 10000.0).get((3, 4, 5), torch.device("cpu"))
    x = torch.randn(60, 2, 3, 16, generator=torch.Generator().manual_seed(0))

    def interleaved_reference(t, freqs, tensor_format, interleaved, fused):
        assert tensor_format == "sbhd" and interleaved and fused and freqs.shape == (60, 1, 1, 16)
        f = freqs[..., ::2]
        assert torch.equal(freqs[..., 1::2], f)  # each angle repeated for its pair
        t0, t1 = t.float()[..., ::2], t.float()[..., 1::2]
        out = torch.stack([t0 * f.cos() - t1 * f.sin(), t0 * f.sin() + t1 * f.cos()], dim=-1)
        return out.flatten(-2).to(t.dtype)

    ref = apply_rotary(x, cos, sin)
    got = apply_rotary_te(interleaved_reference, x, cos, sin)
    assert float((got - ref).abs().max()) < 1e-5


@pytest.mark.gpu
def test_te_fused_rope_matches_on_cuda():
    """With TE installed: the fused kernel equals `apply_rotary` (bf16 inputs: within bf16 rounding of the
    float32 rotation, 2^-8 relative). Without TE the te backend is unavailable and `te_fused_rope` is None."""
    fn = te_fused_rope()
    try:
        import transformer_engine  # noqa: F401
        have_te = True
    except ImportError:
        have_te = False
    if not have_te:
        assert fn is None
        return
    assert fn is not None, "TE is installed but its apply_rotary_pos_emb lacks interleaved / fused"
    dev = torch.device("cuda")
    cos, sin = RotaryCache((44, 42, 42), 10000.0).get((5, 6, 8), dev)
    x = torch.randn(240, 2, 4, 128, device=dev, dtype=torch.bfloat16)
    ref = apply_rotary(x, cos, sin).float()
    got = apply_rotary_te(fn, x, cos, sin).float()
    assert float((got - ref).abs().max()) <= 2 ** -7 * float(ref.abs().max())
