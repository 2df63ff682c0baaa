"""Shared fixtures: megatron-core on CPU (TP = 1, gloo) for in-process tests; GPU marker handling."""

import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU-only test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def megatron_cpu():
    """One process group (world size 1) and megatron parallel_state at TP = 1 for the session."""
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat

    enable_megatron_cpu_compat()
    initialize_parallel(1)
    yield


# A launch that runs longer than this is killed with every process it started, and the test fails with the
# output gathered so far (each rank's Python stacks included). pytest has no timeout of its own here (no
# pytest-timeout, none in pytest.ini), so this is the only bound on a hung collective. Measured on 2 shared
# cores at load average ~25 (tools/stress_parallel_tests.sh, 20 runs each): a whole test of
# test_far_conversion.py's TP-2 round trip <= 332 s, of test_far_parallel.py's 4-rank launch <= 223 s,
# the launch itself being a part of that. Override with ANYFLOW_TEST_LAUNCH_TIMEOUT (seconds).
LAUNCH_TIMEOUT = float(os.environ.get("ANYFLOW_TEST_LAUNCH_TIMEOUT", 420))
TAIL = 4000  # characters of each stream shown in a failure
_LOG_ROOT = None  # where torchrun's per-rank logs go: under pytest's basetemp in a test session, else $TMPDIR


@pytest.fixture(scope="session", autouse=True)
def _launch_log_root(tmp_path_factory):
    global _LOG_ROOT
    _LOG_ROOT = str(tmp_path_factory.mktemp("launch-logs"))
    yield
    _LOG_ROOT = None


def _tail(text, n=TAIL):
    return text if len(text) <= n else "[...]\n" + text[-n:]


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _cmd0(p):
    try:
        return (p.cmdline() or [""])[0]
    except Exception:  # psutil.NoSuchProcess / AccessDenied / ZombieProcess
        return ""


class _ProcessTree:
    """Every process started under ``proc`` (recorded while it runs), so that all of them can be killed.

    torchrun starts each rank with ``start_new_session=True``, and a rank may start processes of its own:
    killing the launcher's process group alone would leave them running (reparented to init, holding CPU,
    ports and the test's files). The tree is polled while the launch runs, so a process is still known
    after its parent died.
    """

    def __init__(self, proc):
        import psutil

        self.proc = proc
        self.known = {}  # pid -> psutil.Process (its create time guards against a recycled pid)
        try:
            self.known[proc.pid] = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            pass

    def poll(self):
        import psutil

        for p in list(self.known.values()):
            try:
                for c in p.children(recursive=True):
                    self.known.setdefault(c.pid, c)
            except psutil.NoSuchProcess:
                pass

    @property
    def pids(self):
        return sorted(self.known)

    def alive(self):
        import psutil

        out = []
        for p in self.known.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out

    def dump_stacks(self, of_children, wait=3.0):
        """SIGABRT the Python processes that ran past the timeout (the launcher's children, the ranks, when
        ``of_children``; else the command itself): with ``PYTHONFAULTHANDLER=1`` each writes the stack of
        every thread to its stderr first, so a hang says where it hung."""
        import signal

        import psutil

        try:
            procs = self.known[self.proc.pid].children() if of_children else [self.known[self.proc.pid]]
        except (KeyError, psutil.NoSuchProcess):
            return
        procs = [p for p in procs if "python" in os.path.basename(_cmd0(p)).lower()]
        for p in procs:
            try:
                p.send_signal(signal.SIGABRT)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=wait)

    def kill(self, grace=5.0):
        """SIGTERM the launcher (torchrun then stops its ranks), then SIGKILL whatever is left, group by group."""
        import signal

        import psutil

        self.poll()
        if self.proc.poll() is None:  # (once reaped, its pid, the group's id, could be another's)
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.poll()
        for p in self.alive():
            try:
                if os.getpgid(p.pid) == p.pid:  # a group leader (a rank): its group too
                    os.killpg(p.pid, signal.SIGKILL)
                p.kill()
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        self.proc.wait()
        psutil.wait_procs(self.alive(), timeout=5)


class LaunchError(AssertionError):
    """A command exited non-zero or ran past its timeout; the message has its output (every rank's for
    a torchrun launch). ``pids``: every process it started (all dead when this is raised);
    ``timed_out``; ``log_dir``: torchrun's per-rank logs (kept on failure)."""

    def __init__(self, message, pids=(), timed_out=False, log_dir=None):
        super().__init__(message)
        self.pids, self.timed_out, self.log_dir = list(pids), timed_out, log_dir


def _no_core_dumps():  # in the child before exec: the SIGABRT of `dump_stacks` must not write core files
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _run_tree(args, timeout, env, out_path, err_path, launcher=False):
    """Run ``args`` in its own session with stdout / stderr to files (no pipe an orphan could hold open).

    Returns (returncode or None when it timed out, the pids it started). On a timeout the Python stacks are
    dumped (`_ProcessTree.dump_stacks`; of the ranks when ``launcher``) and every process it started is
    killed before this returns.
    """
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1", **(env or {}))
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=full_env,
                                start_new_session=True, preexec_fn=_no_core_dumps)
    tree = _ProcessTree(proc)
    deadline = time.monotonic() + timeout
    try:
        while True:
            tree.poll()
            try:
                proc.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                tree.dump_stacks(of_children=launcher)
                tree.kill()
                return None, tree.pids
    except BaseException:  # KeyboardInterrupt, a pytest-timeout exception: leave nothing behind
        tree.kill(grace=1.0)
        raise
    tree.poll()
    if proc.returncode != 0:  # a failed launch: nothing it started may outlive it (a rank's own children)
        tree.kill(grace=0.0)
    return proc.returncode, tree.pids


def run_cmd(args, timeout=LAUNCH_TIMEOUT, env=None):
    """Run a command from the repo root; fail the test with its output when it exits non-zero or runs past
    ``timeout`` seconds (then it is killed with every process it started)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="run_cmd-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        t0 = time.monotonic()
        rc, pids = _run_tree([str(a) for a in args], timeout, env, out_path, err_path)
        stdout, stderr = _read(out_path), _read(err_path)
    cmd = " ".join(map(str, args))
    if rc is None:
        raise LaunchError(f"command timed out after {time.monotonic() - t0:.0f}s (limit {timeout:.0f}s; a Python "
                          "command was sent SIGABRT: stderr ends with its stacks; then it and every process it "
                          f"started were killed): {cmd}\n--- stdout ---\n{_tail(stdout)}\n"
                          f"--- stderr ---\n{_tail(stderr)}", pids, timed_out=True)
    if rc != 0:
        raise LaunchError(f"command failed ({rc}): {cmd}\n--- stdout ---\n{_tail(stdout)}\n"
                          f"--- stderr ---\n{_tail(stderr)}", pids)
    return subprocess.CompletedProcess(args, rc, stdout, stderr)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_logs(log_dir):
    """{rank: (stdout, stderr)} from ``torch.distributed.run --log-dir`` (DIR/<run>/attempt_<k>/<rank>/)."""
    import glob

    logs = {}
    for d in sorted(glob.glob(os.path.join(log_dir, "*", "attempt_*", "*"))):
        if os.path.basename(d).isdigit():
            logs[int(os.path.basename(d))] = (_read(os.path.join(d, "stdout.log")),
                                              _read(os.path.join(d, "stderr.log")))
    return logs


def _exit_codes(launcher_stderr):
    """{rank: 'exitcode : ...'} from torchrun's failure summary."""
    import re

    return {int(m.group(1)): m.group(2).strip() for m in
            re.finditer(r"rank\s*:\s*(\d+) \(local_rank.*\n\s*exitcode\s*:\s*([^\n]*)", launcher_stderr)}


def torchrun(script_args, nproc=2, timeout=LAUNCH_TIMEOUT, env=None):
    """Launch ``python -m torch.distributed.run --nproc_per_node N`` on a free port, each rank's stdout /
    stderr to its own log file.

    On a non-zero exit or past ``timeout`` seconds (then the launcher, every rank and anything a rank
    started are killed) the test fails with the tail of EVERY rank's stderr and stdout, labelled by rank
    and exit code (a rank that crashed, not just the peer that then lost its connection), and the
    launcher's summary. Returns a CompletedProcess whose stdout / stderr are the ranks' logs in rank order
    and whose ``rank_logs`` is ``{rank: (stdout, stderr)}``.
    """
    import shutil
    import tempfile

    log_dir = tempfile.mkdtemp(prefix="torchrun-", dir=_LOG_ROOT)  # kept on failure (pytest prunes old basetemps)
    out_path, err_path = os.path.join(log_dir, "launcher.stdout"), os.path.join(log_dir, "launcher.stderr")
    for attempt in range(3):  # the free port can be taken by another process before the launcher binds it
        args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={_free_port()}", f"--log-dir={log_dir}", "--redirects=3", *map(str, script_args)]
        t0 = time.monotonic()
        rc, pids = _run_tree(args, timeout, env, out_path, err_path, launcher=True)
        launcher_out, launcher_err = _read(out_path), _read(err_path)
        if rc is None or rc == 0 or "address already in use" not in launcher_err.lower() or _rank_logs(log_dir):
            break
        shutil.rmtree(log_dir, ignore_errors=True)
        os.makedirs(log_dir)
    logs = _rank_logs(log_dir)
    if rc == 0:
        shutil.rmtree(log_dir, ignore_errors=True)
        proc = subprocess.CompletedProcess(args, rc, "".join(o for o, _ in logs.values()),
                                           "".join(e for _, e in logs.values()))
        proc.rank_logs = logs
        return proc
    codes = _exit_codes(launcher_err)
    head = (f"torchrun timed out after {time.monotonic() - t0:.0f}s (limit {timeout:.0f}s); the ranks were sent "
            f"SIGABRT (each stderr ends with its Python stacks: where it hung), then the launcher, its {nproc} ranks "
            "and every process they started were killed" if rc is None else
            f"torchrun failed ({rc})")
    parts = [f"{head}: {' '.join(args)}\nper-rank logs: {log_dir}"]
    for rank in range(nproc):
        out, err = logs.get(rank, ("", ""))
        code = codes.get(rank, "killed at the timeout" if rc is None else "0 or not reported")
        parts.append(f"=== rank {rank} (exitcode: {code}) stderr ===\n{_tail(err) or '(empty)'}\n"
                     f"=== rank {rank} stdout ===\n{_tail(out, 1500) or '(empty)'}")
    parts.append(f"=== launcher stderr ===\n{_tail(launcher_err, 2500)}")
    if launcher_out.strip():
        parts.append(f"=== launcher stdout ===\n{_tail(launcher_out, 1000)}")
    raise LaunchError("\n".join(parts), pids, timed_out=rc is None, log_dir=log_dir)


def pretrain_cli(argv):
    """``python pretrain_anyflow.py ARGV`` in-process: its exit status, with the CLI's error policy
    (megatron_anyflow/cli.py) applied as ``main_guard`` applies it."""
    import importlib.util

    from megatron_anyflow.cli import run_main

    spec = importlib.util.spec_from_file_location("pretrain_anyflow", os.path.join(REPO, "pretrain_anyflow.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return run_main(mod.main, argv, prog="pretrain_anyflow.py")
