"""No-grad forwards with LoRA run the merged weight W + s B A (``lora_merged_nograd``), equal to the
unmerged path: float32 within 1e-6 relative, bf16 within bf16 rounding; the cache follows optimizer steps.

Tolerances. float32: merged and unmerged compute the same products in another association
((W + sBA) x against W x + s B (A x)); each output element differs by a few roundings (u = 6e-8) of
the O(1) terms summed: measured 1.3e-7 relative; 1e-6 leaves 8x. bf16: the merged weight is W + sBA
rounded to bf16 once (relative 2^-9 per element) where the unmerged path rounds W x and the LoRA term
separately; through the 2-layer tiny model the outputs differ by a few bf16 ulps: measured 1.5e-3
relative, norm-wise, bound 1e-2 (bf16 spacing 2^-8 = 3.9e-3 x a few roundings); and the merged bf16
output is no further from the float32 model than the unmerged one is (both measured 5.0e-3; bound x 1.5).
"""

import pytest
import torch

from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.model import WanModel


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 3, 16, 4, 6, generator=g).to(dtype), torch.rand(2, 3, generator=g) * 1000,
            torch.rand(2, 3, generator=g) * 300, torch.randn(2, 5, 384, generator=g).to(dtype))


def _model(mode, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = WanModel(wan_config("tiny", bf16=dtype == torch.bfloat16, lora_merged_nograd=mode)).eval()
    L.apply_lora(model, ["gen", "fake"], rank=4, alpha=8)  # scaling 2: the scale is folded in, not skipped
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in L.adapter_parameters(model, "gen") + L.adapter_parameters(model, "fake"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("mode", ["per-call", "cache"])
def test_merged_equals_unmerged_in_float32(mode):
    x, t, r, txt = _inputs()
    model = _model(mode)
    for adapter in ("gen", "fake", None):
        with torch.no_grad():
            merged = model(x, t, r, txt, adapter=adapter)
            L.set_merged_nograd(model, "off")
            unmerged = model(x, t, r, txt, adapter=adapter)
            L.set_merged_nograd(model, mode)
        ref = model(x, t, r, txt, adapter=adapter).detach()  # grad enabled: always the unmerged path
        assert torch.equal(unmerged, ref)
        if adapter is None:
            assert torch.equal(merged, ref)
        else:
            assert 0 < rel(merged, ref) < 1e-6, adapter  # > 0: the merged path really ran


def test_merged_equals_unmerged_in_bf16():
    x, t, r, txt = _inputs(torch.bfloat16)
    model = _model("per-call", torch.bfloat16)
    torch.manual_seed(0)
    fp32 = _model("off")
    with torch.no_grad():
        merged = model(x, t, r, txt, adapter="gen")
        L.set_merged_nograd(model, "off")
        unmerged = model(x, t, r, txt, adapter="gen")
        exact = fp32(x.float(), t, r, txt.float(), adapter="gen")
    assert merged.dtype == torch.bfloat16
    assert 0 < rel(merged, unmerged) < 1e-2
    assert rel(merged, exact) < 1.5 * rel(unmerged, exact) + 1e-3


def test_cache_is_reused_and_invalidated_by_an_optimizer_step():
    x, t, r, txt = _inputs()
    model = _model("cache")
    lin = model.blocks[0].self_attention.linear_qkv
    with torch.no_grad():
        model(x, t, r, txt, adapter="gen")
    w1 = lin._merged_cache["gen"][1]
    with torch.no_grad():
        model(x, t, r, txt, adapter="gen")
    assert lin._merged_cache["gen"][1] is w1  # merged once, reused
    # One optimizer step on the generator (in-place update: the parameters' _version moves).
    params = L.adapter_parameters(model, "gen")
    opt = torch.optim.SGD(params, lr=0.5)
    (model(x, t, r, txt, adapter="gen") ** 2).mean().backward()
    opt.step()
    with torch.no_grad():
        after = model(x, t, r, txt, adapter="gen")
    assert lin._merged_cache["gen"][1] is not w1
    assert rel(after, model(x, t, r, txt, adapter="gen").detach()) < 1e-6
    # A write through .data bypasses the version counters: clear_merged_cache is the documented remedy.
    for p in params:
        p.data.mul_(0.5)
    L.clear_merged_cache(model)
    with torch.no_grad():
        halved = model(x, t, r, txt, adapter="gen")
    assert rel(halved, model(x, t, r, txt, adapter="gen").detach()) < 1e-6


def test_bad_mode_is_named():
    model = _model("off")
    with pytest.raises(ValueError, match="merged no-grad mode 'always'"):
        L.set_merged_nograd(model, "always")
    with pytest.raises(ValueError, match="lora_merged_nograd='always'"):
        wan_config("tiny", lora_merged_nograd="always")
