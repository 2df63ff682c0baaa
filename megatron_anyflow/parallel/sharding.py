"""Sharded state dicts for megatron-core distributed checkpoints (`dist_checkpointing`).

Every parameter and persistent buffer becomes a `ShardedTensor` whose global shape is the unsharded
one: a tensor-parallel shard (``tensor_model_parallel`` / ``partition_dim`` attributes) records its
offset along the partition dim; anything else is replicated over TP and DP (one writer). A checkpoint
saved at one TP size therefore loads at any other.

Keys are canonical: the ``.base`` level of LoRA wrappers is dropped, so a base model's weights have
the same keys with or without adapters, and adapters live under ``<linear>.adapters.<name>.lora_{A,B}``.
"""

from __future__ import annotations

from typing import Dict

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_anyflow.parallel.tensor_parallel import tp_rank, tp_world_size


def canonical_key(name: str) -> str:
    """Checkpoint key of a state-dict entry: LoRA wrappers' ``.base.`` level removed."""
    return name.replace(".base.", ".")


def _dp_rank() -> int:
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_data_parallel_rank(with_context_parallel=True)


def sharded_tensor_like(key: str, param: torch.Tensor, data: torch.Tensor) -> ShardedTensor:
    """`ShardedTensor` for ``data`` sharded exactly like ``param`` (used for params, EMA, optimizer state)."""
    tp, rank, dp = tp_world_size(), tp_rank(), _dp_rank()
    if getattr(param, "tensor_model_parallel", False) and tp > 1:
        return ShardedTensor.from_rank_offsets(key, data, (param.partition_dim, rank, tp), replica_id=(0, 0, dp))
    return ShardedTensor.from_rank_offsets(key, data, replica_id=(0, rank, dp))


def module_sharded_state_dict(module: torch.nn.Module, prefix: str = "") -> Dict[str, ShardedTensor]:
    """`ShardedTensor` per parameter / persistent buffer of ``module`` (canonical keys, ``prefix`` added)."""
    params = dict(module.named_parameters())
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if t is None or name.endswith("_extra_state"):
            continue
        key = prefix + canonical_key(name)
        out[key] = sharded_tensor_like(key, params.get(name, t), t.detach())
    return out


def load_module_state(module: torch.nn.Module, loaded: Dict[str, torch.Tensor], prefix: str = "") -> None:
    """Copy tensors loaded under canonical keys back into ``module`` (shapes checked)."""
    own = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, t in own.items():
            if t is None or name.endswith("_extra_state"):
                continue
            key = prefix + canonical_key(name)
            if key not in loaded:
                continue
            src = loaded[key]
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"checkpoint tensor {key}: expected local shape {tuple(t.shape)}, "
                                 f"found {tuple(src.shape)}")
            t.copy_(src.to(t.dtype))
