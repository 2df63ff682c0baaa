"""Crash-safe distributed checkpoints (megatron-core `dist_checkpointing`, torch_dist format).

Layout of a checkpoint root (Megatron's convention)::

    ROOT/latest_checkpointed_iteration.txt    "120" or "release"; replaced atomically, written last
    ROOT/iter_0000120/                        sharded tensors (model, adapters, EMA, optimizer states)
        .metadata, __R_0.distcp, common.pt    torch_dist shards (one file per rank) and their index
        metadata.json                         megatron-core's format marker
        anyflow_meta.json                     config, iteration and whatever the caller records
        rank_00000.pt ...                     per-rank state (RNG), read with ``weights_only=True``
    ROOT/release/                             a converted model (tools/convert_from_hf.py)

A save goes to ``<tag>.tmp`` and is renamed to ``<tag>`` only after every rank finished writing;
the tracker file is then replaced. A crash at any point leaves the previous tracker and checkpoint
untouched, and loading never looks at ``*.tmp``.

A checkpoint directory is *complete* (`incomplete_reason` returns None) when its name does not end in
``.tmp``, ``anyflow_meta.json`` is a JSON object, megatron-core's ``metadata.json`` is JSON, ``common.pt``
exists, the torch_dist index ``.metadata`` unpickles under an allow-list of checkpoint metadata types
(no code runs), every shard file the index names exists and is at least as long as the index says,
and (for checkpoints written by this version) a ``rank_*.pt`` exists for every rank that saved.
`find_resume_checkpoint` (``--load``) resumes from the tracker's checkpoint when it is complete and
otherwise falls back, with a warning naming what was wrong, to the newest complete ``iter_*``.

Kill safety: megatron-core 0.16's torch_dist save strategy writes through ``FileSystemWriterAsync``,
which forks one writer process per bucket and starts a ``multiprocessing`` Manager server; a SIGKILL
of the trainer leaves them orphaned (parent PID 1, waiting forever). `save_checkpoint` therefore
writes the same torch_dist format with PyTorch DCP's ``FileSystemWriter(thread_count=1)`` in the
calling thread (`InProcessTorchDistSaveStrategy`): no process is ever created, so none can outlive
the trainer.

Loading runs no code from the checkpoint: ``rank_*.pt`` and ``common.pt`` are read with
``torch.load(weights_only=True)``, and the torch_dist index ``.metadata`` (which PyTorch DCP reads
with a plain ``pickle.load``) is first unpickled here under an allow-list and refused otherwise. The
shards' tensors are read by DCP with ``weights_only=True``; pickled non-tensor objects in shards
(which DCP would read with ``weights_only=False``) are never requested: `load_checkpoint` asks only
for tensors.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import json
import os
import pickle
import re
import shutil
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

TRACKER = "latest_checkpointed_iteration.txt"
META = "anyflow_meta.json"
DCP_INDEX = ".metadata"            # torch_dist index (pickled torch.distributed.checkpoint Metadata)
MCORE_CONFIG = "metadata.json"     # megatron-core's backend marker
COMMON = "common.pt"               # megatron-core's non-sharded objects (empty here)
RANK_FILE = re.compile(r"^rank_(\d{5})\.pt$")
ITER_DIR = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint on disk is incomplete, corrupt or unsafe to load; the message names the file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def tag_for(iteration: Optional[int]) -> str:
    """Directory name: ``iter_%07d`` for a training iteration, ``release`` for None."""
    return "release" if iteration is None else f"iter_{iteration:07d}"


def read_tracker(root: str) -> Optional[str]:
    """The tag the tracker file under ``root`` names (``iter_%07d`` or ``release``), or None without one.

    Args:
        root: checkpoint root.
    Returns:
        the tag, or None when ``root/latest_checkpointed_iteration.txt`` does not exist.
    Raises:
        CheckpointError: the tracker is empty, not text, or holds anything but a non-negative integer or
            ``release`` (the message names the file and what it holds).
    """
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(4096)
    expected = "expected an iteration number or 'release'"
    try:
        val = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"tracker {path} is not text ({os.path.getsize(path)} bytes starting "
                              f"{raw[:16]!r}); {expected}") from None
    if not val:
        raise CheckpointError(f"tracker {path} is empty; {expected}")
    if val == "release":
        return "release"
    if not val.isdigit():
        raise CheckpointError(f"tracker {path} holds {val[:40]!r}; {expected}")
    return tag_for(int(val))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class InProcessTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron-core's torch_dist format, written by the calling thread (no writer processes).

    megatron-core 0.16 writes torch_dist checkpoints through ``FileSystemWriterAsync``
    (``strategies/filesystem_async.py``): ``write_preloaded_data_multiproc`` forks one writer per
    bucket (``mp.get_context("fork")``) and the results travel through a ``spawn`` Manager server.
    Both outlive a SIGKILLed trainer. This strategy keeps megatron-core's key translation and
    planner (``MCoreSavePlanner``), so the files are the same format and `dist_checkpointing.load`
    reads them at any TP layout, but writes with PyTorch DCP's ``FileSystemWriter(thread_count=1)``,
    which writes in the calling thread. Synchronous saves only (no ``async_save``).
    """

    def __init__(self):
        super().__init__("torch_dist", 1, thread_count=1)

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        """Write this rank's shards of ``sharded_state_dict`` into ``checkpoint_dir`` (collective)."""
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint import save as dcp_save

        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, sync_files=True, thread_count=1)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
        dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)

    def async_save(self, sharded_state_dict, checkpoint_dir):
        raise NotImplementedError("InProcessTorchDistSaveStrategy saves synchronously only")


def save_checkpoint(root: str, iteration: Optional[int], sharded_state_dict: Dict[str, Any],
                    meta: Dict[str, Any], rank_state: Optional[Dict[str, Any]] = None,
                    before_commit: Optional[Callable[[], None]] = None) -> str:
    """Write a checkpoint; every rank calls it with its own sharded state dict. Returns the final dir.

    Args:
        root: checkpoint root (created if missing).
        iteration: training iteration, or None for a ``release`` (converted) checkpoint.
        sharded_state_dict: megatron-core sharded state dict (ShardedTensor values / plain objects).
        meta: JSON-serialisable metadata written by rank 0 (config, args, iteration).
        rank_state: optional per-rank object (RNG states, data position), saved with torch.save.
        before_commit: test hook, called on every rank after the data is written and before the
            rename (a crash injected here must leave the previous checkpoint loadable).
    """
    tag = tag_for(iteration)
    final = os.path.join(root, tag)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, tmp)
    if rank_state is not None:
        torch.save(rank_state, os.path.join(tmp, f"rank_{_rank():05d}.pt"))
    if _rank() == 0:
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1, default=str)
    _barrier()
    if before_commit is not None:
        before_commit()
    if _rank() == 0:
        if os.path.exists(final):
            old = final + ".old"
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _atomic_write(os.path.join(root, TRACKER), "release" if iteration is None else str(iteration))
    _barrier()
    return final


def resolve_checkpoint_dir(path: str) -> str:
    """A checkpoint directory from a root (via its tracker) or a tag directory itself.

    Raises:
        FileNotFoundError: nothing loadable at ``path`` (the message says what was looked for).
    """
    if os.path.isfile(os.path.join(path, META)):
        return path
    tag = read_tracker(path)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint at {path!r}: neither {META} nor {TRACKER} found")
    d = os.path.join(path, tag)
    if not os.path.isfile(os.path.join(d, META)):
        raise FileNotFoundError(f"{TRACKER} in {path!r} names {tag!r} but {d!r} is incomplete or missing")
    return d


def find_resume_checkpoint(root: str, warn: Callable[[str], None] = print) -> Optional[str]:
    """The checkpoint directory to resume from under ``root``, or None for a first launch.

    (Stub: being hardened; see the issue on checkpoints that never silently restart.)
    """
    try:
        return resolve_checkpoint_dir(root)
    except FileNotFoundError:
        return None


def read_meta(ckpt_dir: str) -> Dict[str, Any]:
    """The metadata JSON of a checkpoint directory."""
    with open(os.path.join(ckpt_dir, META)) as f:
        return json.load(f)


def load_checkpoint(ckpt_dir: str, sharded_state_dict: Dict[str, Any], strict: bool = True) -> Dict[str, Any]:
    """Load the tensors named by ``sharded_state_dict`` (resharded to this rank's layout).

    Raises:
        KeyError: with ``strict``, keys requested but absent from the checkpoint (named).
    """
    from megatron.core.dist_checkpointing.validation import StrictHandling

    available = set(dist_checkpointing.load_tensors_metadata(ckpt_dir).keys())
    missing = sorted(k for k in sharded_state_dict if k not in available)
    if missing and strict:
        raise KeyError(f"checkpoint {ckpt_dir!r} lacks {len(missing)} key(s): {missing[:20]}")
    request = {k: v for k, v in sharded_state_dict.items() if k in available}
    if not request:
        return {}
    return dist_checkpointing.load(request, ckpt_dir, strict=StrictHandling.ASSUME_OK_UNEXPECTED)


def load_rank_state(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """This rank's per-rank state, or None when the checkpoint has none for it."""
    path = os.path.join(ckpt_dir, f"rank_{_rank():05d}.pt")
    if not os.path.isfile(path):
        return None
    return torch.load(path, weights_only=False)


def load_model_weights(model: torch.nn.Module, path: str, require_adapters: bool = False,
                       allow_missing: tuple = ()) -> str:
    """Load a model's weights from a checkpoint root or directory (any TP layout it was saved with).

    Every base-model tensor must be present. Adapter tensors (``.adapters.``) that the checkpoint lacks
    keep their fresh initialisation unless ``require_adapters``; so do tensors whose key starts with one
    of ``allow_missing`` (e.g. the delta embedder of a plain Wan base). Returns the checkpoint directory.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        KeyError: missing base (or, with ``require_adapters``, adapter) tensors, named.
    """
    from megatron_anyflow.parallel.sharding import load_module_state

    ckpt_dir = resolve_checkpoint_dir(path)
    sharded = model.sharded_state_dict()
    available = set(dist_checkpointing.load_tensors_metadata(ckpt_dir).keys())
    missing = sorted(k for k in sharded if k not in available and (require_adapters or ".adapters." not in k)
                     and not k.startswith(tuple(allow_missing)))
    if missing:
        raise KeyError(f"checkpoint {ckpt_dir!r} lacks {len(missing)} model tensor(s): {missing[:20]}")
    loaded = load_checkpoint(ckpt_dir, sharded, strict=False)
    load_module_state(model, loaded)
    return ckpt_dir
