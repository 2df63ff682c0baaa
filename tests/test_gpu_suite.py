"""benchmarks/gpu_suite.sh on the CPU, in its two dry modes.

* ``GPU_SUITE_DRY=stub`` (the suite's mechanics, stand-in parts, no torch): the files in $OUT (never more
  than 6; results.tgz, summary.md, suite_stdout.txt at the end), the parts in value order, a partial
  archive after a kill at a random time (SIGTERM, then SIGKILL of the suite's process group) that holds
  every finished part's JSON / markdown, a part cut at its limit keeping its rows, and exit 3 within
  10 s when the packages are missing (or the wheels do not install).
* ``GPU_SUITE_DRY=1`` (the real tools at tiny sizes): what each part writes.

Budgets scale with the machine (the start-up time of Python / torch measured here), and no assertion
depends on how long a part took: a loaded 2-core machine may cut or skip late parts, never reorder them
or lose a finished part's files. GPU figures are never asserted (benchmarks print them)."""

import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time

import pytest
from conftest import REPO

SUITE = os.path.join(REPO, "benchmarks", "gpu_suite.sh")
WHEELS = os.path.join(REPO, "benchmarks", "prepare_gpu_wheels.sh")
ORDER = ["01_env", "02_model_vs_diffusers", "03_stage1", "04_generation", "05_profile_stage1", "06_stage2",
         "07_attention", "08_far", "09_kernels", "10_pytest_gpu", "11_steps", "12_teacher"]
TABLES = [p for p in ORDER if p not in ("01_env", "10_pytest_gpu", "11_steps")]  # parts writing JSON + markdown
OUT_FILES = {"results.tgz", "summary.md", "suite_stdout.txt"}
TRANSIENT = {".results.tgz.fg", ".results.tgz.bg", ".summary.md.tmp"}
_DONE = re.compile(r"^\[gpu_suite\] (\d\d_\w+): (ok|TIMEOUT|FAILED|skipped)", re.M)
_START = re.compile(r"^\[gpu_suite\] (\d\d_\w+) \(limit (\d+) s, estimate (\d+) s", re.M)


def _wall(cmd, n=3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _stub_budget() -> int:
    """60 s on an idle machine (Python starts in ~0.1 s); more where Python starts slowly (a loaded one)."""
    return int(min(200, max(60, 120 * _wall([sys.executable, "-c", "import json"]))))


def _env(tmp_path, **extra):
    env = dict(os.environ, GPU_SUITE_OUT=str(tmp_path / "out"), GPU_SUITE_WORK=str(tmp_path / "work"),
               PYTHON=sys.executable)
    env.pop("OUT", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Suite:
    """The suite in its own process group, $OUT watched while it runs."""

    def __init__(self, tmp_path, **env):
        self.out, self.work = tmp_path / "out", tmp_path / "work"
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(["bash", SUITE], cwd=REPO, env=_env(tmp_path, **env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.max_files = 0
        self.names = set()

    def watch(self, until: float, started: int = 0) -> bool:
        """Poll $OUT until the suite exits (True), or ``until`` seconds have passed, or (``started`` > 0) the
        suite's progress log names that many started parts (False)."""
        while time.monotonic() - self.t0 < until:
            if started and self.started_parts() >= started:
                return False
            if self.out.is_dir():
                entries = os.listdir(self.out)
                # no folders in $OUT (is_dir, not "not is_file": a transient pack renamed away between listdir and
                # the check is neither, and is no folder)
                assert not any((self.out / e).is_dir() for e in entries), entries
                self.max_files = max(self.max_files, len(entries))
                self.names.update(entries)
            if self.proc.poll() is not None:
                return True
            time.sleep(0.2)
        return False

    def started_parts(self) -> int:
        try:
            return len(_START.findall((self.out / "suite_stdout.txt").read_text()))
        except FileNotFoundError:
            return 0

    def kill(self):
        """SIGTERM, then SIGKILL two seconds later, to the suite's process group; then the running part's
        group (GNU timeout leads its own), should the suite have had no time to stop it."""
        pg = self.proc.pid
        try:
            os.killpg(pg, signal.SIGTERM)
        except ProcessLookupError:  # the suite ended on its own between the caller's check and this signal
            pass
        self.watch(time.monotonic() - self.t0 + 2)
        try:
            os.killpg(pg, signal.SIGKILL)
        except ProcessLookupError:  # the group has gone already
            pass
        self.proc.wait(timeout=30)
        self.cleanup()

    def cleanup(self):
        pgid_file = self.work / ".part_pgid"
        if pgid_file.is_file():
            try:
                os.killpg(int(pgid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass

    def stdout(self) -> str:
        return self.proc.stdout.read() if self.proc.stdout else ""


def _archive(out, dest):
    with tarfile.open(out / "results.tgz") as tar:
        tar.extractall(dest, filter="data")
    (stem,) = os.listdir(dest)
    return dest / stem


def _check_archive(out, dest):
    """Every part that suite_stdout.txt reports finished is in results.tgz with its log, and with its JSON and
    markdown when it ended ok (JSON complete); the parts ran in value order, the skipped ones last."""
    log = (out / "suite_stdout.txt").read_text()
    started = [m.group(1) for m in _START.finditer(log)]
    done = {m.group(1): m.group(2) for m in _DONE.finditer(log)}
    assert started == [p for p in ORDER if p in started], started  # value order
    ran = [p for p in ORDER if p in done and done[p] != "skipped"]
    skipped = [p for p in ORDER if done.get(p) == "skipped"]
    assert ran + skipped == [p for p in ORDER if p in done], (ran, skipped)  # skipped parts form the tail
    root = _archive(out, dest)
    for part in ran:
        assert (root / f"{part}.log").is_file(), part
        if part in TABLES and done[part] == "ok":
            rep = json.loads((root / f"{part}.json").read_text())
            if isinstance(rep, dict):  # gpu_checks.py writes its two rows as a list
                assert rep["meta"]["complete"] is True, part
            assert (root / f"{part}.md").read_text().startswith("# "), part
    status = (root / "status.md").read_text()
    for part in ran:
        assert f"| {part} | " in status, part
    return root, done


def test_scripts_parse():
    for script in (SUITE, WHEELS):
        subprocess.run(["bash", "-n", script], check=True)
        text = open(script).read()
        assert "set -u" in text or "set -euo" in text
        if shutil.which("shellcheck"):
            subprocess.run(["shellcheck", "-S", "warning", script], check=True)


def test_budgets_are_the_derived_ones():
    """The suite's PARTS table carries gpu_checks.gpu_budgets() (FLOP count + dry-run CPU seconds) and the
    dry-run CPU seconds themselves, in value order."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import gpu_checks
    finally:
        sys.path.pop(0)
    table = re.search(r"^PARTS=\(\n(.*?)^\)", open(SUITE).read(), re.S | re.M).group(1)
    rows = [line.strip().strip('"').split() for line in table.strip().splitlines()]
    assert [r[0] for r in rows] == ORDER
    derived = gpu_checks.gpu_budgets()
    assert {r[0]: int(r[2]) for r in rows} == derived
    assert {r[0]: int(r[3]) for r in rows} == gpu_checks.DRY_CPU_S
    for part, est in derived.items():  # the header's table says the same
        assert re.search(rf"^#   {part} .*?\s{est}$", open(SUITE).read(), re.M | re.S), part


def test_stub_suite_full_run(tmp_path):
    budget = _stub_budget()
    s = Suite(tmp_path, GPU_SUITE_DRY="stub", GPU_SUITE_BUDGET_S=budget, GPU_SUITE_PACK_S=2)
    finished = s.watch(budget + 60)
    if not finished:
        s.kill()
    out_text = s.stdout()
    assert finished, out_text[-3000:]
    elapsed = time.monotonic() - s.t0
    assert s.proc.returncode in (0, 1), out_text[-3000:]
    assert set(os.listdir(s.out)) == OUT_FILES
    assert s.max_files <= 6 and s.names <= OUT_FILES | TRANSIENT, s.names
    root, done = _check_archive(s.out, tmp_path / "x")
    assert done.get("01_env") == "ok" and "03_stage1" in done, done  # the headline is never starved
    assert elapsed < budget + 30  # the hard stop (with room for a loaded machine's last pack)
    summary = (s.out / "summary.md").read_text()
    assert summary.startswith("# GPU suite: cpu-stub") and "**Stub run**" in summary
    assert summary.index("## Headline") < summary.index("| part | status |")
    assert [p for p in ORDER if f"| {p} | " in summary] == [p for p in ORDER if p in done]
    assert (root / "summary.md").is_file() and (root / "suite_stdout.txt").is_file()
    # the stand-ins' rows: stage 2 interleaves ours and the reference per schedule
    if done.get("06_stage2") == "ok":
        labels = [r["label"] for r in json.loads((root / "06_stage2.json").read_text())["rows"]]
        assert labels[:4] == ["sequential megatron_anyflow", "sequential reference", "pipelined megatron_anyflow",
                              "pipelined reference"]


def test_stub_suite_killed_at_a_random_time(tmp_path):
    # The moment is drawn in the suite's own progress (after its k-th part has started, plus a random delay up
    # to one second), not in wall time: a fast machine finishes the stub suite before a wall-clock moment
    # late in the budget, and the kill must still land while the suite runs.
    budget = _stub_budget()
    rng = random.Random()
    k, delay = rng.randint(1, 6), rng.uniform(0.0, 1.0)
    print(f"killing {delay:.2f} s after part {k} starts (budget {budget} s)")
    s = Suite(tmp_path, GPU_SUITE_DRY="stub", GPU_SUITE_BUDGET_S=budget, GPU_SUITE_PACK_S=2)
    try:
        if not s.watch(budget + 60, started=k):
            s.watch(time.monotonic() - s.t0 + delay)
            s.kill()
    finally:
        s.cleanup()
    names = set(os.listdir(s.out))
    assert len(names) <= 6 and names <= OUT_FILES | TRANSIENT, names
    assert s.max_files <= 6
    _check_archive(s.out, tmp_path / "x")


def test_a_part_past_its_limit_is_cut_and_keeps_its_rows(tmp_path):
    # the stand-in of stage 2 wants twice its limit: cut, its rows so far in the archive (complete: false)
    s = Suite(tmp_path, GPU_SUITE_DRY="stub", GPU_SUITE_BUDGET_S=20, GPU_SUITE_PARTS="06_stage2",
              GPU_SUITE_STUB_FRACTION=2)
    assert s.watch(80)
    assert s.proc.returncode == 1
    root, done = _check_archive(s.out, tmp_path / "x")
    assert done == {"06_stage2": "TIMEOUT"}
    rep = json.loads((root / "06_stage2.json").read_text())
    assert rep["meta"]["complete"] is False and 0 < len(rep["rows"]) < 5
    assert "TIMEOUT (partial results kept)" in (s.out / "summary.md").read_text()


def test_missing_packages_exit_3_within_10_s(tmp_path):
    # a Python without site-packages: what a GPU machine without the carried wheels has
    py = tmp_path / "python_without_wheels"
    py.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    py.chmod(0o755)
    t0 = time.monotonic()
    proc = subprocess.run(["bash", SUITE], cwd=REPO, env=_env(tmp_path, GPU_SUITE_DRY="stub", PYTHON=py,
                                                               GPU_SUITE_WHEELS=tmp_path / "no_wheels"),
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 10, proc.stdout
    assert proc.returncode == 3, proc.stdout + proc.stderr
    out = tmp_path / "out"
    assert set(os.listdir(out)) == OUT_FILES
    log = (out / "suite_stdout.txt").read_text()
    assert "no wheels in" in log and "MISSING: torch, megatron.core, diffusers, peft" in log
    assert "02_model_vs_diffusers (limit" not in log  # nothing else ran
    assert "| 01_env | MISSING PACKAGES | 3 |" in (out / "summary.md").read_text()


def test_a_broken_wheel_exits_3(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "diffusers-0.0.1-py3-none-any.whl").write_bytes(b"not a zip file")
    proc = subprocess.run(["bash", SUITE], cwd=REPO, env=_env(tmp_path, GPU_SUITE_DRY="stub",
                                                               GPU_SUITE_WHEELS=wheels),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    log = (tmp_path / "out" / "suite_stdout.txt").read_text()
    assert "the wheel install FAILED" in log and "01_env (limit" not in log
    with tarfile.open(tmp_path / "out" / "results.tgz") as tar:
        assert any(n.endswith("/00_wheels.log") for n in tar.getnames())


DRY_PARTS = [p for p in ORDER if p not in ("10_pytest_gpu", "11_steps")]  # those two: start-up only on a CPU


def test_dry_suite_writes_every_part(tmp_path):
    """The real tools at tiny sizes (GPU_SUITE_DRY=1), every part but the CPU-only pytest / CLI ones."""
    # ~1.5 imports of the stack per part, 9 parts: ~230 s where the imports take 8 s (an idle 2-core machine)
    budget = int(60 + 22 * _wall([sys.executable, "-W", "ignore", "-c", "import torch, megatron.core, diffusers, peft"],
                                 n=1))
    s = Suite(tmp_path, GPU_SUITE_DRY="1", GPU_SUITE_BUDGET_S=budget, GPU_SUITE_PARTS=" ".join(DRY_PARTS))
    finished = s.watch(budget + 60)
    if not finished:
        s.kill()
    text = s.stdout()
    assert finished, text[-3000:]
    assert set(os.listdir(s.out)) == OUT_FILES and s.max_files <= 6
    root, done = _check_archive(s.out, tmp_path / "x")
    # a failure is a bug; a part cut or skipped by a slow machine is not (its files are checked where it ended ok)
    assert not [p for p, st in done.items() if st == "FAILED"], (done, text[-3000:])
    assert done.get("01_env") == "ok" and done.get("03_stage1") == "ok", (done, text[-3000:])  # the headline
    summary = (s.out / "summary.md").read_text()
    assert "Dry run on the CPU" in summary and "## Headline" in summary
    assert "- 03_stage1 stage1: ours" in summary and "speed-up" in summary  # the headline line of stage 1
    ok = {p for p, st in done.items() if st == "ok"}
    if "02_model_vs_diffusers" in ok:
        checks = json.loads((root / "02_model_vs_diffusers.json").read_text())
        assert [c["dtype"] for c in checks] == ["fp32", "bf16"] and all(c["ok"] for c in checks)
    # stage 1: ours, then the reference; selective recompute / diffusers' gradient checkpointing; MFU twice
    s1 = json.loads((root / "03_stage1.json").read_text())
    assert s1["meta"]["complete"] and s1["meta"]["recompute_granularity"] == "selective"
    assert [(r["step"], r["implementation"]) for r in s1["rows"]] == [("stage1", "megatron_anyflow"),
                                                                       ("stage1", "reference")]
    assert all("error" not in r for r in s1["rows"])
    assert [r["recompute"] for r in s1["rows"]] == ["selective", "gradient_checkpointing"]
    assert all(r["mfu"] > 0 and r["mfu_datasheet"] is None for r in s1["rows"])  # no data sheet for a CPU
    assert "speedup_vs_reference" in s1["rows"][0]
    if "04_generation" in ok:  # ours then diffusers' pipeline per (model, N); fp32 latents equal
        gen = json.loads((root / "04_generation.json").read_text())
        assert gen["meta"]["complete"] and [(r["model"], r["steps"], r["implementation"]) for r in gen["rows"]] == [
            (m, n, i) for m in ("bidirectional", "far") for n in (1, 4) for i in ("megatron_anyflow", "diffusers")]
        assert all(r["rel_err_vs_diffusers"] < gen["meta"]["fp32_tolerance"] for r in gen["rows"]
                   if r["implementation"] == "megatron_anyflow")
        assert "- 04_generation far N=4: ours" in summary
    if "05_profile_stage1" in ok:
        prof = json.loads((root / "05_profile_stage1.json").read_text())["rows"]
        assert [r["implementation"] for r in prof] == ["megatron_anyflow"]
        cats = prof[0]["profile"]["categories"]
        assert set(cats) == {"attention", "gemm", "elementwise", "communication"} and cats["gemm"]["ms"] > 0
        assert "| attention |" in (root / "05_profile_stage1.md").read_text()
    if "06_stage2" in ok:
        s2 = json.loads((root / "06_stage2.json").read_text())
        # interleaved per schedule; overlapped has our row only (the reference has no overlap)
        assert [(r["schedule"], r["implementation"]) for r in s2["rows"]] == [
            ("sequential", "megatron_anyflow"), ("sequential", "reference"), ("pipelined", "megatron_anyflow"),
            ("pipelined", "reference"), ("overlapped", "megatron_anyflow")]
        over = s2["rows"][-1]
        assert "error" in over or over["speedup_vs_pipelined"] > 0
        assert all(r["recompute"] != "none" for r in s2["rows"] if "error" not in r)
    if "07_attention" in ok:
        attn = json.loads((root / "07_attention.json").read_text())
        assert attn["meta"]["complete"] and {r["impl"] for r in attn["rows"]} >= {"sdpa", "math", "cudnn"}
    if "08_far" in ok:
        far = json.loads((root / "08_far.json").read_text())
        assert [r["step"] for r in far["rows"]] == ["stage1", "stage2"] and all("error" not in r for r in far["rows"])
    if "09_kernels" in ok:
        kern = json.loads((root / "09_kernels.json").read_text())
        assert kern["meta"]["complete"] and kern["rows"] and not kern["meta"]["compile"]
        assert "| kernel | pass |" in (root / "09_kernels.md").read_text()
    if "12_teacher" in ok:
        teacher = json.loads((root / "12_teacher.json").read_text())
        assert [r["implementation"] for r in teacher["rows"]] == ["megatron_anyflow", "reference"]
