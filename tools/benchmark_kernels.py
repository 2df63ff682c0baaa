#!/usr/bin/env python
"""Benchmark the AnyFlow stage-1 loss kernels against their PyTorch references.

For each kernel (``flow_map_loss``: paper eq. 4, 6 / Alg. 1; ``adaptive_reweight``: eq. 7) and each pass
(forward, forward+backward) this times the Triton kernel, the eager PyTorch reference and
``torch.compile`` of the reference, and reports the median time, the achieved bandwidth (the bytes the
kernel must move: flow_map_loss reads 5 latents forward, and 5 latents + writes 1 gradient backward),
the bandwidth floor (those bytes at the measured device-copy bandwidth of ``empty_like(x).copy_(x)``),
the ratio to that floor and the speedup over ``torch.compile``.

Default shape: one 14B-sized sample of latents, b=1, F=21, C=16, H=60, W=104, bf16, on CUDA (timed with
CUDA events). Without CUDA it runs on CPU at a small size (F=3, H=W=16), times with
``time.perf_counter``, runs the Triton path through the interpreter only when ``TRITON_INTERPRET=1`` is
set (skipped otherwise) and skips ``torch.compile`` unless ``--compile`` is given (CPU compilation takes
longer than the whole run should).

Output: a markdown table on stdout; ``--json PATH`` / ``--markdown PATH`` also write the rows, rewritten
after every row (temporary file + ``os.replace``), so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import megatron_anyflow_kernels as K  # installed with `pip install -e .` (the kernels/ folder)

try:
    from megatron_anyflow.measure.report import write_atomic
except ImportError:  # the kernels alone, without the project on the path
    def write_atomic(path, text):
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=1, help="samples b")
    p.add_argument("--frames", type=int, default=None, help="latent frames F (default 21 on CUDA, 3 on CPU)")
    p.add_argument("--channels", type=int, default=16, help="latent channels C")
    p.add_argument("--height", type=int, default=None, help="latent height H (default 60 on CUDA, 16 on CPU)")
    p.add_argument("--width", type=int, default=None, help="latent width W (default 104 on CUDA, 16 on CPU)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="latent dtype")
    p.add_argument("--reweight-batch", type=int, default=16, help="per-sample losses B for adaptive_reweight")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 200 on CUDA, 10 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="time torch.compile of the reference (default: on for CUDA, off for CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--kernels", default="flow_map_loss,adaptive_reweight",
                   help="comma-separated subset of flow_map_loss,adaptive_reweight")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON (after every row)")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the notes and table (after every row)")
    return p.parse_args(argv)


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, iters, warmup):
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
            for s, e in zip(starts, ends):
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        else:
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth_gbs(device, timer, iters, warmup):
    """Measured device-copy bandwidth, bytes read + written per second (GB/s)."""
    nbytes = (512 << 20) if device.type == "cuda" else (64 << 20)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    ms = timer.median_ms(lambda: torch.empty_like(x).copy_(x), max(iters // 4, 5), max(warmup, 1))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_flow_map_loss(args, device, dtype, timer, impls, emit=lambda row: None):
    B, F, C, H, W = args.batch, args.frames, args.channels, args.height, args.width
    gen = torch.Generator(device="cpu").manual_seed(0)
    lat = [torch.randn(B, F, C, H, W, generator=gen).to(device=device, dtype=dtype) for _ in range(5)]
    dt = (torch.rand(B, F, generator=gen) * 1000).to(device)
    fw = torch.ones(B, F)
    fw[:, 0] = 0.0  # an I2V condition frame
    fw = fw.to(device)
    sw = torch.rand(B, generator=gen).to(device)
    uc_grad = lat[0].clone().requires_grad_(True)
    n, es = lat[0].numel(), lat[0].element_size()
    small = B * F * 4 * 2 + B * 4 * 2
    passes = {"fwd": 5 * n * es + small, "fwd+bwd": 11 * n * es + 2 * small}
    rows = []
    for name, fn in impls.items():
        if fn is None:
            continue
        for pas, nbytes in passes.items():
            if pas == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        return fn(*lat, dt, fw, sw)
            else:
                def step(fn=fn):
                    loss = fn(uc_grad, *lat[1:], dt, fw, sw)
                    return torch.autograd.grad(loss.sum(), uc_grad)
            rows.append(dict(kernel="flow_map_loss", pass_=pas, impl=name, bytes=nbytes,
                             ms=timer.median_ms(step, args.iters, args.warmup)))
            emit(rows[-1])
    return rows


def bench_adaptive_reweight(args, device, timer, impls, emit=lambda row: None):
    B = args.reweight_batch
    gen = torch.Generator(device="cpu").manual_seed(1)
    loss = (torch.rand(B, generator=gen) + 0.01).to(device).requires_grad_(True)
    bnd = (torch.arange(B) < B // 2).to(device)
    bm = torch.tensor(0.5, device=device)
    passes = {"fwd": B * 5 + 4 + B * 4 + 4, "fwd+bwd": B * 5 + 4 + B * 4 + 4 + B * 8 + 4}
    rows = []
    for name, fn in impls.items():
        if fn is None:
            continue
        for pas, nbytes in passes.items():
            if pas == "fwd":
                def step(fn=fn):
                    with torch.no_grad():
                        return fn(loss, bnd, bm)
            else:
                def step(fn=fn):
                    out, _ = fn(loss, bnd, bm)
                    return torch.autograd.grad(out, loss)
            rows.append(dict(kernel="adaptive_reweight", pass_=pas, impl=name, bytes=nbytes,
                             ms=timer.median_ms(step, args.iters, args.warmup)))
            emit(rows[-1])
    return rows


def finish_rows(rows, copy_gbs):
    compiled = {(r["kernel"], r["pass_"]): r["ms"] for r in rows if r["impl"] == "torch.compile"}
    for r in rows:
        r["gbs"] = r["bytes"] / (r["ms"] * 1e-3) / 1e9
        r["floor_ms"] = r["bytes"] / (copy_gbs * 1e9) * 1e3
        r["x_floor"] = r["ms"] / r["floor_ms"]
        c = compiled.get((r["kernel"], r["pass_"]))
        r["speedup_vs_compile"] = (c / r["ms"]) if c is not None else None
    return rows


def markdown(rows):
    out = ["| kernel | pass | impl | median ms | GB/s | floor ms | x floor | speedup vs compile |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        sp = f"{r['speedup_vs_compile']:.2f}" if r["speedup_vs_compile"] is not None else "n/a"
        out.append(f"| {r['kernel']} | {r['pass_']} | {r['impl']} | {r['ms']:.4f} | {r['gbs']:.3g} | "
                   f"{r['floor_ms']:.4f} | {r['x_floor']:.3g} | {sp} |")
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit("--device cuda requested but CUDA is not available")
    on_cuda = device.type == "cuda"
    args.frames = args.frames or (21 if on_cuda else 3)
    args.height = args.height or (60 if on_cuda else 16)
    args.width = args.width or (104 if on_cuda else 16)
    args.iters = args.iters or (200 if on_cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (20 if on_cuda else 2)
    if args.compile is None:
        args.compile = on_cuda
    dtype = _DTYPES[args.dtype]
    kernels = {k.strip() for k in args.kernels.split(",") if k.strip()}
    unknown = kernels - {"flow_map_loss", "adaptive_reweight"}
    if unknown:
        sys.exit(f"unknown --kernels entries: {sorted(unknown)}")

    notes = []
    if on_cuda:
        notes.append(f"measured on CUDA: {torch.cuda.get_device_name(device)}, timed with CUDA events")
    else:
        notes.append("measured on CPU (no CUDA): small shape, time.perf_counter; NOT representative of GPU speed")
    run_triton = K.HAS_TRITON and (on_cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if not K.HAS_TRITON:
        notes.append("triton is not installed: the Triton rows are skipped")
    elif not run_triton:
        notes.append("Triton rows skipped: no CUDA and TRITON_INTERPRET=1 is not set "
                     "(set it to time the Triton interpreter, which says nothing about GPU speed)")
    elif not on_cuda:
        notes.append("Triton rows run through the Triton interpreter (TRITON_INTERPRET=1)")
    if not args.compile:
        notes.append("torch.compile rows skipped (pass --compile to time them)")
    print("\n".join(f"**{n}**" if i == 0 else f"- {n}" for i, n in enumerate(notes)))
    sys.stdout.flush()

    timer = Timer(device)
    copy_gbs = copy_bandwidth_gbs(device, timer, args.iters, args.warmup)
    shape = (args.batch, args.frames, args.channels, args.height, args.width)
    print(f"- latents {list(shape)} {args.dtype}; adaptive_reweight B={args.reweight_batch}; "
          f"device copy bandwidth {copy_gbs:.1f} GB/s (read + write); median of {args.iters} iterations\n")

    def triton_fn(fn):
        return (lambda *a: fn(*a, backend="triton")) if run_triton else None

    meta = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if on_cuda else "cpu",
                shape=list(shape), dtype=args.dtype, reweight_batch=args.reweight_batch,
                copy_bandwidth_gbs=copy_gbs, iters=args.iters, notes=notes, compile=bool(args.compile))
    rows = []

    def write(complete):  # after every row, atomically: a run cut short keeps its rows
        done = finish_rows([dict(r) for r in rows], copy_gbs)
        if args.json:
            write_atomic(args.json, json.dumps(dict(meta=dict(meta, complete=complete), rows=[
                {("pass" if k == "pass_" else k): v for k, v in r.items()} for r in done]), indent=2) + "\n")
        if args.markdown:
            head = "\n".join(f"**{n}**" if i == 0 else f"- {n}" for i, n in enumerate(notes))
            part = "" if complete else f"\n\n**Partial: {len(rows)} rows so far** (written after each row)."
            write_atomic(args.markdown, f"# Stage-1 loss kernels\n\n{head}{part}\n\n{markdown(done)}\n")
        return done

    def emit(row):
        rows.append(row)
        write(False)

    write(False)
    if "flow_map_loss" in kernels:
        impls = {"triton": triton_fn(K.flow_map_loss), "torch eager": K.flow_map_loss_reference,
                 "torch.compile": torch.compile(K.flow_map_loss_reference) if args.compile else None}
        bench_flow_map_loss(args, device, dtype, timer, impls, emit)
    if "adaptive_reweight" in kernels:
        impls = {"triton": triton_fn(K.adaptive_reweight), "torch eager": K.adaptive_reweight_reference,
                 "torch.compile": torch.compile(K.adaptive_reweight_reference) if args.compile else None}
        bench_adaptive_reweight(args, device, timer, impls, emit)
    done = write(True)
    print(markdown(done))
    for path in (args.json, args.markdown):
        if path:
            print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
