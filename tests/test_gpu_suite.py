"""benchmarks/gpu_suite.sh in its CPU dry mode: every part runs and writes its files, the summary lists
them, a part past its limit is cut with its partial log kept and the rest skipped at the suite's
deadline. The GPU figures themselves are never asserted (benchmarks print them)."""

import json
import os
import shutil
import subprocess

import pytest
from conftest import REPO

SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.sh")
WHEELS = os.path.join(REPO, "benchmarks", "prepare_gpu_wheels.sh")
PARTS = ["01_env", "02_pytest_gpu", "03_model_vs_diffusers", "04_steps", "05_attention", "06_throughput_t_s1",
         "07_profile_stage1", "08_kernels", "09_throughput_stage2"]


def _suite(tmp_path, timeout, **env):
    e = dict(os.environ, GPU_SUITE_DRY="1", GPU_SUITE_OUT=str(tmp_path / "results"), **env)
    return subprocess.run(["bash", SUITE], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", [SUITE, WHEELS])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    assert "set -u" in text or "set -euo" in text
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", script], check=True)


def test_dry_suite_writes_every_part(tmp_path):
    proc = _suite(tmp_path, timeout=400)
    out = tmp_path / "results"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for part in PARTS:
        log = out / f"{part}.log"
        assert log.is_file() and log.stat().st_size > 0, part
    for md in ("03_model_vs_diffusers", "05_attention", "06_throughput_t_s1", "07_profile_stage1",
               "09_throughput_stage2"):
        assert (out / f"{md}.md").is_file(), md
    summary = (out / "summary.md").read_text()
    assert "Dry run on the CPU" in summary
    for part in PARTS:
        assert f"| {part} | ok | 0 |" in summary, part
    assert (out / "08_kernels.json").is_file()
    # the correctness part compared the model with diffusers in both precisions
    checks = json.loads((out / "03_model_vs_diffusers.json").read_text())
    assert [c["dtype"] for c in checks] == ["fp32", "bf16"] and all(c["ok"] for c in checks)
    # one stage-1 and one stage-2 iteration through the CLI
    steps = (out / "04_steps.log").read_text()
    assert "== one stage1 iteration" in steps and "== one stage2 iteration" in steps and "critic_loss" in steps
    # throughput rows against the reference, with the profile of our stage-1 iteration
    thr = json.loads((out / "06_throughput_t_s1.json").read_text())
    rows = {(r["step"], r["implementation"]): r for r in thr["rows"]}
    assert set(rows) == {(s, i) for s in ("teacher", "stage1") for i in ("megatron_anyflow", "reference")}
    assert all("error" not in r for r in rows.values())
    cats = rows[("stage1", "megatron_anyflow")]["profile"]["categories"]
    assert set(cats) == {"attention", "gemm", "elementwise", "communication"} and cats["gemm"]["ms"] > 0
    assert "| attention |" in (out / "07_profile_stage1.md").read_text()
    s2 = json.loads((out / "09_throughput_stage2.json").read_text())
    # overlapped (pipelined + --overlap-critic) has our row only: the reference has no overlap, and the
    # overlap's gain is read against our pipelined row (speedup_vs_pipelined)
    assert {(r["schedule"], r["implementation"]) for r in s2["rows"]} == {
        (s, i) for s in ("sequential", "pipelined") for i in ("megatron_anyflow", "reference")} | {
        ("overlapped", "megatron_anyflow")}
    over = next(r for r in s2["rows"] if r["schedule"] == "overlapped")
    assert "error" in over or over["speedup_vs_pipelined"] > 0
    assert all(r["recompute"] != "none" for r in s2["rows"] if "error" not in r)
    attn = json.loads((out / "05_attention.json").read_text())
    assert {r["impl"] for r in attn["rows"]} >= {"sdpa", "math", "cudnn"}


def test_a_part_past_its_limit_is_cut_and_keeps_its_log(tmp_path):
    proc = _suite(tmp_path, timeout=120, GPU_SUITE_PART_LIMIT_S="5", GPU_SUITE_PARTS="05_attention")
    out = tmp_path / "results"
    summary = (out / "summary.md").read_text()
    assert proc.returncode == 1, proc.stdout  # a timeout is not a pass
    assert "| 05_attention | TIMEOUT (partial results kept) | 124 |" in summary
    assert (out / "05_attention.log").is_file()  # what it wrote before the cut stays
    assert not (out / "01_env.log").exists()  # not selected


def test_parts_past_the_suites_deadline_are_skipped(tmp_path):
    proc = _suite(tmp_path, timeout=60, GPU_SUITE_BUDGET_S="1", GPU_SUITE_PARTS="01_env 08_kernels")
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert proc.returncode == 1
    assert "| 01_env | skipped (out of time) |" in summary and "| 08_kernels | skipped (out of time) |" in summary
    assert "deadline" in (tmp_path / "results" / "08_kernels.log").read_text()
