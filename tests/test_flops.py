"""The model-FLOP formula against PyTorch's FLOP counter on the real model (explicit-matmul attention,
which the counter sees; CPU SDPA is invisible to it)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.measure.flops import expected_segments, forward_flops, step_flops


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


# ------------------------------------------------------------------------------------------------
# hardware FLOPs
# ------------------------------------------------------------------------------------------------
from megatron_anyflow.models import lora as L  # noqa: E402
from megatron_anyflow.measure.flops import (  # noqa: E402
    pass_hardware_flops, rollout_segments, stage2_iteration_flops, step_hardware_flops)


@pytest.mark.parametrize("targets", [L.DEFAULT_TARGETS, L.TEACHER_TARGETS], ids=["default", "teacher"])
@pytest.mark.parametrize("grad, lora, input_grad", [(True, True, False), (True, True, True), (False, True, False),
                                                    (False, False, False)],
                         ids=["train", "train-chained-input", "nograd-lora", "nograd-base"])
def test_hardware_flops_match_the_flop_counter(targets, grad, lora, input_grad):
    """What autograd executes (frozen base: dgrad only where needed; LoRA both grads; cross-attention
    k / v without backward; explicit-matmul attention) equals the formula, GEMM for GEMM."""
    cfg = wan_config("tiny", attention_impl="math")
    torch.manual_seed(0)
    model = WanModel(cfg)
    L.apply_lora(model, ["a"], 4, 4.0, targets)
    f, h, w, C = 3, 8, 12, 7
    x = torch.randn(2, f, 16, h, w, requires_grad=input_grad)
    t = torch.rand(2) * 1000
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
        out = model(x, t, t * 0.5, torch.randn(2, C, 384), adapter="a" if lora else None)
        if grad:
            out.float().sum().backward()
    expected = pass_hardware_flops(cfg, f, h, w, C, grad=grad, lora_rank=4, lora_targets=targets, lora=lora,
                                   input_requires_grad=input_grad, attention="math", batch=2)
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


def test_fused_attention_backward_is_the_counters_convention():
    """attention="flash" counts backward at 2.5x forward: PyTorch's own count for the fused SDPA kernels."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    q = (1, 12, 320, 128)
    assert sdpa_backward_flop_count(q, q, q, q) == 2.5 * sdpa_flop_count(q, q, q)
    cfg = wan_config("tiny")
    kw = dict(lora_rank=0, lora=False)
    fl = pass_hardware_flops(cfg, 3, 8, 8, 8, grad=True, input_requires_grad=True, attention="flash", **kw)
    ma = pass_hardware_flops(cfg, 3, 8, 8, 8, grad=True, input_requires_grad=True, attention="math", **kw)
    S, C, h, nl = 3 * 4 * 4, 8, cfg.hidden_size, cfg.num_layers
    # self-attention 2.5x vs 2x of 4 S^2 h; cross-attention 2.5x vs dq only (1x) of 4 S C h
    assert fl - ma == pytest.approx(nl * (0.5 * 4 * S * S * h + 1.5 * 4 * S * C * h), rel=1e-12)


def test_hardware_flops_of_a_step_and_the_model_convention():
    """At 32k tokens attention dominates (backward 2.5x, not 2x): hardware > model FLOPs; at 240 tokens
    the base's skipped wgrad dominates: hardware < model."""
    cfg = wan_config("wan2.1-1.3b", perform_initialization=False)
    shape = (21, 60, 104, 512)
    model = step_flops(cfg, "stage1", *shape).flops_per_sample
    hw = step_hardware_flops(cfg, "stage1", *shape, lora_rank=256).total
    assert 1.0 * model < hw < 1.15 * model
    small = (5, 8, 12, 512)
    assert step_hardware_flops(cfg, "teacher", *small, lora_rank=256).total < step_flops(
        cfg, "teacher", *small).flops_per_sample
    merged = step_hardware_flops(cfg, "stage1", *shape, lora_rank=256, merged_nograd=True).total
    assert merged < hw
    with pytest.raises(ValueError, match="stage"):
        step_hardware_flops(cfg, "stage3", *shape, lora_rank=4)
    with pytest.raises(ValueError, match="attention"):
        pass_hardware_flops(cfg, *shape, grad=False, attention="cudnn")


def test_stage2_flops_are_the_sum_over_the_drawn_plans():
    cfg = wan_config("tiny")
    shape = (3, 8, 8, 8)
    plans = [(2, 0), (4, 2), (8, 7), (1, 0), (50, 49), (16, 3)]
    assert [rollout_segments(N, k) for N, k in plans] == [2, 3, 2, 1, 2, 3]
    for schedule in ("sequential", "pipelined"):
        per_it = stage2_iteration_flops(cfg, plans, *shape, schedule=schedule, lora_rank=4)
        for (N, k), (m, hw) in zip(plans, per_it):
            seg = rollout_segments(N, k)
            crit = seg if schedule == "sequential" else 0
            assert m == (step_flops(cfg, "stage2_generator", *shape, rollout_grad_segments=seg).flops_per_sample
                         + step_flops(cfg, "stage2_critic", *shape, rollout_segments=crit).flops_per_sample)
            assert hw == step_hardware_flops(cfg, "stage2", *shape, lora_rank=4, rollout_grad_segments=seg,
                                             rollout_segments=crit).total
        # linear in the segment count: the mean over the draws is the count at the mean draw
        mean_seg = sum(rollout_segments(*p) for p in plans) / len(plans)
        e = step_flops(cfg, "stage2_generator", *shape, rollout_grad_segments=mean_seg).flops_per_sample + step_flops(
            cfg, "stage2_critic", *shape, rollout_segments=mean_seg if schedule == "sequential" else 0).flops_per_sample
        assert sum(m for m, _ in per_it) / len(plans) == pytest.approx(e, rel=1e-12)
