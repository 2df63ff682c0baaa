"""One trainer per --save root, checked before any work (issue #18, F1 and F6).

A second trainer on a root a live trainer holds exits 2 with one line naming the holder; a lock left by
a dead trainer is taken over with a warning; an unwritable --save fails at start, not at the first save.
Trainers run in-process where they can (fast), and as subprocesses where two must race.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import LaunchError, pretrain_cli, torchrun
from megatron_anyflow.checkpoint import store as ckpt
from megatron_anyflow.training.arguments import parse_args
from megatron_anyflow.training.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = ".anyflow_save.lock"  # ckpt.LOCK_FILE (spelled out: the tests must run against the old code too)
ARGS = ["--stage", "stage1", "--mock-data", "--mock-num-samples", "8", "--mock-latent-shape", "3", "16", "4", "6",
        "--micro-batch-size", "1", "--global-batch-size", "1", "--lora-rank", "4", "--num-workers", "0",
        "--log-interval", "100"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

# Holds an exclusive flock on argv[1] (writing the holder JSON a trainer would) until stdin closes.
HOLDER = r"""
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                         "start_time": "2026-12-01T10:00:00+00:00"}).encode())
print("locked", flush=True)
sys.stdin.read()
"""

# Tries a non-blocking flock on argv[1]; exit 0 when it got it, 1 when it is held.
TRY_LOCK = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(1)
"""

# A real trainer (pretrain_anyflow.main) that does its imports first, says so, and starts only when the
# go-file appears: two of them then claim the root within milliseconds of each other.
RACER = r"""
import os, sys, time
sys.path.insert(0, os.getcwd())
import pretrain_anyflow
from megatron_anyflow.training.trainer import Trainer
try:
    from megatron_anyflow.cli import run_main
except ImportError:  # before megatron_anyflow/cli.py, main() printed the error line itself
    run_main = lambda main, argv, prog: main(argv)
ready, go = sys.argv[1], sys.argv[2]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.002)
start = time.time()
try:
    rc = run_main(pretrain_anyflow.main, sys.argv[3:], prog="pretrain_anyflow.py")
finally:
    with open(ready + ".times", "w") as f:  # when this trainer ran (start, end)
        f.write(f"{start} {time.time()}")
sys.exit(rc)
"""


_main = pretrain_cli  # in-process pretrain_anyflow.py (tests/conftest.py)


def _hold(path):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def _release(p):
    p.stdin.close()
    p.wait(timeout=30)


def _lock_is_free(path):
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(path)]).returncode == 0


def _errors(stderr):
    return [l for l in stderr.splitlines() if l.strip()]


def test_live_holder_refuses_a_second_trainer(tmp_path, capsys):
    root = tmp_path / "c"
    root.mkdir()
    holder = _hold(root / LOCK)
    try:
        capsys.readouterr()
        t0 = time.monotonic()
        rc = _main(ARGS + ["--train-iters", "1", "--save", str(root)])
        took = time.monotonic() - t0
        err = capsys.readouterr().err
        assert rc == 2, (rc, err)
        lines = _errors(err)
        assert len(lines) == 1 and "Traceback" not in err, err
        host = socket.gethostname()
        assert lines[0].endswith(f"error: --save {root} is in use by another trainer (host {host}, pid {holder.pid}, "
                                 f"started 2026-12-01T10:00:00+00:00, lock {root / LOCK}); wait for it to end or "
                                 "choose another --save"), lines[0]
        assert took < 10, took  # refused before the model is built
        assert sorted(os.listdir(root)) == [LOCK]  # nothing written
    finally:
        _release(holder)


def test_stale_lock_of_a_dead_trainer_is_taken_over(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "start_time": "2026-12-01T09:00:00+00:00"}
    (root / LOCK).write_text(json.dumps(stale))
    lines = []
    tr = Trainer(parse_args(ARGS + ["--train-iters", "1", "--save", str(root)]),
                 log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    warn = [l for l in lines if "stale save lock" in l]
    assert len(warn) == 1 and "is no longer running" in warn[0] and f"pid {dead.pid}" in warn[0], lines
    assert "started 2026-12-01T09:00:00+00:00" in warn[0] and str(root / LOCK) in warn[0]
    info = json.loads((root / LOCK).read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["start_time"]
    assert not _lock_is_free(root / LOCK)  # held now (flock): another process is refused
    tr.train()
    tr.save_lock.release()
    assert _lock_is_free(root / LOCK) and (root / LOCK).read_text() == ""  # a clean release leaves no holder


def test_a_killed_holder_never_blocks(tmp_path):
    """The flock vanishes with its process: a SIGKILLed holder's root is claimable at once."""
    root = tmp_path / "c"
    root.mkdir()
    holder = _hold(root / LOCK)
    assert not _lock_is_free(root / LOCK)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lines = []
    tr = Trainer(parse_args(ARGS + ["--train-iters", "1", "--save", str(root)]),
                 log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("stale save lock" in l and f"pid {holder.pid}" in l for l in lines), lines
    tr.save_lock.release()


def test_unwritable_save_fails_at_start(tmp_path, capsys):
    """F6: found before any compute, not at the first save after the whole run."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad = blocker / "ckpt"
    t0 = time.monotonic()
    with pytest.raises(ckpt.CheckpointError, match=f"--save {bad}: cannot create the directory"):
        Trainer(parse_args(ARGS + ["--train-iters", "1000", "--save", str(bad)]), log=lambda *a, **k: None)
    assert time.monotonic() - t0 < 5
    capsys.readouterr()
    assert _main(ARGS + ["--train-iters", "1000", "--save", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(_errors(err)) == 1 and "error: --save" in err and "Traceback" not in err, err
    if os.geteuid() != 0:  # root writes through permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(ckpt.CheckpointError, match="is not writable"):
                Trainer(parse_args(ARGS + ["--train-iters", "1000", "--save", str(ro)]), log=lambda *a, **k: None)
        finally:
            ro.chmod(0o755)


def test_free_space_short_of_one_checkpoint_warns(tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    lines = []
    tr = Trainer(parse_args(ARGS + ["--train-iters", "1", "--save", str(tmp_path / "c")]),
                 log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    warn = [l for l in lines if "one checkpoint needs about" in l]
    assert len(warn) == 1 and warn[0].startswith(f"warning: --save {tmp_path / 'c'}: 1.0 KB free"), lines
    tr.save_lock.release()


def _race(tmp_path, trial):
    root = tmp_path / f"race{trial}"
    go = tmp_path / f"go{trial}"
    argv = ARGS + ["--train-iters", "2", "--save-interval", "1", "--save", str(root)]
    procs = []
    for k in range(2):
        ready = str(tmp_path / f"ready{trial}.{k}")
        procs.append(subprocess.Popen([sys.executable, "-c", RACER, ready, str(go), *argv], cwd=REPO, env=ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 300
        while not all((tmp_path / f"ready{trial}.{k}").exists() for k in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate(timeout=30) for p in procs if p.poll() is not None]
            time.sleep(0.01)
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    times = [tuple(map(float, (tmp_path / f"ready{trial}.{k}.times").read_text().split())) for k in range(2)]
    return root, [(p.pid, p.returncode, out, err) for p, (out, err) in zip(procs, outs)], times


def test_two_trainers_on_one_save_root(tmp_path):
    """F1: two trainers started at the same instant on one --save, 10 times: every time exactly one trains
    and the other exits 2 naming it; every checkpoint is complete, verified, and written by the winner."""
    trials = int(os.environ.get("ANYFLOW_LOCK_TRIALS", 10))
    outcomes = []
    trial = 0
    while len(outcomes) < trials:
        root, runs, times = _race(tmp_path, trial)
        trial += 1
        rcs = sorted(rc for _, rc, _, _ in runs)
        (s0, e0), (s1, e1) = times
        if rcs == [0, 0] and (s1 > e0 or s0 > e1) and trial < 2 * trials:
            continue  # one was starved until the other had finished (an overloaded machine): no race, redo
        outcomes.append(rcs)
        assert rcs == [0, 2], (trial, times, [(rc, err[-2000:]) for _, rc, _, err in runs])
        (wpid, _, _, _), = [r for r in runs if r[1] == 0]
        (_, _, _, lerr), = [r for r in runs if r[1] == 2]
        lines = _errors(lerr)
        assert len(lines) == 1 and "Traceback" not in lerr, lerr
        assert (f"error: --save {root} is in use by another trainer (host {socket.gethostname()}, pid {wpid}, "
                "started ") in lines[0], lines[0]
        assert f"lock {root / LOCK})" in lines[0]
        tags = sorted(n for n in os.listdir(root) if n.startswith("iter_"))
        assert tags == ["iter_0000001", "iter_0000002"], tags  # no leftover *.tmp, nothing else
        for tag in tags:
            d = str(root / tag)
            assert ckpt.incomplete_reason(d) is None, ckpt.incomplete_reason(d)
            assert ckpt.read_meta(d)["writer"]["pid"] == wpid  # not a mix of two runs
    assert outcomes == [[0, 2]] * trials


def test_refusal_stops_every_rank(tmp_path):
    """Two ranks: rank 0 finds the root held, and both ranks exit 2 with the line (no hang)."""
    root = tmp_path / "c"
    root.mkdir()
    holder = _hold(root / LOCK)
    try:
        t0 = time.monotonic()
        with pytest.raises(LaunchError) as info:
            torchrun(["pretrain_anyflow.py", *ARGS, "--global-batch-size", "2", "--train-iters", "1",
                      "--save", str(root)], nproc=2, timeout=300)
        msg = str(info.value)
        assert not info.value.timed_out, msg
        codes = []
        for rank in (0, 1):
            section = msg.split(f"=== rank {rank} ")[1].split("=== rank")[0]
            assert f"error: --save {root} is in use by another trainer (host" in section, msg  # every rank says it
            codes.append(section.splitlines()[0])
        # The first rank to exit has status 2; torchrun then stops the other, which may still be exiting.
        assert any("exitcode: 2" in c for c in codes), codes
        assert all("exitcode: 2" in c or "SIGTERM" in c for c in codes), codes
        assert time.monotonic() - t0 < 300
    finally:
        _release(holder)
