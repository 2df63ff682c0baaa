"""Load models from checkpoints, following adapter checkpoints back to their base.

A training checkpoint made with LoRA stores only its trainable tensors and records the base it was
trained on (``meta["pretrained"]``); a converted or full fine-tuned checkpoint stores the whole model.
`load_base` resolves either into full base weights; `load_for_inference` adds the run's adapters.

What a checkpoint *is* as a base (``--pretrained``, or the recorded base of a later run): a converted or
full checkpoint is its weights; a LoRA **teacher** checkpoint (``--stage teacher --lora-rank R``) is its
own base with the ``teacher`` adapter's **EMA** weights merged (the reference's LoRA-teacher recipe loads
the teacher with ``pretrained_weight: ema``; the fine-tuned teacher is then the real score and the fake
score's start); a stage-1 / stage-2 LoRA checkpoint is the base it was trained on (its generator /
fake-score adapters are students, merged only on request).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import torch

from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.parallel.sharding import load_module_state, module_sharded_state_dict
from megatron_anyflow.checkpoint import store as ckpt

DELTA = "condition_embedder.delta_embedder."
# AnyFlow-FAR's compressed-context embedding: absent from a Wan / bidirectional base (initialised from
# patch_embedding, docs/design/far.md 1.1) and trained fully (not LoRA) with the generator adapter, whose checkpoint
# holds it live and under ``ema.generator.``.
FAR = "far_patch_embedding."


def _has_base(ckpt_dir: str, model: torch.nn.Module) -> bool:
    avail = ckpt.tensor_keys(ckpt_dir)
    want = [k for k in module_sharded_state_dict(model)
            if ".adapters." not in k and not k.startswith(DELTA) and not k.startswith(FAR)]
    return all(k in avail for k in want)


def represented_adapter(meta: dict) -> Optional[str]:
    """The adapter a checkpoint merges into itself when used as a base: ``"teacher"`` for a LoRA teacher
    checkpoint, None otherwise (see the module docstring)."""
    lora = meta.get("lora") or {}
    return "teacher" if meta.get("stage") == "teacher" and "teacher" in lora.get("adapters", []) else None


def load_as_base(model: WanModel, path: str) -> str:
    """Fill ``model`` with what the checkpoint at ``path`` is as a base (module docstring): its weights,
    following recorded bases, with a LoRA teacher's adapter merged. Returns the checkpoint directory."""
    d = ckpt.resolve_checkpoint_dir(path)
    return load_base(model, d, merge_adapter=represented_adapter(ckpt.read_meta(d)), merge_ema=True)


def load_as_model(path: str, **config_overrides) -> WanModel:
    """A `WanModel` (TP = 1, eval mode) holding what the checkpoint at ``path`` is as a base: e.g. the
    teacher for sampling or synthesising data from a converted, full or LoRA-teacher checkpoint."""
    d = ckpt.resolve_checkpoint_dir(path)
    meta = ckpt.read_meta(d)
    model = WanModel(wan_config(None, **meta["wan_config"], perform_initialization=False, **config_overrides))
    load_as_base(model, d)
    return model.eval()


def load_base(model: WanModel, path: str, merge_adapter: Optional[str] = None, merge_ema: bool = False) -> str:
    """Fill ``model``'s base weights from ``path`` (a checkpoint root or directory).

    If the checkpoint holds the whole model, it is loaded directly; if it only holds adapters, its
    ``pretrained`` base is loaded first, recursively as a base (`load_as_base`: a LoRA teacher recorded as
    the base has its adapter merged). ``merge_adapter``: an adapter of this checkpoint to merge into the
    base (e.g. a LoRA-fine-tuned ``teacher``), with its EMA weights when ``merge_ema`` and the checkpoint
    has them (live weights otherwise). A base without a delta embedder gets one
    as a copy of the time embedder when the model has one. The model must not be LoRA-wrapped.

    Raises:
        KeyError / FileNotFoundError: missing tensors or checkpoints, named.
    """
    d = ckpt.resolve_checkpoint_dir(path)
    meta = ckpt.read_meta(d)
    if _has_base(d, model):
        ckpt.load_model_weights(model, d, allow_missing=(DELTA, FAR))
        if model.condition_embedder.delta_embedder is not None and not _delta_in(d):
            model.condition_embedder.reset_delta_embedder()
        if getattr(model.config, "far", False) and not any(k.startswith(FAR) for k in ckpt.tensor_keys(d)):
            model.reset_far_patch_embedding()  # a Wan / bidirectional base: trilinear init (docs/design/far.md 1.1)
    elif meta.get("pretrained"):
        if not os.path.isdir(meta["pretrained"]):
            raise FileNotFoundError(f"{d} holds adapters only; its recorded base {meta['pretrained']!r} (anyflow_meta.json "
                                    "'pretrained') does not exist: restore it or re-run with that base")
        load_as_base(model, meta["pretrained"])
    else:
        raise KeyError(f"{d} holds no base weights and records no pretrained base")
    if merge_adapter is not None:
        lora = meta.get("lora")
        if not lora or merge_adapter not in lora["adapters"]:
            raise KeyError(f"adapter {merge_adapter!r} not in {d} (adapters: {lora['adapters'] if lora else []})")
        ce = model.condition_embedder
        # An untrained delta embedder is a bitwise copy of the time embedder (AnyFlow's start: the model is
        # exactly the base at t = r). Merging a teacher that fine-tuned the time embedder must keep that
        # property, so such a copy is re-taken from the merged time embedder; a trained one is kept.
        delta_is_copy = ce.delta_embedder is not None and all(
            torch.equal(a, b) for a, b in zip(ce.delta_embedder.state_dict().values(),
                                              ce.time_embedder.state_dict().values()))
        L.apply_lora(model, [merge_adapter], lora["rank"], lora["alpha"], targets=lora["targets"])
        has_ema = merge_ema and any(k.startswith(f"ema.{merge_adapter}.")
                                    for k in ckpt.tensor_keys(d))
        _load_adapter_tensors(model, d, ema=merge_adapter if has_ema else None, adapters=[merge_adapter])
        L.merge_adapter(model, merge_adapter)
        L.remove_lora(model)
        if delta_is_copy:
            ce.reset_delta_embedder()
        if getattr(model.config, "far", False) and not any(k.startswith(FAR) for k in ckpt.tensor_keys(d)):
            model.reset_far_patch_embedding()  # follow a teacher-merged patch embedding
        for p in model.parameters():
            p.requires_grad_(True)
    return d


def _delta_in(ckpt_dir: str) -> bool:
    return any(k.startswith(DELTA) for k in ckpt.tensor_keys(ckpt_dir))


def _load_adapter_tensors(model: torch.nn.Module, ckpt_dir: str, ema: Optional[str] = None,
                          adapters: Optional[List[str]] = None, expert: Optional[str] = None) -> None:
    """Load the adapter tensors (or their EMA copies under ``ema.<group>.``) of ``adapters`` (None: all of
    the model's) from the checkpoint; every one of them must be there.

    A missing tensor is an error, never a silent fresh initialisation: a LoRA ``B`` left at zero (or an
    ``A`` at its random init) gives a model that runs and is wrong (an export differed by 4.4e-3 with
    exit 0 before this check). AnyFlow-FAR's ``far_patch_embedding`` travels with the ``generator``
    adapter (live, or its EMA) and is required with it when the checkpoint is a FAR one; a bidirectional
    base checkpoint has none (the caller initialises it, docs/design/far.md 1.1).

    ``expert``: in a two-expert stage-2 checkpoint, the expert whose tensors (keys ``<expert>.*``) fill ``model``.

    Raises:
        CheckpointError: tensors of the requested adapters are missing from the checkpoint (the first few
            named, with the directory and how many in all).
    """
    prefix = (f"ema.{ema}." if ema else "") + (f"{expert}." if expert else "")
    avail = ckpt.tensor_keys(ckpt_dir)
    want = {k: v for k, v in module_sharded_state_dict(model, prefix).items()
            if ".adapters." in k and (adapters is None or any(f".adapters.{a}." in k for a in adapters))}
    # FAR: the fully trained far_patch_embedding travels with the generator adapter (live, or its EMA).
    if getattr(getattr(model, "config", None), "far", False):
        far = {k: v for k, v in module_sharded_state_dict(model, prefix).items() if k[len(prefix):].startswith(FAR)}
        meta_far = bool((ckpt.read_meta(ckpt_dir).get("wan_config") or {}).get("far"))
        if meta_far and (adapters is None or "generator" in adapters):
            want.update(far)
        else:
            want.update({k: v for k, v in far.items() if k in avail})
    missing = sorted(k for k in want if k not in avail)
    if missing:
        what = f"EMA ({prefix[:-1]}) " if ema else ""
        raise ckpt.CheckpointError(
            f"{ckpt_dir} lacks {len(missing)} {what}tensor(s) of adapter(s) {adapters or 'all'}, e.g. "
            f"{', '.join(missing[:3])}: the checkpoint is incomplete or from another configuration (LoRA "
            "targets / rank); a missing adapter tensor is never replaced by a fresh initialisation")
    if want:
        load_module_state(model, ckpt.load_checkpoint(ckpt_dir, want, strict=True), prefix)


def load_adapters(model: torch.nn.Module, path: str, adapters: List[str], ema: bool = False,
                  expert: Optional[str] = None) -> str:
    """Load the named adapters (live or EMA weights) from a training checkpoint into a LoRA model;
    ``expert``: that expert's of a two-expert stage-2 checkpoint (`stage2_expert_arch`).

    Raises:
        KeyError: an adapter is not in the checkpoint.
    """
    d = ckpt.resolve_checkpoint_dir(path)
    meta = ckpt.read_meta(d)
    have = (meta.get("lora") or {}).get("adapters", [])
    for a in adapters:
        if a not in have:
            raise KeyError(f"adapter {a!r} not in {d} (adapters: {have})")
        _load_adapter_tensors(model, d, ema=a if ema else None, adapters=[a], expert=expert)
    return d


def stage2_expert_arch(meta: dict, expert: Optional[str], where: str) -> Optional[dict]:
    """The architecture of ``expert`` in a two-expert stage-2 checkpoint (``meta["experts"]``: both experts,
    tensors under ``high.`` / ``low.``), or None for a one-model checkpoint (``expert`` must then be None).

    Raises:
        ValueError: a two-expert checkpoint without ``expert`` in ("high", "low"), or ``expert`` given for a
            one-model checkpoint (named with ``where``).
    """
    if meta.get("experts"):
        if expert not in ("high", "low"):
            raise ValueError(f"{where} holds both experts of a two-expert model (a two-expert stage-2 run): name one, "
                             f"expert='high' or 'low' (got {expert!r}); convert_to_hf --pipeline exports both")
        return dict(meta["wan_config"], expert=expert)
    if expert is not None:
        raise ValueError(f"expert={expert!r}: {where} holds one model, not a two-expert stage-2 run")
    return None


def load_with_adapter(path: str, adapter: Optional[str] = None, ema: bool = False, expert: Optional[str] = None,
                      **config_overrides) -> WanModel:
    """A `WanModel` (TP = 1, eval mode) from a training / converted checkpoint: the base the run trained on
    (`load_base`) with ``adapter`` applied as LoRA linears, **not merged**, live or EMA (``ema``) weights;
    ``adapter`` None: the base alone (with the EMA of every weight under ``ema.model.`` when ``ema``: full
    fine-tuning). `load_for_inference` merges it; ``convert_to_hf --lora-only`` exports the adapter as is.

    ``expert``: one expert of a two-expert stage-2 checkpoint (`stage2_expert_arch`): its recorded base (or its own
    saved base, ``<expert>.*``, after a random-init preset run) and its adapters.

    Raises:
        KeyError: ``adapter`` is not in the checkpoint (the checkpoint's adapters named).
        CheckpointError: tensors of the adapter are missing (`_load_adapter_tensors`).
        ValueError: ``expert`` missing for a two-expert checkpoint or given for a one-model one.
    """
    d = ckpt.resolve_checkpoint_dir(path)
    meta = ckpt.read_meta(d)
    arch = stage2_expert_arch(meta, expert, d)
    model = WanModel(wan_config(None, **(arch or meta["wan_config"]), perform_initialization=False, **config_overrides))
    key = f"{expert}." if arch else ""  # a two-expert checkpoint keeps each expert's tensors under its name
    if arch:
        want = {k: v for k, v in module_sharded_state_dict(model, key).items() if ".adapters." not in k}
        have = ckpt.tensor_keys(d)  # one read of the index (it is parsed and checked on every call)
        if all(k in have for k in want):  # saved with the run (random-init preset, full fine-tuning)
            load_module_state(model, ckpt.load_checkpoint(d, want, strict=True), key)
        elif meta["experts"][expert]:
            load_as_base(model, meta["experts"][expert])
        else:
            raise KeyError(f"{d} holds no base weights of the {expert}-noise expert and records no base for it")
    else:
        load_base(model, d)
    if adapter is None and ema:  # full fine-tuning: EMA of every weight under ema.model.
        request = {k: v for k, v in module_sharded_state_dict(model, "ema.model." + key).items()}
        load_module_state(model, ckpt.load_checkpoint(d, request, strict=True), "ema.model." + key)
    if adapter is not None:
        lora = meta.get("lora")
        if not lora or adapter not in lora["adapters"]:
            raise KeyError(f"adapter {adapter!r} not in {d} (adapters: {lora['adapters'] if lora else []})")
        L.apply_lora(model, [adapter], lora["rank"], lora["alpha"], targets=lora["targets"])
        load_adapters(model, d, [adapter], ema=ema, expert=expert)
        L.set_active_adapter(model, adapter)
    return model.eval()


def load_for_inference(path: str, adapter: Optional[str] = None, ema: bool = False, expert: Optional[str] = None,
                       **config_overrides) -> WanModel:
    """A `WanModel` from a training / converted checkpoint, with ``adapter`` merged (TP = 1); ``expert``: one
    expert of a two-expert stage-2 checkpoint (`load_with_adapter`).

    Trained non-adapter tensors of the checkpoint (full fine-tuning) are loaded as well.
    """
    model = load_with_adapter(path, adapter, ema, expert, **config_overrides)
    if adapter is not None:
        L.merge_adapter(model, adapter)
        L.remove_lora(model)
    return model


def expert_pair(first: Tuple[str, str], second: Tuple[str, str]) -> Tuple[Dict[str, Tuple[str, str, dict]], float]:
    """The two experts of a two-expert model (Wan2.2 A14B) from two checkpoints, in either order: their roles and
    the boundary come from each checkpoint's ``wan_config`` (``expert``, ``boundary_ratio``; recorded by
    ``convert_from_hf`` from ``transformer/`` / ``transformer_2/`` and by ``--expert`` training runs). The one
    place every tool and the trainer pair experts.

    Args:
        first, second: ``(flag, path)`` as the user gave them (e.g. ``("--teacher", p)``), for the messages.

    Returns:
        ``({"high": (path, directory, meta), "low": (...)}, boundary_ratio)``.

    Raises:
        ValueError (a user error: one line): a checkpoint that is not one expert (no ``wan_config.boundary_ratio``
            or ``expert``), two checkpoints of the same expert, or boundaries that differ (flags, paths and fields
            named).
        FileNotFoundError / CheckpointError: no complete checkpoint at a path (named).
    """
    pair: Dict[str, Tuple[str, str, dict]] = {}
    for flag, path in (first, second):
        d = ckpt.resolve_checkpoint_dir(path)
        meta = ckpt.read_meta(d)
        arch = meta.get("wan_config") or {}
        role = arch.get("expert")
        if arch.get("boundary_ratio") is None or role not in ("high", "low"):
            raise ValueError(f"{flag} {path} is not one expert of a two-expert model (wan_config.boundary_ratio "
                             f"{arch.get('boundary_ratio')}, wan_config.expert {role}): convert the experts from a "
                             "Wan2.2 A14B pipeline's transformer/ and transformer_2/ (convert_from_hf records both), "
                             "or train them with --expert high / low")
        if role in pair:
            raise ValueError(f"{first[0]} {first[1]} and {second[0]} {second[1]} are both the {role}-noise expert "
                             f"(wan_config.expert {role}); pass one high and one low expert")
        pair[role] = (path, d, meta)
    b = {role: float(m["wan_config"]["boundary_ratio"]) for role, (_, _, m) in pair.items()}
    if b["high"] != b["low"]:
        raise ValueError(f"the experts' boundaries differ (wan_config.boundary_ratio): {b['high']} in "
                         f"{pair['high'][0]} (high), {b['low']} in {pair['low'][0]} (low)")
    return pair, b["high"]
