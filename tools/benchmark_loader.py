#!/usr/bin/env python
"""Samples/s of the training data loader on a Wan-sized synthetic dataset, next to what a GPU step consumes.

Writes ``--num-samples`` random samples of Wan 2.1 size (latents [21, 16, 60, 104], text [512, 4096], bf16:
8.4 MB per sample) with `write_latent_dataset` to a temporary directory, then reads one epoch in the
data-parallel sampler's order through `TrainingDataLoader` (what `Trainer` uses) for each worker count,
timing every iteration's ``next_iteration`` with nothing else running (the loader's ceiling, not a
training run). Also times the previous loader's access pattern (a whole-shard ``load_file`` per shard
change, random order) for comparison.

The files were just written, so reads come from the page cache unless ``--drop-cache`` asks the kernel
to drop them first (``posix_fadvise(DONTNEED)`` per shard before each run): that is the first-epoch
case on a local disk. Network file systems are not measured.

Consumption is an assumption, not a measurement: ``--step-seconds-per-sample`` (default 3.0: 1.3B
stage 1 on one H200 after the issue-10 fixes, docs/design/performance.md 2; ~5.8 before them) gives
1 / 3.0 = 0.33 samples/s per GPU, i.e. ``--gpus-per-node`` (8) x that per node. Each data-parallel rank
runs its own loader, so the loader's samples/s compares with the per-GPU figure.

Output: a markdown table on stdout; ``--output-dir DIR`` writes ``DIR/loader.json`` and ``DIR/loader.md`` (``--name`` to rename).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_anyflow.data.latent_dataset import DataParallelSampler, LatentDataset, write_latent_dataset  # noqa: E402
from megatron_anyflow.data.loader import TrainingDataLoader  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--latent-shape", type=int, nargs=4, default=[21, 16, 60, 104], metavar=("F", "C", "H", "W"))
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--text-dim", type=int, default=4096)
    p.add_argument("--samples-per-shard", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=8, help="one rank's samples per iteration (DP = 1)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--consumer-ms-per-sample", type=float, default=50.0,
                   help="second pass per worker count: sleep this long per sample after each iteration (a "
                        "stand-in for the GPU step) and report the time left waiting for data")
    p.add_argument("--repeats", type=int, default=3, help="runs per loader; the table shows medians")
    p.add_argument("--drop-cache", action="store_true", help="posix_fadvise(DONTNEED) the shards before each run")
    p.add_argument("--step-seconds-per-sample", type=float, default=3.0,
                   help="assumed GPU time per sample (1.3B stage 1 on one H200, docs/design/performance.md 2)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--data-dir", default=None, help="write the dataset here (kept) instead of a temporary dir")
    p.add_argument("--output-dir", default=None, help="write NAME.json and NAME.md here")
    p.add_argument("--name", default="loader", help="file name stem for --output-dir")
    args = p.parse_args(argv)
    if args.num_samples % args.global_batch_size or args.global_batch_size % args.micro_batch_size:
        p.error(f"--num-samples {args.num_samples} must be a multiple of --global-batch-size "
                f"{args.global_batch_size}, itself a multiple of --micro-batch-size {args.micro_batch_size}")
    return args


def write_synthetic(path: str, args) -> None:
    """``args.num_samples`` standard-normal samples in bf16, written shard by shard's worth of memory."""
    g = torch.Generator().manual_seed(0)
    n = args.num_samples
    latents = torch.randn((n, *args.latent_shape), generator=g, dtype=torch.bfloat16)
    text = torch.randn((n, args.text_len, args.text_dim), generator=g, dtype=torch.bfloat16)
    neg = torch.zeros(1, args.text_len, args.text_dim, dtype=torch.bfloat16)
    write_latent_dataset(path, latents, text, neg, {"note": "tools/benchmark_loader.py synthetic"},
                         samples_per_shard=args.samples_per_shard)


def drop_cache(ds: LatentDataset) -> None:
    for s in ds.shards:
        fd = os.open(os.path.join(ds.path, s["file"]), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _epoch(path: str, args, num_workers: int, consume_s: float) -> tuple:
    ds = LatentDataset(path)
    if args.drop_cache:
        drop_cache(ds)
    sampler = DataParallelSampler(len(ds), args.global_batch_size, args.micro_batch_size, 1, 0, seed=0)
    loader = TrainingDataLoader(sampler, num_workers, torch.bfloat16)
    iters = len(ds) // args.global_batch_size
    waits = []
    t0 = time.perf_counter()
    for k in range(iters):
        t = time.perf_counter()
        loader.next_iteration(ds, k * args.global_batch_size, iters - k)
        waits.append(time.perf_counter() - t)
        time.sleep(consume_s)
    total = time.perf_counter() - t0
    loader.close()
    return len(ds), iters, total, waits


def time_loader(path: str, args, num_workers: int) -> dict:
    """One epoch through `TrainingDataLoader` as fast as it reads (the first iteration includes the
    workers' start), then one with a consumer sleeping ``--consumer-ms-per-sample`` per sample after
    each iteration: the mean wait per later iteration is the data time a training step would see."""
    n, iters, total, times = _epoch(path, args, num_workers, 0.0)
    steady = sum(times[1:])
    consume = args.consumer_ms_per_sample / 1000 * args.global_batch_size
    _, _, _, waits = _epoch(path, args, num_workers, consume)
    return {"num_workers": num_workers, "samples": n, "seconds": total,
            "samples_per_s": n / total,
            "steady_samples_per_s": (n - args.global_batch_size) / steady if iters > 1 and steady > 0 else None,
            "first_iteration_s": times[0], "consumer_s_per_iteration": consume,
            "wait_s_per_iteration": sum(waits[1:]) / max(iters - 1, 1)}


def time_whole_shard_loads(path: str, args) -> dict:
    """The previous loader's access pattern: whole-shard ``load_file`` whenever the sampled shard changes."""
    from safetensors.torch import load_file

    ds = LatentDataset(path)
    if args.drop_cache:
        drop_cache(ds)
    sampler = DataParallelSampler(len(ds), args.global_batch_size, args.micro_batch_size, 1, 0, seed=0)
    cache, loads = (-1, None), 0
    t0 = time.perf_counter()
    for pos in range(0, len(ds), args.global_batch_size):
        for idx in sampler.micro_batches(pos):
            xs = []
            for i in idx:
                k = max(j for j, o in enumerate(ds.offsets[:-1]) if o <= i)
                if cache[0] != k:
                    cache, loads = (k, load_file(os.path.join(path, ds.shards[k]["file"]))), loads + 1
                xs.append((cache[1]["latents"][i - ds.offsets[k]], cache[1]["text"][i - ds.offsets[k]]))
            torch.stack([a for a, _ in xs]), torch.stack([b for _, b in xs])
    total = time.perf_counter() - t0
    return {"num_workers": "whole-shard load_file (previous loader)", "samples": len(ds), "seconds": total,
            "samples_per_s": len(ds) / total, "steady_samples_per_s": None, "first_iteration_s": None,
            "shard_loads": loads}


def median_row(runs: list) -> dict:
    """The runs' medians of every numeric field (the machine is shared: single runs vary 2x); ``runs``
    keeps the individual samples/s."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, float):
            out[k] = statistics.median(r[k] for r in runs)
    out["runs_samples_per_s"] = [r["samples_per_s"] for r in runs]
    return out


def _safetensors_version() -> str:
    import safetensors

    return f"safetensors {safetensors.__version__}"


def markdown(result: dict) -> str:
    a = result["assumption"]
    lines = [f"# Data loader throughput ({result['machine']}, {result['date']})", "",
             f"Command: `{result['command']}`", "",
             f"Dataset: {result['num_samples']} Wan-sized samples (latents {result['latent_shape']}, text "
             f"{result['text_shape']}, bf16, {result['mb_per_sample']:.1f} MB/sample, {result['samples_per_shard']} "
             f"per shard), medians of {result['repeats']} runs of one epoch each in the sampler's order, micro-batch {result['micro_batch_size']}, "
             f"{result['global_batch_size']} samples per iteration; page cache "
             f"{'dropped before each run' if result['drop_cache'] else 'warm (files just written)'}.", "",
             "| loader | samples/s (epoch) | samples/s (after 1st iteration) | MB/s | 1st iteration (s) | "
             "wait per iteration behind a consumer (ms) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        steady = f"{r['steady_samples_per_s']:.1f}" if r["steady_samples_per_s"] else "-"
        first = f"{r['first_iteration_s']:.2f}" if r["first_iteration_s"] is not None else "-"
        name = r["num_workers"] if isinstance(r["num_workers"], str) else f"TrainingDataLoader, {r['num_workers']} workers"
        wait = f"{1000 * r['wait_s_per_iteration']:.0f}" if "wait_s_per_iteration" in r else "-"
        lines.append(f"| {name} | {r['samples_per_s']:.1f} | {steady} | "
                     f"{r['samples_per_s'] * result['mb_per_sample']:.0f} | {first} | {wait} |")
    old = next(r for r in result["rows"] if "shard_loads" in r)
    lines += ["", f"Consumer: a sleep of {result['consumer_ms_per_sample']:g} ms per sample after each iteration "
              "(a stand-in for the GPU step; the main thread is idle in it, as it mostly is while CUDA runs). "
              "The wait is the data time such a step would see: with workers the next iteration is read "
              "during it.", "",
              f"The previous loader's row re-opened a shard {old['shard_loads']} times for {old['samples']} samples "
              "with whole-shard `load_file`. With the safetensors installed here (" + result["safetensors"] + ") "
              "`load_file` memory-maps the file, so that only costs the pages of the samples used; older "
              "safetensors versions read the whole shard (4.3 GB for 256 float32 samples) on every re-open. "
              "Either way it ran on the training thread, in float32 for datasets written before bf16 storage.",
              "", f"GPU consumption (assumed, not measured): {a['seconds_per_sample']} s per sample per GPU "
              f"({a['source']}) = {a['per_gpu_samples_per_s']:.2f} samples/s per GPU, "
              f"{a['per_node_samples_per_s']:.2f} samples/s per node of {a['gpus_per_node']} GPUs "
              f"({a['per_node_samples_per_s'] * result['mb_per_sample']:.0f} MB/s). Each DP rank has its own loader: "
              f"compare the rows with the per-GPU figure.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = None
    path = args.data_dir
    if path is None:
        tmp = tempfile.mkdtemp(prefix="anyflow_loader_bench_")
        path = os.path.join(tmp, "data")
    try:
        if not os.path.isfile(os.path.join(path, "index.json")):
            t = time.perf_counter()
            write_synthetic(path, args)
            print(f"wrote {args.num_samples} samples to {path} in {time.perf_counter() - t:.1f}s", flush=True)
        rows = [median_row([time_whole_shard_loads(path, args) for _ in range(args.repeats)])]
        for w in args.workers:
            rows.append(median_row([time_loader(path, args, w) for _ in range(args.repeats)]))
            print(f"num_workers {w}: {rows[-1]['samples_per_s']:.1f} samples/s", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    f, c, h, w = args.latent_shape
    mb = (f * c * h * w + args.text_len * args.text_dim) * 2 / 1e6
    per_gpu = 1.0 / args.step_seconds_per_sample
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
                   f"torch {torch.__version__}, shared with other jobs (load average {os.getloadavg()[0]:.1f})",
        "command": "python tools/benchmark_loader.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "num_samples": args.num_samples, "latent_shape": list(args.latent_shape),
        "text_shape": [args.text_len, args.text_dim], "mb_per_sample": mb,
        "samples_per_shard": args.samples_per_shard, "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size, "drop_cache": args.drop_cache, "rows": rows,
        "consumer_ms_per_sample": args.consumer_ms_per_sample, "repeats": args.repeats, "safetensors": _safetensors_version(),
        "assumption": {"seconds_per_sample": args.step_seconds_per_sample,
                       "source": "1.3B stage 1 on one H200 after the issue-10 fixes, docs/design/performance.md 2 estimate",
                       "per_gpu_samples_per_s": per_gpu, "gpus_per_node": args.gpus_per_node,
                       "per_node_samples_per_s": per_gpu * args.gpus_per_node},
    }
    md = markdown(result)
    print(md)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, args.name + ".json"), "w") as fh:
            json.dump(result, fh, indent=1)
        with open(os.path.join(args.output_dir, args.name + ".md"), "w") as fh:
            fh.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
