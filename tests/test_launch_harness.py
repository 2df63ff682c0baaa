"""The test harness's launchers (tests/conftest.py ``torchrun`` / ``run_cmd``) never hang and say why.

A failing multi-process launch must show every rank's own error (the rank that crashed, not only the
peer left waiting in a barrier with gloo's "Connection closed by peer"), and a launch that hangs must
end at its timeout with nothing it started left running (the ranks run in sessions of their own, so
killing the launcher's process group alone would orphan them).
"""

import os
import shutil
import sys
import time

import psutil
import pytest

from conftest import REPO, LaunchError, run_cmd, torchrun

SCRIPT = "tests/distributed/harness_check.py"  # relative to the repository root (launch cwd)


def _pids(d):
    return {name: int((d / name).read_text()) for name in os.listdir(d) if name.endswith(".pid")}


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_rank_failure_shows_every_ranks_error(tmp_path):
    with pytest.raises(LaunchError) as info:
        torchrun([SCRIPT, "raise", str(tmp_path)], nproc=2, timeout=120)
    shutil.rmtree(info.value.log_dir)  # kept for a failure; this one was expected (the message has the logs)
    msg = str(info.value)
    assert "RuntimeError: harness_check: planted failure on rank 1" in msg, msg
    rank1 = msg[msg.index("=== rank 1 "):]
    assert "planted failure on rank 1" in rank1.split("=== rank 1 stdout")[0], msg  # under rank 1's label
    # Rank 1's own exit code is 1, unless torchrun saw rank 0's consequent failure ("connection closed by peer")
    # first and stopped rank 1 with SIGTERM while it was still exiting (seen once in a full run): either way its
    # header says how it ended, and its traceback is the planted error.
    assert "=== rank 0 " in msg and "rank 1 started" in msg, msg
    assert "exitcode: 1 " in rank1.split("\n")[0] or "SIGTERM" in rank1.split("\n")[0], msg
    assert not info.value.timed_out
    assert all(_gone(p) for p in info.value.pids)


def test_hang_times_out_and_kills_everything(tmp_path):
    timeout = 60  # time for both ranks to import torch and reach the hang on a loaded 2-core machine
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        torchrun([SCRIPT, "hang", str(tmp_path)], nproc=2, timeout=timeout)
    elapsed = time.monotonic() - t0
    shutil.rmtree(info.value.log_dir)
    assert info.value.timed_out and "timed out" in str(info.value)
    assert elapsed < timeout + 20, elapsed  # <= 3 s for the stacks, 5 s for torchrun to stop, then SIGKILL
    pids = _pids(tmp_path)
    assert set(pids) == {"rank0.pid", "rank1.pid", "child.pid"}, pids  # the script got as far as the hang
    msg = str(info.value)
    assert "rank 1 sleeping instead of joining the barrier" in msg
    rank0, rank1 = msg.split("=== rank 1 ")[0], msg.split("=== rank 1 ")[1]
    lines = open(os.path.join(REPO, SCRIPT)).read().splitlines()
    barrier = 1 + lines.index("    dist.barrier()")
    sleep = 1 + lines.index("        time.sleep(3600)")
    assert f"harness_check.py\", line {barrier} in main" in rank0, msg  # faulthandler: rank 0 in the barrier
    assert f"harness_check.py\", line {sleep} in main" in rank1, msg  # rank 1 in time.sleep
    recorded = set(info.value.pids)
    assert set(pids.values()) <= recorded, (pids, recorded)
    survivors = [p for p in recorded | set(pids.values()) if not _gone(p)]
    assert not survivors, [psutil.Process(p).cmdline() for p in survivors]


def test_run_cmd_timeout_kills_the_process_tree(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'], start_new_session=True); "
            f"open({str(pidfile)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(3600)")
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        run_cmd([sys.executable, "-c", code], timeout=20)
    assert time.monotonic() - t0 < 35 and info.value.timed_out and "started" in str(info.value)
    assert "Fatal Python error: Aborted" in str(info.value)  # its stack (faulthandler) before it was killed
    assert _gone(int(pidfile.read_text())) and all(_gone(p) for p in info.value.pids)
