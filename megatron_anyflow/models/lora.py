"""LoRA over (tensor-parallel) linears: several named adapters on one frozen base.

``y = base(x) + (alpha / rank) * B(A(x))`` (Hu et al., 2021), with A initialised Kaiming-uniform and
B at zero so a fresh adapter leaves the model unchanged. Adapter weights are fp32 (master weights for
the optimiser); their GEMMs run in the activations' dtype (bf16 in bf16 / FP8 runs).

Sharding follows the wrapped weight, so every rank only stores and multiplies its own part:

- column-parallel base ``W [out/tp, in]``: A ``[r, in]`` replicated, B ``[out/tp, r]`` sharded on rows.
  A's rank-r output enters the TP region the same way the base input does (all-gather under sequence
  parallelism, copy with an all-reduced gradient otherwise); the collective is on r channels, not h.
- row-parallel base ``W [out, in/tp]``: A ``[r, in/tp]`` sharded on columns, B ``[out, r]`` replicated;
  A's partial output is summed over TP exactly like the base output (reduce-scatter under SP,
  all-reduce otherwise).
- replicated ``nn.Linear`` (time / delta embedders): plain LoRA.

Fused outputs (``linear_qkv`` laid out (head, {q,k,v}, d)) get one A / B pair per part (q, k, v), so
the adapters are exactly diffusers / PEFT's ``to_q`` / ``to_k`` / ``to_v`` LoRAs.

A replicated LoRA weight that only sees the rank's token slice under sequence parallelism inherits the
``sequence_parallel`` flag, so `allreduce_sequence_parallel_grads` sums its gradient over TP.

Which adapter runs. A call states it: ``model(z, t, r, text, adapter="generator")`` enters
`adapter_scope`, which every `LoRALinear` reads; recomputed regions capture the scope of their forward
(`bind_adapter_scope`), so a backward replays the adapter its forward used whatever is set globally
meanwhile. Outside any scope the per-module default (`set_active_adapter`) applies.

The combine is one GEMM: ``y = addmm(base(x), A(x), (s B)^T)`` (the B-GEMM accumulates into the base
output); a fused q/k/v output gets a block-structured ``[out, groups * r]`` B whose rows are already in
the base's (head, group, d) order, so no re-interleaving copy and no separate scaling multiply (the
zero blocks cost (groups - 1) x the B-GEMM's FLOPs on ``linear_qkv`` only: 2 x 2 S r 3h, < 1 % of a
layer at Wan sizes).

No-grad forwards (``torch.is_grad_enabled()`` False: CFG branches, real / fake score, rollouts) run the
merged weight ``W + s B A`` through the base linear instead of the unmerged path (`merged_nograd`):
``"per-call"`` merges each wrapped weight when it is used (2 r out in FLOPs, about 0.2 % of a
forward at 32k tokens; one weight-sized temporary at a time), ``"cache"`` keeps one merged copy per
(linear, adapter) until the adapter's or the base's parameters change (keyed on their ``_version``
counters and data pointers, so an optimizer step or a load invalidates it; a write through ``.data``
bypasses the counters: call `clear_merged_cache`). Memory of ``"cache"``: one copy of every wrapped
base weight per adapter: 2.2 GB (bf16) per adapter at 1.3B, 19.7 GB / TP at 14B. ``"off"`` (the
library default, `WanConfig.lora_merged_nograd`; the trainer's ``--lora-nograd-merge`` defaults to
``"cache"``): the unmerged path always, so a no-grad forward is bit-identical
to a grad-enabled one (merged and unmerged agree only to rounding: 1e-6 relative in float32, bf16
rounding in bf16).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import zlib
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megatron_anyflow.parallel.tensor_parallel import (
    copy_to_tp,
    gather_sequence_tp,
    reduce_from_tp,
    reduce_scatter_sequence_tp,
    tp_rank,
    tp_world_size,
)

# AnyFlow's targets (docs/design/anyflow.md 1.3): self-attention q/k/v/o, FFN, time and delta embedders.
DEFAULT_TARGETS = (
    "blocks.*.self_attention.linear_qkv",
    "blocks.*.self_attention.linear_proj",
    "blocks.*.mlp.linear_fc1",
    "blocks.*.mlp.linear_fc2",
    "condition_embedder.time_embedder.linear_1",
    "condition_embedder.time_embedder.linear_2",
    "condition_embedder.delta_embedder.linear_1",
    "condition_embedder.delta_embedder.linear_2",
)
# The teacher's LoRA fine-tune (reference teacher config): attention q/k/v/o and FFN only; the time
# embedder stays the base's, so a merged teacher keeps the converted model's timestep conditioning.
TEACHER_TARGETS = DEFAULT_TARGETS[:4]


class _Unset:
    def __repr__(self):
        return "<unset>"


_UNSET = _Unset()


class _Scope:
    """The adapter of the current call (`adapter_scope`); ``_UNSET`` = each LoRALinear's default.

    A plain global rather than a ``ContextVar``: ``torch.compile`` traces a global read (guarding on
    its value) without a graph break.
    """

    adapter = _UNSET

    @classmethod
    def get(cls):
        return cls.adapter

    @classmethod
    def set(cls, adapter):
        prev, cls.adapter = cls.adapter, adapter
        return prev

    @classmethod
    def reset(cls, prev):
        cls.adapter = prev


_ADAPTER_SCOPE = _Scope
MERGED_NOGRAD_MODES = ("per-call", "cache", "off")


@contextlib.contextmanager
def adapter_scope(adapter=_UNSET):
    """Run the enclosed forward with ``adapter`` (a name, or None for the base alone) on every LoRA linear.

    Overrides the per-module default (`set_active_adapter`) for this call only; leaving the scope
    restores the enclosing one. ``adapter_scope()`` with no argument changes nothing.
    """
    if adapter is _UNSET:
        yield
        return
    token = _ADAPTER_SCOPE.set(adapter)
    try:
        yield
    finally:
        _ADAPTER_SCOPE.reset(token)


def bind_adapter_scope(fn: Callable) -> Callable:
    """``fn`` wrapped to run in the adapter scope current now (for recomputation in backward).

    A checkpointed region replays its forward during backward, outside the caller's scope; binding
    makes the replay use the adapter its forward used. Outside any scope ``fn`` is returned as is (the
    per-module defaults are read at replay: `WanModel.forward` always opens a scope, so this only
    concerns modules called directly).
    """
    scope = _ADAPTER_SCOPE.get()
    if scope is _UNSET:
        return fn

    def bound(*args, **kwargs):
        token = _ADAPTER_SCOPE.set(scope)
        try:
            return fn(*args, **kwargs)
        finally:
            _ADAPTER_SCOPE.reset(token)

    return bound


def default_adapter(model: nn.Module):
    """The adapter `set_active_adapter` selected on every LoRA linear of ``model`` (None: the base alone);
    ``_UNSET`` when ``model`` has no LoRA linear or its linears disagree (set one by one)."""
    actives = {m.active for m in lora_modules(model)}
    return actives.pop() if len(actives) == 1 else _UNSET


def _kind(base: nn.Module) -> str:
    if isinstance(base, ColumnParallelLinear) or getattr(base, "parallel_mode", None) == "column":
        return "column"
    if isinstance(base, RowParallelLinear) or getattr(base, "parallel_mode", None) == "row":
        return "row"
    if isinstance(base, nn.Linear):
        return "replicated"
    raise TypeError(f"LoRA cannot wrap {type(base).__name__}: expected a megatron column/row-parallel "
                    "linear or nn.Linear")


def _seeded_kaiming(shape, seed: int) -> torch.Tensor:
    """Kaiming-uniform(a=sqrt(5)) init of a full [r, in] matrix from a fixed seed.

    The full matrix is drawn on every rank from the same seed and then sliced, so an adapter starts
    identically at any TP size.
    """
    g = torch.Generator().manual_seed(seed)
    fan_in = shape[1]
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform with a = sqrt(5)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul(bound).float()


class LoRAAdapter(nn.Module):
    """Weights of one adapter on one linear: ``lora_A`` [groups * r, in_local], ``lora_B`` [groups, out_g, r]."""

    def __init__(self, in_local: int, out_local: int, rank: int, alpha: float, groups: int,
                 a_init: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.rank, self.alpha, self.groups = rank, alpha, groups
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(a_init.to(dtype))
        self.lora_B = nn.Parameter(torch.zeros(groups, out_local // groups, rank, dtype=dtype))


class LoRALinear(nn.Module):
    """A base linear plus named LoRA adapters; at most one adapter is active at a time.

    Forward returns what the base returns (``(out, bias)`` for megatron linears, a tensor for nn.Linear).

    Args:
        base: `ColumnParallelLinear`, `RowParallelLinear` (or their TE twins) or `nn.Linear`.
        name: the module's path in the model (seeds the adapter init so it is TP-size independent).
    """

    def __init__(self, base: nn.Module, name: str):
        super().__init__()
        self.base = base
        self.name = name
        self.kind = _kind(base)
        self.adapters = nn.ModuleDict()
        self.active: Optional[str] = None
        self.merged_nograd = "off"  # see the module docstring; apply_lora / set_merged_nograd set it
        self._merged_cache = {}  # adapter -> (key, merged weight); "cache" mode only
        groups, head_dim = getattr(base, "lora_out_groups", (1, None))
        self.groups, self.head_dim = groups, head_dim
        w = base.weight
        self.out_local, self.in_local = w.shape
        self._sp_flag = bool(getattr(w, "sequence_parallel", False) or getattr(base.bias, "sequence_parallel", False)
                             if base.bias is not None else getattr(w, "sequence_parallel", False))

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped base weight (so code reading ``linear.weight.dtype`` keeps working)."""
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, adapter: str, rank: int, alpha: float, seed: int = 0) -> None:
        """Create adapter ``adapter`` (A seeded from (seed, module name, adapter), B = 0)."""
        if adapter in self.adapters:
            raise ValueError(f"adapter {adapter!r} already exists on {self.name}")
        tp, r = tp_world_size(), tp_rank()
        in_full = self.in_local * tp if self.kind == "row" else self.in_local
        out_full = (self.out_local * tp if self.kind == "column" else self.out_local) // self.groups
        if rank > min(in_full, out_full):
            raise ValueError(f"LoRA rank {rank} on {self.name} exceeds the layer's smaller dimension: in {in_full}, "
                             f"out {out_full}{' per q/k/v' if self.groups > 1 else ''}; use a rank <= "
                             f"{min(in_full, out_full)} (--lora-rank)")
        key = zlib.crc32(f"{seed}:{self.name}:{adapter}".encode())
        a = torch.cat([_seeded_kaiming((rank, in_full), key + g) for g in range(self.groups)])
        if self.kind == "row" and tp > 1:
            a = a.chunk(tp, dim=1)[r].contiguous()
        # fp32 master weights (the optimiser updates them); the GEMMs run in the activations' dtype.
        ad = LoRAAdapter(self.in_local, self.out_local, rank, alpha, self.groups, a, torch.float32)
        ad.to(self.base.weight.device)
        if self.kind == "column" and tp > 1:
            ad.lora_B.tensor_model_parallel, ad.lora_B.partition_dim, ad.lora_B.partition_stride = True, 1, 1
        if self.kind == "row" and tp > 1:
            ad.lora_A.tensor_model_parallel, ad.lora_A.partition_dim, ad.lora_A.partition_stride = True, 1, 1
        sp = self._sequence_parallel()
        if sp:
            # Weights applied on the rank's token slice only: A of a column linear, B of a row linear,
            # and both of a replicated linear that is used on local tokens.
            if self.kind == "column":
                ad.lora_A.sequence_parallel = True
            elif self.kind == "row":
                ad.lora_B.sequence_parallel = True
            elif self._sp_flag:
                ad.lora_A.sequence_parallel = ad.lora_B.sequence_parallel = True
        self.adapters[adapter] = ad

    def _sequence_parallel(self) -> bool:
        if self.kind == "replicated":
            return self._sp_flag and tp_world_size() > 1
        return bool(getattr(self.base, "sequence_parallel", False)) and tp_world_size() > 1

    # -- forward ----------------------------------------------------------------------------------
    def _resolve(self) -> Optional[str]:
        """The adapter this call runs: the enclosing `adapter_scope`, else the module default."""
        scope = _ADAPTER_SCOPE.get()
        adapter = self.active if scope is _UNSET else scope
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not defined on {self.name}; have {list(self.adapters)}")
        return adapter

    def _b_matrix(self, ad: LoRAAdapter, dtype: torch.dtype) -> torch.Tensor:
        """``s B`` as one ``[out_local, groups * r]`` matrix in the base weight's row order, in ``dtype``.

        For a fused (head, group, d) output the matrix is block-structured: row (n, g, d) holds
        ``s B_g[n d + d]`` in columns ``[g r, (g + 1) r)`` and zeros elsewhere, so ``A(x) @ B^T`` lands in
        the base layout without a re-interleaving copy. Weight-sized work only (no activation traffic).
        """
        B = ad.lora_B if ad.scaling == 1.0 else ad.lora_B * ad.scaling
        B = B.to(dtype)  # [groups, out_g, r]
        if self.groups == 1:
            return B[0]
        g, out_g, r = B.shape
        d = self.head_dim
        n = out_g // d
        eye = torch.eye(g, dtype=dtype, device=B.device)
        full = B.view(g, n, d, r).transpose(0, 1)[:, :, :, None, :] * eye[None, :, None, :, None]  # [n, g, d, g, r]
        return full.reshape(n * g * d, g * r)

    def _lora_a(self, x: torch.Tensor, ad: LoRAAdapter) -> torch.Tensor:
        """``A(x)`` [..., groups * r] in the layout of the base output's tokens (TP / SP collectives on r)."""
        a = F.linear(x, ad.lora_A.to(x.dtype))
        sp = self._sequence_parallel()
        # Functional-collective mappings (traceable by torch.compile), megatron's semantics.
        if self.kind == "column" and tp_world_size() > 1:
            a = gather_sequence_tp(a) if sp else copy_to_tp(a)
        elif self.kind == "row" and tp_world_size() > 1:
            a = reduce_scatter_sequence_tp(a) if sp else reduce_from_tp(a)
        return a

    def _delta(self, x: torch.Tensor, ad: LoRAAdapter) -> torch.Tensor:
        """``s B(A(x))`` alone [..., out_local] (reference path; the forward accumulates it into the base)."""
        a = self._lora_a(x, ad)
        return F.linear(a, self._b_matrix(ad, a.dtype))

    def forward(self, x, *args, **kwargs):
        adapter = self._resolve()
        if adapter is None:
            return self.base(x, *args, **kwargs)
        if not torch.is_grad_enabled() and self.merged_nograd != "off":
            return torch.func.functional_call(self.base, {"weight": self.merged_weight(adapter)}, (x, *args), kwargs)
        ad = self.adapters[adapter]
        out = self.base(x, *args, **kwargs)
        y, bias = out if isinstance(out, tuple) else (out, None)
        a = self._lora_a(x, ad).to(y.dtype)
        # The B-GEMM accumulates into the base output (beta = 1): no separate scale / add / interleave.
        y = torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), self._b_matrix(ad, y.dtype).t())
        y = y.view(*a.shape[:-1], -1)
        return (y, bias) if isinstance(out, tuple) else y

    # -- merge ------------------------------------------------------------------------------------
    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's local layout [out_local, in_local] (float32)."""
        ad = self.adapters[adapter]
        return self._b_matrix(ad, torch.float32) @ ad.lora_A.float()

    @torch.no_grad()
    def merged_weight(self, adapter: str) -> torch.Tensor:
        """``W + s B A`` in the base weight's dtype and layout (rounded once from float32).

        ``merged_nograd == "cache"``: computed once and reused until the base weight or the adapter's
        A / B change (their ``_version`` counters and data pointers are the key: an optimizer step, a
        ``load_state_dict`` or `merge` invalidates it). Otherwise computed at each call.
        """
        w, ad = self.base.weight, self.adapters[adapter]
        key = None
        if self.merged_nograd == "cache":
            key = tuple((t._version, t.data_ptr()) for t in (w, ad.lora_A, ad.lora_B)) + (w.dtype, w.device)
            hit = self._merged_cache.get(adapter)
            if hit is not None and hit[0] == key:
                return hit[1]
        merged = self.delta_weight(adapter).add_(w).to(w.dtype)
        if key is not None:
            self._merged_cache[adapter] = (key, merged)
        return merged

    @torch.no_grad()
    def merge(self, adapter: str) -> None:
        """Add the adapter into the base weight (the adapter is kept; deactivate it afterwards)."""
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight(adapter)).to(w.dtype))
        self._merged_cache.clear()


# ------------------------------------------------------------------------------------------------
def _match(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_lora(model: nn.Module, adapters: Iterable[str], rank: int, alpha: float,
               targets: Sequence[str] = DEFAULT_TARGETS, seed: int = 0) -> List[str]:
    """Wrap every target linear of ``model`` in `LoRALinear` and add the named adapters.

    Freezes all base parameters (LoRA weights stay trainable). Targets are fnmatch patterns over module
    paths; patterns that match nothing are ignored (the delta embedder is absent on a plain Wan model).
    Returns the wrapped module paths.

    Raises:
        ValueError: rank < 1, or no module matched any target.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1; got {rank}")
    adapters = list(adapters)
    cfg = getattr(model, "config", None)
    mode = getattr(cfg, "lora_merged_nograd", "off")
    if getattr(cfg, "fp8", None):
        mode = "off"  # TE caches FP8 casts of its weights: a swapped-in merged weight is not safe there
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear) or not _match(name, targets):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lora = LoRALinear(module, name)
        lora.merged_nograd = mode
        for a in adapters:
            lora.add_adapter(a, rank, alpha, seed)
        setattr(parent, attr, lora)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"no module matched the LoRA targets {list(targets)}")
    return wrapped


def lora_modules(model: nn.Module) -> Iterator[LoRALinear]:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            yield m


def set_active_adapter(model: nn.Module, adapter: Optional[str]) -> None:
    """Select the adapter used by every LoRA linear (None = the frozen base alone).

    Raises:
        KeyError: ``adapter`` is not defined on some wrapped linear.
    """
    for m in lora_modules(model):
        if adapter is not None and adapter not in m.adapters:
            raise KeyError(f"adapter {adapter!r} is not defined on {m.name}; have {list(m.adapters)}")
        m.active = adapter


@contextlib.contextmanager
def use_adapter(model: nn.Module, adapter: Optional[str]):
    """Context manager: run with ``adapter`` active, restore the previous choice afterwards."""
    prev = {m: m.active for m in lora_modules(model)}
    set_active_adapter(model, adapter)
    try:
        yield
    finally:
        for m, a in prev.items():
            m.active = a


def set_merged_nograd(model: nn.Module, mode: str) -> None:
    """How no-grad forwards run an adapter: ``"per-call"``, ``"cache"`` or ``"off"`` (module docstring).

    Raises:
        ValueError: an unknown mode.
    """
    if mode not in MERGED_NOGRAD_MODES:
        raise ValueError(f"merged no-grad mode {mode!r}; expected one of {MERGED_NOGRAD_MODES}")
    for m in lora_modules(model):
        m.merged_nograd = mode
        m._merged_cache.clear()


def clear_merged_cache(model: nn.Module) -> None:
    """Drop the cached merged weights (needed only after writing adapter weights through ``.data``)."""
    for m in lora_modules(model):
        m._merged_cache.clear()


def adapter_parameters(model: nn.Module, adapter: str) -> List[nn.Parameter]:
    """The trainable parameters of one adapter across the model."""
    return [p for m in lora_modules(model) if adapter in m.adapters for p in m.adapters[adapter].parameters()]


def merge_adapter(model: nn.Module, adapter: str) -> None:
    """Merge ``adapter`` into the base weights and deactivate adapters (exporting a plain model)."""
    for m in lora_modules(model):
        if adapter in m.adapters:
            m.merge(adapter)
    set_active_adapter(model, None)


def remove_lora(model: nn.Module) -> None:
    """Replace every `LoRALinear` by its base linear (adapters dropped; merge first to keep them)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.base)
