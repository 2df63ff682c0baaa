#!/usr/bin/env python
"""Per-GPU memory plan (computed, not measured) for AnyFlow stage 1 and stage 2 on Wan2.1 1.3B / 14B and
Wan2.2 TI2V-5B.

The command line of the memory model in `megatron_anyflow.measure.memory` (what is counted and how:
its docstring).

    python tools/memory_plan.py                        # headline: 14B and 1.3B on 8 x 80 GB and 1 x 141 GB
    python tools/memory_plan.py --preset wan2.1-14b --stage 2 --tp 8 --cp 1 --dp 1
    python tools/memory_plan.py --json                 # the same as JSON on stdout
    python tools/memory_plan.py --model far --preset wan2.1-1.3b --stage 2 --tp 1 --cp 1  # AnyFlow-FAR
    python tools/memory_plan.py --preset wan2.1-1.3b --stage 1 --tp 1 --recompute selective \
        --recompute-policy save-attention --gpu-gib 139    # the save-attention policy on one H200
    python tools/memory_plan.py --preset wan2.2-ti2v-5b --stage 2 --tp 1 --cp 1 --dp 1 --frames 121 \
        --height 704 --width 1280 --gpu-gib 139            # Wan2.2 TI2V-5B (16x VAE) at 720p on one H200
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_anyflow.measure.memory import (H100_80GB_GIB, MODELS, PRESETS, RECOMPUTE_MODULES,  # noqa: E402
                                             RECOMPUTE_ORDER, RECOMPUTE_POLICIES, PlanConfig, format_layout,
                                             format_plan, format_rows, headline, plan, search_layouts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default=None, help="one preset (default: the headline report)")
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--tp", type=int, default=None, help="with --cp/--dp: plan this layout (else search)")
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the layout search")
    p.add_argument("--gpu-gib", type=float, default=None, help=f"usable GiB per GPU (80 GB card: {H100_80GB_GIB})")
    p.add_argument("--no-sp", action="store_true", help="no sequence parallelism")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--recompute", choices=RECOMPUTE_ORDER, default="full",
                   help="as the trainer's --recompute-granularity")
    p.add_argument("--recompute-policy", choices=RECOMPUTE_POLICIES, default="save-attention",
                   help="selective: keep self-attention's q/k/v/output/lse (save-attention, the trainer's default) "
                        "or checkpoint --recompute-modules (modules)")
    p.add_argument("--recompute-modules", nargs="+", choices=RECOMPUTE_MODULES, default=["core_attn"])
    p.add_argument("--grad-through", choices=("chain", "no_grad_prefix"), default="chain")
    p.add_argument("--overlap-critic", action="store_true",
                   help="stage 2: the critic's graph is alive with the next rollout (side stream)")
    p.add_argument("--lora-nograd-merge", choices=("cache", "per-call", "off"), default="cache",
                   help="as the trainer's option (cache: one merged copy of the wrapped weights per adapter)")
    p.add_argument("--fp8", nargs="?", const="hybrid", default=None, metavar="FORMAT",
                   help="FP8 run (te backend): no merged no-grad LoRA; activations as bf16 (not modelled)")
    p.add_argument("--compile", action="store_true",
                   help="per-block torch.compile: an ESTIMATE of the saved set (not measured)")
    p.add_argument("--lora-rank", type=int, default=256)
    p.add_argument("--teacher-adapter", action="store_true",
                   help="a frozen teacher adapter instead of a merged teacher")
    p.add_argument("--no-dist-opt", action="store_true", help="optimizer state not sharded over DP x CP")
    p.add_argument("--reserve-gib", type=float, default=5.0)
    p.add_argument("--model", choices=MODELS, default="bidirectional",
                   help="far: AnyFlow-FAR, the causal model (teacher-forcing tokens, KV caches; as the trainer's --model)")
    p.add_argument("--chunk-partition", type=int, nargs="+", default=None,
                   help="--model far: latent frames per chunk (default (1, 3, 3, 3, 3, 3, 3, 2), cut to the clip)")
    p.add_argument("--long-context-prob", type=float, default=0.5,
                   help="--model far: > 0 means stage 1 draws n up to every chunk (the longest graph counts)")
    p.add_argument("--far-bidirectional-prob", type=float, default=None,
                   help="--model far: the bidirectional branch's probability (trainer default: 0.1 stage 1, 0 stage 2)")
    p.add_argument("--experts", type=int, choices=(1, 2), default=1,
                   help="2: two-expert stage 2 (Wan2.2 A14B presets: both experts' bases and adapters on every GPU); "
                        "stage 1 trains one expert per run (plan it with 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    kw = dict(sp=not args.no_sp, micro_batch=args.micro_batch, grad_through=args.grad_through,
              overlap_critic=args.overlap_critic, recompute_policy=args.recompute_policy,
              recompute_modules=tuple(args.recompute_modules), lora_nograd_merge=args.lora_nograd_merge,
              fp8=bool(args.fp8), compile=args.compile, lora_rank=args.lora_rank,
              teacher_adapter=args.teacher_adapter, dist_opt=not args.no_dist_opt, reserve_gib=args.reserve_gib)
    kw.update(height=args.height, width=args.width, model=args.model, long_context_prob=args.long_context_prob,
              far_bidirectional_prob=args.far_bidirectional_prob, experts=args.experts,
              chunk_partition=tuple(args.chunk_partition) if args.chunk_partition else None)
    if args.chunk_partition and args.model != "far":
        print("error: --chunk-partition needs --model far", file=sys.stderr)
        return 2
    if args.preset is None:
        res = headline(kw, frames=args.frames)
        if args.json:
            print(json.dumps(res, indent=1, default=str))
            return 0
        print(f"Per-GPU memory plan, computed (not measured on a GPU): bf16, LoRA rank {args.lora_rank}, activations "
              f"per layer as tools/count_layer_ops.py measures them on CPU (eager"
              f"{', compile estimate' if args.compile else ''}), merged no-grad LoRA "
              f"{'off (FP8)' if args.fp8 else args.lora_nograd_merge}, stage 2 --grad-through {args.grad_through}"
              f"{' + overlapped critic' if args.overlap_critic else ''}; selective = --recompute-policy "
              f"{'modules ' + '+'.join(args.recompute_modules) if args.recompute_policy == 'modules' or args.fp8 else 'save-attention'}.\n")
        for key, r in res.items():
            print(f"=== {key}: best plan")
            print(format_plan(r["best"]))
            print("  least recomputation that fits, per " + ("layout:" if "8x80" in key else "clip length:"))
            print(format_rows(r["table"]))
            print()
        return 0
    gpu_gib = args.gpu_gib if args.gpu_gib is not None else H100_80GB_GIB
    kw.update(frames=args.frames)
    if args.tp is not None:
        try:
            res = plan(PlanConfig(preset=args.preset, stage=args.stage, tp=args.tp, cp=args.cp, dp=args.dp,
                                  recompute=args.recompute, gpu_gib=gpu_gib, **kw))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(res, indent=1, default=str) if args.json else format_plan(res))
        return 0
    res = search_layouts(args.preset, args.stage, args.gpus, gpu_gib, **kw)
    if args.json:
        print(json.dumps(res, indent=1, default=str))
        return 0
    print(format_plan(res[0]))
    print("\nall layouts (best first):")
    for p in res:
        print(f"  {'fits ' if p['fits'] else 'no   '} {p['total_gib']:7.1f} GiB  {format_layout(p)}")
    return 0


if __name__ == "__main__":
    from megatron_anyflow.cli import main_guard

    main_guard(main)  # a user error: one line, exit 2 (megatron_anyflow/cli.py)
