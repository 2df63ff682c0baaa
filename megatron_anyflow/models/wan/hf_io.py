"""Read and write diffusers transformer directories (``config.json`` + safetensors, sharded or not)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterable, Tuple

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def read_hf_transformer_dir(path: str, progress: bool = True) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Config dict and full state dict of a diffusers transformer directory.

    Accepts ``path`` itself or a pipeline directory with a ``transformer/`` sub-folder.

    Raises:
        FileNotFoundError: no ``config.json`` or no safetensors weights (names what was looked for).
        ValueError: an index that names a missing shard.
    """
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "transformer")):
        path = os.path.join(path, "transformer")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: expected a diffusers transformer directory")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if os.path.isfile(os.path.join(path, INDEX)):
        with open(os.path.join(path, INDEX)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
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
        sd.update(load_file(fp))
    return cfg, sd


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
