"""Load models from checkpoints, following adapter checkpoints back to their base.

A training checkpoint made with LoRA stores only its trainable tensors and records the base it was
trained on (``meta["pretrained"]``); a converted or full fine-tuned checkpoint stores the whole model.
`load_base` resolves either into full base weights; `load_for_inference` adds the run's adapters.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from megatron.core import dist_checkpointing

from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.parallel.sharding import load_module_state, module_sharded_state_dict
from megatron_anyflow.training import checkpointing as ckpt

DELTA = "condition_embedder.delta_embedder."


def _has_base(ckpt_dir: str, model: torch.nn.Module) -> bool:
    avail = set(dist_checkpointing.load_tensors_metadata(ckpt_dir).keys())
    want = [k for k in module_sharded_state_dict(model) if ".adapters." not in k and not k.startswith(DELTA)]
    return all(k in avail for k in want)


def load_base(model: WanModel, path: str, merge_adapter: Optional[str] = None) -> str:
    """Fill ``model``'s base weights from ``path`` (a checkpoint root or directory).

    If the checkpoint holds the whole model, it is loaded directly; if it only holds adapters, its
    ``pretrained`` base is loaded first (recursively). ``merge_adapter``: an adapter of that checkpoint
    to merge into the base (e.g. a LoRA-fine-tuned ``teacher``). A base without a delta embedder gets one
    as a copy of the time embedder when the model has one. The model must not be LoRA-wrapped.

    Raises:
        KeyError / FileNotFoundError: missing tensors or checkpoints, named.
    """
    d = ckpt.resolve_checkpoint_dir(path)
    meta = ckpt.read_meta(d)
    if _has_base(d, model):
        ckpt.load_model_weights(model, d, allow_missing=(DELTA,))
        if model.condition_embedder.delta_embedder is not None and not _delta_in(d):
            model.condition_embedder.reset_delta_embedder()
    elif meta.get("pretrained"):
        load_base(model, meta["pretrained"])
    else:
        raise KeyError(f"{d} holds no base weights and records no pretrained base")
    if merge_adapter is not None:
        lora = meta.get("lora")
        if not lora or merge_adapter not in lora["adapters"]:
            raise KeyError(f"adapter {merge_adapter!r} not in {d} (adapters: {lora['adapters'] if lora else []})")
        L.apply_lora(model, [merge_adapter], lora["rank"], lora["alpha"], targets=lora["targets"])
        _load_adapter_tensors(model, d)
        L.merge_adapter(model, merge_adapter)
        L.remove_lora(model)
        for p in model.parameters():
            p.requires_grad_(True)
    return d


def _delta_in(ckpt_dir: str) -> bool:
    return any(k.startswith(DELTA) for k in dist_checkpointing.load_tensors_metadata(ckpt_dir).keys())


def _load_adapter_tensors(model: torch.nn.Module, ckpt_dir: str, ema: Optional[str] = None,
                          adapters: Optional[List[str]] = None) -> None:
    """Load adapter tensors (or their EMA copies under ``ema.<group>.``) that the checkpoint has."""
    prefix = f"ema.{ema}." if ema else ""
    avail = set(dist_checkpointing.load_tensors_metadata(ckpt_dir).keys())
    request = {k: v for k, v in module_sharded_state_dict(model, prefix).items()
               if ".adapters." in k and k in avail
               and (adapters is None or any(f".adapters.{a}." in k for a in adapters))}
    if request:
        load_module_state(model, ckpt.load_checkpoint(ckpt_dir, request, strict=True), prefix)


def load_adapters(model: torch.nn.Module, path: str, adapters: List[str], ema: bool = False) -> str:
    """Load the named adapters (live or EMA weights) from a training checkpoint into a LoRA model.

    Raises:
        KeyError: an adapter is not in the checkpoint.
    """
    d = ckpt.resolve_checkpoint_dir(path)
    meta = ckpt.read_meta(d)
    have = (meta.get("lora") or {}).get("adapters", [])
    for a in adapters:
        if a not in have:
            raise KeyError(f"adapter {a!r} not in {d} (adapters: {have})")
        _load_adapter_tensors(model, d, ema=a if ema else None, adapters=[a])
    return d


def load_for_inference(path: str, adapter: Optional[str] = None, ema: bool = False, **config_overrides) -> WanModel:
    """A `WanModel` from a training / converted checkpoint, with ``adapter`` merged (TP = 1).

    Trained non-adapter tensors of the checkpoint (full fine-tuning) are loaded as well.
    """
    d = ckpt.resolve_checkpoint_dir(path)
    meta = ckpt.read_meta(d)
    model = WanModel(wan_config(None, **meta["wan_config"], perform_initialization=False, **config_overrides))
    load_base(model, d)
    if adapter is None and ema:  # full fine-tuning: EMA of every weight under ema.model.
        request = {k: v for k, v in module_sharded_state_dict(model, "ema.model.").items()}
        load_module_state(model, ckpt.load_checkpoint(d, request, strict=True), "ema.model.")
    if adapter is not None:
        lora = meta["lora"]
        L.apply_lora(model, [adapter], lora["rank"], lora["alpha"], targets=lora["targets"])
        load_adapters(model, d, [adapter], ema=ema)
        L.merge_adapter(model, adapter)
        L.remove_lora(model)
    return model.eval()
