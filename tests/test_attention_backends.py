"""--attention-impl: every kernel available here gives the same block output; missing ones are clear errors.

Tolerance: SDPA (PyTorch's CPU flash kernel, float32, online softmax) against the explicit float32
math form: both are float32 sums of <= 64 terms of O(1) values in another order; the error is a few
ulp of the output (u = 6e-8): 1e-5 relative norm-wise leaves ~100x margin.
"""

import pytest
import torch

from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.layer import TorchCoreAttention, resolve_attention_impl
from megatron_anyflow.models.wan.model import WanModel


def _qkv(s=24, b=2, n=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, b, n, d, generator=g) for _ in range(3)]


def test_auto_on_cpu_resolves_to_sdpa():
    choice, why = resolve_attention_impl("auto", torch.device("cpu"))
    assert choice == "sdpa" and "cpu" in why


def test_sdpa_equals_math_for_the_core_and_the_model():
    q, k, v = _qkv()
    outs = {}
    for impl in ("sdpa", "math", "auto"):
        core = TorchCoreAttention(wan_config("tiny", attention_impl=impl))
        outs[impl] = core(q, k, v)
        assert outs[impl].shape == (24, 2, 64)
    assert core.resolved == "sdpa"
    assert (outs["sdpa"] - outs["math"]).norm() / outs["math"].norm() < 1e-5
    assert torch.equal(outs["auto"], outs["sdpa"])
    # Strided q / k / v (the fused-qkv views the layer passes) give the same result as contiguous ones.
    qkv = torch.stack([q, k, v], dim=3)
    core = TorchCoreAttention(wan_config("tiny", attention_impl="sdpa"))
    assert torch.allclose(core(*qkv.unbind(3)), outs["sdpa"], rtol=0, atol=1e-6)

    g = torch.Generator().manual_seed(1)
    x, txt = torch.randn(1, 2, 16, 4, 6, generator=g), torch.randn(1, 5, 384, generator=g)
    t = torch.tensor([700.0])
    res = {}
    for impl in ("sdpa", "math"):
        torch.manual_seed(0)
        model = WanModel(wan_config("tiny", attention_impl=impl)).eval()
        with torch.no_grad():
            res[impl] = model(x, t, t * 0.5, txt)
    assert (res["sdpa"] - res["math"]).norm() / res["math"].norm() < 1e-5


def test_kernels_that_cannot_run_here_are_named():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="'cudnn' needs a CUDA device; the inputs are on cpu"):
        resolve_attention_impl("cudnn", cpu)
    with pytest.raises(ValueError, match="attention_impl='bogus'"):
        resolve_attention_impl("bogus", cpu)
    with pytest.raises(ValueError, match="attention_impl='bogus'"):
        wan_config("tiny", attention_impl="bogus")
    for impl, package in (("fa3", "flash_attn_interface"), ("flash", "flash-attn")):
        try:
            __import__("flash_attn_interface" if impl == "fa3" else "flash_attn")
            pytest.fail(f"{package} is installed on this CPU machine: this test expects it absent")
        except ImportError:
            pass
        with pytest.raises(ImportError, match=package):
            resolve_attention_impl(impl, cpu)
        core = TorchCoreAttention(wan_config("tiny", attention_impl=impl))
        with pytest.raises(ImportError, match=package):
            core(*_qkv())


def test_the_choice_is_described_for_the_start_up_log():
    model = WanModel(wan_config("tiny", attention_impl="auto"))
    line = model.describe_kernels(torch.device("cpu"))
    assert line.startswith("attention: sdpa (--attention-impl auto;"), line


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "cudnn", "sdpa", "math"])
def test_cuda_kernels_match_math_in_bf16(impl):
    """bf16 q/k/v on CUDA: each kernel within bf16 rounding (2^-8 relative per element, norm-wise
    ~4e-3 after the softmax-weighted sums) of the float32 math form."""
    q, k, v = (t.cuda().bfloat16() for t in _qkv(s=256, n=4, d=128))
    ref = TorchCoreAttention(wan_config("tiny", attention_impl="math"))(q.float(), k.float(), v.float())
    out = TorchCoreAttention(wan_config("tiny", attention_impl=impl))(q, k, v).float()
    assert (out - ref).norm() / ref.norm() < 1e-2
