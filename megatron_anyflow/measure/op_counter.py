"""Count what one Wan block does on the device: aten ops launched, bytes they move, bytes kept for backward.

Measured by running the real block on CPU at a small size (what is counted does not depend on the device):

- **ops / bytes moved** (`OpCounter`, a `TorchDispatchMode`): every aten op that reaches the kernel
  level in forward and backward is counted once; its "bytes moved" are the bytes of its tensor inputs
  plus outputs (``numel * element_size``; a lower bound on DRAM traffic of an unfused kernel, the usual
  roofline estimate). View ops (``OpOverload.is_view``: ``view``, ``permute``, ``expand`` ...; and
  ``_unsafe_view`` / ``detach`` / ``alias``) launch no
  kernel and move nothing: they are counted apart and not in the totals.
- **saved-activation bytes** (`saved_bytes`): unique storages packed for backward
  (``torch.autograd.graph.saved_tensors_hooks``; a non-reentrant checkpoint's kept inputs show up there,
  what it recomputes does not) plus the outputs a selective-checkpoint policy saves (reported by the
  policy itself). Parameters and the inputs every layer shares (modulation, text states, RoPE tables)
  are left out; the block input counts when the block saves it (it is the previous layer's output).
  The per-token figure is the slope between two token counts (the grid and twice its frames), so
  weight-sized tensors a layer saves (a cast weight, LoRA's per-call B matrix) are reported apart
  ("fixed") instead of inflating the per-token figure at small sizes.

`measure_block` returns both for one configuration; `tools/count_layer_ops.py` prints the table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# Ops that only make a new tensor header (no kernel) although not tagged as views.
_NO_KERNEL = (torch.ops.aten.detach, torch.ops.aten.alias, torch.ops.aten._unsafe_view, torch.ops.aten.lift_fresh)


class OpCounter(TorchDispatchMode):
    """Counts aten ops and the bytes of their tensor inputs + outputs while active.

    Attributes:
        ops: op name (``aten.mm`` ...) -> number of calls, view ops excluded.
        bytes: op name -> bytes of inputs + outputs summed over its calls.
        views: number of view-op calls (no kernel, no traffic).
    """

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.bytes: Counter = Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket in _NO_KERNEL:
            self.views += 1
            return out
        name = str(func.overloadpacket)
        flat = tree_flatten((args, kwargs or {}))[0] + tree_flatten(out)[0]
        self.ops[name] += 1
        self.bytes[name] += sum(_nbytes(t) for t in flat if isinstance(t, torch.Tensor))
        return out

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())


def saved_bytes(fn, exclude: Sequence[torch.Tensor] = ()) -> Dict[str, int]:
    """Bytes the autograd graph of ``fn()`` keeps for backward, by dtype (``{"float32": .., "total": ..}``).

    Unique storages packed by ``torch.autograd.graph.saved_tensors_hooks`` (this sees the inputs a
    non-reentrant checkpoint keeps, not what it recomputes), plus the outputs a selective-checkpoint
    policy of `megatron_anyflow.models.wan.layer` saves (reported through
    `layer.observe_selective_saves`; `saved_tensors_hooks` cannot see inside a checkpoint). Storages of
    ``exclude`` (parameters, inputs shared by every layer) are left out.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, torch.Tensor] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip:
                seen.setdefault(ptr, t)
        return t

    try:
        from megatron_anyflow.models.wan.layer import observe_selective_saves
    except ImportError:  # before the selective policy existed
        observe_selective_saves = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if observe_selective_saves is not None:
            with observe_selective_saves(pack):
                kept = fn()
        else:
            kept = fn()
    out: Dict[str, int] = {"total": 0}
    for t in seen.values():
        n = t.untyped_storage().nbytes()
        name = str(t.dtype).replace("torch.", "")
        out[name] = out.get(name, 0) + n
        out["total"] += n
    del kept
    return out


@dataclass
class BlockMeasurement:
    """One configuration's figures (per layer, forward + backward)."""

    label: str
    tokens: int
    ops_forward: int
    ops_backward: int
    bytes_forward: int
    bytes_backward: int
    saved_bytes_per_token: float
    saved_by_dtype_per_token: Dict[str, float]
    saved_fixed_bytes: float
    top_ops: Dict[str, int] = field(default_factory=dict)

    def row(self) -> dict:
        return {"config": self.label, "tokens": self.tokens, "ops fwd": self.ops_forward,
                "ops bwd": self.ops_backward, "MB fwd": round(self.bytes_forward / 1e6, 3),
                "MB bwd": round(self.bytes_backward / 1e6, 3),
                "saved B/token": round(self.saved_bytes_per_token, 1),
                "of which fp32": round(self.saved_by_dtype_per_token.get("float32", 0.0), 1),
                "saved fixed KB": round(self.saved_fixed_bytes / 1e3, 1)}


def build_block_inputs(preset: str = "tiny-video", dtype: torch.dtype = torch.float32, lora: bool = True,
                       grid=(2, 8, 8), batch: int = 1, text_len: int = 16, seed: int = 0, **overrides):
    """A one-block `WanModel` (LoRA on every default target when ``lora``) and its first block's inputs.

    Returns ``(model, block, (x, e, text, rope, segments))`` with x [S, b, h] requiring grad (the
    gradient flows through the stack in training) where S = prod(grid).
    """
    from megatron_anyflow.models import lora as L
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.model import WanModel

    torch.manual_seed(seed)
    cfg = wan_config(preset, num_layers=1, bf16=dtype == torch.bfloat16, **overrides)
    model = WanModel(cfg)
    if lora:
        L.apply_lora(model, ["generator"], cfg.lora_rank, cfg.lora_alpha)
        for p in L.adapter_parameters(model, "generator"):  # B != 0 so the LoRA path is not trivially zero
            if p.dim() == 3:
                p.data.normal_(0, 0.02)
        L.set_active_adapter(model, "generator")
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    blk = model.blocks[0]
    captured = {}

    def capture(module, args):
        captured["args"] = args  # returns None: the call's arguments are left as they are

    handle = blk.register_forward_pre_hook(capture)
    f, hh, ww = grid
    pt, ph, pw = cfg.patch_size
    g = torch.Generator().manual_seed(seed + 1)
    lat = torch.randn(batch, f * pt, cfg.in_channels, hh * ph, ww * pw, generator=g).to(dtype)
    txt = torch.randn(batch, text_len, cfg.text_dim, generator=g).to(dtype)
    with torch.no_grad():
        model(lat, torch.full((batch,), 500.0), torch.full((batch,), 200.0), txt)
    handle.remove()
    x, e, text, rope, segments = captured["args"]
    x = x.detach().clone().requires_grad_(True)
    return model, blk, (x, e.detach(), text.detach(), rope, segments)


def measure_block(label: str, preset: str = "tiny-video", dtype: torch.dtype = torch.float32, lora: bool = True,
                  grid=(2, 8, 8), batch: int = 1, text_len: int = 16, **overrides) -> BlockMeasurement:
    """Ops, bytes moved and saved-activation bytes of one block at ``preset`` dims (see module docstring).

    ``overrides`` go to `wan_config` (e.g. ``recompute_granularity="full"``).
    """
    try:  # full recompute exactly as the model applies it (FP8-aware context, adapter captured)
        from megatron_anyflow.models.wan.model import checkpoint_block
    except ImportError:  # before item 4: plain non-reentrant checkpoint of the block
        def checkpoint_block(config, blk, *args, **kw):
            return torch.utils.checkpoint.checkpoint(blk, *args, use_reentrant=False, **kw)

    def setup(grid_):
        model, blk, inputs = build_block_inputs(preset, dtype, lora, grid_, batch, text_len, **overrides)
        # blocks the model checkpoints whole (full recompute, the save-attention policy), as it does
        full = model._recompute(0) if hasattr(model, "_recompute") else False

        def run(inp):
            _, e, text, rope, segments = inputs
            if full:
                return checkpoint_block(model.config, blk, inp, e, text, rope, segments)
            return blk(inp, e, text, rope, segments)

        return model, inputs, run

    model, (x, e, text, rope, segments), run = setup(grid)
    tokens = x.shape[0] * x.shape[1]
    # warm-up (first-call caches, e.g. RoPE tables) outside the counters
    run(x).float().sum().backward()
    x.grad = None
    fwd = OpCounter()
    with fwd:
        y = run(x)
    w = torch.randn_like(y)
    bwd = OpCounter()
    with bwd:
        y.backward(w)
    del y
    saved = saved_bytes(lambda: run(x), exclude=[e, text, *rope, *model.parameters()])
    # Per token = the slope between this grid and one with twice the frames: weight-sized tensors
    # (LoRA's per-call B matrix, casts of weights) are the same at both sizes and drop out.
    grid2 = (2 * grid[0], *grid[1:])
    model2, (x2, e2, text2, rope2, _), run2 = setup(grid2)
    tokens2 = x2.shape[0] * x2.shape[1]
    saved2 = saved_bytes(lambda: run2(x2), exclude=[e2, text2, *rope2, *model2.parameters()])
    per_token = {k: (saved2.get(k, 0) - saved.get(k, 0)) / (tokens2 - tokens) for k in set(saved) | set(saved2)}
    top = dict((fwd.ops + bwd.ops).most_common(12))
    return BlockMeasurement(
        label=label, tokens=tokens, ops_forward=fwd.total_ops, ops_backward=bwd.total_ops,
        bytes_forward=fwd.total_bytes, bytes_backward=bwd.total_bytes,
        saved_bytes_per_token=per_token["total"], saved_fixed_bytes=saved["total"] - per_token["total"] * tokens,
        saved_by_dtype_per_token={k: v for k, v in per_token.items() if k != "total"}, top_ops=top)


DEFAULT_CASES = (
    ("fp32 LoRA, no recompute", dict(dtype=torch.float32)),
    ("bf16 LoRA, no recompute", dict(dtype=torch.bfloat16)),
    ("bf16 LoRA, full recompute", dict(dtype=torch.bfloat16, recompute_granularity="full",
                                       recompute_method="uniform", recompute_num_layers=1)),
    ("bf16 LoRA, selective core_attn", dict(dtype=torch.bfloat16, recompute_granularity="selective",
                                            recompute_modules=["core_attn"])),
    ("bf16 LoRA, selective mlp", dict(dtype=torch.bfloat16, recompute_granularity="selective",
                                      recompute_modules=["mlp"])),
    ("bf16 LoRA, selective save-attention", dict(dtype=torch.bfloat16, recompute_granularity="selective",
                                                 recompute_policy="save-attention")),
)
