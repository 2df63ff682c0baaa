"""Selective recomputation that fits flash attention (``recompute_policy="save-attention"``), and the
adapter a recomputed block replays (the adapter travels with the call, not with global state).

Exactness: a recomputed block replays the same kernels on the same inputs (CPU kernels are
deterministic), so gradients are bit-identical to the run without recomputation.
"""

import pytest
import torch

from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.measure.op_counter import measure_block


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, 4, 6, generator=g).to(dtype)
    t = torch.rand(2, 3, generator=g) * 1000
    return x, t, t * torch.rand(2, 3, generator=g), torch.randn(2, 7, 384, generator=g).to(dtype)


def _grads(overrides, lora, dtype=torch.float32, adapter=L._UNSET, switch_to=None):
    torch.manual_seed(0)
    model = WanModel(wan_config("tiny", bf16=dtype == torch.bfloat16, **overrides))
    if lora:
        L.apply_lora(model, ["a", "b"], rank=4, alpha=4)
        g = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for p in L.adapter_parameters(model, "a") + L.adapter_parameters(model, "b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        L.set_active_adapter(model, "a")
    x, t, r, txt = _inputs(dtype)
    out = model(x, t, r, txt) if adapter is L._UNSET else model(x, t, r, txt, adapter=adapter)
    if switch_to is not None:
        L.set_active_adapter(model, switch_to)  # another role selected between forward and backward
    (out.float() ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


SAVE_ATTENTION = dict(recompute_granularity="selective", recompute_policy="save-attention")
FULL = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


@pytest.mark.parametrize("lora, dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)],
                         ids=["full-ft-fp32", "lora-fp32", "lora-bf16"])
def test_save_attention_policy_gives_the_gradients_of_no_recompute(lora, dtype, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(k.get("context_fn")) or real(*a, **k))
    ref = _grads({}, lora, dtype)
    assert not calls
    got = _grads(SAVE_ATTENTION, lora, dtype)
    assert len(calls) == 2 and all(c is not None for c in calls)  # one selective checkpoint per block
    assert ref.keys() == got.keys() and ref
    for n in ref:
        assert torch.equal(ref[n], got[n]), n


def test_save_attention_policy_keeps_q_k_v_output_and_lse_only():
    """Per token and layer (bf16, tiny: h = 64, 4 heads): q, k, v and the attention output (4 x h x 2 B),
    the log-sum-exp (4 heads x 4 B) and the block input the checkpoint holds (h x 2 B)."""
    h, n = 64, 4
    expected = 4 * h * 2 + n * 4 + h * 2
    kw = dict(preset="tiny", dtype=torch.bfloat16, grid=(2, 4, 4), text_len=5)
    policy = measure_block("save-attention", **kw, **SAVE_ATTENTION)
    none = measure_block("none", **kw)
    full = measure_block("full", **kw, **FULL)
    assert policy.saved_bytes_per_token == expected, policy.saved_by_dtype_per_token
    assert full.saved_bytes_per_token == h * 2  # the block input only
    assert none.saved_bytes_per_token > 5 * expected
    # It recomputes the rest of the block: backward runs more ops than without recomputation, fewer
    # than full recomputation (attention is not replayed).
    assert none.ops_backward < policy.ops_backward < full.ops_backward


@pytest.mark.parametrize("overrides", [FULL, SAVE_ATTENTION,
                                       dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])],
                         ids=["full", "save-attention", "modules"])
def test_recomputation_replays_the_adapter_of_the_forward(overrides):
    """Forward with adapter 'a' (given in the call), adapter 'b' selected globally before backward: the
    replayed blocks still run 'a' (gradients equal the run without recomputation)."""
    ref = _grads({}, True, adapter="a")
    got = _grads(overrides, True, adapter="a", switch_to="b")
    assert ref.keys() == got.keys() and all(".adapters.a." in k for k in ref)
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
    # The global default still works for callers that do not pass an adapter (captured at forward).
    got_default = _grads(overrides, True, switch_to="b")
    for n in ref:
        assert torch.equal(ref[n], got_default[n]), n


def test_explicit_adapter_and_unknown_adapter():
    torch.manual_seed(0)
    model = WanModel(wan_config("tiny")).eval()
    L.apply_lora(model, ["a"], rank=4, alpha=4)
    with torch.no_grad():
        for p in L.adapter_parameters(model, "a"):
            p.add_(0.05)
    x, t, r, txt = _inputs()
    L.set_active_adapter(model, "a")
    with torch.no_grad():
        base = model(x, t, r, txt, adapter=None)
        with L.use_adapter(model, None):
            assert torch.equal(model(x, t, r, txt), base)
        assert not torch.allclose(model(x, t, r, txt), base)
        with pytest.raises(KeyError, match="adapter 'nope' is not defined"):
            model(x, t, r, txt, adapter="nope")


def test_save_attention_needs_the_local_backend():
    cfg = wan_config("tiny", **SAVE_ATTENTION)
    cfg.backend = "te"  # checked before the te layer spec is built (so this runs without TE as well)
    with pytest.raises(ValueError, match="recompute_policy='save-attention' needs backend='local'"):
        WanModel(cfg)
    with pytest.raises(ValueError, match="recompute_policy='bogus'"):
        wan_config("tiny", recompute_granularity="selective", recompute_policy="bogus")
