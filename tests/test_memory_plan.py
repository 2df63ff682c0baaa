"""The memory model (megatron_anyflow/measure/memory.py): hand-checked components; and its CLI, tools/memory_plan.py."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from contextlib import redirect_stdout

import pytest

from conftest import REPO, run_cmd

from megatron_anyflow.measure import memory as mp

_spec = importlib.util.spec_from_file_location("memory_plan", os.path.join(REPO, "tools", "memory_plan.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

GIB = 2.0 ** 30


def test_tokens():
    assert mp.latent_tokens(81, 480, 832) == 21 * 30 * 52 == 32760
    assert mp.latent_tokens(17, 480, 832) == 5 * 30 * 52
    with pytest.raises(ValueError, match="4n"):
        mp.latent_tokens(80, 480, 832)
    with pytest.raises(ValueError, match="multiples of 16"):
        mp.latent_tokens(81, 481, 832)
    # Wan2.2 TI2V-5B: the Wan2.2 VAE's 16x space -> 31 x 44 x 80 latents of 121 x 704 x 1280, 22 x 40 patches
    assert mp.latent_tokens(121, 704, 1280, mp.vae_spatial("wan2.2-ti2v-5b")) == 31 * 22 * 40 == 27280
    with pytest.raises(ValueError, match="multiples of 32 \\(VAE 16x, patch 2\\)"):
        mp.latent_tokens(121, 720, 1280, 16)  # 45 latent rows: not a whole number of 2 x 2 patches


def test_14b_parameter_counts_and_base_weights():
    c = mp.model_counts("wan2.1-14b")
    h, F, L, r = 5120, 13824, 40, 256
    assert (c.hidden, c.ffn, c.layers, c.heads) == (h, F, L, 40)
    # 14.29e9 base (diffusers Wan2.1-14B) + the delta embedder (256 h + h + h h + h)
    delta = 256 * h + h + h * h + h
    assert abs(c.total_params - delta - 14.29e9) / 14.29e9 < 0.01
    # replicated: patch embedding, time / delta / text embedders, time_proj, head, adaLN tables, the
    # cross-attention LayerNorm and the row-parallel biases (proj, cross proj, fc2)
    emb = 256 * h + h + h * h + h  # one time embedder
    replicated = (16 * 4 * h + h) + 2 * emb + (4096 * h + h + h * h + h) + (h * 6 * h + 6 * h) \
        + (h * 64 + 64) + 2 * h + L * (6 * h + 2 * h + 3 * h)
    assert c.replicated_params == replicated
    # sharded (head / FFN-split) parameters per block: self-attention qkv weight + bias, proj weight;
    # cross-attention q and kv weights + biases, proj weight; fc1 weight + bias, fc2 weight; and the q / k
    # RMSNorm weights of self- and cross-attention (4 h, head-sharded)
    per_block = (3 * h * h + 3 * h) + h * h + (h * h + h) + (2 * h * h + 2 * h) + h * h + (F * h + F) + h * F + 4 * h
    assert c.sharded_params == L * per_block
    # bytes: bf16 except diffusers' fp32 modules (embedders, adaLN tables, the cross-attention LayerNorm);
    # the q / k RMSNorm weights are bf16 in a bf16 model (cast with the rest), so every sharded parameter
    # is 2 bytes
    fp32_rep = 2 * emb + 2 * h + L * (6 * h + 2 * h)
    assert c.replicated_bytes == 4 * fp32_rep + 2 * (replicated - fp32_rep)
    assert c.sharded_bytes == 2 * c.sharded_params
    p = mp.plan(mp.PlanConfig(preset="wan2.1-14b", stage=2, tp=8, cp=1, dp=1))
    base = p["components"]["base weights (bf16, TP-sharded + replicated)"] * GIB
    # ~ 14.29e9 * 2 / 8 bytes, plus the replicated part whole on every rank
    assert base == pytest.approx(c.sharded_bytes / 8 + c.replicated_bytes, rel=1e-12)
    assert 14.29e9 * 2 / 8 < base < 14.29e9 * 2 / 8 + c.replicated_bytes
    assert base / GIB == pytest.approx(3.87, abs=0.01)


def test_lora_counts_hand_formula_14b():
    c = mp.model_counts("wan2.1-14b")
    h, F, L, r = 5120, 13824, 40, 256
    # per block: qkv (column, 3 groups): A 3 r h repl., B 3 h r shard.; proj (row): A r h shard., B h r repl.;
    # fc1 (column): A r h repl., B F r shard.; fc2 (row): A r F shard., B h r repl.
    # time and delta embedders (plain): linear_1 (256 -> h) and linear_2 (h -> h), both replicated.
    assert c.lora_sharded == L * r * (3 * h + h + F + F)
    assert c.lora_replicated == L * r * (3 * h + h + h + h) + 2 * r * (256 + h + h + h)
    p = mp.plan(mp.PlanConfig(preset="wan2.1-14b", stage=2, tp=8, cp=1, dp=2))
    local = c.lora_sharded / 8 + c.lora_replicated
    gen = [v for k, v in p["components"].items() if k.startswith("LoRA generator")][0]
    assert gen * GIB == pytest.approx(local * (2 + 4 + 12 / 2), rel=1e-12)
    assert p["components"]["generator EMA (fp32)"] * GIB == pytest.approx(4 * local, rel=1e-12)


def test_lora_counts_match_apply_lora_on_tiny_model():
    from megatron_anyflow.models.lora import apply_lora
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.model import WanModel

    model = WanModel(wan_config("tiny"))
    sharded, replicated = mp.lora_counts(model, 8)
    apply_lora(model, ["gen"], rank=8, alpha=8.0)
    n = sum(p.numel() for n_, p in model.named_parameters() if ".adapters.gen." in n_)
    assert n == sharded + replicated


# (label, plan keywords, wan_config overrides) for every recompute setting the trainer offers
SETTINGS = [
    ("none", dict(recompute="none"), {}),
    ("full", dict(recompute="full"), dict(recompute_granularity="full", recompute_method="uniform",
                                          recompute_num_layers=1)),
    ("selective save-attention", dict(recompute="selective", policy="save-attention"),
     dict(recompute_granularity="selective", recompute_policy="save-attention")),
    ("selective core_attn", dict(recompute="selective", policy="modules", modules=("core_attn",)),
     dict(recompute_granularity="selective", recompute_policy="modules", recompute_modules=["core_attn"])),
    ("selective mlp", dict(recompute="selective", policy="modules", modules=("mlp",)),
     dict(recompute_granularity="selective", recompute_policy="modules", recompute_modules=["mlp"])),
]
# Block dims measured: tiny-video (h 128, 4 heads, FFN 512, rank 32) and a second shape whose ratios
# differ (FFN / h 2 instead of 4, 6 heads, rank 16), so a term with the wrong dimension cannot hide.
DIMS = [
    dict(),
    dict(hidden_size=192, num_attention_heads=6, ffn_hidden_size=384, lora_rank=16, lora_alpha=16.0),
]


def _measure(dtype, dims, overrides):
    import torch

    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.measure.op_counter import measure_block

    m = measure_block("plan", preset="tiny-video", dtype=dtype, lora=True, grid=(2, 4, 4), text_len=8,
                      **dims, **overrides)
    cfg = wan_config("tiny-video", **dims)
    return m, cfg


@pytest.mark.parametrize("dims", DIMS, ids=["tiny-video", "h192-f384-r16"])
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
@pytest.mark.parametrize("label,plan_kw,overrides", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_plan_matches_measured_saved_bytes(label, plan_kw, overrides, dtype_name, dims):
    """The plan's per-token per-layer saved bytes against what one block really saves for backward
    (`op_counter.measure_block`: saved_tensors_hooks + the selective policy's saves, as the slope between
    two token counts) at TP = 1, LoRA on every default target, eager. Within 10 % (the issue's contract);
    the formula is derived term by term from the code, so today it agrees exactly on CPU (a GPU attention
    kernel may pad its log-sum-exp: 4 B per head per token, < 1 % of a layer). The fixed (weight- and
    text-sized) part is checked the same way."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    m, cfg = _measure(dtype, dims, overrides)
    planned = mp.layer_saved_bytes_per_token(cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
                                             cfg.lora_rank, tp=1, dtype=dtype_name, **plan_kw)
    assert planned == pytest.approx(m.saved_bytes_per_token, rel=0.10), (label, dtype_name, planned, m.row())
    fixed = mp.layer_saved_fixed_bytes(cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads,
                                       cfg.lora_rank, tp=1, dtype=dtype_name, text_tokens=8, **plan_kw)
    assert fixed == pytest.approx(m.saved_fixed_bytes, rel=0.10, abs=64), (label, dtype_name, fixed, m.row())
    if label == "none" and dtype_name == "bf16":  # the fp32 intermediates of norms are there and modelled
        fp32 = m.saved_by_dtype_per_token.get("float32", 0.0)
        h = cfg.hidden_size
        assert fp32 == pytest.approx(3 * (4 * h + 8) + 3 * (4 * h + 4) + 2 * 4 * cfg.num_attention_heads)


@pytest.mark.parametrize("label,plan_kw,overrides", [SETTINGS[0], SETTINGS[2]], ids=["none", "save-attention"])
def test_plan_matches_measured_saved_bytes_at_wan_1_3b_dims(label, plan_kw, overrides):
    """The same at the real 1.3B block (h 1536, 12 heads x 128, FFN 8960, LoRA rank 256), bf16, 8 and 16
    tokens (the per-token slope does not depend on the token count: nothing in a block is quadratic
    in it with flash-style attention). ~3 s each."""
    import torch

    from megatron_anyflow.measure.op_counter import measure_block

    m = measure_block("plan", preset="wan2.1-1.3b", dtype=torch.bfloat16, lora=True, grid=(1, 2, 4), text_len=8,
                      lora_rank=256, lora_alpha=256.0, **overrides)
    planned = mp.layer_saved_bytes_per_token(1536, 8960, 12, 256, tp=1, dtype="bf16", **plan_kw)
    assert planned == pytest.approx(m.saved_bytes_per_token, rel=0.10), (label, planned, m.row())


def test_saved_bytes_terms_and_parallel_split():
    h, F, a, r = 5120, 13824, 40, 256
    per = lambda **kw: mp.layer_saved_bytes_per_token(h, F, a, r, **kw)  # noqa: E731
    # bf16, no recompute, TP = 1: 40 h + 4 F + 12 r + 8 a + 36 bytes per token (module docstring)
    assert per() == 40 * h + 4 * F + 12 * r + 8 * a + 36
    # fp32: norm inputs are the tensors themselves, the fused qkv stays alive for the q / k norm views
    assert per(dtype="fp32") == 60 * h + 8 * F + 24 * r + 8 * a + 36
    # full: the block input only, split by TP under SP
    assert per(recompute="full", tp=4) == 2 * h / 4 and per(recompute="full", tp=4, sp=False) == 2 * h
    # save-attention: q, k, v, out (bf16, heads split by TP) + lse + the block input (tokens split by SP)
    assert per(recompute="selective", tp=4) == 4 * 2 * h / 4 + 4 * a / 4 + 2 * h / 4
    # TP = 4 with SP: outside-TP terms / 4, inside / 4, per-token RMSNorm statistics whole,
    # LoRA A outputs (4 + 2 / 4) r
    assert per(tp=4) == pytest.approx((16 * h + 24) / 4 + (24 * h + 4 * F + 8 * a) / 4 + 12 + 2 * r * 4.5)
    # Ulysses: linear_proj's input is a new tensor after the inverse all-to-all
    assert per(tp=4, ulysses=True) - per(tp=4) == 2 * h / 4
    # compile is an estimate: the fp32 norm inputs become bf16, nothing else changes
    assert per() - per(compile=True) == 3 * 2 * h + 3 * 2 * h
    for bad in (dict(recompute="some"), dict(recompute="selective", policy="x"), dict(dtype="int8"),
                dict(recompute="selective", policy="modules", modules=("attn",))):
        with pytest.raises(ValueError):
            per(**bad)
    # the plan's activations are L x (s x per-token + fixed) + the part outside the blocks
    p = mp.plan(mp.PlanConfig(preset="wan2.1-14b", stage=1, tp=4, cp=2, dp=1, recompute="none"))
    s = p["tokens_per_rank"]
    layer = s * per(tp=4, ulysses=True) + mp.layer_saved_fixed_bytes(h, F, a, r, tp=4)
    act = [v for k, v in p["components"].items() if k.startswith("activations")][0] * GIB
    assert act == pytest.approx(40 * layer + s * 6 * h / 4, rel=1e-12)
    assert p["saved_bytes_per_token_per_layer"] == per(tp=4, ulysses=True)


def test_merged_lora_cache():
    c = mp.model_counts("wan2.1-14b")
    h, F, L = 5120, 13824, 40
    # wrapped weights: qkv, proj, fc1, fc2 per block (bf16, TP-sharded) + time / delta embedders (fp32)
    assert c.wrapped_sharded_bytes == 2 * L * (3 * h * h + h * h + F * h + h * F)
    assert c.wrapped_replicated_bytes == 4 * 2 * (256 * h + h * h)
    key = "merged no-grad LoRA weights"
    cache = lambda p: sum(v for k, v in p["components"].items() if k.startswith(key)) * GIB  # noqa: E731
    kw = dict(preset="wan2.1-14b", tp=4, cp=2, dp=1)
    one = c.wrapped_sharded_bytes / 4 + c.wrapped_replicated_bytes
    assert cache(mp.plan(mp.PlanConfig(stage=1, **kw))) == pytest.approx(one)  # generator
    assert cache(mp.plan(mp.PlanConfig(stage=2, **kw))) == pytest.approx(2 * one)  # generator + fake score
    assert cache(mp.plan(mp.PlanConfig(stage=2, fp8=True, **kw))) == 0  # forced off under FP8
    assert cache(mp.plan(mp.PlanConfig(stage=2, lora_nograd_merge="off", **kw))) == 0
    per_call = mp.plan(mp.PlanConfig(stage=2, lora_nograd_merge="per-call", **kw))
    off = mp.plan(mp.PlanConfig(stage=2, lora_nograd_merge="off", **kw))
    # per-call: one weight-sized temporary, the largest merge: the fp32 time-embedder linear_2 (h x h,
    # replicated: fp32 delta + fp32 result, 8 B) beats qkv / TP (3 h x h / 4: 4 + 2 B)
    assert (per_call["total_gib"] - off["total_gib"]) * GIB == pytest.approx(max(8 * h * h, 6 * 3 * h * h / 4))
    with pytest.raises(ValueError, match="save-attention"):
        mp.plan(mp.PlanConfig(stage=2, fp8=True, recompute="selective", **kw))


def test_stage2_counts_live_graphs_as_the_code_has_them():
    kw = dict(preset="wan2.1-14b", tp=8, cp=1, dp=1, recompute="full")
    s1 = mp.plan(mp.PlanConfig(stage=1, **kw))
    s2 = mp.plan(mp.PlanConfig(stage=2, **kw))
    s2n = mp.plan(mp.PlanConfig(stage=2, grad_through="no_grad_prefix", **kw))
    s2o = mp.plan(mp.PlanConfig(stage=2, overlap_critic=True, **kw))
    act = lambda p: [v for k, v in p["components"].items() if k.startswith("activations")][0]  # noqa: E731
    # the stage-1 co-training graph is freed before the rollout: 3 rollout segments (chain), 2 with
    # no_grad_prefix, + the critic's fake-score forward only when it overlaps the next rollout
    assert act(s2) == pytest.approx(3 * act(s1)) and act(s2n) == pytest.approx(2 * act(s1))
    assert act(s2o) == pytest.approx(4 * act(s1))
    assert (s2["grad_forwards"], s2n["grad_forwards"], s2o["grad_forwards"], s1["grad_forwards"]) == (3, 2, 4, 1)
    # stage 2 has a second trainable adapter
    assert s2["total_gib"] > s1["total_gib"]
    with pytest.raises(ValueError, match="heads"):
        mp.plan(mp.PlanConfig(preset="wan2.1-14b", tp=3))


def test_headline_and_cli():
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(["--json"]) == 0
    res = json.loads(buf.getvalue())
    best = res["wan2.1-14b/stage2/8x80GB"]["best"]
    assert best["fits"] and best["gpus"] == 8 and best["total_gib"] <= mp.H100_80GB_GIB
    assert res["wan2.1-14b/stage2/1x141GB"]["table"]  # one row per clip length
    # the CLI as a program, one explicit layout
    proc = run_cmd([sys.executable, "tools/memory_plan.py", "--preset", "wan2.1-1.3b", "--stage", "1",
                    "--tp", "2", "--cp", "2", "--dp", "2", "--recompute", "none"])
    assert "fit" in proc.stdout and "base weights" in proc.stdout
    # FP8 (what the 14B launch script runs): no merged-LoRA copy; the save-attention policy is refused
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(["--preset", "wan2.1-14b", "--stage", "2", "--tp", "4", "--cp", "2", "--fp8", "hybrid"]) == 0
    assert "fp8" in buf.getvalue() and "merged no-grad LoRA" not in buf.getvalue()
    assert cli.main(["--preset", "wan2.1-14b", "--tp", "4", "--cp", "2", "--fp8", "hybrid",
                    "--recompute", "selective"]) == 2


# ------------------------------------------------------------------------------------------------
# AnyFlow-FAR (--model far)
# ------------------------------------------------------------------------------------------------
RECIPE = (1, 3, 3, 3, 3, 3, 3, 2)


def test_far_token_counts_are_far_md_1_2():
    """Token counts come from FarLayout: docs/design/far.md 1.2 at 480 x 832 (latents 60 x 104)."""
    assert mp.default_chunk_partition() == RECIPE
    lays = mp.far_layouts(RECIPE, 60, 104)
    tf = {n: lay.valid_length for n, lay in lays["teacher_forcing"].items()}
    assert tf == {3: 21840, 4: 28470, 5: 29640, 6: 30810, 7: 31980, 8: 30030}
    assert [lay.valid_length for lay in lays["prefills"]] == [1560, 6240, 9750, 10920, 12090, 13260, 14430]
    assert [lay.valid_length for lay in lays["steps"]] == [1560] + [4680] * 6 + [3120]
    assert list(mp.far_layouts(RECIPE, 60, 104, long_context_prob=0.0)["teacher_forcing"]) == [3]
    # CP x SP = 4: the odd-Fc lengths (n = 4, 6, 8) are padded, never rejected (docs/design/far.md 4.3)
    padded = mp.far_layouts(RECIPE, 60, 104, pad_to=4)["teacher_forcing"]
    assert {n: lay.length for n, lay in padded.items() if lay.pad} == {4: 28472, 6: 30812, 8: 30032}
    # shorter clips: the recipe cut to the clip (61 frames = 16 latents)
    assert mp.fit_chunk_partition(RECIPE, 16) == (1, 3, 3, 3, 3, 3) and mp.fit_chunk_partition(RECIPE, 5) == (1, 3, 1)
    with pytest.raises(ValueError, match="covers 21"):
        mp.fit_chunk_partition(RECIPE, 22)


def _far_plan(**kw):
    base = dict(model="far", preset="wan2.1-1.3b", tp=1, cp=1, dp=1, recompute="full")
    return mp.plan(mp.PlanConfig(**{**base, **kw}))


def _component(p, prefix):
    hits = [v for k, v in p["components"].items() if k.startswith(prefix)]
    assert len(hits) == 1, (prefix, list(p["components"]))
    return hits[0] * GIB


def test_far_kv_cache_bytes():
    """KV caches: tokens x layers x 2 (K, V) x hidden / (TP x CP) x 2 bytes (bf16). Inference: the largest
    cache, 14,430 tokens: 2.48 GiB per sample for 1.3B, 11.0 GiB for 14B (docs/design/far.md 1.6). Stage 2 with full
    recompute: every prefix cache of the rollout once (68,250 tokens), and the same without it: a step
    reads the cache as a key range merged by the lse, keeping no cat(cache, k / v) copy."""
    def kv(tokens, layers, hidden, tp=1, cp=1):
        return tokens * layers * 2 * hidden / (tp * cp) * 2

    p = _far_plan(stage=2)
    assert p["far"]["inference_cache_tokens"] == 14430
    assert p["far"]["inference_cache_gib_per_sample"] * GIB == kv(14430, 30, 1536)
    assert p["far"]["inference_cache_gib_per_sample"] == pytest.approx(2.48, abs=0.005)
    assert _component(p, "KV caches alive during the rollout") == kv(68250, 30, 1536)
    assert p["far"]["kv_tokens_alive"] == 68250 == sum(p["far"]["prefill_tokens"])
    p14 = _far_plan(stage=2, preset="wan2.1-14b", tp=4, cp=2, micro_batch=2)
    assert p14["far"]["inference_cache_gib_per_sample"] * GIB == kv(14430, 40, 5120, 4, 2)
    assert kv(14430, 40, 5120) / GIB == pytest.approx(11.0, abs=0.05)
    assert _component(p14, "KV caches alive") == 2 * kv(68250, 40, 5120, 4, 2)  # per sample of the micro-batch
    for kw in (dict(recompute="none"), dict(recompute="none", grad_through="no_grad_prefix"),
               dict(recompute="selective")):
        assert _component(_far_plan(stage=2, **kw), "KV caches alive") == kv(68250, 30, 1536), kw
    # the rollout's activations are the bidirectional plan's: 3 segments over the clip's 32,760 query tokens
    bi = mp.plan(mp.PlanConfig(preset="wan2.1-1.3b", stage=2, tp=1, cp=1, dp=1, recompute="full"))
    assert _component(p, "activations: 3 segments x 8 chunks") == pytest.approx(_component(bi, "activations"),
                                                                                rel=1e-12)
    # + the caches; the DMD backward's rematerialised layer reads its cache in place (no cat copy)
    assert p["total_gib"] == pytest.approx(bi["total_gib"] + kv(68250, 30, 1536) / GIB, rel=1e-12)


def test_far_stage1_activations():
    """Stage 1: the longest teacher-forcing graph (n = 7, 31,980 tokens at 480p) or the bidirectional
    branch's whole clip (32,760 tokens), whichever is larger: stages.FarStage1 backpropagates the causal
    branch before the bidirectional forward, so the two graphs never coexist. Full recompute keeps the
    block inputs."""
    h, L = 1536, 30
    p = _far_plan(stage=1)
    assert p["far"]["longest_n"] == 7 and p["grad_forwards"] == 2
    per = 2 * h  # full recompute: the block input (bf16), TP = 1
    assert not any(k.startswith("activations: FAR teacher forcing") for k in p["components"])
    assert _component(p, "activations: bidirectional branch (32760 tokens)") == pytest.approx(
        L * 32760 * per + 32760 * 6 * h, rel=1e-12)
    causal = _far_plan(stage=1, far_bidirectional_prob=0.0)
    assert _component(causal, "activations: FAR teacher forcing n=7 (31980 tokens)") == pytest.approx(
        L * 31980 * per + 31980 * 6 * h, rel=1e-12)
    only = _far_plan(stage=1, far_bidirectional_prob=0.0, long_context_prob=0.0)
    assert only["grad_forwards"] == 1 and only["far"]["longest_n"] == 3
    assert _component(only, "activations: FAR teacher forcing n=3 (21840 tokens)") == pytest.approx(
        L * 21840 * per + 21840 * 6 * h, rel=1e-12)
    # no recompute: the groups' concatenated output only (multi-range groups merge by the lse: no K / V copy)
    lay = mp.far_layouts(RECIPE, 60, 104)["teacher_forcing"][7]
    assert mp.far_attention_extra_bytes(lay, h, 1, 1, "none") == 31980 * 2 * h
    assert mp.far_attention_extra_bytes(lay, h, 2, 2, "none") == 0  # CP: the inverse all-to-all makes it
    assert mp.far_attention_extra_bytes(lay, h, 1, 1, "selective", "save-attention") == 0
    assert mp.far_attention_extra_bytes(lay, h, 1, 1, "full") == 0
    # save-attention (issue target: within 15 % of bidirectional per token): the same bytes per token
    sa = dict(stage=1, recompute="selective", recompute_policy="save-attention")
    far_tok = _component(_far_plan(far_bidirectional_prob=0.0, **sa), "activations: FAR teacher forcing") / 31980
    bi = mp.plan(mp.PlanConfig(preset="wan2.1-1.3b", tp=1, cp=1, dp=1, **sa))
    bi_tok = _component(bi, "activations") / 32760
    assert far_tok == pytest.approx(bi_tok, rel=0.01)
    # layouts: FAR needs the Ulysses exchange (heads / (TP x CP)); the partition must fit the clip
    with pytest.raises(ValueError, match="Ulysses"):
        _far_plan(tp=4, cp=2)
    with pytest.raises(ValueError, match="stage 2 rolls out whole clips"):
        _far_plan(stage=2, chunk_partition=(1, 3, 3))
    assert _far_plan(stage=1, chunk_partition=(1, 3, 3))["far"]["bidirectional_tokens"] == 7 * 1560
    layouts = mp.search_layouts("wan2.1-1.3b", 1, 8, model="far")
    assert layouts and all(12 % (q["config"]["tp"] * q["config"]["cp"]) == 0 for q in layouts)


def test_far_grouped_attention_extras_match_measured_saved_bytes():
    """The FAR-only saved bytes of one block against what autograd keeps: one block's saved bytes (a
    2-layer minus a 1-layer model) of a FAR forward with grad, less the same model's bidirectional
    per-token and fixed bytes measured at the same harness (two clip lengths, per-frame times, LoRA on
    every default target, bf16). No recompute: the groups' concatenated output at CP = 1 only (the
    multi-range groups merge by the lse: no K / V copy); save-attention: per token what the
    bidirectional layer saves (issue target: within 15 %; measured equal); a cached step: nothing
    cache-sized (it reads the cache as a key range, no cat(cache, k / v))."""
    import torch

    from megatron_anyflow.models import lora as L
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.far import FarKVCache, FarLayout
    from megatron_anyflow.models.wan.model import WanModel
    from megatron_anyflow.measure.op_counter import saved_bytes

    cp, H, W = (1, 1, 2, 1, 1), 8, 12  # 24 tokens per full frame, 6 per compressed
    text = torch.randn(1, 8, 384, dtype=torch.bfloat16)

    def layer_bytes(call, **overrides):
        out = []
        for nl in (1, 2):
            torch.manual_seed(0)
            cfg = wan_config("tiny-video", num_layers=nl, bf16=True, far=True, chunk_partition=cp, **overrides)
            m = WanModel(cfg)
            L.apply_lora(m, ["generator"], cfg.lora_rank, cfg.lora_alpha)
            m.far_patch_embedding.weight.requires_grad_(True)
            fn = call(m)
            fn()
            # the KV cache a step reads is alive anyway (the plan's "KV caches alive"): not the layer's
            keep = [t for kv in getattr(fn, "cache", FarKVCache()).layers for t in kv]
            out.append(saved_bytes(fn, exclude=list(m.parameters()) + keep)["total"])
        return out[1] - out[0]

    def x_t(f):
        g = torch.Generator().manual_seed(f)
        return torch.randn(1, f, 48, H, W, generator=g).to(torch.bfloat16), torch.rand(1, f, generator=g) * 1000

    def bi(f):
        x, t = x_t(f)
        return lambda m: (lambda: m(x, t, t * 0.5, text, adapter="generator"))

    def teacher_forcing(m):
        x, t = x_t(sum(cp))
        return lambda: m(x, t, t * 0.5, text, adapter="generator", chunk_partition=cp, clean_latents=x[:, -4:])

    def step(m):
        x, t = x_t(sum(cp))
        cache = m.prefill(x[:, :-1], text, cp[:-1], adapter="generator")

        def fn():
            return m(x[:, -1:], t[:, -1:], t[:, -1:] * 0.5, text, adapter="generator", chunk_partition=cp,
                     kv_cache=cache)
        fn.cache = cache
        return fn

    h = 128
    lay = FarLayout.train(cp, H, W, clean=True)
    assert any(len(r) > 1 for _, _, r in lay.attention_groups())  # multi-range groups are measured
    for recompute, kw in (("none", {}),
                          ("selective", dict(recompute_granularity="selective", recompute_policy="save-attention"))):
        b2, b6 = layer_bytes(bi(2), **kw), layer_bytes(bi(6), **kw)
        per_token = (b6 - b2) / (4 * 24)
        fixed = b2 - 48 * per_token
        far = layer_bytes(teacher_forcing, **kw)
        measured = far - (lay.length * per_token + fixed)
        planned = mp.far_attention_extra_bytes(lay, h, 1, 1, recompute)
        if recompute == "none":
            assert planned == lay.length * 2 * h
            assert measured == pytest.approx(planned, rel=0.15)  # the rest: per-frame modulation rows
            st, cache = FarLayout.step(cp, H, W), FarLayout.prefill(cp[:-1], H, W).valid_length
            measured = layer_bytes(step) - (st.length * per_token + fixed)
            # no cat(cache, k / v) (before the lse merge: + (cache + step) x 2 x 2 h = 55 kB here); at
            # most one output-sized tensor per step token (measured: exactly 2 h B per token)
            assert abs(measured) <= 1.05 * st.length * 2 * h < 0.2 * cache * 2 * 2 * h, measured
        else:
            assert planned == 0
            assert (far - fixed) / lay.length == pytest.approx(per_token, rel=0.15)  # the target
            assert abs(measured) < 0.01 * far, (far, per_token, fixed)  # measured: equal


def test_far_cli_prints_the_token_counts():
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli.main(["--model", "far", "--preset", "wan2.1-14b", "--stage", "2", "--tp", "4", "--cp", "2",
                        "--fp8", "hybrid"]) == 0
    out = buf.getvalue()
    assert "AnyFlow-FAR" in out and "n=7: 31980" in out and "n=3: 21840" in out and "n=8: 30030" in out
    assert "1560 + 6240 + 9750 + 10920 + 12090 + 13260 + 14430 = 68250 tokens" in out
    assert "KV caches alive during the rollout: 68250 tokens" in out and "largest KV cache 14430 tokens" in out
    with redirect_stdout(io.StringIO()):
        assert cli.main(["--chunk-partition", "1", "3", "--preset", "wan2.1-14b", "--tp", "8"]) == 2
        assert cli.main(["--model", "far", "--preset", "wan2.1-1.3b", "--tp", "8"]) == 2  # 12 heads / 8
