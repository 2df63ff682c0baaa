"""tools/memory_plan.py: hand-checked components and the CLI."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import sys
from contextlib import redirect_stdout

import pytest

from conftest import REPO, run_cmd

_spec = importlib.util.spec_from_file_location("memory_plan", os.path.join(REPO, "tools", "memory_plan.py"))
mp = importlib.util.module_from_spec(_spec)
sys.modules["memory_plan"] = mp  # dataclasses look their module up in sys.modules
_spec.loader.exec_module(mp)

GIB = 2.0 ** 30


def test_tokens():
    assert mp.latent_tokens(81, 480, 832) == 21 * 30 * 52 == 32760
    assert mp.latent_tokens(17, 480, 832) == 5 * 30 * 52
    with pytest.raises(ValueError, match="4n"):
        mp.latent_tokens(80, 480, 832)
    with pytest.raises(ValueError, match="multiples of 16"):
        mp.latent_tokens(81, 481, 832)


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


def test_activation_formula():
    s, b, h, F, a = 1000, 1, 64, 160, 4
    # full recomputation: the layer input only, split by TP under SP
    assert mp.layer_activation_bytes(s, b, h, F, a, tp=4, sp=True, recompute="full") == 2 * s * b * h / 4
    assert mp.layer_activation_bytes(s, b, h, F, a, tp=4, sp=False, recompute="full") == 2 * s * b * h
    # no recomputation, TP = 1, no LoRA: 2 bytes x (17 s b h + 2 s b F + 3 C b h) + 2 s b a fp32 stats
    none = mp.layer_activation_bytes(s, b, h, F, a, tp=1, sp=False, recompute="none", lora_rank=0)
    assert none == 2 * (17 * s * h + 2 * s * F + 3 * 512 * h) + 8 * s * a
    sel = mp.layer_activation_bytes(s, b, h, F, a, tp=1, sp=False, recompute="selective", lora_rank=0)
    assert none - sel == 2 * (3 * s * h + s * F)
    # LoRA A outputs: (4 + 2 / t) s b r elements
    with_lora = mp.layer_activation_bytes(s, b, h, F, a, tp=2, sp=True, recompute="none", lora_rank=8)
    no_lora = mp.layer_activation_bytes(s, b, h, F, a, tp=2, sp=True, recompute="none", lora_rank=0)
    assert with_lora - no_lora == pytest.approx(2 * 5 * s * 8)
    with pytest.raises(ValueError, match="recompute"):
        mp.layer_activation_bytes(s, b, h, F, a, 1, recompute="some")


def test_stage2_counts_three_graphs_and_option():
    kw = dict(preset="wan2.1-14b", tp=8, cp=1, dp=1, recompute="full")
    s1 = mp.plan(mp.PlanConfig(stage=1, **kw))
    s2 = mp.plan(mp.PlanConfig(stage=2, **kw))
    s2n = mp.plan(mp.PlanConfig(stage=2, grad_through="no_grad_prefix", **kw))
    act = lambda p: [v for k, v in p["components"].items() if k.startswith("activations")][0]  # noqa: E731
    assert act(s2) == pytest.approx(3 * act(s1)) and act(s2n) == pytest.approx(2 * act(s1))
    assert s2["grad_forwards"] == 3 and s1["grad_forwards"] == 1
    # stage 2 has a second trainable adapter
    assert s2["total_gib"] > s1["total_gib"]
    with pytest.raises(ValueError, match="heads"):
        mp.plan(mp.PlanConfig(preset="wan2.1-14b", tp=3))


def test_headline_and_cli():
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert mp.main(["--json"]) == 0
    res = json.loads(buf.getvalue())
    best = res["wan2.1-14b/stage2/8x80GB"]["best"]
    assert best["fits"] and best["gpus"] == 8 and best["total_gib"] <= mp.H100_80GB_GIB
    assert res["wan2.1-14b/stage2/1x141GB"]["table"]  # one row per clip length
    # the CLI as a program, one explicit layout
    proc = run_cmd([sys.executable, "tools/memory_plan.py", "--preset", "wan2.1-1.3b", "--stage", "1",
                    "--tp", "2", "--cp", "2", "--dp", "2", "--recompute", "none"])
    assert "fit" in proc.stdout and "base weights" in proc.stdout
