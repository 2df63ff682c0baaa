"""Attention of one query block over several key ranges, merged exactly with the log-sum-exp (no copies).

The FAR attention (`models.wan.far.FarAttention`) has query groups whose allowed keys are several
contiguous ranges of the sequence (context, noisy and clean chunks; docs/design/far.md 1.5), and the
cached generation step attends to the KV cache and the current chunk. Concatenating those keys and
values costs a K / V-sized copy per group, which autograd keeps for backward. Instead each range is
attended on its own by a flash-style kernel that also returns the row log-sum-exp, and the partial
outputs are merged exactly (the rule of blockwise / ring attention, e.g. Liu et al. 2023, "Ring
Attention with Blockwise Transformers"; PyTorch's context-parallel SDPA merges the same way):

    lse = logsumexp_i lse_i,        out = sum_i exp(lse_i - lse) * out_i

Backward needs no partial output: with the merged ``out`` and ``lse`` each range's flash backward
gives exactly its share (P_ij = exp(s_ij - lse) is the merged softmax restricted to the range, and the
row term D = rowsum(dO * out) is the merged one), so dq = sum_i dq_i and dk_i, dv_i come out directly.
Saved for backward: q, the key / value ranges as given (views: no new storage), the merged output and
the fp32 lse -- what one kernel over the whole key set would save.

`multi_range_attention` is a ``torch.library`` custom op, so selective checkpointing
(`layer.save_attention_policy`) and ``torch.compile`` see one op whose outputs are the merged output
and lse (nothing per range). Kernels (PyTorch's SDPA internals, which return the lse):

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward (tested here);
- CUDA fp16 / bf16: ``aten._scaled_dot_product_flash_attention`` (FlashAttention-2) and its backward;
  CUDA fp32: ``aten._scaled_dot_product_efficient_attention`` (lse padded to a multiple of 32 rows)
  and its backward. UNTESTED on this machine (no GPU): ``tests/test_range_attention.py`` has the GPU
  check (marked ``gpu``) against the dense mask.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

aten = torch.ops.aten


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One range: (out [b, n, sq, d] in q's dtype, lse [b, n, sq] fp32 (fp64 for fp64 inputs))."""
    sq = q.shape[2]
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
        else:
            out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)[:2]
            lse = lse[..., :sq]  # rows padded to a multiple of 32
        return out, lse
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return out, lse


def _kernel_backward(do, q, k, v, out, lse):
    """One range's (dq, dk, dv) given the MERGED out and lse (module docstring)."""
    if q.device.type == "cuda":
        sq, sk = q.shape[2], k.shape[2]
        if q.dtype in (torch.float16, torch.bfloat16):
            # the philox RNG state is read only with dropout; dummies of the forward's (rng_state,
            # unused) shapes and dtypes (torch/_meta_registrations.py); cum_seq None: not varlen
            seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
            offset = torch.zeros((), dtype=torch.uint64, device=q.device)
            return aten._scaled_dot_product_flash_attention_backward(
                do, q, k, v, out, lse, None, None, sq, sk, 0.0, False, seed, offset)
        pad = 0 if torch.version.hip else (-sq) % 32  # the kernel's lse rows (padded except on ROCm)
        lse_p = torch.nn.functional.pad(lse, (0, pad)) if pad else lse
        empty = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            do, q, k, v, None, out, lse_p.contiguous(), empty, empty, 0.0, [True, True, True, False], False)
        return dq, dk, dv
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(do, q, k, v, out, lse, 0.0, False)


@torch.library.custom_op("megatron_anyflow::multi_range_attention", mutates_args=())
def multi_range_attention(q: torch.Tensor, keys: List[torch.Tensor],
                          values: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` over the union of the key ranges, merged with the log-sum-exp.

    Args:
        q: [b, n, sq, d] (any strides with a contiguous last dim), fp32 / fp64 / bf16 / fp16.
        keys, values: equally long lists (>= 1) of [b, n, sk_i, d] in q's dtype and device; the key set
            is their union (order is irrelevant). Scale 1 / sqrt(d), no mask, no dropout.

    Returns:
        (out [b, n, sq, d] contiguous in q's dtype, lse [b, n, sq] fp32 -- fp64 for fp64 inputs --
        the natural-log log-sum-exp of the scaled scores over all keys; not differentiable).

    Raises:
        ValueError: empty or unequal key / value lists, a range with no keys, or a dtype / device
            different from q's.
    """
    _check(q, keys, values)
    acc = _acc_dtype(q.dtype)
    if len(keys) == 1:
        out, lse = _kernel_forward(q, keys[0], values[0])
        return out.contiguous(), lse.to(acc).contiguous()
    parts = [_kernel_forward(q, k, v) for k, v in zip(keys, values)]
    lses = torch.stack([lse.to(acc) for _, lse in parts])  # [r, b, n, sq]
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - lse).unsqueeze(-1)  # [r, b, n, sq, 1], sums to 1 over r
    out = w[0] * parts[0][0].to(acc)
    for i in range(1, len(parts)):
        out.add_(w[i] * parts[i][0].to(acc))
    return out.to(q.dtype), lse.contiguous()


@multi_range_attention.register_fake
def _(q, keys, values):
    b, n, sq, d = q.shape
    return q.new_empty(b, n, sq, values[0].shape[-1]), q.new_empty(b, n, sq, dtype=_acc_dtype(q.dtype))


def _check(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    if not keys or len(keys) != len(values):
        raise ValueError(f"multi_range_attention needs equally many key and value ranges (>= 1); got "
                         f"{len(keys)} keys, {len(values)} values")
    for i, (k, v) in enumerate(zip(keys, values)):
        if k.shape[2] == 0 or k.shape[2] != v.shape[2]:
            raise ValueError(f"key range {i}: {k.shape[2]} keys, {v.shape[2]} values; expected equal and > 0")
        if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
            raise ValueError(f"key range {i}: {k.dtype} / {v.dtype} on {k.device}; expected q's {q.dtype} on "
                             f"{q.device}")


def _setup_context(ctx, inputs, output):
    q, keys, values = inputs
    out, lse = output
    ctx.n = len(keys)
    ctx.mark_non_differentiable(lse)  # returned for inspection / tests; merges use the op itself
    ctx.save_for_backward(q, out, lse, *keys, *values)


def _backward(ctx, dout, _dlse):
    q, out, lse, *kv = ctx.saved_tensors
    keys, values = kv[:ctx.n], kv[ctx.n:]
    lse_k = lse.to(torch.float32) if q.dtype != torch.float64 else lse
    dout = dout.contiguous()
    dq, dks, dvs = None, [], []
    for k, v in zip(keys, values):
        gq, gk, gv = _kernel_backward(dout, q, k, v, out, lse_k)
        dq = gq if dq is None else dq + gq
        dks.append(gk)
        dvs.append(gv)
    return dq, dks, dvs


multi_range_attention.register_autograd(_backward, setup_context=_setup_context)
