"""Crash-safe distributed checkpoints (megatron-core `dist_checkpointing`, torch_dist format).

Layout of a checkpoint root (Megatron's convention)::

    ROOT/latest_checkpointed_iteration.txt    "120" or "release"; replaced atomically, written last
    ROOT/iter_0000120/                        sharded tensors (model, adapters, EMA, optimizer states)
        .metadata, __R_0.distcp, common.pt    torch_dist shards (one file per rank) and their index
        metadata.json                         megatron-core's format marker
        anyflow_meta.json                     config, iteration and whatever the caller records
        rank_00000.pt ...                     per-rank state (RNG), read with ``weights_only=True``
        checksums.sha256                      SHA-256 of every file above (``sha256sum -c`` format)
    ROOT/release/                             a converted model (tools/convert_from_hf.py)
    ROOT/.anyflow_save.lock                   the save lock of the trainer writing ROOT (`SaveLock`)

A save goes to ``<tag>.tmp`` and is renamed to ``<tag>`` only after every rank finished writing;
the tracker file is then replaced. A crash at any point leaves the previous tracker and checkpoint
untouched, and loading never looks at ``*.tmp``.

A checkpoint directory is *complete* (`incomplete_reason` returns None) when its name does not end in
``.tmp``, ``anyflow_meta.json`` is a JSON object, megatron-core's ``metadata.json`` is JSON, ``common.pt``
exists, the torch_dist index ``.metadata`` unpickles under an allow-list of checkpoint metadata types
(no code runs), every shard file the index names exists and is at least as long as the index says,
and (for checkpoints written by this version) a ``rank_*.pt`` exists for every rank that saved, and
every file's SHA-256 matches ``checksums.sha256``.
`find_resume_checkpoint` (``--load``) resumes from the tracker's checkpoint when it is complete and
otherwise falls back, with a warning naming what was wrong, to the newest complete ``iter_*``.

Checksums: `save_checkpoint` records the SHA-256 of every file it wrote in ``checksums.sha256`` before
the rename that makes the checkpoint visible. Each rank hashes the files it wrote right after writing
them (still in its page cache); rank 0 gathers the digests, adds its own files and ``anyflow_meta.json``,
and writes the manifest last. ``anyflow_meta.json`` says ``"checksums": "checksums.sha256"``, so a deleted
manifest is damage too. `verify_checkpoint` re-hashes the files (in threads; a digest is cached per
process only for a file unmodified for 2 s before it was hashed). A mismatch makes the checkpoint damaged
exactly like a truncated shard: resume falls back to the newest complete one, naming the file.
Checkpoints written before checksums existed load without them (`has_checksums` is False: unverified).
``tools/verify_checkpoint.py ROOT [--all]`` checks them from the command line.

Save lock: a trainer claims its ``--save`` root before any work (`claim_save_root`: global rank 0
creates the root, checks it is writable, and takes `SaveLock`, an exclusive ``fcntl.flock`` on
``ROOT/.anyflow_save.lock``; the verdict is broadcast so a refusal stops every rank). A second trainer
on the same root is refused with one line naming the holder. The kernel drops a flock when its holder
dies, so a crashed trainer never blocks the next one. The JSON in the file (host, PID, start time) is
only there to name the holder; a leftover from a dead holder is overwritten with a warning.

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

import concurrent.futures
import dataclasses
import datetime
import enum
import hashlib
import importlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import sys
import tempfile
import time
import weakref
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
CHECKSUMS = "checksums.sha256"     # SHA-256 of every other file of the checkpoint (sha256sum format)
LOCK_FILE = ".anyflow_save.lock"   # ROOT/.anyflow_save.lock: flock'ed by the trainer writing ROOT
RANK_FILE = re.compile(r"^rank_(\d{5})\.pt$")
ITER_DIR = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint on disk is incomplete, corrupt or unsafe to load; the message names the file."""


class ChecksumError(CheckpointError):
    """Files whose SHA-256 differs from the manifest (``files``: their paths); the message names them."""

    def __init__(self, message: str, files: Iterable[str] = ()):
        super().__init__(message)
        self.files = list(files)


class SaveLockError(CheckpointError):
    """The ``--save`` root is held by another live trainer, or cannot be created or written."""


class ResumeMismatchError(CheckpointError, ValueError):
    """``--load`` found a checkpoint of another stage / model / preset / LoRA configuration (one field named)."""


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
    created, so a killed trainer leaves nothing behind but an ignored ``<tag>.tmp``. Before the rename,
    every rank hashes the files it wrote and rank 0 writes ``checksums.sha256`` (SHA-256 of every file,
    ``anyflow_meta.json`` included), which loads verify.

    Args:
        root: checkpoint root (created if missing).
        iteration: training iteration, or None for a ``release`` (converted) checkpoint.
        sharded_state_dict: megatron-core sharded state dict (ShardedTensor values / plain objects).
        meta: JSON-serialisable metadata written by rank 0 (config, args, iteration); ``saved_ranks``
            (the world size), ``rank_states`` (whether ``rank_*.pt`` files were written), ``checksums``
            (the manifest's name) and ``writer`` (host, PID and time of the saving process) are added.
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
    # Every rank hashes the files it just wrote (still in its page cache); rank 0 collects the digests.
    digests = _gather_digests(_hash_own_files(tmp))
    if _rank() == 0:
        meta = dict(meta, saved_ranks=_world(), rank_states=rank_state is not None, checksums=CHECKSUMS,
                    writer=_writer_info())
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        rest = [n for n in os.listdir(tmp) if n not in digests and _WRITTEN_FILES.match(n)
                and n not in (CHECKSUMS, DCP_INDEX + ".tmp")]  # anyflow_meta.json, and any file no rank claimed
        digests.update(zip(rest, _sha256_many([os.path.join(tmp, n) for n in rest])))
        write_checksums(tmp, digests)
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
# Checksums (SHA-256 of every file, in sha256sum format)

_HASH_CHUNK = 8 << 20
_HASH_QUIET_S = 2.0  # a digest is cached only for a file unmodified this long before it was hashed
_hash_cache: Dict[tuple, str] = {}
_MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def _stat_key(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file (read in 8 MiB blocks; hashlib releases the GIL, so threads hash in parallel).

    Repeated calls in one process for an unchanged file reuse the digest, but only when the file had been
    unmodified for 2 s when it was hashed: a write after that changes its mtime / ctime, and a write within
    the same timestamp tick cannot be mistaken for the hashed content.
    """
    key = _stat_key(path)
    hit = _hash_cache.get(key)
    if hit is not None:
        return hit
    started = time.time()
    h = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    digest = h.hexdigest()
    quiet = started - max(key[4], key[5]) / 1e9 >= _HASH_QUIET_S
    if quiet and _stat_key(path) == key:
        if len(_hash_cache) >= 4096:
            _hash_cache.clear()
        _hash_cache[key] = digest
    return digest


def _sha256_many(paths: List[str]) -> List[str]:
    """`sha256_file` of each path, several files at once (up to 8 threads)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(len(paths), 8, os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def _hash_own_files(tmp: str) -> Dict[str, str]:
    """name -> digest of the files this rank wrote into ``tmp``: its DCP shards ``__<rank>_*.distcp``
    and ``rank_<rank>.pt``; rank 0 also the index ``.metadata``, ``common.pt`` and ``metadata.json``."""
    r = _rank()
    shard = re.compile(rf"^__{r}_\d+\.distcp$")
    mine = sorted(n for n in os.listdir(tmp) if shard.match(n) or n == f"rank_{r:05d}.pt"
                  or (r == 0 and n in (DCP_INDEX, COMMON, MCORE_CONFIG)))
    return dict(zip(mine, _sha256_many([os.path.join(tmp, n) for n in mine])))


def _gather_digests(mine: Dict[str, str]) -> Dict[str, str]:
    """Every rank's ``mine`` merged (collective when the world has several ranks)."""
    if _world() == 1:
        return dict(mine)
    parts: List[Optional[Dict[str, str]]] = [None] * _world()
    dist.all_gather_object(parts, mine)
    out: Dict[str, str] = {}
    for p in parts:
        out.update(p or {})
    return out


def _writer_info() -> Dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def write_checksums(directory: str, digests: Dict[str, str]) -> str:
    """Write ``directory/checksums.sha256`` (``<sha256>  <relative path>`` per line, sorted: what
    ``sha256sum -c`` reads) atomically and durably. Returns its path."""
    path = os.path.join(directory, CHECKSUMS)
    _atomic_write(path, "".join(f"{h}  {n}\n" for n, h in sorted(digests.items())))
    return path


def write_checksums_for_tree(directory: str) -> str:
    """Hash every regular file under ``directory`` (recursively, paths relative to it, the manifest itself
    excluded) and write ``directory/checksums.sha256``. Used for exports (tools/convert_to_hf.py)."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for n in sorted(filenames):
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, directory)
            if rel != CHECKSUMS and os.path.isfile(p) and not os.path.islink(p):
                rels.append(rel.replace(os.sep, "/"))
    digests = dict(zip(rels, _sha256_many([os.path.join(directory, r) for r in rels])))
    return write_checksums(directory, digests)


def has_checksums(ckpt_dir: str) -> bool:
    """Whether ``ckpt_dir`` has a ``checksums.sha256`` (checkpoints from before checksums load unverified)."""
    return os.path.isfile(os.path.join(ckpt_dir, CHECKSUMS))


def read_checksums(directory: str) -> Optional[Dict[str, str]]:
    """relative path -> hex SHA-256 from ``directory/checksums.sha256``, or None without one.

    Raises:
        CheckpointError: the manifest is not text, is empty, has a line other than ``<sha256>  <file>``,
            or names a path outside ``directory`` (absolute or with ``..``); the message names the line.
    """
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint {directory}: {path} is not text ({len(raw)} bytes)") from None
    out: Dict[str, str] = {}
    for num, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MANIFEST_LINE.match(line)
        rel = m.group(2) if m else ""
        if not m or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise CheckpointError(f"checkpoint {directory}: {path} line {num} is not '<sha256>  <file>' "
                                  f"({line[:60]!r})")
        out[rel] = m.group(1).lower()
    if not out:
        raise CheckpointError(f"checkpoint {directory}: {path} lists no file")
    return out


def verify_checksums(directory: str, required: Iterable[str] = ()) -> Optional[int]:
    """Re-hash every file ``directory/checksums.sha256`` lists and compare.

    Args:
        directory: a checkpoint (or export) directory.
        required: relative paths that must be listed (a checkpoint's own files).
    Returns:
        the number of files verified, or None when there is no manifest.
    Raises:
        ChecksumError: files whose content differs from their recorded SHA-256 (all of them named).
        CheckpointError: the manifest is malformed, misses a required file, or lists a missing file.
    """
    sums = read_checksums(directory)
    if sums is None:
        return None
    manifest = os.path.join(directory, CHECKSUMS)
    unlisted = sorted(set(required) - set(sums))
    if unlisted:
        more = f" (nor {len(unlisted) - 1} other file(s))" if len(unlisted) > 1 else ""
        raise CheckpointError(f"checkpoint {directory}: {os.path.join(directory, unlisted[0])} is not listed in "
                              f"{manifest}{more}")
    names = sorted(sums)
    paths = [os.path.join(directory, n) for n in names]
    absent = [p for p in paths if not os.path.isfile(p)]
    if absent:
        raise CheckpointError(f"checkpoint {directory}: {absent[0]} is missing (listed in {manifest})")
    got = _sha256_many(paths)
    bad = [(p, sums[n], g) for n, p, g in zip(names, paths, got) if g != sums[n]]
    if bad:
        raise ChecksumError(f"checkpoint {directory}: " + "; ".join(
            f"{p}: sha256 mismatch (recorded {want[:12]}..., found {have[:12]}...)" for p, want, have in bad),
            [p for p, _, _ in bad])
    return len(names)


# ---------------------------------------------------------------------------------------------------
# One trainer per --save root

_HELD_LOCKS: Dict[str, List[Any]] = {}  # real path of a lock file -> [fd, holders in this process]


def _forget_locks_in_child() -> None:
    """After a fork: the child must not keep the parent's lock alive (a flock lives while any duplicate
    of its file descriptor is open), e.g. a data-loader worker outliving a killed trainer."""
    for fd, _ in _HELD_LOCKS.values():
        try:
            os.close(fd)  # drops the child's reference only; the parent's lock stays
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no such process / no psutil
        return None


def _pid_alive(pid: Any, started: Any) -> bool:
    """Whether process ``pid`` of this host runs and (when known) started at ``started`` (epoch seconds)."""
    try:
        pid = int(pid)
        os.kill(pid, 0)
    except (TypeError, ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass
    now_start = _process_start(pid)
    if now_start is not None and isinstance(started, (int, float)):
        return abs(now_start - started) < 2.0  # else the PID was reused by another process
    return True


def _holder_text(info: Dict[str, Any], path: str) -> str:
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {info.get('start_time', '?')}, "
            f"lock {path}")


def _read_lock_fd(fd: int) -> Dict[str, Any]:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _release_lock(key: str) -> None:
    entry = _HELD_LOCKS.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _HELD_LOCKS[key]
    fd = entry[0]
    try:
        os.ftruncate(fd, 0)  # a clean release leaves no holder to report
    except OSError:
        pass
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
    except (OSError, ImportError):
        pass
    os.close(fd)


class SaveLock:
    """An exclusive lock on a checkpoint root: one trainer writes it at a time.

    The lock is an ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``ROOT/.anyflow_save.lock``. The kernel holds it
    for the process (and drops it when the process ends, however it ends), so a crashed holder never
    blocks and a live one always does. The file holds the holder's host, PID, process start time and lock
    time as JSON, only to name it in the refusal; content left by a dead holder is taken over with a
    warning. Within one process the lock is re-entrant (several `Trainer` objects of one test or notebook
    share it); forked children close their copy of the descriptor (so an orphaned worker cannot keep it).
    Released by `release`, when the object is garbage collected, or at exit. On a filesystem without
    flock (``ENOLCK`` / ``EOPNOTSUPP``) it falls back to the recorded PID: a live holder on this host is
    refused, and a warning says that a trainer on another host cannot be detected.

    Raises (constructor):
        SaveLockError: another live trainer holds the lock (the message names its host, PID, start time
            and the lock file), or the lock file cannot be created.
    """

    def __init__(self, root: str, warn: Callable[[str], None] = print):
        self.root = root
        self.path = os.path.join(root, LOCK_FILE)
        self._key = os.path.realpath(self.path)
        self._acquire(warn)
        self._finalizer = weakref.finalize(self, _release_lock, self._key)

    @property
    def held(self) -> bool:
        return self._finalizer.alive

    def release(self) -> None:
        """Release this handle (the lock itself when it is the process's last); idempotent."""
        self._finalizer()

    def _acquire(self, warn: Callable[[str], None]) -> None:
        if self._key in _HELD_LOCKS:
            _HELD_LOCKS[self._key][1] += 1
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise SaveLockError(f"--save {self.root}: cannot create the lock file {self.path} "
                                f"({err.strerror or err})") from None
        try:
            self._lock_fd(fd, warn)
            prev = _read_lock_fd(fd)
            if prev.get("pid") is not None:
                alive = (prev.get("host") == socket.gethostname()
                         and _pid_alive(prev.get("pid"), prev.get("process_start")))
                warn(f"warning: taking over the stale save lock of a trainer that "
                     f"{'no longer holds it' if alive else 'is no longer running'} ({_holder_text(prev, self.path)})")
            now = time.time()
            info = {"host": socket.gethostname(), "pid": os.getpid(),
                    "start_time": datetime.datetime.fromtimestamp(_process_start(os.getpid()) or now)
                    .astimezone().isoformat(timespec="seconds"),
                    "process_start": _process_start(os.getpid()), "locked_at": now,
                    "root": os.path.abspath(self.root), "argv": sys.argv[:12]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info, default=str) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # also drops the flock if it was taken
            raise
        _HELD_LOCKS[self._key] = [fd, 1]

    def _lock_fd(self, fd: int, warn: Callable[[str], None]) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: the recorded PID is all there is
            fcntl = None
        try:
            if fcntl is None:
                raise OSError(0, "fcntl is not available")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            info = _read_lock_fd(fd)
            deadline = time.monotonic() + 2.0
            while info.get("pid") is None and time.monotonic() < deadline:
                time.sleep(0.02)  # the holder writes who it is right after taking the lock
                info = _read_lock_fd(fd)
            holder = _holder_text(info, self.path)
            raise SaveLockError(f"--save {self.root} is in use by another trainer ({holder}); wait for it to end "
                                "or choose another --save") from None
        except OSError as err:
            reason = err.strerror or str(err)
        info = _read_lock_fd(fd)
        if (info.get("host") == socket.gethostname() and info.get("pid") != os.getpid()
                and _pid_alive(info.get("pid"), info.get("process_start"))):
            raise SaveLockError(f"--save {self.root} is in use by another trainer ({_holder_text(info, self.path)}); "
                                "wait for it to end or choose another --save")
        warn(f"warning: {self.path}: no flock on this filesystem ({reason}): only a trainer on this host "
             f"({socket.gethostname()}) is detected, not one on another host writing the same --save")


def check_save_root(root: str) -> None:
    """``--save`` exists or can be created and is writable (a file is created there and removed).

    Raises:
        SaveLockError: it cannot be created (a file in the way, permissions, read-only filesystem) or a file
            cannot be written in it; the message names the path and the OS error.
    """
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as err:
        raise SaveLockError(f"--save {root}: cannot create the directory ({type(err).__name__}: "
                            f"{err.strerror or err})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".anyflow_write_test.", dir=root)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise SaveLockError(f"--save {root} is not writable: creating a file there failed ({type(err).__name__}: "
                            f"{err.strerror or err})") from None


def claim_save_root(root: str, warn: Callable[[str], None] = print) -> Optional[SaveLock]:
    """Check ``--save`` and lock it (`check_save_root`, `SaveLock`) before a trainer does any work.

    Collective when torch.distributed runs several ranks: only global rank 0 checks and locks (saves go to
    one shared root: rank 0 creates and renames every checkpoint directory), and its verdict is broadcast,
    so a refusal stops every rank with the same message instead of leaving them waiting.

    Returns:
        the lock on rank 0 (keep it alive for the run), None on other ranks.
    Raises:
        SaveLockError: on every rank, when rank 0 could not claim the root (the message says why).
    """
    lock, err = None, None
    if _rank() == 0:
        try:
            check_save_root(root)
            lock = SaveLock(root, warn)
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            err = str(e) if isinstance(e, CheckpointError) else f"--save {root}: {type(e).__name__}: {e}"
    if _world() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err is not None:
        raise SaveLockError(err)
    return lock


def check_free_space(root: str, need_bytes: int, warn: Callable[[str], None] = print) -> int:
    """Warn when the filesystem of ``root`` has less free space than ``need_bytes`` (one checkpoint).
    Returns the free bytes."""
    free = shutil.disk_usage(root).free
    if free < need_bytes:
        warn(f"warning: --save {root}: {_fmt_bytes(free)} free, one checkpoint needs about {_fmt_bytes(need_bytes)} "
             "(saved weights, EMA and AdamW moments): saves will fail unless space is freed")
    return free


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


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


def verify_checkpoint(ckpt_dir: str, verify_data: bool = True) -> Dict[str, Any]:
    """Check that ``ckpt_dir`` is a complete, safe checkpoint (see the module docstring).

    Args:
        ckpt_dir: checkpoint directory (``ROOT/iter_*`` or ``ROOT/release``).
        verify_data: re-hash every file against ``checksums.sha256`` (the structure is always checked,
            and a checkpoint recording checksums must have its manifest).
    Returns:
        its metadata (`read_meta`).
    Raises:
        FileNotFoundError: ``ckpt_dir`` or ``anyflow_meta.json`` / ``.metadata`` does not exist.
        ChecksumError: a file's content differs from its recorded SHA-256 (named).
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
    if meta.get("checksums") and not has_checksums(ckpt_dir):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {os.path.join(ckpt_dir, CHECKSUMS)} is missing (the "
                              "checkpoint was saved with checksums)")
    if verify_data:
        own = [n for n in os.listdir(ckpt_dir) if _WRITTEN_FILES.match(n) and n not in (CHECKSUMS, DCP_INDEX + ".tmp")
               and os.path.isfile(os.path.join(ckpt_dir, n))]
        verify_checksums(ckpt_dir, own)  # None (unverified) for a checkpoint from before checksums
    return meta


def incomplete_reason(ckpt_dir: str, verify_data: bool = True) -> Optional[str]:
    """None when `verify_checkpoint` accepts ``ckpt_dir``, else its message (never raises for a bad dir)."""
    try:
        verify_checkpoint(ckpt_dir, verify_data)
    except (FileNotFoundError, CheckpointError) as err:
        return str(err)
    return None


_WRITTEN_FILES = re.compile(r"^(\.metadata(\.tmp)?|__\d+_\d+\.distcp|common\.pt|metadata\.json|"
                            r"anyflow_meta\.json|rank_\d{5}\.pt|checksums\.sha256)$")


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
        if name in (TRACKER, LOCK_FILE) or name.startswith(TRACKER + ".tmp."):
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


def find_resume_checkpoint(root: str, warn: Callable[[str], None] = print, verify_data: bool = True) -> Optional[str]:
    """The checkpoint directory ``--load root`` resumes from, or None for a first launch.

    * ``root`` missing, or a directory with no tracker and no ``iter_*`` directory: None (a first
      launch; unfinished ``*.tmp`` saves are ignored with a warning).
    * ``root`` is itself a checkpoint directory (``ROOT/iter_*``): ``root`` when complete.
    * the tracker names a complete checkpoint: that directory.
    * anything else (tracker empty / binary / garbage / naming a missing or incomplete checkpoint,
      ``iter_*`` directories without a tracker): the newest complete ``iter_*`` directory, after
      ``warn`` with what was wrong.

    A checkpoint whose files do not match their recorded SHA-256 (``checksums.sha256``) is damaged like
    a truncated one: the fallback's warning names the file.

    Args:
        root: the checkpoint root given to ``--load``.
        warn: called with one message when the tracker's checkpoint is not used.
        verify_data: check the files' SHA-256 (`verify_checkpoint`).
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
            verify_checkpoint(root, verify_data)
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
            reason = incomplete_reason(d, verify_data)
            if reason is None:
                return d
            problem = f"{TRACKER} names {tag}, which is not complete: {reason}"
            candidates = [c for c in candidates if c != tag]
    else:
        problem = f"no {TRACKER} in {root} but {len(candidates)} iter_* director{'y' if len(candidates) == 1 else 'ies'}"
    reasons = []
    for tag in candidates:
        d = os.path.join(root, tag)
        reason = incomplete_reason(d, verify_data)
        if reason is None:
            skipped = f" (skipped as damaged: {'; '.join(reasons[:5])})" if reasons else ""
            warn(f"{problem}; resuming from the newest complete checkpoint {d} instead{skipped}")
            return d
        reasons.append(reason)
    raise CheckpointError(f"cannot resume from {root}: {problem}; no complete iter_* checkpoint to fall back to"
                          + (f" ({'; '.join(reasons[:5])})" if reasons else "")
                          + ". Repair or remove the damaged files, or --load an empty directory to start afresh")


def resume_checkpoint_collective(root: str, warn: Callable[[str], None] = print) -> Optional[str]:
    """`find_resume_checkpoint` decided once for all ranks: global rank 0 verifies (checksums included) and
    broadcasts its choice, so every rank resumes from the same directory and the files are hashed once,
    not once per rank. Collective when several ranks run; ``warn`` is called on rank 0 only.

    Raises:
        CheckpointError: on every rank, when rank 0 found nothing to resume from (its message).
    """
    if _world() == 1:
        return find_resume_checkpoint(root, warn)
    d, err = None, None
    if _rank() == 0:
        try:
            d = find_resume_checkpoint(root, warn)
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            err = str(e) if isinstance(e, CheckpointError) else f"--load {root}: {type(e).__name__}: {e}"
    box = [d, err]
    dist.broadcast_object_list(box, src=0)
    d, err = box
    if err is not None:
        raise CheckpointError(err)
    return d


_noted_unverified: set = set()


def note_unverified(ckpt_dir: str, log: Optional[Callable[[str], None]] = None) -> bool:
    """Say once per process (on ``log``, default stderr) that ``ckpt_dir`` has no checksums (written before
    they existed), so its data is unverified. Returns whether it has checksums."""
    if has_checksums(ckpt_dir):
        return True
    key = os.path.abspath(ckpt_dir)
    if key not in _noted_unverified and _rank() == 0:
        _noted_unverified.add(key)
        msg = (f"note: checkpoint {ckpt_dir} has no {CHECKSUMS} (saved before checksums were recorded): its "
               "data is unverified")
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(msg)
    return False


def _json_norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def run_identity(stage: Optional[str], arch: Dict[str, Any], preset: Optional[str], pretrained: Optional[str],
                 lora: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The fields a resume must match, in the order they are compared: stage, model kind (bidirectional /
    far), the model preset (only without ``--pretrained``, which then fixes the architecture), every
    architecture field (``wan_config.*``, the FAR ones included), and the LoRA rank, alpha, adapters and
    targets. Applied to a run (`Trainer`) and to a checkpoint's metadata (`check_resume_compatible`)."""
    arch = _json_norm(arch or {})
    out: Dict[str, Any] = {"stage": stage, "model": "far" if arch.get("far") else "bidirectional"}
    if pretrained is None:
        out["model_preset"] = preset
    for k in sorted(arch):
        out[f"wan_config.{k}"] = arch[k]
    lora = _json_norm(lora) if lora else None
    out["lora_rank"] = int(lora.get("rank", 0)) if lora else 0
    if lora:
        for k in ("alpha", "adapters", "targets"):
            if k in lora:
                out[f"lora_{k}"] = lora[k]
    return out


def check_resume_compatible(root: str, ckpt_dir: str, meta: Dict[str, Any], run: Dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another configuration, before any of its weights is used.

    Compares `run_identity` of the checkpoint's ``anyflow_meta.json`` with ``run`` (this run's
    `run_identity`). A field the checkpoint does not record (an older version's metadata) is not compared,
    except the model kind (absent means bidirectional).

    Raises:
        ResumeMismatchError: one line naming the first differing field, both values and the file.
    """
    args = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    ck = run_identity(meta.get("stage"), meta.get("wan_config") or {}, args.get("model_preset"),
                      meta.get("pretrained") if "pretrained" in meta else args.get("pretrained"), meta.get("lora"))
    path = os.path.join(ckpt_dir, META)
    for field, mine in run.items():
        theirs = ck.get(field)
        if field not in ck or (field == "model_preset" and theirs is None):
            continue  # not recorded by the checkpoint's version (or not comparable: --pretrained set the arch)
        if _json_norm(theirs) != _json_norm(mine):
            raise ResumeMismatchError(
                f"--load {root}: {field} differs: checkpoint of {field} {theirs!r} ({path}), this run has {field} "
                f"{mine!r}; resume with the checkpoint's settings or --load another root")


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


def load_checkpoint(ckpt_dir: str, sharded_state_dict: Dict[str, Any], strict: bool = True,
                    verify_data: bool = True) -> Dict[str, Any]:
    """Load the tensors named by ``sharded_state_dict`` (resharded to this rank's layout).

    The checkpoint is verified first (`verify_checkpoint`): its index and ``common.pt`` are read
    without running code, and missing or truncated shards are named before megatron-core reads them.

    Args:
        ckpt_dir: checkpoint directory.
        sharded_state_dict: megatron-core sharded state dict of what to load.
        strict: raise when a requested key is absent.
        verify_data: check the files' SHA-256 first (False when the caller just did, e.g. a resume).
    Returns:
        key -> loaded tensor for the requested keys that the checkpoint holds.
    Raises:
        KeyError: with ``strict``, keys requested but absent from the checkpoint (named).
        FileNotFoundError / CheckpointError: the checkpoint is incomplete, corrupt or unsafe; a failure
            inside megatron-core's reader is re-raised as CheckpointError naming the checkpoint.
    """
    from megatron.core.dist_checkpointing.validation import StrictHandling

    verify_checkpoint(ckpt_dir, verify_data)
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
    note_unverified(ckpt_dir)
    sharded = model.sharded_state_dict()
    available = tensor_keys(ckpt_dir)
    missing = sorted(k for k in sharded if k not in available and (require_adapters or ".adapters." not in k)
                     and not k.startswith(tuple(allow_missing)))
    if missing:
        raise KeyError(f"checkpoint {ckpt_dir!r} lacks {len(missing)} model tensor(s): {missing[:20]}")
    loaded = load_checkpoint(ckpt_dir, sharded, strict=False)
    load_module_state(model, loaded)
    return ckpt_dir
