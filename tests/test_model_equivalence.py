"""The megatron-core Wan / AnyFlow DiT against diffusers' reference implementations (float32).

Tolerance: relative error (norm-wise) < 1e-5 in float32; "exact" means bitwise equality.
"""

import pytest
import torch
from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel

from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.convert import hf_to_megatron, load_full_state_dict
from megatron_anyflow.models.wan.model import WanModel

HF_KW = dict(num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16, text_dim=384,
             freq_dim=32, ffn_dim=160, num_layers=2)
SHAPES = [  # (b, f, H, W): single frame, odd frames + non-square, batch 3 with 5 frames
    (1, 1, 4, 6),
    (2, 3, 8, 12),
    (3, 5, 6, 10),
]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def pair(delta: bool, seed: int = 0):
    torch.manual_seed(seed)
    hf = (AnyFlowTransformer3DModel if delta else WanTransformer3DModel)(**HF_KW).eval()
    model = WanModel(wan_config("tiny", delta_embedder=delta)).eval()
    load_full_state_dict(model, hf_to_megatron(hf.state_dict(), 16), "diffusers")
    return hf, model


def inputs(b, f, H, W, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, f, 16, H, W, generator=g)
    t = torch.rand(b, f, generator=g) * 1000
    r = t * torch.rand(b, f, generator=g)
    txt = torch.randn(b, 7, 384, generator=g)
    return x, t, r, txt


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_frame", [False, True])
def test_matches_diffusers_anyflow(shape, per_frame):
    hf, model = pair(delta=True)
    x, t, r, txt = inputs(*shape)
    if not per_frame:
        t, r = t[:, :1].expand_as(t).contiguous(), r[:, :1].expand_as(r).contiguous()
    with torch.no_grad():
        ref = hf(x, t, r, txt, return_dict=False)[0]
        out = model(x, t, r, txt)
    assert out.shape == x.shape
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_frame", [False, True])
def test_matches_diffusers_wan(shape, per_frame):
    hf, model = pair(delta=False)
    x, t, _, txt = inputs(*shape)
    b, f, _, H, W = x.shape
    with torch.no_grad():
        if per_frame:  # diffusers Wan takes per-token timesteps [b, seq]
            t_tok = t.repeat_interleave((H // 2) * (W // 2), dim=1)
            ref = hf(x.permute(0, 2, 1, 3, 4), t_tok, txt, return_dict=False)[0]
            out = model(x, t, None, txt)
        else:
            ref = hf(x.permute(0, 2, 1, 3, 4), t[:, 0], txt, return_dict=False)[0]
            out = model(x, t[:, 0], None, txt)
    assert rel(out, ref.permute(0, 2, 1, 3, 4)) < 1e-5


def test_t_equals_r_with_fresh_delta_embedder_is_exactly_the_base_model():
    torch.manual_seed(0)
    base = WanModel(wan_config("tiny", delta_embedder=False)).eval()
    flow = WanModel(wan_config("tiny", delta_embedder=True)).eval()
    flow.load_state_dict(base.state_dict(), strict=False)
    flow.condition_embedder.reset_delta_embedder()
    x, t, _, txt = inputs(2, 3, 8, 12)
    with torch.no_grad():
        a = base(x, t, None, txt)
        b = flow(x, t, t, txt)
        c = flow(x, t, t * 0.5, txt)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # r matters once r != t


def test_bf16_model_keeps_timesteps_float32():
    """600 and 601 are one bf16 value apart (spacing 4 there): a bf16 cast would merge them."""
    torch.manual_seed(0)
    model = WanModel(wan_config("tiny", bf16=True)).eval()
    assert model.proj_out.weight.dtype == torch.bfloat16
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    x, _, _, txt = inputs(1, 2, 4, 6)
    with torch.no_grad():
        a = model(x.bfloat16(), torch.full((1, 2), 600.0), torch.full((1, 2), 200.0), txt.bfloat16())
        b = model(x.bfloat16(), torch.full((1, 2), 601.0), torch.full((1, 2), 200.0), txt.bfloat16())
    assert a.dtype == torch.bfloat16
    assert not torch.equal(a, b)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(1, 2, 8, 4, 6)), "channels"),
    (dict(x=torch.randn(1, 2, 16, 5, 6)), "divisible by patch_size"),
    (dict(t=torch.rand(1, 3) * 1000), "t must be"),
    (dict(txt=torch.randn(1, 7, 100)), "text must be"),
    (dict(x=torch.randn(2, 16, 4, 6)), "latents must be"),
])
def test_bad_inputs_are_named(bad, match):
    model = WanModel(wan_config("tiny"))
    kw = dict(x=torch.randn(1, 2, 16, 4, 6), t=torch.rand(1, 2) * 1000, r=None, txt=torch.randn(1, 7, 384))
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        model(kw["x"], kw["t"], kw["r"], kw["txt"])


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        wan_config("wan9")
    with pytest.raises(ValueError, match="unknown WanConfig field"):
        wan_config("tiny", hidden=3)
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        wan_config("tiny", hidden_size=66)


@pytest.mark.parametrize("preset, target", [("wan2.1-1.3b", 1.42e9), ("wan2.1-14b", 14.29e9)])
def test_full_size_parameter_counts_on_meta_device(preset, target):
    with torch.device("meta"):
        model = WanModel(wan_config(preset, perform_initialization=False))
    delta = sum(p.numel() for p in model.condition_embedder.delta_embedder.parameters())
    base = sum(p.numel() for p in model.parameters()) - delta
    assert abs(base - target) / target < 0.02, base
    h = model.config.hidden_size
    assert delta == 256 * h + h * h + 2 * h  # linear_1 (256 -> h) and linear_2 (h -> h) with biases


@pytest.mark.parametrize("overrides", [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
    dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
])
def test_activation_recomputation_gives_the_same_gradients(overrides, monkeypatch):
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, t, r, txt = inputs(2, 3, 4, 6)
    grads = []
    for cfg in (wan_config("tiny"), wan_config("tiny", **overrides)):
        torch.manual_seed(0)
        model = WanModel(cfg)
        assert model.config.recompute_granularity == cfg.recompute_granularity
        (model(x, t, r, txt) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    expected = {"uniform": 2, "block": 1}.get(overrides.get("recompute_method"), 2 * 3)
    assert len(calls) == expected  # 2 blocks; selective: self-attn, cross-attn and FFN per block
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n


def _has_te():
    try:
        import transformer_engine  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_te(), reason="Transformer Engine is installed: the missing-TE error path does not apply")
def test_te_backend_and_fp8_without_transformer_engine_are_clear_errors():
    with pytest.raises(ImportError, match="needs Transformer Engine"):
        WanModel(wan_config("tiny", backend="te"))
    with pytest.raises(ValueError, match="needs backend='te'"):
        wan_config("tiny", fp8="hybrid")


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [None, "hybrid"])
def test_te_backend_matches_local_backend_on_gpu(fp8):
    """bf16 TE linears + TE attention vs the local backend with the same weights: rel. error < 2e-2
    (bf16) / < 1e-1 (FP8 GEMMs, delayed scaling, first forward)."""
    pytest.importorskip("transformer_engine")
    torch.manual_seed(0)
    local = WanModel(wan_config("tiny", hidden_size=256, num_attention_heads=2, bf16=True)).cuda().eval()
    kw = dict(fp8=fp8, fp8_recipe="delayed") if fp8 else {}
    te = WanModel(wan_config("tiny", hidden_size=256, num_attention_heads=2, bf16=True, backend="te", **kw)).cuda().eval()
    load_full_state_dict(te, {k: v for k, v in local.state_dict().items() if v is not None}, strict=False)
    x, t, r, txt = (a.cuda() for a in inputs(2, 3, 8, 16))
    with torch.no_grad():
        a = local(x.bfloat16(), t, r, txt.bfloat16()).float()
        b = te(x.bfloat16(), t, r, txt.bfloat16()).float()
    assert rel(b, a) < (1e-1 if fp8 else 2e-2)
