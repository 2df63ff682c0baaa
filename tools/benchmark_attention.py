#!/usr/bin/env python
"""Attention kernels and device ceilings at the Wan shapes: what each ``--attention-impl`` reaches.

For each shape (Wan2.1-1.3B and 14B self-attention over 81 x 480 x 832 video = 32,760 tokens; their
cross-attention over 512 text tokens) and each kernel of the local backend (``cudnn``, ``flash``,
``fa3``, ``sdpa``, ``math``, and what ``auto`` resolves to), this times the project's own
`TorchCoreAttention` forward and forward + backward on q / k / v ``[s, b, n, d]`` and reports the median
time and TFLOP/s: forward ``4 s_q s_k n d`` FLOPs, backward 2.5x the forward (the fused kernels'
executed count, `measure.flops`). A kernel that is not installed or does not fit is a row with its
error. ``math`` is skipped where its score matrix would exceed ``--math-max-gib``.

The ceilings first: the bf16 dense matmul rate (``--matmul-size``, the MFU denominator of
`tools/benchmark_throughput.py`) and the device copy bandwidth.

Without CUDA (``--tiny``, the default there): fp32 on CPU at 256 tokens, a smoke run that says so.
``--json`` / ``--markdown`` are rewritten after every row (atomically), so a run cut short keeps its rows.

    python tools/benchmark_attention.py --json out.json --markdown out.md
    python tools/benchmark_attention.py --tiny
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from megatron_anyflow.measure.device import device_name, measure_copy_bandwidth, measure_matmul_tflops
from megatron_anyflow.measure.report import write_atomic

IMPLS = ("auto", "cudnn", "flash", "fa3", "sdpa", "math")
# name: (s_q, s_k, heads, head_dim)
SHAPES = {
    "1.3b-self": (32760, 32760, 12, 128), "1.3b-cross": (32760, 512, 12, 128),
    "14b-self": (32760, 32760, 40, 128), "14b-cross": (32760, 512, 40, 128),
}
TINY = {"tiny-self": (256, 256, 2, 64), "tiny-cross": (256, 16, 2, 64)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=None, help="tiny shapes (default without CUDA)")
    p.add_argument("--shapes", nargs="+", default=None, help=f"subset of {sorted(SHAPES)}")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 10 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--matmul-size", type=int, default=None, help="default 8192 CUDA, 512 CPU")
    p.add_argument("--math-max-gib", type=float, default=16.0, help="skip math above this score-matrix size")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--markdown", default=None, metavar="PATH")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    a.tiny = (not cuda) if a.tiny is None else a.tiny
    table = TINY if a.tiny else SHAPES
    a.shapes = a.shapes or list(table)
    unknown = [s for s in a.shapes if s not in table]
    if unknown:
        p.error(f"unknown shapes {unknown}; expected some of {sorted(table)}")
    a.table = table
    a.iters = a.iters or (10 if cuda else 3)
    a.matmul_size = a.matmul_size or (8192 if cuda else 512)
    return a


def _time(fn, iters: int, warmup: int, cuda: bool) -> float:
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(shape_name, shape, impl, a, device, dtype) -> dict:
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.layer import TorchCoreAttention, resolve_attention_impl

    sq, sk, n, d = shape
    row = {"shape": shape_name, "s_q": sq, "s_k": sk, "heads": n, "head_dim": d, "impl": impl}
    fwd_flops = 4.0 * sq * sk * n * d
    try:
        row["resolved"] = resolve_attention_impl(impl, device)[0]
        if row["resolved"] == "math" and sq * sk * n * 4 / 2 ** 30 > a.math_max_gib:
            raise MemoryError(f"math scores {sq}x{sk}x{n} fp32 exceed --math-max-gib {a.math_max_gib}")
        core = TorchCoreAttention(wan_config("tiny", attention_impl=impl))
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(sq, 1, n, d, device=device, dtype=dtype, generator=g, requires_grad=True)
        k, v = (torch.randn(sk, 1, n, d, device=device, dtype=dtype, generator=g, requires_grad=True)
                for _ in range(2))
        dout = torch.randn(sq, 1, n * d, device=device, dtype=dtype, generator=g)
        cuda = device.type == "cuda"
        with torch.no_grad():
            t_f = _time(lambda: core(q, k, v), a.iters, a.warmup, cuda)

        def fwd_bwd():
            torch.autograd.backward(core(q, k, v), dout)

        t_fb = _time(fwd_bwd, a.iters, a.warmup, cuda)
        row.update(fwd_ms=t_f * 1e3, fwd_bwd_ms=t_fb * 1e3, fwd_tflops=fwd_flops / t_f / 1e12,
                   bwd_tflops=2.5 * fwd_flops / max(t_fb - t_f, 1e-12) / 1e12,
                   fwd_bwd_tflops=3.5 * fwd_flops / t_fb / 1e12)
    except Exception as e:  # noqa: BLE001 -- a missing package or an OOM is this row's result
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def markdown(report) -> str:
    m = report["meta"]
    out = [f"# Attention kernels and ceilings on {m['device']}", ""]
    if m.get("complete") is False:
        out += [f"**Partial: {len(report['rows'])} of {m.get('rows_planned', '?')} rows** (written after each row).", ""]
    if m["device_kind"] == "cpu":
        out += ["**Measured on the CPU at tiny sizes**: a smoke run; says nothing about GPU speed.", ""]
    mm, cp = m["matmul"], m["copy"]
    out += [f"- matmul: {mm['tflops']:.4g} TFLOP/s ({mm['dtype']} {mm['n']}^3); copy: {cp['gb_per_s']:.4g} GB/s "
            "(read + write)", f"- {m['dtype']}, b = 1, median of {m['iters']} calls after {m['warmup']} warm-up; "
            "backward FLOPs = 2.5x forward (fused kernels' executed count)", "",
            "| shape | s_q x s_k, heads x dim | impl (resolved) | fwd ms | fwd TFLOP/s | fwd+bwd ms | bwd TFLOP/s | "
            "fwd+bwd TFLOP/s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        head = f"| {r['shape']} | {r['s_q']} x {r['s_k']}, {r['heads']} x {r['head_dim']} | {r['impl']} " \
               f"({r.get('resolved', '?')}) |"
        if "error" in r:
            out.append(f"{head} {r['error']} | | | | |")
        else:
            out.append(f"{head} {r['fwd_ms']:.3f} | {r['fwd_tflops']:.4g} | {r['fwd_bwd_ms']:.3f} | "
                       f"{r['bwd_tflops']:.4g} | {r['fwd_bwd_tflops']:.4g} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    a = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    print(f"attention benchmark on {device_name()}" + ("" if cuda else " (CPU smoke run)"), flush=True)
    matmul = measure_matmul_tflops(a.matmul_size)
    copy = measure_copy_bandwidth(1 << 28 if cuda else 1 << 20)
    print(f"matmul {matmul['tflops']:.4g} TFLOP/s, copy {copy['gb_per_s']:.4g} GB/s", flush=True)
    rows = []
    meta = {"device": device_name(), "device_kind": device.type, "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "iters": a.iters, "warmup": a.warmup, "matmul": matmul, "copy": copy,
            "rows_planned": len(a.shapes) * len(a.impls)}

    def write(complete):  # after every row, atomically: a run cut short keeps its rows
        report = {"meta": dict(meta, complete=complete), "rows": rows}
        md = markdown(report)
        for path, text in ((a.json, json.dumps(report, indent=1) + "\n"), (a.markdown, md)):
            if path:
                write_atomic(path, text)
        return report, md

    write(False)
    for name in a.shapes:
        for impl in a.impls:
            rows.append(bench(name, a.table[name], impl, a, device, dtype))
            r = rows[-1]
            print(f"{name} {impl}: " + (r["error"] if "error" in r else
                                        f"fwd {r['fwd_ms']:.3f} ms {r['fwd_tflops']:.4g} TFLOP/s, fwd+bwd "
                                        f"{r['fwd_bwd_ms']:.3f} ms {r['fwd_bwd_tflops']:.4g} TFLOP/s"), flush=True)
            write(False)
    report, md = write(True)
    print(md, flush=True)
    return report


if __name__ == "__main__":
    main()
