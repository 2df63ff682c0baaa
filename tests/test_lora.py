"""LoRA adapters on the frozen base: identity at init, switching, merging, one shared base."""

import pytest
import torch

from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.model import WanModel


def _inputs():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 3, 16, 4, 6, generator=g), torch.rand(2, 3, generator=g) * 1000,
            torch.rand(2, 3, generator=g) * 300, torch.randn(2, 5, 384, generator=g))


def _randomize(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    for p in L.adapter_parameters(model, adapter):
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = WanModel(wan_config("tiny")).eval()
    return m


def test_default_targets_and_freezing(model):
    wrapped = L.apply_lora(model, ["generator", "fake_score"], rank=4, alpha=8)
    assert "blocks.0.self_attention.linear_qkv" in wrapped and "blocks.1.mlp.linear_fc2" in wrapped
    assert "condition_embedder.delta_embedder.linear_2" in wrapped
    assert not any("cross_attention" in w for w in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    qkv = model.blocks[0].self_attention.linear_qkv.adapters["generator"]
    assert qkv.lora_A.shape == (3 * 4, 64) and qkv.lora_B.shape == (3, 64, 4)  # one pair per q, k, v


def test_fresh_adapter_is_identity_and_adapters_switch(model):
    x, t, r, txt = _inputs()
    with torch.no_grad():
        base = model(x, t, r, txt)
    L.apply_lora(model, ["a", "b"], rank=4, alpha=8)
    L.set_active_adapter(model, "a")
    with torch.no_grad():
        assert torch.equal(model(x, t, r, txt), base)
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    with torch.no_grad():
        ya = model(x, t, r, txt)
        with L.use_adapter(model, "b"):
            yb = model(x, t, r, txt)
        with L.use_adapter(model, None):
            y0 = model(x, t, r, txt)
        ya2 = model(x, t, r, txt)
    assert torch.equal(y0, base) and torch.equal(ya, ya2)
    assert not torch.allclose(ya, yb) and not torch.allclose(ya, base)
    with pytest.raises(KeyError, match="adapter 'c'"):
        L.set_active_adapter(model, "c")


def test_merge_equals_active_adapter(model):
    x, t, r, txt = _inputs()
    L.apply_lora(model, ["g"], rank=4, alpha=8)
    _randomize(model, "g", 5)
    L.set_active_adapter(model, "g")
    with torch.no_grad():
        active = model(x, t, r, txt)
        L.merge_adapter(model, "g")
        merged = model(x, t, r, txt)
    assert ((active - merged).norm() / active.norm()).item() < 1e-5


def test_merge_matches_a_float64_lora_formula(model):
    L.apply_lora(model, ["g"], rank=3, alpha=6)
    _randomize(model, "g", 7)
    lin = model.blocks[0].self_attention.linear_qkv
    w0 = lin.base.weight.detach().double().clone()
    ad = lin.adapters["g"]
    A, B = ad.lora_A.double(), ad.lora_B.double()
    # Expected: per head n and part j in (q, k, v): rows (n, j, :) get scale * B_j[n rows] @ A_j.
    d, heads = 16, 4
    expected = w0.view(heads, 3, d, -1).clone()
    for j in range(3):
        delta = (B[j] @ A[j * 3:(j + 1) * 3]) * 2.0
        expected[:, j] += delta.view(heads, d, -1)
    lin.merge("g")
    assert torch.allclose(lin.base.weight.double(), expected.view_as(w0), atol=1e-6)


def test_adapters_share_one_base(model):
    L.apply_lora(model, ["generator", "fake_score", "teacher"], rank=4, alpha=4)
    lin = model.blocks[0].mlp.linear_fc1
    ptrs = {lin.adapters[a].lora_A.data_ptr() for a in lin.adapters}
    assert len(ptrs) == 3
    n_base = sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n)
    assert n_base == sum(p.numel() for p in WanModel(wan_config("tiny")).parameters())


def test_rank_must_be_positive(model):
    with pytest.raises(ValueError, match="rank must be >= 1"):
        L.apply_lora(model, ["g"], rank=0, alpha=1)
