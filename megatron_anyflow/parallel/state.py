"""Process-group set-up: torchrun or a single process, NCCL on GPU and gloo on CPU."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state


# Timeout of every collective (barriers included) on the default group and megatron-core's groups. A barrier
# waits for the slowest rank: a checkpoint save on a slow disk, or a rank starved on a loaded 2-core test
# machine, must not trip it. gloo's default is also 30 minutes; NCCL's is 10, too short for writing a large
# checkpoint. ANYFLOW_DIST_TIMEOUT_MINUTES overrides it.
TIMEOUT_MINUTES = int(os.environ.get("ANYFLOW_DIST_TIMEOUT_MINUTES", 30))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(tensor_model_parallel_size: int = 1, context_parallel_size: int = 1,
                        backend: str | None = None) -> None:
    """Initialise torch.distributed and megatron-core's `parallel_state`.

    Works under ``torchrun`` (reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) and as a plain
    ``python`` process (world size 1 on a free local port). Backend: NCCL when CUDA is available,
    gloo otherwise. Idempotent for the same sizes.

    Raises:
        ValueError: the world size does not divide by TP x CP.
    """
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = datetime.timedelta(minutes=TIMEOUT_MINUTES)
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain process: world of one, without touching os.environ (child processes inherit it)
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    if world % (tensor_model_parallel_size * context_parallel_size):
        raise ValueError(f"world size {world} does not divide by tensor_model_parallel_size="
                         f"{tensor_model_parallel_size} x context_parallel_size={context_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size() == tensor_model_parallel_size
                and parallel_state.get_context_parallel_world_size() == context_parallel_size):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size, context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=TIMEOUT_MINUTES)


def destroy_parallel() -> None:
    """Tear down megatron-core's groups and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
