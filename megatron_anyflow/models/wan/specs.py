"""Layer specs of the Wan block for the two backends; both share `WanLayer`'s definition.

- ``local``: megatron-core `ColumnParallelLinear` / `RowParallelLinear` (one fused GEMM + bias at TP = 1)
  and the attention kernel ``--attention-impl`` picks (cuDNN / FlashAttention-3 / flash-attn / SDPA /
  math); runs anywhere, CPU included (TP / SP with gloo).
- ``te``: Transformer Engine linears (FP8-capable) and TE fused attention; GPU only.
"""

from __future__ import annotations

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_anyflow.models.wan.layer import (
    TECoreAttention,
    TorchCoreAttention,
    WanColumnParallelLinear,
    WanCrossAttention,
    WanCrossAttentionSubmodules,
    WanLayer,
    WanLayerSubmodules,
    WanMLP,
    WanMLPSubmodules,
    WanRowParallelLinear,
    WanSelfAttention,
    WanSelfAttentionSubmodules,
)


def _layer_spec(column, row, core_attention) -> ModuleSpec:
    return ModuleSpec(
        module=WanLayer,
        submodules=WanLayerSubmodules(
            self_attention=ModuleSpec(
                module=WanSelfAttention,
                submodules=WanSelfAttentionSubmodules(linear_qkv=column, core_attention=core_attention,
                                                      linear_proj=row),
            ),
            cross_attention=ModuleSpec(
                module=WanCrossAttention,
                submodules=WanCrossAttentionSubmodules(linear_q=column, linear_kv=column,
                                                       core_attention=core_attention, linear_proj=row),
            ),
            mlp=ModuleSpec(module=WanMLP, submodules=WanMLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def get_wan_layer_local_spec() -> ModuleSpec:
    """Spec of the local backend: megatron-core parallel linears (one fused ``F.linear`` with its bias at
    TP = 1) and the attention kernel of ``config.attention_impl`` (`layer.TorchCoreAttention`)."""
    return _layer_spec(WanColumnParallelLinear, WanRowParallelLinear, TorchCoreAttention)


def get_wan_layer_te_spec() -> ModuleSpec:
    """Spec of the Transformer Engine backend.

    Raises:
        ImportError: Transformer Engine is not installed (it ships GPU builds only; install the
            ``[gpu]`` extra or use an NGC PyTorch container), with the fallback named.
    """
    try:  # megatron-core's TE extension imports without TE (it substitutes mocks): check TE itself
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
    except ImportError as err:  # TE is optional
        raise ImportError(
            "backend='te' needs Transformer Engine (GPU only): pip install 'megatron_anyflow[gpu]' or use "
            "the NGC PyTorch image; use backend='local' otherwise"
        ) from err
    return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, TECoreAttention)


def get_wan_layer_spec(backend: str) -> ModuleSpec:
    """Spec for ``backend`` in {"local", "te"}; raises ValueError for anything else."""
    if backend == "local":
        return get_wan_layer_local_spec()
    if backend == "te":
        return get_wan_layer_te_spec()
    raise ValueError(f"backend={backend!r}; expected 'local' or 'te'")
