"""Every bad input to a command-line tool ends in one named line and exit 2, never a traceback.

Each row is a command a user could type (the cases of an adversarial probe of the CLIs), the text its
error line must contain (the flag or file that is wrong and what was expected), and the exit status.
The policy itself is ``megatron_anyflow/cli.py``; argparse errors (usage line + one error line) follow the
same rule: the last stderr line names the problem.
"""

import errno
import os
import subprocess
import sys

import pytest

from conftest import REPO

from megatron_anyflow.cli import one_line, run_main

PY = sys.executable


def _run(args, cwd=REPO, timeout=300, env=None):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    full_env.pop("ANYFLOW_TRACEBACK", None)
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def _assert_one_line_error(proc, expected, code=2):
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert err_lines, "no error line on stderr"
    last = err_lines[-1]
    assert "error:" in last and expected in last, f"expected {expected!r} in the last stderr line, got {last!r}"


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("empty_input"))


PRETRAIN = [PY, "pretrain_anyflow.py", "--stage", "stage1", "--mock-data", "--train-iters", "1"]
PREPARE = [PY, "tools/prepare_dataset.py", "--quiet", "--device", "cpu"]

PRETRAIN_CASES = [
    (["--lr", "1e39"], "--lr 1e+39: must lie in [0,"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr=-1e-4"], "--lr -0.0001: must lie in [0,"),
    (["--critic-lr", "inf"], "--critic-lr inf: must be a finite number"),
    (["--min-lr", "1.0", "--lr", "1e-4"], "--min-lr 1.0: must lie in [0, --lr 0.0001]"),
    (["--adam-beta2", "1.0"], "--adam-beta2 1.0: must lie in [0, 1)"),
    (["--fd-eps", "nan"], "--fd-eps nan: must be a finite number"),
    (["--train-iters", "0"], "--train-iters must be >= 1"),
]


@pytest.mark.parametrize("extra,expected", PRETRAIN_CASES, ids=[" ".join(c[0]) for c in PRETRAIN_CASES])
def test_pretrain_argument_ranges(extra, expected):
    _assert_one_line_error(_run(PRETRAIN + extra), expected)


def test_prepare_dataset_bad_inputs(empty_dir, tmp_path):
    out = str(tmp_path / "out")
    cases = [
        (["--input", str(tmp_path / "missing")], f"--input {tmp_path / 'missing'}: no such file or folder"),
        (["--input", empty_dir, "--num-frames", "0"], "--num-frames 0: must be 4k+1"),
        (["--input", empty_dir, "--num-frames", "8"], "--num-frames 8: must be 4k+1"),
        (["--input", empty_dir, "--height", "50"], "--height 50: must be a positive multiple of 4"),
        (["--input", empty_dir, "--codec", "wan-vae", "--width", "100"], "--width 100: must be a positive multiple of 8"),
        # an existing but empty input folder: found after the codec is built, still one line
        (["--input", empty_dir, "--height", "48", "--width", "80", "--num-frames", "5"], "no videos"),
    ]
    for extra, expected in cases:
        _assert_one_line_error(_run(PREPARE + ["--output", out] + extra), expected)


def test_policy_user_errors_one_line_bugs_keep_traceback(capsys):
    def bad_value(argv):
        raise ValueError("--frames -1: expected a positive count\n(second line folded)")

    assert run_main(bad_value, prog="tool") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tool: error: --frames -1: expected a positive count (second line folded)"]

    def full_disk(argv):
        raise OSError(errno.EFBIG, "File too large")  # as a write under `ulimit -f` raises it: no file name

    assert run_main(full_disk, prog="tool", outputs=lambda: ["/data/out"]) == 2
    assert capsys.readouterr().err.strip() == "tool: error: File too large: while writing /data/out"
    assert one_line(PermissionError(errno.EACCES, "Permission denied", "/ro/x")) == "Permission denied: /ro/x"

    def bug(argv):
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        run_main(bug, prog="tool")
    os.environ["ANYFLOW_TRACEBACK"] = "1"
    try:
        with pytest.raises(ValueError):
            run_main(bad_value, prog="tool")
    finally:
        del os.environ["ANYFLOW_TRACEBACK"]


def test_read_only_output_is_one_line(tmp_path):
    if os.geteuid() == 0:
        # root ignores directory permissions; a file in the way of the output folder is the same failure
        # (the OS refuses to create the folder) and does not depend on the user.
        blocker = tmp_path / "not_a_dir"
        blocker.write_text("x")
        out = str(blocker / "data")
        expected = str(blocker)
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out = str(ro / "data")
        expected = str(ro)
    clips = tmp_path / "clips"
    clips.mkdir()
    proc = _run(PREPARE + ["--input", str(clips), "--output", out, "--num-frames", "5", "--height", "48",
                           "--width", "80"])
    _assert_one_line_error(proc, expected)


@pytest.fixture(scope="module")
def gen_ckpt(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    from test_pipeline_export import tiny_stage1_checkpoint

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gen_cli")
    ckpt = tiny_stage1_checkpoint(str(root / "ckpt"))
    embeds = str(root / "embeds.safetensors")
    save_file({"prompt_embeds": torch.randn(1, 8, 384)}, embeds)
    return ckpt, embeds, root


def test_generate_bad_inputs(gen_ckpt):
    ckpt, embeds, root = gen_ckpt
    a_file = root / "a_file"
    a_file.write_text("x")
    base = [PY, "tools/generate.py", "--checkpoint", ckpt, "--prompt-embeds", embeds, "--no-progress", "--steps", "1"]
    out = ["--output", str(root / "out")]
    cases = [
        (["--codec", "none", "--latent-shape", "3", "16", "7", "8"] + out,
         "--latent-shape 3 16 7 8: the latent F x H x W must be divisible by the model's patch size (1, 2, 2)"),
        (["--codec", "none", "--latent-shape", "0", "16", "4", "6"] + out, "--latent-shape 0 16 4 6: F, C, H and W"),
        (["--frames=-1"] + out, "--frames -1: must be >= 1"),
        (["--codec", "none", "--latent-shape", "3", "16", "4", "6", "--output", str(a_file)],
         f"--output {a_file}: is a file"),
        (["--codec", "none", "--latent-shape", "3", "16", "4", "6", "--steps", "0"] + out, "steps"),
        (["--checkpoint", str(root / "missing")] + out, "missing"),
    ]
    for extra, expected in cases:
        _assert_one_line_error(_run(base + extra), expected)
    assert not (root / "out" / "generation.json").exists()


def test_mostly_skipped_run_exits_3(tmp_path):
    """--lr 1e30 is finite, so it passes the argument check; the first step blows the LoRA weights up and
    every later step is non-finite and skipped (5 of 6), fewer in a row than --max-skipped-iters (10). Such
    a run used to exit 0; it must not be reported as a success."""
    proc = _run([PY, "pretrain_anyflow.py", "--stage", "stage1", "--mock-data", "--model-preset", "tiny",
                 "--mock-num-samples", "8", "--micro-batch-size", "2", "--train-iters", "6", "--lr", "1e30",
                 "--lr-warmup-iters", "0", "--lora-rank", "4", "--log-interval", "1", "--save", str(tmp_path / "ck")])
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    assert "5 of 6 optimizer step(s) skipped" in proc.stdout
    assert "5 of 6 optimizer steps were skipped" in proc.stderr.strip().splitlines()[-1]


def test_a_finished_two_rank_run_ends_its_process_groups():
    """A multi-process run whose ranks return at different times ends its process groups in order (barrier,
    then destroy) instead of leaving gloo to interpreter exit, which aborted a generation rank in CI
    ("terminate called without an active exception", SIGABRT, reported by torchrun as a failed run).
    Fails without `cli.end_process_groups`: both ranks report their group still initialized at exit."""
    from conftest import torchrun

    proc = torchrun(["tests/distributed/teardown_check.py"])
    for rank in (0, 1):
        out = proc.rank_logs[rank][0]
        assert f"rank {rank} at exit: process group initialized=False" in out, (rank, out)


def test_every_torchrun_check_script_ends_its_process_groups():
    """Each tests/distributed script ends its groups as the tools do (`cli.end_process_groups`, or `main_guard`,
    which calls it): the race above hit tests/distributed/far_parallel_check.py in CI (rank 2 aborted at exit
    while rank 0 wrote the report). late_rank.py runs a tool under its own main_guard."""
    root = os.path.join(REPO, "tests", "distributed")
    missing = []
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py") or name == "late_rank.py":
            continue
        text = open(os.path.join(root, name)).read()
        main_block = text[text.index('if __name__ == "__main__":'):]
        if "end_process_groups()" not in main_block and "main_guard(" not in main_block:
            missing.append(name)
    assert not missing, f"torchrun scripts that leave their process groups to interpreter exit: {missing}"
