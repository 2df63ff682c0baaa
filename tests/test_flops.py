"""The model-FLOP formula against PyTorch's FLOP counter on the real model (explicit-matmul attention,
which the counter sees; CPU SDPA is invisible to it)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.training.flops import expected_segments, forward_flops, step_flops


@pytest.mark.parametrize("kw, shape, text_len", [
    (dict(), (5, 8, 12), 11),
    (dict(hidden_size=128, num_attention_heads=4, ffn_hidden_size=320, num_layers=3), (3, 6, 10), 7),
    (dict(delta_embedder=False), (1, 4, 4), 5),
])
def test_forward_flops_match_the_flop_counter(kw, shape, text_len):
    cfg = wan_config("tiny", attention_impl="math", **kw)
    model = WanModel(cfg)
    f, h, w = shape
    x = torch.randn(2, f, 16, h, w)
    t = torch.rand(2) * 1000
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, t * 0.5, torch.randn(2, text_len, 384))
    assert counter.get_total_flops() / 2 == pytest.approx(forward_flops(cfg, f, h, w, text_len), rel=1e-9)


def test_step_forward_equivalents():
    cfg = wan_config("tiny")
    f = forward_flops(cfg, 3, 8, 8, 8)
    assert step_flops(cfg, "teacher", 3, 8, 8, 8).flops_per_sample == 3 * f
    assert step_flops(cfg, "stage1", 3, 8, 8, 8).flops_per_sample == 6 * f
    assert step_flops(cfg, "stage2_generator", 3, 8, 8, 8).forward_equivalents == 9 + 3 + 6
    assert step_flops(cfg, "stage2_critic", 3, 8, 8, 8, rollout_segments=2).forward_equivalents == 5
    assert expected_segments([2]) == 2 and expected_segments([2, 4]) == pytest.approx((2 + 2.5) / 2)
    with pytest.raises(ValueError, match="stage"):
        step_flops(cfg, "stage3", 3, 8, 8)
