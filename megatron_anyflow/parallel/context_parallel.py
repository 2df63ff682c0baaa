"""Context parallelism (CP) for the Wan DiT: sequence split, Ulysses all-to-all, output gather.

Layout. The token sequence ``[S, b, h]`` (frame-major, then row, then column) is split into ``cp``
contiguous chunks: CP rank ``c`` keeps tokens ``[c * S / cp, (c + 1) * S / cp)``. Under tensor +
sequence parallelism the CP chunk is further split over TP (CP outer, TP inner), so a rank holds
tokens starting at ``c * S / cp + t * S / (cp * tp)`` (see `local_token_range`).

Every collective here runs over megatron-core's context-parallel group
(``parallel_state.get_context_parallel_group()``) and is the identity at CP = 1.

Gradient convention. The model computes its output on the rank's tokens and gathers it whole on
every CP rank (`gather_from_context_parallel_region`); the loss is then computed identically on every
CP rank, so the gather's backward keeps only the rank's slice of the (replicated) output gradient.
Every parameter's gradient on a CP rank is then the contribution of that rank's tokens only: the full
gradient is the SUM over CP ranks (`parallel.tensor_parallel.finalize_model_grads` does that).
Gradients with respect to the model inputs are made whole with `reduce_grad_over_context_parallel`.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from megatron.core import parallel_state


# ----------------------------------------------------------------------------------------------
# Group queries
# ----------------------------------------------------------------------------------------------
def cp_world_size() -> int:
    """Context-parallel size, 1 when model parallelism is not initialised."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_context_parallel_world_size()


def cp_rank() -> int:
    """Context-parallel rank, 0 when model parallelism is not initialised."""
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_context_parallel_rank()


def cp_group():
    """The context-parallel process group (megatron-core's)."""
    return parallel_state.get_context_parallel_group()


def check_sequence_split(seq: int, grid: Tuple[int, int, int], cp: int, tp: int = 1) -> None:
    """Raise if ``seq`` tokens cannot be split evenly over ``cp`` (x ``tp`` under sequence parallelism).

    Args:
        seq: number of tokens of one sample (``prod(grid)``).
        grid: the patched (frames, rows, cols) token grid, named in the message.
        cp: context-parallel size.
        tp: tensor-parallel size when sequence parallelism is on, else 1.

    Raises:
        ValueError: naming the token count, the grid and the sizes. The sequence is never padded.
    """
    parts = cp * tp
    if parts == 1 or seq % parts == 0:
        return
    if cp == 1:
        raise ValueError(f"{seq} tokens (grid {tuple(grid)}) do not divide by the tensor-parallel size {tp} "
                         "under sequence parallelism; change the latent size or disable SP")
    sizes = f"context-parallel size {cp}"
    if tp > 1:
        sizes += f" x tensor-parallel size {tp} (sequence parallelism) = {parts}"
    raise ValueError(f"{seq} tokens (grid {tuple(grid)}) do not divide by the {sizes}; change the latent "
                     "size (frames / height / width) or the parallel sizes (the sequence is not padded)")


def local_token_range(seq: int, cp: int, c: int, tp: int = 1, t: int = 0) -> Tuple[int, int]:
    """(start, length) of the tokens held by CP rank ``c`` / TP rank ``t`` (CP outer, TP inner).

    ``tp`` is the TP size when sequence parallelism is on, else 1. Call `check_sequence_split` first.
    """
    length = seq // (cp * tp)
    return c * (seq // cp) + t * length, length


# ----------------------------------------------------------------------------------------------
# Sequence split / gather
# ----------------------------------------------------------------------------------------------
def split_to_context_parallel_region(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This CP rank's contiguous chunk of ``x`` along ``dim`` (no communication).

    Backward: the chunk's gradient in place, zeros elsewhere (plain autograd of a slice): parameters
    upstream of the split (patch embedding) get the partial gradient of this rank's tokens, summed
    over CP by `finalize_model_grads` like every other gradient.

    Raises:
        ValueError: ``x.shape[dim]`` does not divide by the CP size.
    """
    cp = cp_world_size()
    if cp == 1:
        return x
    n = x.shape[dim]
    if n % cp:
        raise ValueError(f"dimension {dim} of size {n} does not divide by the context-parallel size {cp}")
    return x.narrow(dim, cp_rank() * (n // cp), n // cp)


class _GatherFromContextParallel(torch.autograd.Function):
    """All-gather over CP along ``dim`` (rank order); backward keeps this rank's slice (no reduction).

    The output is consumed identically on every CP rank (replicated loss), so each rank's slice of
    the output gradient is already the whole gradient of its tokens: reducing it over CP would scale
    gradients by CP. Mirrors megatron's SP gather with ``tensor_parallel_output_grad=False``.
    """

    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        n = grad.shape[ctx.dim] // world
        return grad.narrow(ctx.dim, rank * n, n).contiguous(), None, None


def gather_from_context_parallel_region(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every CP rank's chunk of ``x`` along ``dim`` in CP-rank order (identity at CP = 1).

    ``x`` [s_local, ...] -> [s_local * cp, ...] on every CP rank; backward: split (see
    `_GatherFromContextParallel`). Use it for an output whose loss is computed on every CP rank.
    """
    if cp_world_size() == 1:
        return x
    return _GatherFromContextParallel.apply(x, dim, cp_group())


class _ReduceGradOverContextParallel(torch.autograd.Function):
    """Identity forward; backward sums the gradient over CP (megatron's copy-to-region, for CP)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def reduce_grad_over_context_parallel(x: torch.Tensor) -> torch.Tensor:
    """Mark a model input replicated over CP: forward identity, backward all-reduce (sum) over CP.

    Each CP rank back-propagates only its tokens' part of the gradient; the sum is the input's whole
    gradient, so input gradients come out whole and identical on every CP rank. A no-op for tensors
    that do not require grad and at CP = 1.
    """
    if cp_world_size() == 1 or not x.requires_grad:
        return x
    return _ReduceGradOverContextParallel.apply(x, cp_group())


# ----------------------------------------------------------------------------------------------
# Ulysses all-to-all
# ----------------------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` into ``world`` chunks along ``scatter_dim``, send chunk j to rank j, and concatenate
    the chunks received from ranks 0..world-1 along ``gather_dim``.

    One ``all_to_all_single`` on a ``[world, *chunk]`` buffer (supported by NCCL and, checked with
    torch 2.13, by gloo on CPU), as a functional collective (out of place: ``torch.compile`` keeps it
    in the block's graph).
    """
    world = dist.get_world_size(group)
    send = torch.stack(x.chunk(world, dim=scatter_dim), dim=0).contiguous()
    recv = funcol.all_to_all_single(send, None, None, group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Differentiable `_all_to_all`; its adjoint is the all-to-all with the two dims swapped."""

    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def all_to_all_heads_to_sequence(x: torch.Tensor, head_dim: int = 2) -> torch.Tensor:
    """Ulysses forward exchange over CP: scatter heads, gather the sequence.

    ``x`` [s_local, b, n, ...] (this rank's CP chunk of the sequence, ``n`` heads) ->
    [s_local * cp, b, n / cp, ...] (the whole CP sequence in order, heads ``[c * n / cp, (c + 1) * n / cp)``
    of CP rank c). ``head_dim`` is the heads dimension (2 for ``[s, b, n, d]``).

    Raises:
        ValueError: ``n`` does not divide by the CP size.
    """
    cp = cp_world_size()
    if cp == 1:
        return x
    if x.shape[head_dim] % cp:
        raise ValueError(f"{x.shape[head_dim]} attention heads on this rank do not divide by the "
                         f"context-parallel size {cp}")
    return _AllToAll.apply(x, head_dim, 0, cp_group())


def all_to_all_sequence_to_heads(x: torch.Tensor, head_dim: int = 2) -> torch.Tensor:
    """Inverse of `all_to_all_heads_to_sequence`: scatter the sequence, gather heads.

    ``x`` [s_local * cp, b, n / cp, ...] -> [s_local, b, n, ...].
    """
    if cp_world_size() == 1:
        return x
    return _AllToAll.apply(x, 0, head_dim, cp_group())
