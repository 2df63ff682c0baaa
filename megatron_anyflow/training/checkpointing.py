"""Crash-safe distributed checkpoints (megatron-core `dist_checkpointing`, torch_dist format).

Layout of a checkpoint root (Megatron's convention)::

    ROOT/latest_checkpointed_iteration.txt    "120" or "release"; replaced atomically, written last
    ROOT/iter_0000120/                        sharded tensors (model, adapters, EMA, optimizer states)
        anyflow_meta.json                     config, iteration and whatever the caller records
        rank_00000.pt ...                     per-rank state (RNG, data position)
    ROOT/release/                             a converted model (tools/convert_from_hf.py)

A save goes to ``<tag>.tmp`` and is renamed to ``<tag>`` only after every rank finished writing;
the tracker file is then replaced. A crash at any point leaves the previous tracker and checkpoint
untouched, and loading never looks at ``*.tmp``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

TRACKER = "latest_checkpointed_iteration.txt"
META = "anyflow_meta.json"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def tag_for(iteration: Optional[int]) -> str:
    """Directory name: ``iter_%07d`` for a training iteration, ``release`` for None."""
    return "release" if iteration is None else f"iter_{iteration:07d}"


def read_tracker(root: str) -> Optional[str]:
    """The tag of the last complete checkpoint under ``root``, or None if there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        val = f.read().strip()
    return "release" if val == "release" else tag_for(int(val))


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
