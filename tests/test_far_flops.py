"""AnyFlow-FAR FLOP counts (`measure.flops`): the block-sparse attention pairs against the layout's dense
mask, the forward / step / prefill formulas against PyTorch's FLOP counter on the FAR model
(explicit-matmul attention), and docs/design/far.md 6's cost ratios at 81 x 480 x 832."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.far import FarLayout
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.measure.flops import (far_attention_pairs, far_inference_flops, far_pass_shape, far_shapes,
                                             far_step_flops, far_step_hardware_flops, forward_flops,
                                             shape_forward_flops, shape_hardware_flops, step_flops)

CP, H, W = (1, 2, 2, 1, 1), 8, 12  # full frames 24 tokens, compressed 6


@pytest.mark.parametrize("build", [
    lambda: FarLayout.train(CP, H, W, clean=True),
    lambda: FarLayout.train(CP[:4], H, W, clean=True, pad_to=4),
    lambda: FarLayout.train(CP, H, W),
    lambda: FarLayout.train((3,), H, W),
    lambda: FarLayout.prefill(CP[:4], H, W, pad_to=8),
], ids=["teacher-forcing", "teacher-forcing-padded", "no-clean", "one-chunk", "prefill-padded"])
def test_pairs_are_the_dense_mask(build):
    lay = build()
    assert far_attention_pairs(lay) == int(lay.dense_mask().sum())
    if lay.mode == "train" and len(lay.chunk_partition) == 1:  # one chunk: the bidirectional forward
        assert far_attention_pairs(lay) == lay.length ** 2


def test_step_pairs_are_queries_times_cache_and_self():
    lay = FarLayout.step(CP, H, W)
    cache = FarLayout.prefill(CP[:-1], H, W).valid_length
    assert far_attention_pairs(lay, cache) == lay.valid_length * (cache + lay.valid_length) == 24 * (3 * 6 + 3 * 24 + 24)
    # cache of chunks 0..3: the last two (2 + 1 frames) full, chunks 0, 1 (3 frames) compressed


def _far_model(**kw):
    torch.manual_seed(0)
    cfg = wan_config("tiny", attention_impl="math", far=True, chunk_partition=CP, **kw)
    return cfg, WanModel(cfg)


def _count(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_far_forward_prefill_and_step_match_the_flop_counter():
    """Model FLOPs of one teacher-forcing forward, one prefill and one cached step (batch 2, no grad) ==
    PyTorch's count of what the FAR model runs (grouped explicit-matmul attention, both patch
    embeddings, no head in the prefill, one time row per modulation row)."""
    cfg, model = _far_model()
    b, C = 2, 7
    x = torch.randn(b, sum(CP), 16, H, W)
    text = torch.randn(b, C, 384)
    t = torch.rand(b, sum(CP)) * 1000
    ff = sum(CP[-3:])
    with torch.no_grad():
        n = _count(lambda: model(x, t, t * 0.5, text, chunk_partition=CP, clean_latents=x[:, -ff:]))
        shape = far_pass_shape(cfg, FarLayout.train(CP, H, W, clean=True))
        assert n / b == pytest.approx(shape_forward_flops(cfg, shape, C), rel=1e-12)
        pre = CP[:-1]
        n = _count(lambda: model.prefill(x[:, :sum(pre)], text, pre))
        assert n / b == pytest.approx(shape_forward_flops(cfg, far_pass_shape(cfg, FarLayout.prefill(pre, H, W)), C),
                                      rel=1e-12)
        cache = model.prefill(x[:, :sum(pre)], text, pre)
        n = _count(lambda: model(x[:, -1:], t[:, -1:], t[:, -1:], text, chunk_partition=CP, kv_cache=cache))
        step = far_pass_shape(cfg, FarLayout.step(CP, H, W), cache.num_tokens)
        assert n / b == pytest.approx(shape_forward_flops(cfg, step, C), rel=1e-12)
    # the FAR shapes of a one-chunk forward reduce to the bidirectional formula
    one = far_pass_shape(cfg, FarLayout.train((3,), H, W))
    assert shape_forward_flops(cfg, one, C) == pytest.approx(forward_flops(cfg, 3, H, W, C, per_frame_time=True))


def test_far_hardware_flops_with_grad_match_the_flop_counter():
    """A teacher-forcing call with grad: the frozen base's dgrad, both LoRA grads and the wgrad of the fully
    trained far_patch_embedding (chunks 0..3: one compressed chunk)."""
    cfg, model = _far_model()
    L.apply_lora(model, ["generator"], 4, 4.0)
    model.far_patch_embedding.weight.requires_grad_(True)
    model.far_patch_embedding.bias.requires_grad_(True)
    b, C, cp = 2, 5, CP[:4]
    x = torch.randn(b, sum(cp), 16, H, W)
    text = torch.randn(b, C, 384)
    t = torch.rand(b, sum(cp)) * 1000
    ff = sum(cp[-3:])
    def run():
        out = model(x, t, t * 0.5, text, adapter="generator", chunk_partition=cp, clean_latents=x[:, -ff:])
        out.float().sum().backward()

    n = _count(run)
    shape = far_pass_shape(cfg, FarLayout.train(cp, H, W, clean=True, ))
    expected = shape_hardware_flops(cfg, shape, C, grad=True, lora_rank=4, attention="math", batch=b,
                                    trainable=("far_patch_embedding",))
    assert n == pytest.approx(expected, rel=1e-12)


# n distribution of FAR stage 1 (docs/design/far.md 2.1 / 6): n = 3 with prob 0.5, else n ~ U{3..8}
P_N = {3: 0.5 + 0.5 / 6, **{n: 0.5 / 6 for n in range(4, 9)}}


def test_far_md_token_and_pair_figures_at_480p():
    """docs/design/far.md 6: E[L] 25,318 (vs 32,760), E[loss-bearing tokens] 12,090, E[attention pairs] 235M vs 1,073M
    (0.22x), 0.61x if a dense masked kernel computes all L^2; a rollout step over the 8 chunks 0.41x the
    pairs of a bidirectional step; the 7 prefills 68,250 tokens and 523M pairs."""
    cfg = wan_config("wan2.1-1.3b", far=True, perform_initialization=False)
    sh = far_shapes(cfg, 60, 104)
    tf = sh.teacher_forcing
    e_len = sum(p * tf[n].tokens for n, p in P_N.items())
    assert e_len == pytest.approx(25318, abs=1) and sh.bidirectional.tokens == 32760
    cp = sh.chunk_partition
    noisy = sum(p * sum(cp[:n][-3:]) * 1560 for n, p in P_N.items())
    assert noisy == pytest.approx(12090, abs=1)
    e_pairs = sum(p * tf[n].self_pairs for n, p in P_N.items())
    assert e_pairs / 1e6 == pytest.approx(235, abs=0.5) and sh.bidirectional.self_pairs / 1e6 == pytest.approx(1073, abs=1)
    assert e_pairs / 32760 ** 2 == pytest.approx(0.22, abs=0.005)
    assert sum(p * tf[n].tokens ** 2 for n, p in P_N.items()) / 32760 ** 2 == pytest.approx(0.61, abs=0.005)
    assert sum(s.tokens for s in sh.steps) == 32760
    assert sum(s.self_pairs for s in sh.steps) / 32760 ** 2 == pytest.approx(0.41, abs=0.005)
    assert sum(s.tokens for s in sh.prefills) == 68250
    assert sum(s.self_pairs for s in sh.prefills) / 1e6 == pytest.approx(523, abs=0.5)


@pytest.mark.parametrize("preset, fwd, fwd_dense, s1, s1_dense, inference", [
    ("wan2.1-1.3b", 0.39, 0.66, 0.45, 0.73, {1: 1.56, 4: 0.83, 8: 0.71}),
    ("wan2.1-14b", 0.48, 0.69, 0.55, 0.76, {1: 1.94, 4: 1.00, 8: 0.85}),
])
def test_far_md_flop_ratios_at_480p(preset, fwd, fwd_dense, s1, s1_dense, inference):
    """docs/design/far.md 6, C = 512: one FAR forward (expected over n) / one bidirectional forward, block-sparse and
    dense-masked; a stage-1 step (4 FAR forwards + 1 backward, plus the bidirectional branch with
    probability 0.1 = 2 forwards + 1 backward) / a bidirectional stage-1 step; inference with N steps per
    chunk / N bidirectional steps. Tolerance: far.md's two digits (+-0.01; inference +-0.02, where our
    14B figures are 1.95 / 1.01 / 0.86)."""
    cfg = wan_config(preset, far=True, perform_initialization=False)
    bi = forward_flops(cfg, 21, 60, 104)
    for dense, ratio, step_ratio in ((False, fwd, s1), (True, fwd_dense, s1_dense)):
        sh = far_shapes(cfg, 60, 104, dense=dense)
        e = sum(p * shape_forward_flops(cfg, sh.teacher_forcing[n]) for n, p in P_N.items()) / bi
        assert e == pytest.approx(ratio, abs=0.01), (dense, e)
        step = sum(p * far_step_flops(cfg, "stage1", 60, 104, num_chunks=n, dense=dense).flops_per_sample
                   for n, p in P_N.items()) + 0.1 * far_step_flops(cfg, "stage1", 60, 104, num_chunks=3, dense=dense,
                                                                    bidirectional=True).flops_per_sample
        step -= 0.1 * far_step_flops(cfg, "stage1", 60, 104, num_chunks=3, dense=dense).flops_per_sample
        assert step / step_flops(cfg, "stage1", 21, 60, 104).flops_per_sample == pytest.approx(step_ratio, abs=0.01)
    for N, ratio in inference.items():
        assert far_inference_flops(cfg, 60, 104, N) / (N * bi) == pytest.approx(ratio, abs=0.02), N


def test_far_step_flops_compose_the_calls():
    cfg = wan_config("tiny", far=True, chunk_partition=CP)
    sh = far_shapes(cfg, H, W)
    f = lambda s: shape_forward_flops(cfg, s, 16)  # noqa: E731
    bi, steps, pre = f(sh.bidirectional), sum(map(f, sh.steps)), sum(map(f, sh.prefills))
    s1 = far_step_flops(cfg, "stage1", H, W, 16, num_chunks=4)
    assert s1.flops_per_sample == pytest.approx(6 * f(sh.teacher_forcing[4]))
    assert s1.forward_equivalents == pytest.approx(s1.flops_per_sample / bi)  # in bidirectional forwards
    assert far_step_flops(cfg, "stage1", H, W, 16, num_chunks=4, bidirectional=True).flops_per_sample == pytest.approx(
        s1.flops_per_sample + 4 * bi)
    gen = far_step_flops(cfg, "stage2_generator", H, W, 16, rollout_grad_segments=2, num_chunks=3)
    assert gen.flops_per_sample == pytest.approx(6 * steps + pre + 3 * bi + 6 * f(sh.teacher_forcing[3]))
    assert far_step_flops(cfg, "stage2_critic", H, W, 16, rollout_segments=2).flops_per_sample == pytest.approx(
        2 * steps + pre + 3 * bi)
    assert far_step_flops(cfg, "stage2_critic", H, W, 16, rollout_segments=0).flops_per_sample == pytest.approx(3 * bi)
    hw = far_step_hardware_flops(cfg, "stage2", H, W, 16, lora_rank=4, rollout_grad_segments=2, rollout_segments=0)
    assert hw.critic == pytest.approx(shape_hardware_flops(cfg, sh.bidirectional, 16, grad=True, lora_rank=4))
    with pytest.raises(ValueError, match="num_chunks"):
        far_step_flops(cfg, "stage1", H, W, num_chunks=2)
    with pytest.raises(ValueError, match="FAR step"):
        far_step_flops(cfg, "teacher", H, W)
