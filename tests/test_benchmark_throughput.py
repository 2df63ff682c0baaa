"""tools/benchmark_throughput.py on CPU at a tiny size: every row is there, and its FLOP numbers are the
`training.flops` arithmetic for the chosen sizes (no speed targets)."""

import importlib.util
import json
import math
import os
import sys

import pytest
from conftest import REPO, run_cmd

from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.training.flops import expected_segments, step_flops, tokens

TOOL = os.path.join(REPO, "tools", "benchmark_throughput.py")
LATENT, TEXT, MBS, SIM = (2, 8, 8), 8, 1, [2, 4]


def _load_tool():
    spec = importlib.util.spec_from_file_location("benchmark_throughput", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _expected_flops_per_sample(step, schedule):
    cfg = wan_config("tiny")
    F, H, W = LATENT
    if step in ("teacher", "stage1"):
        return step_flops(cfg, step, F, H, W, TEXT).flops_per_sample
    e = expected_segments(SIM)
    gen = step_flops(cfg, "stage2_generator", F, H, W, TEXT, rollout_grad_segments=e, rollout_segments=e)
    crit = step_flops(cfg, "stage2_critic", F, H, W, TEXT, rollout_segments=e if schedule == "sequential" else 0.0)
    return gen.flops_per_sample + crit.flops_per_sample


def test_cpu_run_rows_and_flops(tmp_path):
    jpath, mpath = tmp_path / "out.json", tmp_path / "out.md"
    proc = run_cmd([sys.executable, TOOL, "--preset", "tiny", "--latent-shape", *map(str, LATENT), "--text-len",
                    str(TEXT), "--micro-batch-size", str(MBS), "--iters", "1", "--warmup", "0", "--simulation-steps",
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
    S = meta["tokens_per_sample"]
    for r in rows:
        assert "error" not in r, r
        assert r["s_per_iter"] > 0 and len(r["iteration_times_s"]) == 1 and r["iteration_times_s"][0] > 0
        assert r["global_batch"] == MBS and r["world_size"] == 1
        fps = _expected_flops_per_sample(r["step"], r["schedule"])
        assert math.isclose(r["model_flops_per_iteration"], MBS * fps, rel_tol=1e-12)
        assert math.isclose(r["model_tflops_per_s_per_gpu"], MBS * fps / r["s_per_iter"] / 1e12, rel_tol=1e-9)
        assert math.isclose(r["tokens_per_s_per_gpu"], MBS * S / r["s_per_iter"], rel_tol=1e-9)
        assert math.isclose(r["mfu"], r["model_tflops_per_s_per_gpu"] / meta["matmul"]["tflops"], rel_tol=1e-9)
        assert r["peak_memory_gib"] >= 0 and r["peak_memory_kind"].startswith("host_peak_rss")
        if r["implementation"] == "megatron_anyflow":
            ref = next(x for x in rows if x["implementation"] == "reference" and x["step"] == r["step"]
                       and x["schedule"] == r["schedule"])
            assert math.isclose(r["speedup_vs_reference"], r["tokens_per_s_per_gpu"] / ref["tokens_per_s_per_gpu"])
    for key, f in meta["flops"].items():
        step, _, sch = key.partition("/")
        assert math.isclose(f["flops_per_sample"], _expected_flops_per_sample(step, sch or None), rel_tol=1e-12)
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
