"""Tensor / sequence-parallel helpers the Wan layers need: the TP mappings on functional collectives
(traceable by ``torch.compile``), the q/k-norm statistic all-reduce, and the gradient reductions."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from megatron.core import parallel_state


def tp_world_size() -> int:
    """Tensor-parallel size, 1 when model parallelism is not initialised."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_rank() -> int:
    """Tensor-parallel rank, 0 when model parallelism is not initialised."""
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_tensor_model_parallel_rank()


class _AllReduceSum(torch.autograd.Function):
    """Sum over the TP group in forward and in backward.

    The q/k RMSNorm statistic is a sum over all heads; each TP rank holds some heads and uses the summed
    statistic for its own channels only, so the gradient of that sum is the sum of every rank's
    gradient (unlike megatron's reduce-from-region, whose backward is the identity).

    Both directions are functional collectives (``torch.distributed._functional_collectives``): out of
    place, so ``torch.compile`` traces them into the block's graph (no graph break) and can overlap them
    with independent work; eager mode waits on the result where it is used.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return funcol.all_reduce(x, "sum", group)

    @staticmethod
    def backward(ctx, grad):
        return funcol.all_reduce(grad.contiguous(), "sum", ctx.group), None


def all_reduce_sum_tp(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over the tensor-parallel group (identity at TP = 1)."""
    if tp_world_size() == 1:
        return x
    return _AllReduceSum.apply(x, parallel_state.get_tensor_model_parallel_group())


# ------------------------------------------------------------------------------------------------
# Tensor / sequence-parallel mappings on functional collectives (traceable by torch.compile)
# ------------------------------------------------------------------------------------------------
# The same four mappings as megatron-core's (`copy_to_tensor_model_parallel_region` ...), written with
# out-of-place functional collectives so that a compiled block keeps them in its graph instead of
# breaking around megatron's in-place ``dist.*`` calls. Sequence dimension: 0 ([s, b, h]).
class _CopyToTP(torch.autograd.Function):
    """Forward identity; backward all-reduce (sum) over TP (megatron's copy-to-region)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return funcol.all_reduce(grad.contiguous(), "sum", ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """Forward all-reduce (sum) over TP; backward identity (megatron's reduce-from-region)."""

    @staticmethod
    def forward(ctx, x, group):
        return funcol.all_reduce(x.contiguous(), "sum", group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherSequence(torch.autograd.Function):
    """Forward all-gather along dim 0 over TP; backward reduce-scatter (megatron's SP gather)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return funcol.all_gather_tensor(x.contiguous(), 0, group)

    @staticmethod
    def backward(ctx, grad):
        return funcol.reduce_scatter_tensor(grad.contiguous(), "sum", 0, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward reduce-scatter along dim 0 over TP; backward all-gather (megatron's SP reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return funcol.reduce_scatter_tensor(x.contiguous(), "sum", 0, group)

    @staticmethod
    def backward(ctx, grad):
        return funcol.all_gather_tensor(grad.contiguous(), 0, ctx.group), None


def _tp_group():
    return parallel_state.get_tensor_model_parallel_group()


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Input of a column-parallel GEMM without SP: identity; its gradient is summed over TP."""
    return x if tp_world_size() == 1 else _CopyToTP.apply(x, _tp_group())


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """Output of a row-parallel GEMM without SP: summed over TP; gradient passed through."""
    return x if tp_world_size() == 1 else _ReduceFromTP.apply(x, _tp_group())


def gather_sequence_tp(x: torch.Tensor) -> torch.Tensor:
    """[s / tp, ...] -> [s, ...] (rank order) under SP; gradient reduce-scattered back."""
    return x if tp_world_size() == 1 else _GatherSequence.apply(x, _tp_group())


def reduce_scatter_sequence_tp(x: torch.Tensor) -> torch.Tensor:
    """[s, ...] partial sums -> this rank's [s / tp, ...] of the sum under SP; gradient all-gathered."""
    return x if tp_world_size() == 1 else _ReduceScatterSequence.apply(x, _tp_group())


def mark_sequence_parallel(params: Iterable[torch.nn.Parameter]) -> None:
    """Flag replicated parameters whose gradients are partial sums over sequence-parallel tokens.

    `allreduce_sequence_parallel_grads` sums these over the TP group after backward (megatron-core's
    convention: the ``sequence_parallel`` attribute, as on LayerNorm weights and row-parallel biases).
    """
    for p in params:
        setattr(p, "sequence_parallel", True)


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> None:
    """Sum the gradients of ``sequence_parallel`` parameters over the TP group, in one flat buffer.

    Must run after backward and before clipping / the optimiser whenever sequence parallelism is on.
    No-op at TP = 1.
    """
    if tp_world_size() == 1:
        return
    grads = [p.grad for p in model.parameters()
             if p.requires_grad and p.grad is not None and getattr(p, "sequence_parallel", False)]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=parallel_state.get_tensor_model_parallel_group())
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def allreduce_data_parallel_grads(model: torch.nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Reduce trainable gradients over the data-parallel x context-parallel group, one flat buffer.

    Default (``group=None``): one all-reduce over ``get_data_parallel_group(with_context_parallel=True)``
    of the gradients divided by the data-parallel size only, i.e. SUM over context-parallel ranks and
    AVERAGE over data-parallel ranks. Under CP each rank back-propagates only its tokens (the model
    gathers its output and the loss is replicated over CP, see `parallel.context_parallel`), so every
    gradient - TP-sharded or replicated - is a partial sum over CP ranks; DP ranks hold different
    samples whose gradients are averaged. At CP = 1 this is the plain DP average.

    With an explicit ``group`` the gradients are averaged over that group (no CP handling).
    """
    if group is None:
        if not parallel_state.model_parallel_is_initialized():
            return
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        divisor = parallel_state.get_data_parallel_world_size(with_context_parallel=False)
    else:
        divisor = dist.get_world_size(group)
    if dist.get_world_size(group) == 1:
        return
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    if divisor > 1:
        flat.div_(divisor)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """Total L2 norm of the gradients of a tensor-parallel model (float32 scalar, same on all ranks).

    Tensor-parallel shards (``tensor_model_parallel``) contribute from every TP rank; replicated
    parameters are counted once (from TP rank 0). The sum of squares is all-reduced over the TP group
    only: call after `finalize_model_grads` (or `allreduce_sequence_parallel_grads` without CP / DP),
    when every CP and DP rank holds the same gradients, which must not be summed again.
    """
    params = [p for p in params if p.grad is not None]
    # On the training device even when this rank has no gradient: NCCL rejects CPU tensors.
    device = params[0].grad.device if params else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    total = torch.zeros((), dtype=torch.float32, device=device)
    rank0 = tp_rank() == 0
    for p in params:
        if getattr(p, "tensor_model_parallel", False) or rank0:
            total += p.grad.detach().float().pow(2).sum()
    if tp_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total.sqrt()


def finalize_model_grads(model: torch.nn.Module) -> None:
    """Make every rank's gradients the gradient of the global-batch mean loss, after backward.

    1. Sequence parallel: sum ``sequence_parallel`` parameters' partial gradients over the TP group
       (`allreduce_sequence_parallel_grads`).
    2. Context parallel: each CP rank saw other tokens of the same samples, so every gradient is a
       partial sum over CP: sum over CP. 3. Data parallel: average over DP. Steps 2 and 3 are one
       all-reduce over the DP x CP group (`allreduce_data_parallel_grads`).
    """
    allreduce_sequence_parallel_grads(model)
    allreduce_data_parallel_grads(model)
