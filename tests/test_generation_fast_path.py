"""The generation fast path (`anyflow.generation.load_model` / tools/generate.py) equals the plain path.

* merged adapters: ``load_model`` merges the LoRA adapter into the base weights once (no LoRA branch at
  inference); its samples equal those of the unmerged model running ``x W + s B (A x)`` in fp32;
* bf16: the bf16 model (blocks, activations, FAR KV cache in bf16) samples within bf16 rounding of the fp32
  one, bidirectional and FAR;
* one forward per step (no guidance pass: the students are guidance-distilled);
* ``--attention-impl`` / ``--cuda-graphs`` that cannot run here are refused before the weights load,
  and ``--compile`` compiles every block.

The equality with diffusers' AnyFlowPipeline in fp32 stays in tests/test_pipeline_export.py and
tests/test_generate.py (and tests/test_far_model.py for AnyFlowFARPipeline).
"""

import pytest
import torch
from test_pipeline_export import LATENT, tiny_stage1_checkpoint

from megatron_anyflow.anyflow import generation as G
from megatron_anyflow.models import lora as L

# Merged vs unmerged, fp32: W' = W + s B A is rounded once per element (relative 2^-24); a linear's output
# then differs from x W + s (x A) B by float32 rounding of its sums, ~sqrt(d) 2^-24 ~ 1e-6 relative at
# d = 160 or less; two layers and N <= 3 steps whose sizes sum to 1 keep it at a few 1e-6 of the final
# latents. 1e-5 bounds that; a merge with the wrong scale s = alpha / rank, or none, is off by the adapter's
# whole effect, asserted below to be > 1e-3.
MERGE_TOL = 1e-5
# bf16 vs fp32: unit roundoff u = 2^-8. The bf16 forward rounds the weights and, per block, the block input,
# the attention / cross-attention / FFN outputs and the residual sums (fp32 accumulation inside each GEMM):
# at most ~8 roundings of relative size u on the path of one output for this 2-layer model, so the
# per-forward error is at most ~8u (worst case, errors adding linearly). The final latents are
# x0 = noise - sum_i (t_i - r_i) u_i with step sizes summing to 1, so |x0_bf16 - x0_fp32| is at most the
# per-forward relative error times |noise - x0| (the displacement the model made), which is the measure.
BF16_TOL = 8 * 2.0 ** -8


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_stage1_checkpoint(str(tmp_path_factory.mktemp("fast") / "ckpt"))


def unmerged(path):
    """The checkpoint's base + its 'generator' adapter as LoRA branches, run unmerged (merged_nograd off)."""
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.model import WanModel
    from megatron_anyflow.checkpoint.store import read_meta, resolve_checkpoint_dir
    from megatron_anyflow.checkpoint.model_io import load_adapters, load_base

    d = resolve_checkpoint_dir(path)
    meta = read_meta(d)
    model = WanModel(wan_config(None, **meta["wan_config"], perform_initialization=False))
    load_base(model, d)
    lo = meta["lora"]
    L.apply_lora(model, ["generator"], lo["rank"], lo["alpha"], targets=lo["targets"])
    load_adapters(model, d, ["generator"])
    L.set_merged_nograd(model, "off")
    L.set_active_adapter(model, "generator")
    return model.eval()


def inputs(n=2, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *LATENT, generator=g), torch.randn(n, 7, 384, generator=g)


def test_merged_adapter_equals_the_lora_branch(ckpt):
    lm = G.load_model(ckpt)
    assert lm.adapter == "generator"
    assert not list(L.lora_modules(lm.model))  # merged once: plain linears, no LoRA branch
    ref_model = unmerged(ckpt)
    assert len(list(L.lora_modules(ref_model))) > 0
    noise, text = inputs()
    fast = G.sample_any_step(lm.model, noise, text, [1, 3], progress=False)
    plain = G.sample_any_step(ref_model, noise, text, [1, 3], progress=False)
    with L.use_adapter(ref_model, None):
        base = G.sample_any_step(ref_model, noise, text, [1], progress=False)
    assert rel(base[1], plain[1]) > 1e-3  # the adapter matters: the bound below can tell a bad merge
    for n in (1, 3):
        assert rel(fast[n], plain[n]) < MERGE_TOL, (n, rel(fast[n], plain[n]))


def test_one_forward_per_step_no_guidance_pass(ckpt):
    lm = G.load_model(ckpt)
    calls = []
    h = lm.model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        noise, text = inputs(n=3)
        G.sample_any_step(lm.model, noise, text, [1, 4], batch_size=2, progress=False)
    finally:
        h.remove()
    # N = 1 and N = 4, samples in batches of 2 and 1: (1 + 4) x 2 calls, each of the batch alone (no CFG doubling)
    assert calls == [2, 1] + [2] * 4 + [1] * 4


def _displacement_rel(x_bf16, x_fp32, noise):
    return float((x_bf16.double() - x_fp32.double()).norm() / (noise.double() - x_fp32.double()).norm())


def test_bf16_within_bf16_rounding_of_fp32(ckpt):
    fp32, bf16 = G.load_model(ckpt), G.load_model(ckpt, bf16=True)
    assert bf16.model.dtype == torch.bfloat16 and bf16.model.blocks[0].mlp.linear_fc1.weight.dtype == torch.bfloat16
    noise, text = inputs()
    a = G.sample_any_step(fp32.model, noise, text, [1, 4], progress=False)
    b = G.sample_any_step(bf16.model, noise, text.bfloat16(), [1, 4], progress=False)
    for n in (1, 4):
        assert b[n].dtype == torch.float32  # the state and the update stay fp32 / fp64
        err = _displacement_rel(b[n], a[n], noise)
        # above fp32 rounding (the blocks did run in bf16), within the bf16 bound
        assert MERGE_TOL < err < BF16_TOL, (n, err)


def test_far_bf16_kv_cache_and_samples():
    """A FAR model in bf16: the KV cache is bf16 (the compute dtype), and its chunked samples are within
    bf16 rounding of the fp32 model's with the same weights (the same bound: the cache holds K / V the
    block computed in bf16, no extra rounding)."""
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.convert import load_full_state_dict
    from megatron_anyflow.models.wan.far import FarModelRunner
    from megatron_anyflow.models.wan.model import WanModel

    torch.manual_seed(3)
    cp = (1, 1, 1)
    ref = WanModel(wan_config("tiny", far=True, chunk_partition=cp)).eval()
    low = WanModel(wan_config("tiny", far=True, chunk_partition=cp, bf16=True)).eval()
    load_full_state_dict(low, ref.state_dict(), strict=False)  # the same weights, rounded to bf16
    g = torch.Generator().manual_seed(4)
    noise, text = torch.randn(1, 3, 16, 8, 8, generator=g), torch.randn(1, 7, 384, generator=g)
    cache = FarModelRunner(low).prefill(noise[:, :2], text.bfloat16(), cp[:2], None)
    assert cache.num_tokens > 0 and all(k.dtype == v.dtype == torch.bfloat16 for k, v in cache.layers)
    a = G.sample_any_step(ref, noise, text, [2], progress=False)[2]
    b = G.sample_any_step(low, noise, text.bfloat16(), [2], progress=False)[2]
    err = _displacement_rel(b, a, noise)
    assert MERGE_TOL < err < BF16_TOL, err


def test_compile_and_unusable_kernels(ckpt, tmp_path):
    lm = G.load_model(ckpt, compile=True, attention_impl="sdpa")
    assert lm.info["compile"] and lm.info["attention_impl"] == "sdpa"
    assert all(blk._compiled_call_impl is not None for blk in lm.model.blocks)  # nn.Module.compile, per block
    assert lm.model.config.attention_impl == "sdpa"
    if not torch.cuda.is_available():
        with pytest.raises(G.GenerationError, match="--cuda-graphs needs a CUDA device"):
            G.load_model(ckpt, cuda_graphs=True)
        with pytest.raises(G.GenerationError, match="--attention-impl flash"):
            G.load_model(ckpt, attention_impl="flash")
    with pytest.raises(G.GenerationError, match="--attention-impl nope: expected one of auto, cudnn"):
        G.load_model(ckpt, attention_impl="nope")
    # the CLI: the same refusal, one line, exit 2, nothing written
    from test_pipeline_export import load_tool

    rc = load_tool("generate").main(["--checkpoint", ckpt, "--prompt-embeds", str(tmp_path / "none.safetensors"),
                                     "--attention-impl", "nope", "--codec", "none", "--latent-shape", "2", "16", "8",
                                     "8", "--output", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and not (tmp_path / "out").exists()

