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
from typing import Any, Callable, Dict, Iterable, List, Optional

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

    The shards are written by the calling thread (`InProcessTorchDistSaveStrategy`): no process is
    created, so a killed trainer leaves nothing behind but an ignored ``<tag>.tmp``.

    Args:
        root: checkpoint root (created if missing).
        iteration: training iteration, or None for a ``release`` (converted) checkpoint.
        sharded_state_dict: megatron-core sharded state dict (ShardedTensor values / plain objects).
        meta: JSON-serialisable metadata written by rank 0 (config, args, iteration); ``saved_ranks``
            (the world size) and ``rank_states`` (whether ``rank_*.pt`` files were written) are added.
        rank_state: optional per-rank state: a dict of tensors, numbers, strings, None and lists /
            dicts of them (read back with ``torch.load(weights_only=True)``).
        before_commit: test hook, called on every rank after the data is written and before the
            rename (a crash injected here must leave the previous checkpoint loadable).
    Returns:
        the final checkpoint directory ``root/<tag>``.
    Raises:
        TypeError: ``rank_state`` holds an object ``weights_only=True`` could not read back (named).
    """
    tag = tag_for(iteration)
    final = os.path.join(root, tag)
    tmp = final + ".tmp"
    if rank_state is not None:
        buf = io.BytesIO()
        torch.save(rank_state, buf)
        buf.seek(0)
        try:
            torch.load(buf, weights_only=True)
        except pickle.UnpicklingError as err:
            raise TypeError(f"rank_state for {final} cannot be read back with weights_only=True: {err}") from None
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy=InProcessTorchDistSaveStrategy())
    if rank_state is not None:
        torch.save(rank_state, os.path.join(tmp, f"rank_{_rank():05d}.pt"))
    if _rank() == 0:
        meta = dict(meta, saved_ranks=_world(), rank_states=rank_state is not None)
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
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


# ---------------------------------------------------------------------------------------------------
# Reading the torch_dist index without running code from it

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a torch_dist ``.metadata``: only DCP's metadata dataclasses / enums and torch dtypes."""

    def find_class(self, module: str, name: str):
        obj = None
        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            ok = isinstance(obj, type) and obj.__module__ == module and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        elif module == "torch.distributed.checkpoint.filesystem":
            ok = name == "_StorageInfo"
            obj = getattr(importlib.import_module(module), name, None)
        elif module == "torch":
            obj = getattr(torch, name, None)
            ok = obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
        elif module == "torch.serialization":
            ok = name == "_get_layout"
            obj = torch.serialization._get_layout
        elif module == "pathlib":  # StorageMeta.checkpoint_id
            ok = name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")
            obj = getattr(importlib.import_module(module), name, None)
        elif module == "collections":
            ok = name in ("OrderedDict", "defaultdict")
            obj = getattr(importlib.import_module(module), name, None)
        elif module == "builtins":
            ok = name in ("set", "frozenset", "tuple", "list", "dict", "slice")
            obj = getattr(importlib.import_module(module), name, None)
        else:
            ok = False
        if not ok or obj is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (not a checkpoint metadata type)")
        return obj


def read_dcp_index(ckpt_dir: str) -> Any:
    """The torch_dist index (``.metadata``) of a checkpoint, unpickled without running code from it.

    Args:
        ckpt_dir: checkpoint directory.
    Returns:
        the ``torch.distributed.checkpoint.metadata.Metadata`` object.
    Raises:
        FileNotFoundError: ``ckpt_dir/.metadata`` does not exist.
        CheckpointError: it is truncated / not a pickle, or names a type outside the allow-list (a
            crafted file that would run code); the message names the file and the type.
    """
    path = os.path.join(ckpt_dir, DCP_INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not a complete torch_dist checkpoint")
    with open(path, "rb") as f:
        data = f.read()
    try:
        index = _IndexUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # noqa: BLE001 - any failure of a corrupt pickle is reported the same way
        raise CheckpointError(f"checkpoint {ckpt_dir}: {path} is unreadable or unsafe "
                              f"({type(err).__name__}: {err})") from None
    if not hasattr(index, "state_dict_metadata"):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {path} holds a {type(index).__name__}, "
                              "expected torch.distributed.checkpoint Metadata")
    return index


def _check_common(ckpt_dir: str) -> None:
    path = os.path.join(ckpt_dir, COMMON)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {path} is missing")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {ckpt_dir}: {path} is unreadable or unsafe "
                              f"({type(err).__name__}: {_weights_only_reason(err)})") from None


def _check_shards(ckpt_dir: str, index: Any) -> None:
    need: Dict[str, int] = {}
    for info in (getattr(index, "storage_data", None) or {}).values():
        rel, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), end)
    for rel, end in sorted(need.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {ckpt_dir}: shard {path} is missing")
        size = os.path.getsize(path)
        if size < end:
            raise CheckpointError(f"checkpoint {ckpt_dir}: shard {path} is truncated: "
                                  f"{size} bytes, expected at least {end}")


def verify_checkpoint(ckpt_dir: str) -> Dict[str, Any]:
    """Check that ``ckpt_dir`` is a complete, safe checkpoint (see the module docstring).

    Args:
        ckpt_dir: checkpoint directory (``ROOT/iter_*`` or ``ROOT/release``).
    Returns:
        its metadata (`read_meta`).
    Raises:
        FileNotFoundError: ``ckpt_dir`` or ``anyflow_meta.json`` / ``.metadata`` does not exist.
        CheckpointError: anything else incomplete, corrupt or unsafe (names the file).
    """
    if os.path.basename(os.path.normpath(ckpt_dir)).endswith(".tmp"):
        raise CheckpointError(f"{ckpt_dir} is an unfinished save (*.tmp), never loaded")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist")
    meta = read_meta(ckpt_dir)
    cfg = os.path.join(ckpt_dir, MCORE_CONFIG)
    try:
        with open(cfg, "rb") as f:
            json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {cfg} is missing") from None
    except ValueError as err:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {cfg} is not JSON ({err})") from None
    _check_shards(ckpt_dir, read_dcp_index(ckpt_dir))
    _check_common(ckpt_dir)
    if meta.get("rank_states"):
        n = int(meta.get("saved_ranks", 1))
        absent = [f"rank_{r:05d}.pt" for r in range(n) if not os.path.isfile(os.path.join(ckpt_dir, f"rank_{r:05d}.pt"))]
        if absent:
            raise CheckpointError(f"checkpoint {ckpt_dir}: saved by {n} rank(s) but {absent[:8]} missing")
    return meta


def incomplete_reason(ckpt_dir: str) -> Optional[str]:
    """None when `verify_checkpoint` accepts ``ckpt_dir``, else its message (never raises for a bad dir)."""
    try:
        verify_checkpoint(ckpt_dir)
    except (FileNotFoundError, CheckpointError) as err:
        return str(err)
    return None


_WRITTEN_FILES = re.compile(r"^(\.metadata(\.tmp)?|__\d+_\d+\.distcp|common\.pt|metadata\.json|"
                            r"anyflow_meta\.json|rank_\d{5}\.pt)$")


def foreign_entries(root: str, tags: Iterable[str]) -> List[str]:
    """Paths under ``root`` that `save_checkpoint` did not write for the checkpoints ``tags``.

    `save_checkpoint` writes the tracker (via ``<tracker>.tmp.<pid>``), ``<tag>/`` (via ``<tag>.tmp``
    and ``<tag>.old``) holding only checkpoint files (torch_dist shards and index, ``common.pt``,
    ``metadata.json``, ``anyflow_meta.json``, ``rank_*.pt``). Anything else is the user's: a tool that
    replaces a checkpoint refuses rather than delete it.

    Args:
        root: an existing directory.
        tags: checkpoint tags that may be replaced (e.g. ``("release",)``).
    Returns:
        the foreign paths, sorted (empty when ``root`` holds only those checkpoints).
    """
    tags = set(tags)
    out: List[str] = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name == TRACKER or name.startswith(TRACKER + ".tmp."):
            if os.path.isfile(path) and not os.path.islink(path):
                continue
        base = name[:-4] if name.endswith((".tmp", ".old")) else name
        if base in tags and os.path.isdir(path) and not os.path.islink(path):
            for sub in sorted(os.listdir(path)):
                sp = os.path.join(path, sub)
                if not (_WRITTEN_FILES.match(sub) and os.path.isfile(sp) and not os.path.islink(sp)):
                    out.append(sp)
            continue
        out.append(path)
    return out


def _iter_dirs(root: str) -> List[str]:
    """Tags of the ``iter_*`` directories under ``root`` (no ``*.tmp``), newest first."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    tags = [n for n in names if ITER_DIR.match(n) and os.path.isdir(os.path.join(root, n))]
    return sorted(tags, key=lambda n: int(ITER_DIR.match(n).group(1)), reverse=True)


def _is_diffusers_dir(path: str) -> bool:
    for d in (path, os.path.join(path, "transformer")):
        if os.path.isfile(os.path.join(d, "config.json")) and any(
                n.startswith("diffusion_pytorch_model") and n.endswith((".safetensors", ".safetensors.index.json"))
                for n in os.listdir(d)):
            return True
    return os.path.isfile(os.path.join(path, "model_index.json"))


def resolve_checkpoint_dir(path: str) -> str:
    """A complete checkpoint directory from a root (via its tracker) or a tag directory itself.

    Used for ``--pretrained`` / ``--init-adapters-from`` / ``convert_to_hf --input``: strict, no
    fallback (the message names the newest complete checkpoint when there is one).

    Args:
        path: checkpoint root or ``ROOT/iter_*`` / ``ROOT/release`` directory.
    Returns:
        the checkpoint directory.
    Raises:
        FileNotFoundError: nothing loadable at ``path``: it does not exist, holds neither
            ``anyflow_meta.json`` nor a tracker, is a diffusers model directory (the message says to run
            ``tools/convert_from_hf.py``), or the tracker names a missing directory.
        CheckpointError: the tracker or the checkpoint it names is corrupt or incomplete (names the file).
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}: " + ("not a directory" if os.path.exists(path)
                                                                   else "it does not exist"))
    if os.path.isfile(os.path.join(path, META)) or os.path.isfile(os.path.join(path, DCP_INDEX)):
        verify_checkpoint(path)
        return path
    if not os.path.isfile(os.path.join(path, TRACKER)) and _is_diffusers_dir(path):
        raise FileNotFoundError(
            f"{path!r} is a diffusers model directory, not a megatron_anyflow checkpoint: convert it first with "
            f"`python tools/convert_from_hf.py --input {path} --output CKPT` and pass CKPT")
    try:
        tag = read_tracker(path)
    except CheckpointError as err:
        raise CheckpointError(f"{err}{_newest_hint(path)}") from None
    if tag is None:
        raise FileNotFoundError(f"no checkpoint at {path!r}: neither {META} nor {TRACKER} found"
                                f"{_newest_hint(path)}")
    d = os.path.join(path, tag)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{TRACKER} in {path!r} names {tag!r} but {d!r} does not exist{_newest_hint(path)}")
    try:
        verify_checkpoint(d)
    except (FileNotFoundError, CheckpointError) as err:
        raise CheckpointError(f"{TRACKER} in {path!r} names {tag!r}, which is incomplete: {err}"
                              f"{_newest_hint(path)}") from None
    return d


def _newest_hint(root: str) -> str:
    for tag in _iter_dirs(root):
        if incomplete_reason(os.path.join(root, tag)) is None:
            return f" (the newest complete checkpoint there is {os.path.join(root, tag)})"
    return ""


def find_resume_checkpoint(root: str, warn: Callable[[str], None] = print) -> Optional[str]:
    """The checkpoint directory ``--load root`` resumes from, or None for a first launch.

    * ``root`` missing, or a directory with no tracker and no ``iter_*`` directory: None (a first
      launch; unfinished ``*.tmp`` saves are ignored with a warning).
    * ``root`` is itself a checkpoint directory (``ROOT/iter_*``): ``root`` when complete.
    * the tracker names a complete checkpoint: that directory.
    * anything else (tracker empty / binary / garbage / naming a missing or incomplete checkpoint,
      ``iter_*`` directories without a tracker): the newest complete ``iter_*`` directory, after
      ``warn`` with what was wrong.

    Args:
        root: the checkpoint root given to ``--load``.
        warn: called with one message when the tracker's checkpoint is not used.
    Returns:
        the directory to resume from, or None.
    Raises:
        CheckpointError: ``root`` is not a directory, is a diffusers model directory (the message says
            to run ``tools/convert_from_hf.py``), is an incomplete checkpoint directory, or something is
            wrong and no ``iter_*`` checkpoint is complete (the message lists what is wrong with each).
    """
    if not os.path.exists(root):
        return None
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: not a directory")
    candidates = _iter_dirs(root)
    has_tracker = os.path.lexists(os.path.join(root, TRACKER))
    if not has_tracker and not candidates and (os.path.isfile(os.path.join(root, META))
                                               or os.path.isfile(os.path.join(root, DCP_INDEX))):
        try:  # a checkpoint directory itself (ROOT/iter_*) rather than its root
            verify_checkpoint(root)
        except (FileNotFoundError, CheckpointError) as err:
            raise CheckpointError(f"cannot resume from {root}: {err}") from None
        return root
    if not has_tracker and not candidates and _is_diffusers_dir(root):
        raise CheckpointError(f"--load {root} is a diffusers model directory, not a checkpoint root: convert it with "
                              f"`python tools/convert_from_hf.py --input {root} --output CKPT` and pass "
                              "--pretrained CKPT")
    if not has_tracker and not candidates:
        unfinished = sorted(n for n in os.listdir(root) if n.endswith(".tmp"))
        if unfinished:
            warn(f"ignoring unfinished save(s) under {root}: {unfinished[:5]}")
        return None
    if has_tracker:
        try:
            tag = read_tracker(root)
            if tag is None:
                raise CheckpointError(f"tracker {os.path.join(root, TRACKER)} is not a regular file")
        except CheckpointError as err:
            problem = str(err)
        else:
            d = os.path.join(root, tag)
            reason = incomplete_reason(d)
            if reason is None:
                return d
            problem = f"{TRACKER} names {tag}, which is not complete: {reason}"
            candidates = [c for c in candidates if c != tag]
    else:
        problem = f"no {TRACKER} in {root} but {len(candidates)} iter_* director{'y' if len(candidates) == 1 else 'ies'}"
    reasons = []
    for tag in candidates:
        d = os.path.join(root, tag)
        reason = incomplete_reason(d)
        if reason is None:
            warn(f"{problem}; resuming from the newest complete checkpoint {d} instead")
            return d
        reasons.append(reason)
    raise CheckpointError(f"cannot resume from {root}: {problem}; no complete iter_* checkpoint to fall back to"
                          + (f" ({'; '.join(reasons[:5])})" if reasons else "")
                          + ". Repair or remove the damaged files, or --load an empty directory to start afresh")


def read_meta(ckpt_dir: str) -> Dict[str, Any]:
    """The metadata (``anyflow_meta.json``) of a checkpoint directory.

    Args:
        ckpt_dir: checkpoint directory.
    Returns:
        the metadata dict.
    Raises:
        FileNotFoundError: ``anyflow_meta.json`` does not exist (named).
        CheckpointError: it is not UTF-8 JSON holding an object (names the file and the error).
    """
    path = os.path.join(ckpt_dir, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {ckpt_dir} is not a complete checkpoint")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {ckpt_dir}: {path} is not valid JSON ({len(raw)} bytes; {err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {path} holds a JSON {type(meta).__name__}, expected an object")
    return meta


def tensor_keys(ckpt_dir: str) -> set:
    """Names of the tensors stored in a checkpoint (from its verified torch_dist index).

    Raises:
        FileNotFoundError / CheckpointError: as `read_dcp_index`.
    """
    read_dcp_index(ckpt_dir)  # refuses a crafted index before megatron-core unpickles it
    try:
        return set(dist_checkpointing.load_tensors_metadata(ckpt_dir).keys())
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {ckpt_dir}: reading {os.path.join(ckpt_dir, DCP_INDEX)} failed "
                              f"({type(err).__name__}: {err})") from None


def load_checkpoint(ckpt_dir: str, sharded_state_dict: Dict[str, Any], strict: bool = True) -> Dict[str, Any]:
    """Load the tensors named by ``sharded_state_dict`` (resharded to this rank's layout).

    The checkpoint is verified first (`verify_checkpoint`): its index and ``common.pt`` are read
    without running code, and missing or truncated shards are named before megatron-core reads them.

    Args:
        ckpt_dir: checkpoint directory.
        sharded_state_dict: megatron-core sharded state dict of what to load.
        strict: raise when a requested key is absent.
    Returns:
        key -> loaded tensor for the requested keys that the checkpoint holds.
    Raises:
        KeyError: with ``strict``, keys requested but absent from the checkpoint (named).
        FileNotFoundError / CheckpointError: the checkpoint is incomplete, corrupt or unsafe; a failure
            inside megatron-core's reader is re-raised as CheckpointError naming the checkpoint.
    """
    from megatron.core.dist_checkpointing.validation import StrictHandling

    verify_checkpoint(ckpt_dir)
    available = tensor_keys(ckpt_dir)
    missing = sorted(k for k in sharded_state_dict if k not in available)
    if missing and strict:
        raise KeyError(f"checkpoint {ckpt_dir!r} lacks {len(missing)} key(s): {missing[:20]}")
    request = {k: v for k, v in sharded_state_dict.items() if k in available}
    if not request:
        return {}
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        return dist_checkpointing.load(request, ckpt_dir, strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - the reader's errors lack the file
        if isinstance(err, CheckpointException) and err.failures:
            err = next(iter(err.failures.values()))[0]
        if isinstance(err, pickle.UnpicklingError):  # torch's message would suggest weights_only=False
            what = "the bytes are not a tensor record: corrupt, or objects weights_only=True refuses"
        else:
            what = f"{type(err).__name__}: {_first_line(err)}"
        raise CheckpointError(f"checkpoint {ckpt_dir}: reading the shards failed{_locate_bad_item(ckpt_dir)} "
                              f"({what})") from None


def _weights_only_reason(err: BaseException) -> str:
    """The useful line of torch's weights_only refusal (``Trying to load unsupported GLOBAL posix.mkdir``),
    without its advice to retry with ``weights_only=False``."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Weights only load failed", "Check the documentation")):
            continue
        ln = ln.split("WeightsUnpickler error:", 1)[-1].strip()
        if ln:
            return ln
    return "refused by weights_only=True"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _locate_bad_item(ckpt_dir: str, budget_bytes: int = 2 << 30) -> str:
    """`` in FILE at byte N`` for the first stored tensor that does not read back (a diagnosis after a
    failure; reads at most ``budget_bytes``), or an empty string."""
    try:
        index = read_dcp_index(ckpt_dir)
    except (FileNotFoundError, CheckpointError):
        return ""
    read = 0
    for info in sorted(index.storage_data.values(), key=lambda i: (str(i.relative_path), i.offset)):
        if read + info.length > budget_bytes:
            return ""
        path = os.path.join(ckpt_dir, info.relative_path)
        with open(path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        read += info.length
        try:
            torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            return f" in {path} at byte {info.offset}"
    return ""


def load_rank_state(ckpt_dir: str) -> Optional[Dict[str, Any]]:
    """This rank's per-rank state (``rank_%05d.pt``), or None when the checkpoint has none for it.

    Read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only; no
    code from the file runs.

    Args:
        ckpt_dir: checkpoint directory.
    Returns:
        the dict written by `save_checkpoint` (``rank_state``), or None.
    Raises:
        CheckpointError: the file is truncated / not a torch file, holds anything ``weights_only``
            refuses (a pickled object that would run code), or is not a dict (names the file).
    """
    path = os.path.join(ckpt_dir, f"rank_{_rank():05d}.pt")
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"checkpoint {ckpt_dir}: refused to load {path}: it holds objects other than "
                              f"tensors / numbers / strings / lists / dicts ({_weights_only_reason(err)})") from None
    except Exception as err:  # noqa: BLE001 - truncated zip, EOFError, ...
        raise CheckpointError(f"checkpoint {ckpt_dir}: {path} is unreadable ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else 'truncated?'})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {path} holds a {type(state).__name__}, expected a dict")
    return state


def load_model_weights(model: torch.nn.Module, path: str, require_adapters: bool = False,
                       allow_missing: tuple = ()) -> str:
    """Load a model's weights from a checkpoint root or directory (any TP layout it was saved with).

    Every base-model tensor must be present. Adapter tensors (``.adapters.``) that the checkpoint lacks
    keep their fresh initialisation unless ``require_adapters``; so do tensors whose key starts with one
    of ``allow_missing`` (e.g. the delta embedder of a plain Wan base). Returns the checkpoint directory.

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (or a diffusers directory: run convert_from_hf).
        CheckpointError: the checkpoint is incomplete, corrupt or unsafe (named).
        KeyError: missing base (or, with ``require_adapters``, adapter) tensors, named.
    """
    from megatron_anyflow.parallel.sharding import load_module_state

    ckpt_dir = resolve_checkpoint_dir(path)
    sharded = model.sharded_state_dict()
    available = tensor_keys(ckpt_dir)
    missing = sorted(k for k in sharded if k not in available and (require_adapters or ".adapters." not in k)
                     and not k.startswith(tuple(allow_missing)))
    if missing:
        raise KeyError(f"checkpoint {ckpt_dir!r} lacks {len(missing)} model tensor(s): {missing[:20]}")
    loaded = load_checkpoint(ckpt_dir, sharded, strict=False)
    load_module_state(model, loaded)
    return ckpt_dir
