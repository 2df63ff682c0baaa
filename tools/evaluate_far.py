#!/usr/bin/env python
"""AnyFlow-FAR students against their teacher: test-time scaling and error by chunk (exposure bias).

    python tools/evaluate_far.py --teacher ckpt/teacher --student "stage 1=ckpt/far_stage1" \
        --student "stage 2=ckpt/far_stage2" --ema --data-path data/tiny --output results/far \
        --steps 1 2 4 8 --num-samples 8

From the same noise and prompts (taken from the dataset), every student generates chunk by chunk with its
KV cache (T2V, N flow-map steps per chunk), the teacher samples the whole video with its Euler ODE, and all
are compared with the teacher's ``--reference-steps``-step ODE samples. Writes ``scaling.json`` /
``scaling.md`` / ``scaling.png`` (quality vs N), ``per_chunk.json`` / ``per_chunk.md`` / ``per_chunk.png``
(error of each chunk's frames at ``--chunk-steps`` N: a teacher-forced student drifts as its own history
accumulates, docs/design/far.md 2.3) and, with the pixel codec, ``samples.mp4`` / ``samples.png`` (labelled rows).
"""

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (bidirectional)")
    p.add_argument("--student", action="append", required=True, metavar="LABEL=CHECKPOINT",
                   help="a FAR student (its 'generator' adapter); repeat for several (e.g. stage 1 and stage 2)")
    p.add_argument("--ema", action="store_true", help="use the students' EMA weights")
    p.add_argument("--data-path", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--chunk-steps", type=int, nargs="+", default=None,
                   help="N of the per-chunk table (default: every --steps value)")
    p.add_argument("--reference-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0, help="teacher CFG scale")
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--video-steps", type=int, nargs="+", default=[1, 4], help="N shown in the MP4 / PNG")
    p.add_argument("--video-seconds", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    students = {}
    for spec in args.student:
        if "=" not in spec:
            p.error(f"--student {spec!r}: expected LABEL=CHECKPOINT (e.g. 'stage 1=ckpt/far_stage1')")
        label, path = spec.split("=", 1)
        if not label or label in students or label == "teacher":
            p.error(f"--student {spec!r}: labels must be non-empty, unique and not 'teacher'")
        students[label] = path
    args.students = students
    return args


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from megatron_anyflow.anyflow.evaluation import (dataset_captions, evaluate_causal, write_contact_sheet,
                                                     write_labelled_video, write_per_chunk_report, write_report)
    from megatron_anyflow.data.latent_dataset import LatentDataset
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from evaluate_anyflow import evaluation_inputs

    enable_megatron_cpu_compat()
    initialize_parallel(1)
    t0 = time.time()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    log = lambda s: print(f"[{time.time() - t0:6.1f}s] {s}", flush=True)  # noqa: E731
    teacher = load_for_inference(args.teacher).to(device)
    students, cp = {}, None
    for label, path in args.students.items():
        m = load_for_inference(path, adapter="generator", ema=args.ema).to(device)
        if not m.config.far:
            print(f"error: --student {label}={path} is not an AnyFlow-FAR checkpoint (trained with --model far)",
                  file=sys.stderr)
            return 2
        if cp is not None and tuple(m.config.chunk_partition) != cp:
            print(f"error: --student {label} has chunk_partition {list(m.config.chunk_partition)}; the others "
                  f"{list(cp)}", file=sys.stderr)
            return 2
        cp = tuple(m.config.chunk_partition)
        students[label] = m
    ds = LatentDataset(args.data_path)
    if ds.latent_shape[0] != sum(cp):
        print(f"error: the students' chunk_partition {list(cp)} covers {sum(cp)} latent frames; {args.data_path} has "
              f"{ds.latent_shape[0]}", file=sys.stderr)
        return 2
    idx, text, neg, noise, decode = evaluation_inputs(ds, args.num_samples, args.seed, device)
    result, per_chunk, samples = evaluate_causal(
        students, teacher, noise, text, neg, args.steps, cp, args.reference_steps, args.guidance, args.shift,
        decode=decode, keep_samples=args.video_steps, progress=log)
    chunk_steps = args.chunk_steps or args.steps
    per_chunk = {m: {k: v for k, v in d.items() if k in chunk_steps} for m, d in per_chunk.items()}
    paths = write_report(result, args.output, title="AnyFlow-FAR test-time scaling")
    paths.update(write_per_chunk_report(per_chunk, cp, args.output))
    print(result.markdown(), flush=True)
    print(open(paths["per_chunk_markdown"]).read(), flush=True)
    if decode is not None:
        cfg = "no CFG" if args.guidance == 1.0 else f"CFG {args.guidance:g}"
        rows = {f"teacher {args.reference_steps} steps (reference, {cfg})": decode(samples[f"teacher-{args.reference_steps}"])}
        for N in args.video_steps:
            s = "step" if N == 1 else "steps"
            for name in [*students, "teacher"]:
                if f"{name}-{N}" in samples:
                    label = f"teacher {N} {s} ({cfg})" if name == "teacher" else f"FAR {name}, {N} {s}/chunk"
                    rows[label] = decode(samples[f"{name}-{N}"])
        captions = dataset_captions(ds.index, idx)
        fps = int(round(ds.index.get("video", {}).get("fps", 8)))
        title = "AnyFlow-FAR students vs teacher, same noise and prompts"
        paths["video"] = write_labelled_video(rows, os.path.join(args.output, "samples.mp4"), captions, title=title,
                                              fps=fps, min_seconds=args.video_seconds)
        paths["contact_sheet"] = write_contact_sheet(rows, os.path.join(args.output, "samples.png"), captions,
                                                     title=title + " (rows: method and sampling steps)")
    with open(os.path.join(args.output, "outputs.json"), "w") as f:
        json.dump(paths, f, indent=1)
    log(f"wrote {', '.join(str(v) for v in paths.values())}")
    return 0


if __name__ == "__main__":
    from megatron_anyflow.cli import main_guard

    main_guard(main)  # a user error: one line, exit 2 (megatron_anyflow/cli.py)
