"""Where a step's time goes: one run under `torch.profiler`, grouped into attention / GEMM / elementwise /
communication by kernel (CUDA) or aten op (CPU) name."""
from __future__ import annotations

import re
from typing import Dict

import torch

from megatron_anyflow.measure.device import _sync

# kernel (CUDA) or aten-op (CPU) name patterns -> category, first match wins
KERNEL_CATEGORIES = (
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter|all_to_all|alltoall|broadcast|c10d"),
    ("attention", r"flash|fmha|attention|_attn|sdpa|mha"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|aten::(mm|bmm|addmm|baddbmm|matmul|linear|_convolution|"
             r"convolution|conv\w*)$|(^|_)b?mm(_|$)|addmm|conv"),
)


def kernel_category(name: str) -> str:
    """``attention``, ``gemm``, ``communication`` or ``elementwise`` (everything else: norms, copies,
    fused Triton pointwise, reductions) for a CUDA kernel or aten op name."""
    n = name.lower()
    for cat, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, n):
            return cat
    return "elementwise"


def profile_categories(fn, top: int = 15) -> Dict[str, object]:
    """Run ``fn`` once under `torch.profiler` and group its time by `kernel_category`.

    CUDA: each kernel's self device time (``key_averages``, device events). CPU: each ``aten::`` op's
    self CPU time (what the host spends in the op itself). Returns ``{"unit": "ms", "source": ...,
    "categories": {cat: {"ms", "share", "calls"}}, "top": [{"name", "category", "ms", "calls"}]}``.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync()
    with profile(activities=acts) as prof:
        fn()
        _sync()
    rows = []
    for e in prof.key_averages():
        name = e.key
        if cuda:  # kernels: events on the device
            if getattr(e.device_type, "name", str(e.device_type)) != "CUDA":
                continue
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        else:
            if not name.startswith("aten::"):
                continue
            us = e.self_cpu_time_total
        if us:
            rows.append((name, float(us) / 1e3, int(e.count)))
    cats: Dict[str, Dict[str, float]] = {c: {"ms": 0.0, "share": 0.0, "calls": 0}
                                         for c in ("attention", "gemm", "elementwise", "communication")}
    for name, ms, n in rows:
        c = cats[kernel_category(name)]
        c["ms"] += ms
        c["calls"] += n
    total = sum(c["ms"] for c in cats.values())
    for c in cats.values():
        c["share"] = c["ms"] / total if total > 0 else 0.0
    rows.sort(key=lambda r: -r[1])
    return {"unit": "ms", "source": "CUDA kernels (self device time)" if cuda else "aten ops (self CPU time)",
            "total_ms": total, "categories": cats,
            "top": [{"name": n[:120], "category": kernel_category(n), "ms": ms, "calls": c} for n, ms, c in rows[:top]]}
