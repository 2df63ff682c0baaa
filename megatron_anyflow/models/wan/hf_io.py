"""Read and write diffusers transformer directories (``config.json`` + safetensors, sharded or not)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterable, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``; ValueError naming the file when it is not one."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{path}: not a valid JSON {what} ({len(raw)} bytes; {err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), found a {type(obj).__name__}")
    return obj


def read_hf_transformer_dir(path: str, progress: bool = True) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Config dict and full state dict of a diffusers transformer directory.

    Accepts ``path`` itself or a pipeline directory with a ``transformer/`` sub-folder.

    Args:
        path: diffusers transformer (or pipeline) directory.
        progress: show a progress bar over the shards.
    Returns:
        ``(config, state_dict)``.
    Raises:
        FileNotFoundError: no ``config.json`` or no safetensors weights (names what was looked for).
        ValueError: ``config.json`` or the index is not a JSON object, the index names a missing shard,
            a safetensors file is unreadable (truncated, not safetensors), or two shards hold the same
            key; the message names the file.
    """
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "transformer")):
        path = os.path.join(path, "transformer")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: expected a diffusers transformer directory")
    cfg = _read_json(cfg_path, "diffusers config")
    index_path = os.path.join(path, INDEX)
    if os.path.isfile(index_path):
        weight_map = _read_json(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: expected a non-empty 'weight_map' object")
        shards = sorted(set(map(str, weight_map.values())))
    elif os.path.isfile(os.path.join(path, WEIGHTS)):
        shards = [WEIGHTS]
    else:
        raise FileNotFoundError(f"no {WEIGHTS} or {INDEX} in {path} (only safetensors checkpoints are read)")
    sd: Dict[str, torch.Tensor] = {}
    it: Iterable[str] = shards
    if progress:
        from tqdm import tqdm

        it = tqdm(shards, desc="reading shards", unit="shard")
    for name in it:
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise ValueError(f"{INDEX} in {path} names shard {name}, which does not exist")
        try:
            part = load_file(fp)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError / OSError kinds
            raise ValueError(f"{fp}: not a readable safetensors file ({os.path.getsize(fp)} bytes; "
                             f"{type(err).__name__}: {err})") from None
        dup = sorted(set(part) & set(sd))
        if dup:
            raise ValueError(f"{fp}: holds {len(dup)} key(s) already read from another shard: {dup[:5]}")
        sd.update(part)
    return cfg, sd


def two_expert_boundary(path: str) -> Tuple[Optional[float], Optional[str]]:
    """Whether ``path`` is (part of) a two-expert diffusers ``WanPipeline`` (Wan2.2 A14B).

    Reads ``model_index.json`` of ``path`` (a pipeline directory) or of its parent (``path`` being its
    ``transformer/`` or ``transformer_2/`` sub-folder). A pipeline is two-expert when its index names a
    ``transformer_2`` and a ``boundary_ratio`` (diffusers ``WanPipeline``: ``transformer`` serves timesteps
    ``>= boundary_ratio * 1000``, ``transformer_2`` those below).

    Returns:
        ``(boundary_ratio, role)``: role ``"pipeline"`` for the pipeline directory itself,
        ``"transformer"`` / ``"transformer_2"`` for an expert's sub-folder; ``(None, None)`` otherwise
        (a single-model pipeline such as Wan2.2 TI2V-5B, whose ``boundary_ratio`` is null, or no index).
    Raises:
        ValueError: ``model_index.json`` is not a JSON object (names the file).
    """
    path = os.path.abspath(path.rstrip("/"))
    for index_dir, role in ((path, "pipeline"), (os.path.dirname(path), os.path.basename(path))):
        index = os.path.join(index_dir, "model_index.json")
        if not os.path.isfile(index):
            continue
        cfg = _read_json(index, "diffusers pipeline index")
        second = cfg.get("transformer_2")
        if cfg.get("boundary_ratio") is None or not second or second[0] is None:
            return None, None
        if role not in ("pipeline", "transformer", "transformer_2"):
            return None, None
        return float(cfg["boundary_ratio"]), role
    return None, None


def write_hf_transformer_dir(path: str, config: dict, sd: Dict[str, torch.Tensor],
                             max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``config.json`` and safetensors (sharded with an index above ``max_shard_bytes``).

    Written into ``path + '.tmp'`` and renamed at the end: an interrupted export never leaves a
    directory that looks complete.

    Raises:
        FileExistsError: ``path`` exists (remove it or choose another).
    """
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; remove it or pass another output directory")
    tmp = path.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    import diffusers

    config = dict(config, _diffusers_version=diffusers.__version__)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    sd = {k: v.contiguous() for k, v in sd.items()}
    shards, cur, size = [], {}, 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = sd[k]
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.replace(tmp, path)
