#!/usr/bin/env python
"""Generation speed of an AnyFlow student: megatron_anyflow's sampler against diffusers' pipelines, same weights.

For each model kind (``bidirectional``: the any-step flow-map student; ``far``: AnyFlow-FAR, chunk by chunk
with the KV cache) and each step count N (NFE per video, per chunk for FAR), this times the **model time
of one video** -- text encoding and VAE excluded: the prompt embeddings and the noise are given, the
output is the final latents -- and reports, per row:

* **s/video** -- the median over ``--iters`` timed generations after ``--warmup`` untimed ones, each timed
  between device synchronisations (``torch.cuda.synchronize`` + ``time.perf_counter``).
* **model TFLOP/s** -- model FLOPs of one video over s/video, credited identically to both implementations
  (`measure.flops`): bidirectional ``N x forward_flops`` (one forward per step, no guidance pass: the
  students are guidance-distilled); FAR ``far_inference_flops`` (N steps per chunk against the KV cache,
  the prefills between chunks; block-sparse attention pairs). MFU against the measured matmul rate and,
  on a known GPU, the data-sheet bf16 peak (`benchmark.DATASHEET_BF16_TFLOPS`).
* **peak memory** -- CUDA ``max_memory_allocated`` / ``max_memory_reserved`` over the row, with only that
  implementation's weights on the device (the other one waits on the CPU); CPU: the increase of the
  host peak RSS (indicative only, as in ``tools/benchmark_throughput.py``).
* **rel. err vs diffusers** -- ``|ours - diffusers| / |diffusers|`` (Frobenius) of the final latents of the
  same noise and text at the same N: the timing compares equal work. In fp32 this is float32 rounding
  (< 1e-5, the bound of tests/test_pipeline_export.py); in bf16 both sides round differently. FAR:
  diffusers 0.42's generation step pads q, k, v with zeros to a multiple of 128 tokens and lets the zero
  keys into the softmax (docs/design/far.md 7.1; we keep the reference's exact attention), so the two
  agree to float32 rounding only where every chunk's tokens are a multiple of 128 (the CPU size); at 480p
  each FAR forward differs by ~3e-4 relative (the same work, a different softmax).

The two implementations, on the same random weights (`benchmark.diffusers_transformer`, converted with
`convert.hf_to_megatron`; bf16 keeps diffusers' ``_keep_in_fp32_modules`` in fp32 on both sides):

* ``megatron_anyflow``: ``anyflow.generation.sample_any_step`` -- what ``tools/generate.py`` runs -- on a
  `WanModel` with ``--attention-impl`` and, with ``--compile``, regional ``torch.compile`` per block.
* ``diffusers``: ``AnyFlowPipeline`` / ``AnyFlowFARPipeline`` (``FlowMapEulerDiscreteScheduler``, shift
  ``--shift``, ``guidance_scale=1``, ``output_type="latent"``, ``prompt_embeds`` and ``latents`` given, no
  text encoder or VAE), eager.

Sizes: ``--frames --height --width`` video (Wan VAE: latents ``((frames - 1) / 4 + 1, height / 8, width / 8)``)
or ``--latent-shape F H W``. Defaults: on CUDA ``wan2.1-1.3b`` at 81 x 480 x 832 (21 x 60 x 104 latents,
32,760 tokens), text 512, bf16, N = 1 2 4 8, both model kinds; without CUDA a CPU smoke run at the
``tiny`` preset, latents 3 x 16 x 32 (FAR chunks (1, 1, 1); 128 tokens per frame, see below), text 8,
fp32, one thread. A 14B layer slice:
``--preset wan2.1-14b --num-layers 4`` (per-layer rates as the whole model's).

Rows run per model kind, then per N, ours followed at once by diffusers', so a run cut short keeps whole
comparisons. Output: progress on stdout, then the markdown table; ``--json`` / ``--markdown`` (default
``<output-dir>/generation_<date>_<device>.json/.md``), rewritten after every row (atomically;
``meta.complete`` false until the end).

Usage::

    python tools/benchmark_generation.py                                  # CPU smoke run / 1.3B on one GPU
    python tools/benchmark_generation.py --steps 1 4 --models bidirectional
    python tools/benchmark_generation.py --preset wan2.1-14b --num-layers 4 --compile
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

from megatron_anyflow.measure.device import PeakMemory, _sync, datasheet_peak_tflops, device_name, device_slug, say
from megatron_anyflow.measure.harness import diffusers_transformer
from megatron_anyflow.measure.report import fmt, pct, print_report, write_atomic
from megatron_anyflow.models.wan.config import ATTENTION_IMPLS

__all__ = ["parse_args", "main", "video_flops", "markdown"]
IMPLS = ("megatron_anyflow", "diffusers")
MODELS = ("bidirectional", "far")
#: fp32 limit of the final latents, ours vs diffusers: the two transformers agree per forward to ~1e-7
#: (float32 matmuls in another order); N steps of step size summing to 1 add N such errors, and the
#: FAR prefills re-encode the same inputs -- a small multiple of 1e-7; 1e-5 leaves 100x, far below a
#: real mismatch (a wrong time, shift or chunk convention moves the latents by > 1e-2).
FP32_TOL = 1e-5


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and fill the device-dependent defaults.

    Raises:
        SystemExit (argparse error): sizes that do not map onto whole latents / patches / compressed patches.
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=["tiny", "wan2.1-1.3b", "wan2.1-14b"],
                   help="model preset (default: wan2.1-1.3b on CUDA, tiny on CPU)")
    p.add_argument("--num-layers", type=int, default=None, help="a slice of the model (e.g. 14B with 4 layers)")
    p.add_argument("--frames", type=int, default=None, help="video frames (default 81)")
    p.add_argument("--height", type=int, default=None, help="video height in pixels (default 480)")
    p.add_argument("--width", type=int, default=None, help="video width in pixels (default 832)")
    p.add_argument("--latent-shape", type=int, nargs=3, default=None, metavar=("F", "H", "W"),
                   help="latent frames / height / width directly (default on CPU: 3 8 8)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default 512 on CUDA, 8 on CPU)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="step counts N (NFE per video / chunk)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--chunk-partition", type=int, nargs="+", default=None,
                   help="FAR: latent frames per chunk (default: the recipe's (1, 3, 3, ...) cut to the latent frames)")
    p.add_argument("--shift", type=float, default=5.0, help="time shift of the grid (both implementations)")
    p.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="bf16 weights (default on CUDA)")
    p.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 (default on CPU)")
    p.add_argument("--attention-impl", choices=list(ATTENTION_IMPLS), default="auto",
                   help="our attention kernel (diffusers keeps its own)")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile each transformer block")
    p.add_argument("--no-reference", action="store_true", help="skip the diffusers rows")
    p.add_argument("--iters", type=int, default=None, help="timed videos per row (default 3 CUDA, 1 CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed videos first (compile / autotune / caches)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None, help="CPU only: torch threads (default 1)")
    p.add_argument("--matmul-size", type=int, default=None, help="matmul n for MFU (default 8192 CUDA, 256 CPU)")
    p.add_argument("--peak-tflops", type=float, default=None, help="data-sheet bf16 peak (default: from the name)")
    p.add_argument("--output-dir", default="benchmarks/results")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--markdown", default=None, metavar="PATH")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    a.device_kind = "cuda" if cuda else "cpu"
    a.preset = a.preset or ("wan2.1-1.3b" if cuda else "tiny")
    if a.bf16 is None:
        a.bf16 = cuda
    for name, gpu, cpu in (("text_len", 512, 8), ("iters", 3, 1), ("matmul_size", 8192, 256)):
        if getattr(a, name) is None:
            setattr(a, name, gpu if cuda else cpu)
    if a.iters < 1 or a.warmup < 0 or a.text_len < 1 or not a.steps or min(a.steps) < 1:
        p.error("--iters >= 1, --warmup >= 0, --text-len >= 1 and every --steps N >= 1")
    video_given = any(v is not None for v in (a.frames, a.height, a.width))
    if a.latent_shape is None and not cuda and not video_given:
        a.latent_shape = [3, 16, 32]
    if a.latent_shape is not None:
        a.latent = tuple(int(v) for v in a.latent_shape)
    else:
        a.frames, a.height, a.width = a.frames or 81, a.height or 480, a.width or 832
        if (a.frames - 1) % 4 or a.height % 8 or a.width % 8:
            p.error(f"--frames must be 4k + 1 and --height/--width multiples of 8; got {a.frames}x{a.height}x{a.width}")
        a.latent = ((a.frames - 1) // 4 + 1, a.height // 8, a.width // 8)
    F, H, W = a.latent
    if min(a.latent) < 1 or H % 2 or W % 2:
        p.error(f"latent size {a.latent}: F >= 1 and H, W even (patches 1 x 2 x 2)")
    if "far" in a.models:
        if H % 4 or W % 4:
            p.error(f"--models far: latent {H} x {W} must divide by the compressed patch (4 x 4)")
        from megatron_anyflow.measure.harness import far_chunk_partition

        if a.chunk_partition is None and not cuda and a.latent_shape == [3, 16, 32]:
            a.chunk_partition = [1, 1, 1]  # the CPU smoke size: three chunks, the last reads two from the cache
        a.cp = far_chunk_partition(a)
        if min(a.cp) < 1 or sum(a.cp) != F:
            p.error(f"--chunk-partition {list(a.cp)} must be positive and sum to the {F} latent frames")
    elif a.chunk_partition is not None:
        p.error("--chunk-partition applies to --models far")
    a.steps = list(dict.fromkeys(int(n) for n in a.steps))
    return a


def model_config(a, far: bool):
    """The `WanConfig` of the rows (our model's settings: dtype, attention kernel; FAR: the chunks)."""
    from megatron_anyflow.models.wan.config import wan_config

    extra = dict(far=True, chunk_partition=tuple(a.cp)) if far else {}
    return wan_config(a.preset, perform_initialization=False, bf16=a.bf16, attention_impl=a.attention_impl,
                      **({"num_layers": a.num_layers} if a.num_layers else {}), **extra)


def video_flops(cfg, a, N: int, far: bool) -> float:
    """Model FLOPs of one video at N steps (module docstring; `measure.flops`)."""
    from megatron_anyflow.measure.flops import far_inference_flops, forward_flops

    F, H, W = a.latent
    if far:
        return far_inference_flops(cfg, H, W, N, a.text_len, chunk_partition=a.cp)
    return N * forward_flops(cfg, F, H, W, a.text_len)


class Pair:
    """One model kind's two implementations on the same weights; only the one being timed on the device."""

    def __init__(self, a, far: bool, device):
        from diffusers import AnyFlowFARPipeline, AnyFlowPipeline, FlowMapEulerDiscreteScheduler

        from megatron_anyflow.models.wan.convert import hf_to_megatron, load_full_state_dict
        from megatron_anyflow.models.wan.model import WanModel

        self.a, self.far, self.device = a, far, device
        self.cfg = model_config(a, far)
        dtype = torch.bfloat16 if a.bf16 else torch.float32
        hf = diffusers_transformer(self.cfg, device, dtype, seed=a.seed)
        ours = WanModel(self.cfg)
        load_full_state_dict(ours, hf_to_megatron(hf.state_dict(), self.cfg.head_dim), source="diffusers")
        self.ours = ours.eval().requires_grad_(False)
        if a.compile:
            self.ours.compile_blocks()
        cls = AnyFlowFARPipeline if far else AnyFlowPipeline
        self.pipe = cls(tokenizer=None, text_encoder=None, transformer=hf.requires_grad_(False), vae=None,
                        scheduler=FlowMapEulerDiscreteScheduler(shift=a.shift))
        self.pipe.set_progress_bar_config(disable=True)
        self.hf = hf.to("cpu")
        g = torch.Generator().manual_seed(a.seed + 1)
        F, H, W = a.latent
        # one video: noise [1, F, C, H, W] at t = 1, prompt embeddings [1, L, d] (random: text encoding is excluded)
        self.noise = torch.randn(1, F, self.cfg.in_channels, H, W, generator=g)
        self.text = torch.randn(1, a.text_len, self.cfg.text_dim, generator=g)
        self.latents: Dict = {}

    def place(self, impl: str) -> None:
        """The timed implementation's weights on the device, the other's on the CPU."""
        on, off = (self.ours, self.hf) if impl == "megatron_anyflow" else (self.hf, self.ours)
        off.to("cpu")
        on.to(self.device)

    def generate(self, impl: str, N: int) -> torch.Tensor:
        """The final latents ``[1, F, C, H, W]`` (float32, on the device) of one video at N steps."""
        a, dev = self.a, self.device
        noise, text = self.noise.to(dev), self.text.to(dev)
        if impl == "megatron_anyflow":
            from megatron_anyflow.anyflow.generation import sample_any_step

            return sample_any_step(self.ours, noise, text.to(self.ours.dtype), [N], shift=a.shift, progress=False,
                                   chunk_partition=a.cp if self.far else None)[N]
        F, H, W = a.latent
        kw = dict(chunk_partition=list(a.cp)) if self.far else {}
        with torch.no_grad():
            out = self.pipe(prompt_embeds=text.to(self.hf.dtype), latents=noise.permute(0, 2, 1, 3, 4),
                            num_inference_steps=N, guidance_scale=1.0, height=8 * H, width=8 * W,
                            num_frames=4 * (F - 1) + 1, output_type="latent", return_dict=False, **kw)[0]
        return out.permute(0, 2, 1, 3, 4).float()  # diffusers' [b, C, F, H, W] -> ours

    def close(self):
        del self.ours, self.hf, self.pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def measure(a, pair: Pair, impl: str, N: int, matmul: Dict) -> Dict:
    """Warm up, time ``a.iters`` videos, and fill one result row."""
    model = "far" if pair.far else "bidirectional"
    label = f"{model} N={N} [{impl}]"
    row = {"model": model, "steps": N, "implementation": impl}
    try:
        pair.place(impl)
        mem = PeakMemory()
        mem.start()
        for _ in range(a.warmup):
            pair.generate(impl, N)
        _sync()
        times = []
        for _ in range(a.iters):
            _sync()
            t0 = time.perf_counter()
            x0 = pair.generate(impl, N)
            _sync()
            times.append(time.perf_counter() - t0)
        peaks = mem.peaks_gib()
    except Exception as e:  # noqa: BLE001 -- an OOM or an unsupported size ends this row, not the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        say(f"  {label}: FAILED: {row['error']}")
        return row
    pair.latents[(impl, N)] = x0.detach().float().cpu()
    from megatron_anyflow.measure.flops import mfu

    s = statistics.median(times)
    flops = video_flops(pair.cfg, a, N, pair.far)
    peak = a.datasheet["tflops"]
    tflops = flops / s / 1e12
    row.update({"s_per_video": s, "times_s": times, "model_flops_per_video": flops, "model_tflops_per_s": tflops,
                "mfu": mfu(tflops, matmul["tflops"]), "mfu_datasheet": mfu(tflops, peak) if peak else None,
                "peak_memory_gib": peaks["allocated"], "peak_reserved_gib": peaks["reserved"],
                "peak_memory_kind": mem.kind, "output_finite": bool(torch.isfinite(x0).all())})
    ref = pair.latents.get(("diffusers", N))
    ours = pair.latents.get(("megatron_anyflow", N))
    if impl == "diffusers" and ours is not None:
        row["rel_err_vs_ours"] = float((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))
    say(f"  {label}: {s:.4g} s/video, {tflops:.4g} model TFLOP/s, peak {peaks['allocated']:.3f} GiB")
    return row


def _link(rows: List[Dict]) -> None:
    """Speed-up, memory ratio and output difference of each of our rows against diffusers' row (same model, N)."""
    ref = {(r["model"], r["steps"]): r for r in rows if r["implementation"] == "diffusers" and "error" not in r}
    for r in rows:
        d = ref.get((r["model"], r["steps"]))
        if r["implementation"] != "megatron_anyflow" or d is None or "error" in r:
            continue
        r["time_vs_diffusers"] = r["s_per_video"] / d["s_per_video"]
        r["speedup_vs_diffusers"] = d["s_per_video"] / r["s_per_video"]
        r["memory_vs_diffusers"] = (r["peak_memory_gib"] / d["peak_memory_gib"]
                                    if r["peak_memory_kind"].startswith("cuda") and d["peak_memory_gib"] > 0 else None)
        r["rel_err_vs_diffusers"] = d.get("rel_err_vs_ours")


def markdown(report: Dict) -> str:
    """The report as markdown: settings, one row per (model, N, implementation), the FLOP convention."""
    m, rows = report["meta"], report["rows"]
    cpu = m["device_kind"] == "cpu"
    F, H, W = m["latent_shape"]
    out = [f"# AnyFlow generation speed: {m['preset']} on {m['device']}", ""]
    if not m.get("complete"):
        out += [f"**Partial: {len(rows)} of {m['rows_planned']} rows** (written after each row).", ""]
    if cpu:
        out += ["**Measured on the CPU (no CUDA device)**: a smoke run at a tiny size with random weights; the "
                "numbers say nothing about GPU speed. Memory: the increase of the host peak RSS (indicative only).", ""]
    out += [f"- date {m['date']}, torch {m['torch']}, diffusers {m['diffusers']}",
            f"- `{m['preset']}` ({m['num_layers']} layers), latents {F} x {H} x {W} ({m['tokens']} tokens), text "
            f"{m['text_len']} tokens, one video, {'bf16' if m['bf16'] else 'fp32'}, shift {m['shift']:g}; ours: "
            f"attention {m['attention_impl']}, compile {m['compile']}"
            + (f"; FAR chunks {tuple(m['chunk_partition'])}" if m.get("chunk_partition") else ""),
            f"- model time per video (text encoding and VAE excluded), median of {m['iters']} after {m['warmup']} "
            f"warm-up; matmul rate {m['matmul']['tflops']:.4g} TFLOP/s ({m['matmul']['dtype']} {m['matmul']['n']}^3)",
            "", "| model | N | implementation | s/video | model TFLOP/s | MFU (matmul) | MFU (data sheet) | "
            f"{'peak host RSS increase (GiB)' if cpu else 'peak allocated / reserved (GiB)'} | time vs diffusers | "
            "rel. err vs diffusers |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        head = f"| {r['model']} | {r['steps']} | {r['implementation']} |"
        if "error" in r:
            out.append(f"{head} failed: {r['error']} | | | | | | |")
            continue
        mem = f"{r['peak_memory_gib']:.3f}" + (f" / {r['peak_reserved_gib']:.3f}" if r.get("peak_reserved_gib")
                                                 is not None else "")
        out.append(f"{head} {r['s_per_video']:.4g} | {r['model_tflops_per_s']:.4g} | {pct(r['mfu'])} | "
                   f"{pct(r.get('mfu_datasheet'))} | {mem} | {fmt(r.get('time_vs_diffusers'), '.2f')} | "
                   f"{fmt(r.get('rel_err_vs_diffusers'), '.2e')} |")
    out += ["", "Model FLOPs per video (measure/flops.py), credited identically to both implementations: "
            "bidirectional N x one forward (no guidance pass); FAR `far_inference_flops` (N steps per chunk against "
            "the KV cache, block-sparse attention pairs, plus the prefills between chunks). time vs diffusers = "
            "our s/video / diffusers' (< 1: faster). rel. err: |ours - diffusers| / |diffusers| of the final "
            f"latents (fp32: float32 rounding, limit {FP32_TOL:g}; FAR only where every chunk's tokens are a "
            "multiple of 128: diffusers' generation step lets zero-padded keys into the softmax, docs/design/far.md "
            "7.1).", ""]
    return "\n".join(out)


def main(argv=None) -> Dict:
    a = parse_args(argv)
    cuda = a.device_kind == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(a.threads or 1)
    for msg in (".*Transformer Engine and Apex are not installed.*", ".*flex_attention called without torch.compile.*"):
        warnings.filterwarnings("ignore", message=msg)
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.measure.device import measure_matmul_tflops
    from megatron_anyflow.measure.harness import arch_config
    from megatron_anyflow.measure.flops import tokens

    if not cuda:
        enable_megatron_cpu_compat()
    initialize_parallel(1, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    date = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    cfg = arch_config(a.preset, a.num_layers)
    say(f"AnyFlow generation benchmark on {device_name()}")
    if not cuda:
        say("*** NO CUDA: measuring on the CPU (tiny size): a smoke run, not a GPU result ***")
    matmul = measure_matmul_tflops(a.matmul_size)
    a.datasheet = (datasheet_peak_tflops(device_name(), a.peak_tflops) if cuda or a.peak_tflops
                   else {"tflops": None, "source": "CPU: no data-sheet peak"})
    import diffusers

    impls = ["megatron_anyflow"] + ([] if a.no_reference else ["diffusers"])
    meta = {"date": date, "device": device_name(), "device_kind": a.device_kind, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "preset": a.preset, "num_layers": cfg.num_layers,
            "latent_shape": list(a.latent), "tokens": tokens(cfg, *a.latent), "text_len": a.text_len,
            "bf16": a.bf16, "shift": a.shift, "attention_impl": a.attention_impl, "compile": a.compile,
            "steps": a.steps, "models": a.models, "implementations": impls,
            "chunk_partition": list(a.cp) if "far" in a.models else None, "iters": a.iters, "warmup": a.warmup,
            "matmul": matmul, "datasheet": a.datasheet, "fp32_tolerance": FP32_TOL,
            "rows_planned": len(a.models) * len(a.steps) * len(impls),
            "command": " ".join([os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:]))}
    stem = os.path.join(a.output_dir, f"generation_{date}_{device_slug()}")
    jpath, mpath = a.json or stem + ".json", a.markdown or stem + ".md"
    rows: List[Dict] = []

    def write(complete: bool) -> Dict:
        import json

        _link(rows)
        report = {"meta": dict(meta, complete=complete), "rows": rows}
        write_atomic(jpath, json.dumps(report, indent=1, default=float) + "\n")
        write_atomic(mpath, markdown(report))
        return report

    write(False)
    for model in a.models:
        say(f"{model}: building both implementations on the same random weights ...")
        try:
            pair = Pair(a, model == "far", device)
        except Exception as e:  # noqa: BLE001 -- e.g. out of memory: this model kind's rows fail, named
            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            say(f"  {model}: FAILED to build: {msg}")
            rows += [{"model": model, "steps": N, "implementation": i, "error": msg} for N in a.steps for i in impls]
            write(False)
            continue
        for N in a.steps:
            for impl in impls:
                rows.append(measure(a, pair, impl, N, matmul))
                write(False)
        pair.close()
    report = write(True)
    print_report(markdown(report), jpath, mpath)
    return report


if __name__ == "__main__":
    main()
