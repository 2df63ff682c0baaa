"""The training data loader: a `torch.utils.data.DataLoader` (worker processes, pinned memory when CUDA
is present, prefetch) driven by the deterministic data-parallel sampler.

The sampler stays the single source of the data order: `MicroBatchSampler` is the DataLoader's batch
sampler and yields this rank's micro-batches (`DataParallelSampler.micro_batches`) of the iterations
starting at ``consumed_samples``, so the order is a pure function of (seed, consumed samples) whatever
the number of workers, and a resumed run reads exactly what an uninterrupted one would. Workers only
decide *when* a micro-batch is read (ahead of its use), never *which*.

`TrainingDataLoader` is what `Trainer` holds: ``next_iteration(dataset, consumed_samples, remaining)``
returns the iteration's micro-batch index lists (what ``Stage.train_step`` takes) and keeps their tensors so
that ``get(dataset, indices)`` (behind ``Trainer.batch``) returns them without reading again. Its workers start on
the first call and end with the last planned iteration (or `close`, or garbage collection).

Workers never outlive the trainer: each worker starts with `die_with_parent` (the DataLoader's
``worker_init_fn``). On Linux it asks the kernel for ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so a worker is
killed the moment its parent ends, even by SIGKILL (PyTorch's own check polls every 5 s). The kernel
sends the signal when the *thread* that started the worker ends, so the workers of a loader created in a
short-lived thread would die with that thread; the trainer starts them from its training thread. As a
second line (other systems, or prctl refused) a daemon thread in the worker polls its parent PID every
0.1 s and kills the worker when it changes.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import signal
import sys
import threading
import time
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from megatron_anyflow.data.latent_dataset import DataParallelSampler


class MicroBatchSampler(Sampler):
    """Batch sampler: this rank's micro-batches (lists of dataset indices) of ``num_iterations``
    iterations, the first starting at stream position ``consumed_samples``, in training order
    (iteration-major, then accumulation step ``j``): exactly
    ``sampler.micro_batches(consumed_samples + k * global_batch)[j]`` for k, j in order.

    Raises:
        ValueError: negative ``consumed_samples`` or ``num_iterations``.
    """

    def __init__(self, sampler: DataParallelSampler, consumed_samples: int, num_iterations: int):
        if consumed_samples < 0 or num_iterations < 0:
            raise ValueError(f"consumed_samples {consumed_samples} and num_iterations {num_iterations} must be >= 0")
        self.sampler, self.consumed, self.num_iterations = sampler, consumed_samples, num_iterations

    def __iter__(self) -> Iterator[List[int]]:
        for k in range(self.num_iterations):
            yield from self.sampler.micro_batches(self.consumed + k * self.sampler.global_batch)

    def __len__(self) -> int:
        return self.num_iterations * self.sampler.num_micro


class IndexedSamples(Dataset):
    """``dataset[i]`` as ``(i, latents [f, c, h, w], text [L, d][, condition])``: the index travels with its
    sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return (i, *self.dataset[i])


def _stack(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.stack(tensors).to(dtype)``; in a worker written straight into shared memory (as
    ``default_collate`` does), so handing the batch to the training process copies nothing."""
    shape = (len(tensors), *tensors[0].shape)
    if torch.utils.data.get_worker_info() is None:
        return torch.stack(list(tensors)).to(dtype)
    out = torch.empty(shape, dtype=dtype).share_memory_()
    for k, t in enumerate(tensors):
        out[k].copy_(t)  # the cast happens in the copy
    return out


def collate_samples(items: Sequence[Tuple[torch.Tensor, ...]], dtype: torch.dtype):
    """(indices [b] list, latents [b, f, c, h, w], text [b, L, d][, condition [b, f, c_y, h, w]]) in ``dtype``,
    on the CPU: one stacked tensor per field of the samples ``(i, latents, text[, condition])``.

    The same values as `latent_dataset.collate` (stack, then cast): the cast runs in the worker, so a
    bf16 run moves bf16 through shared and pinned memory.
    """
    idx = [int(it[0]) for it in items]
    return (idx, *(_stack([it[k] for it in items], dtype) for k in range(1, len(items[0]))))


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT_POLL_S = 0.1


def _set_parent_death_signal(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` through libc (Linux); whether the kernel accepted it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists
        return False
    return False


def _watch_parent(parent: int, creator: Optional[int]) -> None:
    while True:
        if os.getppid() != parent or (creator is not None and _gone(creator)):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(_PARENT_POLL_S)


def die_with_parent(worker_id: int = 0, creator: Optional[int] = None) -> None:
    """Make this (worker) process end as soon as its parent dies, however the parent dies.

    ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux (the kernel kills the worker with its parent); if the
    parent already died before that took effect, SIGKILL now; plus a daemon thread that polls every
    0.1 s (every system) whether the parent PID changed or ``creator`` (the process that built the
    DataLoader: the parent itself, or the forkserver's client) is gone. Used as the DataLoader's
    ``worker_init_fn``; ``worker_id`` is ignored.
    """
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent or (creator is not None and _gone(creator)):  # died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    if creator == parent:
        creator = None
    threading.Thread(target=_watch_parent, args=(parent, creator), name="anyflow-parent-watch", daemon=True).start()


def build_data_loader(dataset, batch_sampler: Sampler, num_workers: int, dtype: torch.dtype,
                      pin_memory: Optional[bool] = None, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over ``dataset`` (``ds[i] -> (latents, text)``) yielding (indices, latents, text) per
    batch of ``batch_sampler``. ``num_workers = 0`` reads in-process; ``pin_memory`` defaults to whether
    CUDA is available; ``prefetch_factor`` batches per worker are read ahead. Workers end with the
    process that started them (`die_with_parent`).

    Raises:
        ValueError: ``num_workers < 0`` or ``prefetch_factor < 1``.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 = read in the training process); got {num_workers}")
    if prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be >= 1; got {prefetch_factor}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    kwargs = dict(prefetch_factor=prefetch_factor) if num_workers > 0 else {}
    if num_workers > 0:
        kwargs["worker_init_fn"] = functools.partial(die_with_parent, creator=os.getpid())
    return DataLoader(IndexedSamples(dataset), batch_sampler=batch_sampler, num_workers=num_workers,
                      collate_fn=functools.partial(collate_samples, dtype=dtype), pin_memory=pin_memory,
                      persistent_workers=False, **kwargs)


class TrainingDataLoader:
    """Per-iteration front end of the loader for the training loop.

    ``next_iteration(dataset, consumed, remaining)`` returns this rank's micro-batch index lists of the
    iteration starting at stream position ``consumed`` (== ``sampler.micro_batches(consumed)``, checked)
    and keeps their tensors for ``get``. By default the workers read up to one whole iteration ahead
    (``prefetch_factor = max(2, ceil(micro-batches per iteration / num_workers))``), so the next
    iteration is read while this one trains. It (re)starts the DataLoader over ``dataset`` for ``remaining``
    iterations whenever ``consumed`` is not where the previous call left off (first call, a resume,
    another ``train()``) or ``dataset`` is another object, and shuts the workers down after handing out
    the last of them.

    Raises (``next_iteration``):
        RuntimeError: the loader produced other indices than the sampler (a bug, never silent).
    """

    def __init__(self, sampler: DataParallelSampler, num_workers: int, dtype: torch.dtype,
                 pin_memory: Optional[bool] = None, prefetch_factor: Optional[int] = None):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 = read in the training process); got {num_workers}")
        self.sampler, self.num_workers, self.dtype = sampler, num_workers, dtype
        self._dataset = None
        if prefetch_factor is None:  # the workers hold the whole next iteration while this one trains
            prefetch_factor = max(2, math.ceil(sampler.num_micro / max(num_workers, 1)))
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self._it = None
        self._next_consumed: Optional[int] = None
        self._left = 0
        self._ready: Dict[Tuple[int, ...], Tuple[torch.Tensor, ...]] = {}
        self._ready_dataset = None
        self._finalizer: Optional[weakref.finalize] = None

    def next_iteration(self, dataset, consumed_samples: int, remaining: int) -> List[List[int]]:
        """This rank's micro-batches of ``dataset`` (``ds[i] -> (latents, text)``) for the iteration at
        ``consumed_samples``; ``remaining`` (>= 1) is how many iterations, this one included, the caller
        will still ask for in sequence (the prefetch plan)."""
        if remaining < 1:
            raise ValueError(f"remaining must be >= 1; got {remaining}")
        if self._it is None or consumed_samples != self._next_consumed or dataset is not self._dataset:
            self.close()
            batches = MicroBatchSampler(self.sampler, consumed_samples, remaining)
            self._it = iter(build_data_loader(dataset, batches, self.num_workers, self.dtype,
                                              self.pin_memory, self.prefetch_factor))
            # Holding the iterator from the finalizer keeps it (and its queues) out of the garbage when this
            # loader is collected with a dropped trainer, so its workers get a clean, immediate shutdown.
            self._finalizer = weakref.finalize(self, _shutdown_workers, self._it)
            self._dataset = dataset
            self._left = remaining
        expected = self.sampler.micro_batches(consumed_samples)
        self._ready, self._ready_dataset = {}, dataset
        micro = []
        for want in expected:
            idx, *fields = next(self._it)
            if idx != want:
                raise RuntimeError(f"data loader at consumed_samples {consumed_samples}: read samples {idx}, the "
                                   f"sampler expects {want}")
            micro.append(idx)
            self._ready[tuple(idx)] = tuple(fields)
        self._next_consumed = consumed_samples + self.sampler.global_batch
        self._left -= 1
        if self._left == 0:
            self.close(keep_ready=True)
        return micro

    def get(self, dataset, indices: Sequence[int]) -> Optional[Tuple[torch.Tensor, ...]]:
        """(latents [b, f, c, h, w], text [b, L, d][, condition]) on the CPU (pinned when pinning) in the loader's dtype
        for a micro-batch of the last ``next_iteration``, or None if ``indices`` is not one of them or
        ``dataset`` is not the one it read."""
        if dataset is not self._ready_dataset:
            return None
        return self._ready.get(tuple(int(i) for i in indices))

    def close(self, keep_ready: bool = False) -> None:
        """Shut the worker processes down (idempotent); the next ``next_iteration`` starts new ones."""
        self._it = self._next_consumed = self._dataset = None
        if not keep_ready:
            self._ready, self._ready_dataset = {}, None
        if self._finalizer is not None:
            self._finalizer()  # runs _shutdown_workers once
            self._finalizer = None


def _shutdown_workers(it) -> None:
    """Stop a DataLoader iterator's worker processes (and pin-memory thread) now, not at its collection."""
    if hasattr(it, "_shutdown_workers"):  # the multi-process iterator; the in-process one has none
        it._shutdown_workers()
