"""Shared fixtures: megatron-core on CPU (TP = 1, gloo) for in-process tests; GPU marker handling."""

import os
import subprocess
import sys
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
    from megatron_anyflow.testing.cpu_compat import enable_megatron_cpu_compat

    enable_megatron_cpu_compat()
    initialize_parallel(1)
    yield


def run_cmd(args, timeout=600, env=None):
    """Run a command from the repo root; fail the test with its output when it exits non-zero."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def torchrun(script_args, nproc=2, timeout=600):
    """Launch ``python -m torch.distributed.run --nproc_per_node N`` on a free port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return run_cmd([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={port}", *script_args], timeout=timeout)
