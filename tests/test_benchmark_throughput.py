"""tools/benchmark_throughput.py on CPU at a tiny size: every row is there, and its FLOP numbers are the
`measure.flops` arithmetic for the chosen sizes (no speed targets)."""

import importlib.util
import json
import math
import os
import sys

import pytest
import torch
from conftest import REPO, run_cmd

from megatron_anyflow.measure import harness as B
from megatron_anyflow.measure.flops import (rollout_segments, stage2_iteration_flops, step_flops,
                                             step_hardware_flops, tokens)
from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import wan_config

TOOL = os.path.join(REPO, "tools", "benchmark_throughput.py")
LATENT, TEXT, MBS, SIM = (2, 8, 8), 8, 1, [2, 4]
ITERS, WARMUP, SEED = 2, 0, 1234


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_throughput", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timed_plans():
    """The (N, k) the timed stage-2 iterations draw, recomputed here from the trainer's own plan seeds."""
    from megatron_anyflow.anyflow.distill import DistillConfig, sample_simulation_plan
    from megatron_anyflow.training.trainer import derive_seed

    out = []
    for it in range(WARMUP, WARMUP + ITERS):
        p = sample_simulation_plan(torch.Generator().manual_seed(derive_seed(SEED, "plan", it, 0)),
                                   DistillConfig(num_steps_choices=tuple(SIM)))
        out.append((p.N, p.k))
    return out


def _expected_flops_per_sample(step, schedule, rank, merged=True):
    """(model, hardware) FLOPs per sample of the timed iterations: stage 2 the mean over their own draws."""
    cfg = wan_config("tiny")
    F, H, W = LATENT
    targets = L.TEACHER_TARGETS if step == "teacher" else L.DEFAULT_TARGETS
    if step in ("teacher", "stage1"):
        return (step_flops(cfg, step, F, H, W, TEXT).flops_per_sample,
                step_hardware_flops(cfg, step, F, H, W, TEXT, lora_rank=rank, lora_targets=targets,
                                    merged_nograd=merged).total)
    total_m = total_h = 0.0
    for N, k in _timed_plans():  # sum over the iterations' plans, each credited its own segment count
        n = rollout_segments(N, k)
        crit = n if schedule == "sequential" else 0
        total_m += (step_flops(cfg, "stage2_generator", F, H, W, TEXT, rollout_grad_segments=n).flops_per_sample
                    + step_flops(cfg, "stage2_critic", F, H, W, TEXT, rollout_segments=crit).flops_per_sample)
        total_h += step_hardware_flops(cfg, "stage2", F, H, W, TEXT, lora_rank=rank, lora_targets=targets,
                                       rollout_grad_segments=n, rollout_segments=crit, merged_nograd=merged).total
    return total_m / ITERS, total_h / ITERS


def test_cpu_run_rows_and_flops(tmp_path):
    jpath, mpath = tmp_path / "out.json", tmp_path / "out.md"
    proc = run_cmd([sys.executable, TOOL, "--preset", "tiny", "--latent-shape", *map(str, LATENT), "--text-len",
                    str(TEXT), "--micro-batch-size", str(MBS), "--iters", str(ITERS), "--warmup", str(WARMUP),
                    "--seed", str(SEED), "--recompute-granularity", "full", "--lora-nograd-merge", "per-call",
                    "--simulation-steps",
                    *map(str, SIM), "--matmul-size", "256", "--json", str(jpath), "--markdown", str(mpath)],
                   timeout=300)
    assert "measuring on the CPU" in proc.stdout
    report = json.loads(jpath.read_text())
    meta, rows = report["meta"], report["rows"]
    assert meta["device_kind"] == "cpu" and meta["world_size"] == 1
    assert meta["latent_shape"] == list(LATENT) and meta["tokens_per_sample"] == tokens(wan_config("tiny"), *LATENT)
    expected = {(s, sch, impl) for s, sch in [("teacher", None), ("stage1", None), ("stage2", "sequential"),
                                              ("stage2", "pipelined")]
                for impl in ("megatron_anyflow", "reference")}
    assert {(r["step"], r["schedule"], r["implementation"]) for r in rows} == expected
    # interleaved: each of our rows followed by the reference row of the same step and schedule
    assert [(r["step"], r["schedule"]) for r in rows[::2]] == [(r["step"], r["schedule"]) for r in rows[1::2]]
    assert [r["implementation"] for r in rows] == ["megatron_anyflow", "reference"] * 4
    assert meta["complete"] is True and meta["rows_planned"] == 8
    assert meta["datasheet"]["tflops"] is None and all(r["mfu_datasheet"] is None for r in rows)  # CPU
    S = meta["tokens_per_sample"]
    for r in rows:
        assert "error" not in r, r
        assert r["s_per_iter"] > 0 and len(r["iteration_times_s"]) == ITERS and min(r["iteration_times_s"]) > 0
        assert r["global_batch"] == MBS and r["world_size"] == 1
        fps, hw = _expected_flops_per_sample(r["step"], r["schedule"], meta["lora_rank"])
        assert math.isclose(r["model_flops_per_iteration"], MBS * fps, rel_tol=1e-12)
        assert math.isclose(r["hardware_flops_per_iteration"], MBS * hw, rel_tol=1e-12)
        assert math.isclose(r["model_tflops_per_s_per_gpu"], MBS * fps / r["s_per_iter"] / 1e12, rel_tol=1e-9)
        assert math.isclose(r["hardware_tflops_per_s_per_gpu"], MBS * hw / r["s_per_iter"] / 1e12, rel_tol=1e-9)
        # stage 2: mean time x mean of the iterations' own FLOPs = sum of FLOPs / sum of times
        if r["step"] == "stage2":
            assert [tuple(p) for p in r["rollout_plans"]] == _timed_plans()
            assert math.isclose(sum(r["model_flops_per_iteration_each"]) / sum(r["iteration_times_s"]) / 1e12,
                                r["model_tflops_per_s_per_gpu"], rel_tol=1e-9)
        # both sides recompute: the reference through diffusers' gradient checkpointing
        assert r["recompute"] == ("full" if r["implementation"] == "megatron_anyflow" else "gradient_checkpointing")
        assert r["peak_reserved_gib"] is None  # CPU: no allocator reserve
        assert math.isclose(r["tokens_per_s_per_gpu"], MBS * S / r["s_per_iter"], rel_tol=1e-9)
        assert math.isclose(r["mfu"], r["model_tflops_per_s_per_gpu"] / meta["matmul"]["tflops"], rel_tol=1e-9)
        assert r["peak_memory_gib"] >= 0 and r["peak_memory_kind"].startswith("host_peak_rss")
        if r["implementation"] == "megatron_anyflow":
            ref = next(x for x in rows if x["implementation"] == "reference" and x["step"] == r["step"]
                       and x["schedule"] == r["schedule"])
            assert math.isclose(r["speedup_vs_reference"], r["tokens_per_s_per_gpu"] / ref["tokens_per_s_per_gpu"])
    for key, f in meta["flops"].items():
        step, _, sch = key.partition("/")
        fps, hw = _expected_flops_per_sample(step, sch or None, meta["lora_rank"])
        assert math.isclose(f["flops_per_sample"], fps, rel_tol=1e-12)
        assert math.isclose(f["hardware_flops_per_sample"], hw, rel_tol=1e-12)
    assert meta["reference_recompute"] == "gradient_checkpointing"
    md = mpath.read_text()
    assert "Measured on the CPU" in md and "| stage2 | pipelined | reference |" in md


def test_sizes_and_defaults():
    tool = _load_tool()
    a = tool.parse_args(["--preset", "wan2.1-14b", "--frames", "81", "--height", "480", "--width", "832"])
    assert a.latent == (21, 60, 104) and a.lora_rank == 256 and a.lora_alpha == 256.0
    assert tool._tokens(a) == 32760
    a = tool.parse_args(["--preset", "tiny", "--latent-shape", "3", "4", "6", "--num-layers", "1"])
    assert a.latent == (3, 4, 6) and tool.arch_config(a.preset, a.num_layers).num_layers == 1
    with pytest.raises(SystemExit):
        tool.parse_args(["--preset", "tiny-video", "--frames", "9"])  # 48-channel pixel-codec latents: not Wan VAE
    with pytest.raises(SystemExit):
        tool.parse_args(["--preset", "wan2.1-1.3b", "--frames", "80"])
    with pytest.raises(SystemExit):
        tool.parse_args(["--preset", "tiny", "--latent-shape", "3", "5", "6"])  # H not divisible by the patch


def test_num_layers_override_reaches_the_trainer_preset():
    tool = _load_tool()
    from megatron_anyflow.models.wan import config as C

    with tool.preset_with_layers("wan2.1-14b", 3) as name:
        assert wan_config(name).num_layers == 3 and wan_config(name).hidden_size == 5120
    assert name not in C.PRESETS


def test_reference_targets_follow_the_projects_targets():
    """The teacher row's PEFT targets are TEACHER_TARGETS' linears (no time embedders); the stage rows'
    DEFAULT_TARGETS' (with the time and delta embedders)."""
    teacher, stage = B.peft_targets("teacher"), B.peft_targets("stage1")
    assert B.lora_targets("teacher") == tuple(L.TEACHER_TARGETS)
    assert B.lora_targets("stage2") == tuple(L.DEFAULT_TARGETS)
    assert teacher == ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    assert not any("embedder" in t for t in teacher)
    assert stage[:6] == teacher and len(stage) == 10 and all("embedder" in t for t in stage[6:])


def test_trainer_options_pass_through():
    """Known trainer options are passed on; unknown options are forwarded to pretrain_anyflow.py unchanged."""
    tool = _load_tool()
    a = tool.parse_args(["--preset", "tiny", "--latent-shape", "2", "8", "8", "--attention-impl", "sdpa", "--compile",
                         "--num-workers", "0", "--recompute-granularity", "selective", "--recompute-policy",
                         "save-attention", "--extra-trainer-args", "--grad-through chain"])
    argv = B.trainer_argv(a, "stage1", None, 8)
    from megatron_anyflow.training.arguments import parse_args as trainer_parse_args

    t = trainer_parse_args(argv)
    assert t.attention_impl == "sdpa" and t.compile and t.num_workers == 0
    assert t.recompute_granularity == "selective" and t.recompute_policy == "save-attention"
    assert t.grad_through == "chain" and t.mock_data
    with pytest.raises(SystemExit):
        tool.parse_args(["--preset", "tiny", "stray-positional"])
    # hardware FLOPs follow how the trainer runs its no-grad forwards
    assert not B.merged_nograd(tool.parse_args(["--preset", "tiny", "--lora-nograd-merge", "off"]))
    assert B.merged_nograd(tool.parse_args(["--preset", "tiny", "--lora-nograd-merge", "cache"]))
    from megatron_anyflow.training.arguments import build_parser as trainer_parser

    default = trainer_parser().get_default("lora_nograd_merge")
    assert B.merged_nograd(tool.parse_args(["--preset", "tiny"])) == (default != "off")


def test_real_data_loader_rows(tmp_path):
    """--data-path: both rows read the dataset through the trainer's loader (a worker process), the
    latent size and text length are the dataset's."""
    from megatron_anyflow.data.latent_dataset import write_latent_dataset

    cfg = wan_config("tiny")
    g = torch.Generator().manual_seed(0)
    F, H, W = LATENT
    write_latent_dataset(str(tmp_path / "data"), torch.randn(4, F, cfg.in_channels, H, W, generator=g),
                         torch.randn(4, TEXT, cfg.text_dim, generator=g), torch.randn(1, TEXT, cfg.text_dim, generator=g), {})
    jpath = tmp_path / "out.json"
    proc = run_cmd([sys.executable, TOOL, "--preset", "tiny", "--data-path", str(tmp_path / "data"), "--num-workers",
                    "1", "--steps", "teacher", "--iters", "2", "--warmup", "1", "--matmul-size", "128", "--json",
                    str(jpath), "--markdown", str(tmp_path / "out.md")], timeout=300)
    report = json.loads(jpath.read_text())
    assert report["meta"]["data"] == str(tmp_path / "data") and report["meta"]["num_workers"] == 1
    assert report["meta"]["latent_shape"] == list(LATENT) and report["meta"]["text_len"] == TEXT
    assert len(report["rows"]) == 2 and all("error" not in r for r in report["rows"]), proc.stdout[-2000:]


@pytest.mark.parametrize("name, category", [
    ("void flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTT", "gemm"),
    ("triton_tem_fused_addmm_0", "gemm"),
    ("aten::addmm", "gemm"),
    ("aten::mm", "gemm"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    ("triton_poi_fused_add_mul_native_layer_norm_0", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("aten::copy_", "elementwise"),
])
def test_kernel_categories(name, category):
    from megatron_anyflow.measure.profile import kernel_category

    assert kernel_category(name) == category


# ------------------------------------------------------------------------------------------------
# AnyFlow-FAR rows (--model far)
# ------------------------------------------------------------------------------------------------
FAR_ARGS = ["--model", "far", "--preset", "tiny", "--latent-shape", "5", "8", "8", "--chunk-partition", "1", "1", "1",
            "1", "1", "--text-len", str(TEXT), "--micro-batch-size", "1", "--simulation-steps", *map(str, SIM),
            "--seed", str(SEED)]


def test_far_cpu_rows(tmp_path):
    """The FAR stage-1 and stage-2 rows run on CPU (tiny preset, 5 one-frame chunks: teacher forcing with
    compressed context, rollouts through the KV cache), no teacher and no reference row, each timed
    iteration credited with the FAR FLOPs of its own draws."""
    jpath, mpath = tmp_path / "far.json", tmp_path / "far.md"
    run_cmd([sys.executable, TOOL, *FAR_ARGS, "--iters", "2", "--warmup", "0", "--schedules", "sequential",
             "--matmul-size", "128", "--json", str(jpath), "--markdown", str(mpath)], timeout=300)
    report = json.loads(jpath.read_text())
    meta, rows = report["meta"], report["rows"]
    assert meta["model"] == "far" and meta["chunk_partition"] == [1, 1, 1, 1, 1]
    assert {(r["step"], r["schedule"], r["implementation"]) for r in rows} == {
        ("stage1", None, "megatron_anyflow"), ("stage2", "sequential", "megatron_anyflow")}
    tool = _load_tool()
    a = tool.parse_args([*FAR_ARGS, "--iters", "2", "--warmup", "0"])
    for r in rows:
        assert "error" not in r, r
        assert r["model"] == "far" and r["s_per_iter_statistic"] == "mean" and len(r["far_plans"]) == 2
        f = B.iteration_flops(a, None, r["step"], r["schedule"], True, iterations=range(2))
        assert math.isclose(r["model_flops_per_iteration"], f["flops_per_sample"], rel_tol=1e-12)
        assert math.isclose(r["hardware_flops_per_iteration"], f["hardware_flops_per_sample"], rel_tol=1e-12)
        assert math.isclose(sum(r["model_flops_per_iteration_each"]) / sum(r["iteration_times_s"]) / 1e12,
                            r["model_tflops_per_s_per_gpu"], rel_tol=1e-9)
    md = mpath.read_text()
    assert "AnyFlow-FAR training throughput" in md and "| FAR stage2 | sequential | megatron_anyflow |" in md


@pytest.mark.parametrize("step, schedule", [("stage1", None), ("stage2", "sequential")])
def test_far_hardware_flops_are_what_the_trainer_runs(step, schedule):
    """The FLOPs credited to each FAR iteration (its own n, bidirectional coin, (N, k)) == PyTorch's FLOP
    count of the trainer's iteration itself (explicit-matmul attention, unmerged LoRA): the per-iteration
    plans and the call structure (teacher forcing + null / plus / minus, the bidirectional branch, the
    rollout's steps and prefills, scores, co-training, critic) are the trainer's."""
    from torch.utils.flop_counter import FlopCounterMode

    tool = _load_tool()
    a = tool.parse_args([*FAR_ARGS, "--iters", "2", "--warmup", "0", "--attention-impl", "math",
                         "--lora-nograd-merge", "off", "--threads", "1",
                         # stage 2 co-trains the causal branch only (the trainer refuses the bidirectional one)
                         "--extra-trainer-args", "--long-context-prob 1.0"
                         + (" --far-bidirectional-prob 0.5" if step == "stage1" else "")])
    runner = B.OursRunner(a, step, schedule, 16)
    try:
        credited = B.iteration_flops(a, None, step, schedule, True, iterations=range(2))
        draws = credited["far_plans"]
        assert {p["bidirectional"] for p in draws} == {True, False} or len({p["n"] for p in draws}) > 1
        for it in range(2):
            with FlopCounterMode(display=False) as counter:
                runner.step(it)
            assert counter.get_total_flops() == pytest.approx(
                credited["per_iteration"][it]["hardware_flops_per_sample"], rel=1e-12), draws[it]
    finally:
        runner.close()


# ------------------------------------------------------------------------------------------------
# what a run cut short keeps; MFU against the data sheet
# ------------------------------------------------------------------------------------------------
def test_the_report_is_rewritten_after_every_row(tmp_path, monkeypatch):
    """JSON and markdown on disk after each row (complete: false until the end), ours and the reference of
    each step alternating: a run killed after k rows leaves those k rows."""
    tool = _load_tool()
    jpath, mpath = tmp_path / "r.json", tmp_path / "r.md"
    seen = []

    def fake_measure(a, impl, step, schedule, matmul, cotrain=True):
        on_disk = json.loads(jpath.read_text())
        seen.append((len(on_disk["rows"]), on_disk["meta"]["complete"], (step, schedule, impl)))
        assert "Partial:" in mpath.read_text()
        return {"step": step, "schedule": schedule, "implementation": impl, "model": "bidirectional",
                "error": "not measured (test)"}

    monkeypatch.setattr(tool, "measure", fake_measure)
    report = tool.main(["--preset", "tiny", "--latent-shape", *map(str, LATENT), "--text-len", str(TEXT),
                        "--steps", "stage1", "stage2", "--schedules", "sequential", "overlapped",
                        "--matmul-size", "64", "--simulation-steps", *map(str, SIM), "--json", str(jpath),
                        "--markdown", str(mpath)])
    assert [n for n, _, _ in seen] == [0, 1, 2, 3, 4] and not any(c for _, c, _ in seen)
    assert [w for _, _, w in seen] == [("stage1", None, "megatron_anyflow"), ("stage1", None, "reference"),
                                       ("stage2", "sequential", "megatron_anyflow"),
                                       ("stage2", "sequential", "reference"),
                                       ("stage2", "overlapped", "megatron_anyflow")]  # no reference overlap
    final = json.loads(jpath.read_text())
    assert final["meta"]["complete"] is True and len(final["rows"]) == 5 == final["meta"]["rows_planned"]
    assert report["rows"] == final["rows"] and "Partial:" not in mpath.read_text()
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary file left behind


def test_datasheet_peaks_and_atomic_writes(tmp_path):
    from megatron_anyflow.measure.device import datasheet_peak_tflops
    from megatron_anyflow.measure.report import write_atomic

    assert datasheet_peak_tflops("NVIDIA H100 80GB HBM3")["tflops"] == 989.0  # SXM
    assert datasheet_peak_tflops("NVIDIA H200")["tflops"] == 989.0
    assert datasheet_peak_tflops("NVIDIA H100 PCIe")["tflops"] == 756.0
    assert datasheet_peak_tflops("cpu")["tflops"] is None
    assert datasheet_peak_tflops("NVIDIA H200", override=900.0) == {"tflops": 900.0, "source": "--peak-tflops"}
    path = tmp_path / "a" / "r.json"
    write_atomic(str(path), "one")
    write_atomic(str(path), "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["r.json"]
