"""Megatron-style command-line arguments of ``pretrain_anyflow.py``.

Names follow Megatron-LM where a concept exists there (``--tensor-model-parallel-size``,
``--micro-batch-size``, ``--global-batch-size``, ``--lr``, ``--train-iters``, ``--save``, ``--load``,
``--bf16`` ...); AnyFlow's constants are arguments with the reference values as defaults.
"""

from __future__ import annotations

import argparse
import math
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_anyflow.py",
        description="AnyFlow training on megatron-core: teacher flow matching, stage 1 (forward flow-map "
                    "training), stage 2 (on-policy flow-map distillation).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("stage and model")
    g.add_argument("--stage", choices=["teacher", "stage1", "stage2"], required=True,
                   help="teacher: flow-matching fine-tune; stage1: forward flow-map training; stage2: distillation")
    g.add_argument("--model-preset", default="tiny",
                   choices=["tiny", "tiny-video", "wan2.1-1.3b", "wan2.1-14b", "wan2.2-ti2v-5b", "tiny-wan2.2-ti2v",
                            "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "tiny-wan2.2-t2v-a14b", "tiny-wan2.2-i2v-a14b"],
                   help="architecture when --pretrained is not given (random init); a two-expert Wan2.2 A14B "
                        "preset is one expert in stage 1 (with --expert) and both experts in stage 2")
    g.add_argument("--expert", choices=["high", "low"], default=None,
                   help="two-expert models (Wan2.2 A14B): the expert this stage-1 run trains, on its own time range "
                        "(high: t, r in [boundary, 1]; low: [0, boundary]); default: the one the checkpoint "
                        "records (convert_from_hf of transformer/ or transformer_2/)")
    g.add_argument("--pretrained", default=None,
                   help="checkpoint (root or directory) holding the frozen base: a converted diffusers model "
                        "(tools/convert_from_hf.py) or a full-model checkpoint of an earlier run")
    g.add_argument("--init-adapters-from", default=None,
                   help="stage 2: checkpoint of stage 1 whose 'generator' adapter initialises the generator")
    g.add_argument("--pretrained-2", default=None,
                   help="stage 2 of a two-expert model (Wan2.2 A14B): the other expert's base (--pretrained holds "
                        "one expert, this the other; their roles come from the checkpoints); both stay resident")
    g.add_argument("--init-adapters-from-2", default=None,
                   help="stage 2 of a two-expert model: the other expert's stage-1 checkpoint (its 'generator' "
                        "initialises that expert's generator; either order, the roles come from the checkpoints)")
    g.add_argument("--init-from-live-weights", action="store_true",
                   help="stage 2: start the generator from stage 1's live adapter weights instead of its EMA")
    g.add_argument("--model", choices=["bidirectional", "far"], default="bidirectional",
                   help="bidirectional: the AnyFlow DiT; far: AnyFlow-FAR, the causal (frame-autoregressive) model "
                        "on the same weights plus far_patch_embedding (docs/design/far.md)")
    g.add_argument("--chunk-partition", type=int, nargs="+", default=None,
                   help="--model far: latent frames per chunk of a training clip (default (1, 3, 3, 3, 3, 3, 3, 2) for "
                        "21 latent frames; must sum to the dataset's latent frames)")
    g.add_argument("--far-attention", choices=["grouped", "flex", "dense"], default="grouped",
                   help="--model far: grouped = exact grouped dense attention on the backend's core attention (every "
                        "allowed pair, no mask); flex = flex attention with a block mask (diffusers / the reference; "
                        "compiled on CUDA); dense = masked SDPA over all pairs (reference path)")
    g.add_argument("--backend", choices=["local", "te"], default="local", help="layer backend")
    g.add_argument("--attention-impl", choices=["auto", "cudnn", "fa3", "flash", "sdpa", "math"], default="auto",
                   help="local-backend attention kernel: auto = cuDNN fused attention on Hopper, else FlashAttention-3, "
                        "flash-attn, PyTorch SDPA (CPU: SDPA); logged at start-up. The te backend always uses TE fused "
                        "attention")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional compilation: fuses the norm / modulation / "
                        "RoPE / gating elementwise chains; the first iteration traces)")
    g.add_argument("--lora-nograd-merge", choices=["per-call", "cache", "off"], default="cache",
                   help="no-grad forwards (CFG branches, real / fake score, rollouts) run W + s B A merged once per "
                        "optimizer step per adapter (cache: one copy of every wrapped weight per adapter, 2.2 GB bf16 "
                        "at 1.3B, 19.7 GB / TP at 14B), or merged at each call (per-call: one weight-sized temporary), "
                        "or the unmerged LoRA path (off: no-grad and grad-enabled forwards agree bit for bit instead of "
                        "to rounding). Always off under FP8")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="LoRA rank; 0 = full fine-tuning (default: the preset's rank: 256 for the Wan2.1 sizes as "
                        "in the reference, 8 / 32 for tiny / tiny-video; with --pretrained, the rank of the preset "
                        "with the checkpoint's architecture, else 256)")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scaling 1)")
    g.add_argument("--lora-exclude", nargs="+", default=None, metavar="PATTERN",
                   help="drop the LoRA targets matching these fnmatch patterns (e.g. 'condition_embedder.*': no LoRA "
                        "on the time / delta embedders, which the reference's stage-1 config adapts; issue #17). Stage 2 "
                        "with --init-adapters-from adapts what the stage-1 checkpoint adapted: it needs no repeat, and "
                        "an exclusion that drops one of those modules is refused")
    g.add_argument("--recompute-granularity", choices=["none", "full", "selective"], default="none",
                   help="activation recomputation: full blocks, or selected modules of each block")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform",
                   help="full recomputation: every block (uniform) or the first --recompute-num-layers (block)")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--recompute-modules", nargs="+", choices=["core_attn", "mlp"], default=["core_attn"],
                   help="selective recomputation: which modules")
    g.add_argument("--recompute-policy", choices=["save-attention", "modules"], default="save-attention",
                   help="selective recomputation: save-attention = keep self-attention's q, k, v, output and "
                        "log-sum-exp and recompute the rest of each block (fits flash attention; local backend); "
                        "modules = checkpoint the --recompute-modules")

    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--bf16", action="store_true", help="bf16 weights and activations (timesteps stay fp32)")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="FP8 linear layers through Transformer Engine (needs --backend te and --bf16); "
                        "LoRA adapters and attention stay bf16")
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise", "mxfp8", "blockwise"], default="delayed",
                   help="FP8 scaling recipe (mxfp8 needs Blackwell)")
    g.add_argument("--first-last-layers-bf16", action="store_true",
                   help="keep --num-layers-at-start/end-in-bf16 blocks out of FP8 (not with the delayed recipe)")
    g.add_argument("--num-layers-at-start-in-bf16", type=int, default=1)
    g.add_argument("--num-layers-at-end-in-bf16", type=int, default=1)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="precomputed-latent dataset (tools/prepare_dataset.py)")
    g.add_argument("--mock-data", action="store_true", help="deterministic random latents instead of a dataset")
    g.add_argument("--mock-latent-shape", type=int, nargs=4, default=[3, 16, 8, 8], metavar=("F", "C", "H", "W"))
    g.add_argument("--mock-num-samples", type=int, default=256)
    g.add_argument("--mock-text-len", type=int, default=8)
    g.add_argument("--num-workers", type=int, default=2,
                   help="data-loader worker processes reading and prefetching micro-batches (0 = in the training "
                        "process); the order is the sampler's either way")

    g = p.add_argument_group("optimisation")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, default=None,
                   help="default: 5e-5 (teacher, stage 1), 2e-6 (stage 2, both optimisers)")
    g.add_argument("--critic-lr", type=float, default=None, help="stage 2 fake-score lr (default: --lr)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="default: 1000 (stage 1), 0 (stage 2)")
    g.add_argument("--lr-decay-style", choices=["constant", "cosine", "linear"], default="constant")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=None, help="default: 0.9 (teacher, stage 1), 0.0 (stage 2)")
    g.add_argument("--adam-beta2", type=float, default=None, help="default: 0.95 (teacher, stage 1), 0.999 (stage 2)")
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="stop after this many consecutive iterations whose loss or gradient norm is NaN/inf "
                        "(each such optimizer step is skipped with a warning)")
    g.add_argument("--ema-decay", type=float, default=None, help="default: 0.999 (stage 1), 0.99 (stage 2)")
    g.add_argument("--ema-start-iter", type=int, default=None,
                   help="iteration from which the EMA decays; before it the EMA copies the weights (the reference's "
                        "warm-up). Default: 1000 (teacher, stage 1), 200 (stage 2), as in the reference")

    g = p.add_argument_group("AnyFlow objective (reference values)")
    g.add_argument("--guidance", type=float, default=3.0, help="guidance-fused training scale g (eq. 6)")
    g.add_argument("--fd-eps", type=float, default=5.0, help="finite-difference step in timestep units (eq. 4)")
    g.add_argument("--text-dropout", type=float, default=0.1)
    g.add_argument("--time-shift", type=float, default=5.0)
    g.add_argument("--boundary-fraction", type=float, default=0.5)
    g.add_argument("--r-zero-fraction", type=float, default=0.25)
    g.add_argument("--loss-weight", choices=["beta", "uniform"], default="beta")
    g.add_argument("--no-adaptive-reweight", action="store_true")
    g.add_argument("--reweight-eps", type=float, default=1e-5, help="the constant c of the adaptive reweighting (eq. 7)")
    g.add_argument("--i2v-prob", type=float, default=0.0,
                   help="probability that a sample is conditioned on its clean first latent frame (image-to-video, "
                        "Wan2.2 TI2V): that frame's input is the clean latent at t = 0 (r = 0 for the single-time "
                        "teacher and scores, the sample's / step's r for the flow map, as diffusers' pipelines "
                        "sample), it is excluded from the loss; drawn per sample (0: unconditioned, bitwise)")
    g.add_argument("--kernel-backend", choices=["auto", "torch", "triton"], default="auto",
                   help="fused loss kernels: auto = Triton on CUDA, PyTorch reference elsewhere")
    g.add_argument("--long-context-prob", type=float, default=0.5,
                   help="--model far: probability that an iteration trains on n ~ U{3..len(chunks)} chunks instead "
                        "of 3 (the reference's long_context_training_ratio)")
    g.add_argument("--far-bidirectional-prob", type=float, default=None,
                   help="--model far: probability of the bidirectional flow-matching branch in an iteration "
                        "(reference: 0.1 in stage 1, 0 in stage 2's co-training)")

    g = p.add_argument_group("stage 2 (on-policy distillation)")
    g.add_argument("--simulation", choices=["flow_map", "consistency"], default="flow_map")
    g.add_argument("--simulation-steps", type=int, nargs="+", default=[2, 4, 8, 16, 50])
    g.add_argument("--grad-through", default="chain", help="see anyflow.distill (chain or the cheaper option)")
    g.add_argument("--real-guidance", type=float, default=3.0)
    g.add_argument("--no-cotrain-stage1", action="store_true")
    g.add_argument("--critic-updates", type=int, default=1, help="critic updates per generator update")
    g.add_argument("--schedule", choices=["sequential", "pipelined"], default="sequential",
                   help="sequential: the reference order (critic on the updated generator's own rollout); "
                        "pipelined: the critic trains on the generator's rollout of the same micro-batch (an "
                        "algorithmic variant, one rollout less)")
    g.add_argument("--overlap-critic", action="store_true",
                   help="with --schedule pipelined: run the critic of micro-batch j on a second CUDA stream, "
                        "concurrently with the generator's work on micro-batch j + 1 (same numbers as pipelined)")

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None, help="checkpoint root to write")
    g.add_argument("--save-interval", type=int, default=None, help="iterations between saves (default: end only)")
    g.add_argument("--load", default=None, help="checkpoint root to resume from (same layout: bit-exact)")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--dry-run", action="store_true",
                   help="check the launch (sizes, layout, parameter counts) on any machine and exit")
    g.add_argument("--world-size", type=int, default=None,
                   help="--dry-run: the world size to check (default: WORLD_SIZE, or NNODES x GPUS_PER_NODE)")
    g.add_argument("--exit-after-iters", type=int, default=None,
                   help="stop after this many iterations of this run (for split runs / tests)")
    return p


STAGE_DEFAULTS = {
    "teacher": dict(lr=5e-5, lr_warmup_iters=1000, adam_beta1=0.9, adam_beta2=0.95, ema_decay=0.999, ema_start_iter=1000),
    "stage1": dict(lr=5e-5, lr_warmup_iters=1000, adam_beta1=0.9, adam_beta2=0.95, ema_decay=0.999, ema_start_iter=1000),
    "stage2": dict(lr=2e-6, lr_warmup_iters=0, adam_beta1=0.0, adam_beta2=0.999, ema_decay=0.99, ema_start_iter=200),
}


def default_lora_rank(args: argparse.Namespace) -> int:
    """The LoRA rank when ``--lora-rank`` is not given: the preset's own rank (``--model-preset``, or with
    ``--pretrained`` the preset whose architecture the checkpoint has; 256, the reference's, otherwise)."""
    from megatron_anyflow.models.wan.config import PRESETS

    default = 256
    if args.pretrained is None:
        return int(PRESETS[args.model_preset].get("lora_rank", default))
    try:
        from megatron_anyflow.checkpoint import store as ckpt

        arch = ckpt.read_meta(ckpt.resolve_checkpoint_dir(args.pretrained))["wan_config"]
    except Exception:  # the trainer reports an unreadable --pretrained with its own, clearer error
        return default
    keys = ("hidden_size", "num_attention_heads", "num_layers", "ffn_hidden_size")
    for preset in PRESETS.values():
        if all(arch.get(k) == preset[k] for k in keys):
            return int(preset.get("lora_rank", default))
    return default


_FLOAT32_MAX = 3.4028234663852886e38


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and validate; stage-dependent defaults (docs/design/anyflow.md 1.3, 1.4) fill unset values.

    Raises:
        SystemExit (argparse error) naming the bad value: no data source, bad sizes or fractions.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.critic_lr is None:
        args.critic_lr = args.lr
    # Every float argument is a finite number; learning rates are >= 0 and representable in float32
    # (AdamW keeps its state in float32: --lr 1e39 overflowed inside the optimiser step).
    for action in parser._actions:
        val = getattr(args, action.dest, None)
        if action.type is float and isinstance(val, float) and not math.isfinite(val):
            parser.error(f"{action.option_strings[0]} {val}: must be a finite number")
        if action.type is float and isinstance(val, list) and not all(math.isfinite(v) for v in val):
            parser.error(f"{action.option_strings[0]} {val}: every value must be a finite number")
    for name in ("lr", "critic_lr"):
        val = getattr(args, name)
        # 0 is allowed: a frozen role (e.g. stage 2 with a fixed generator) is a legitimate run.
        if not 0.0 <= val <= _FLOAT32_MAX:
            parser.error(f"--{name.replace('_', '-')} {val}: must lie in [0, {_FLOAT32_MAX:.3g}] (finite in float32)")
    if not 0.0 <= args.min_lr <= args.lr:
        parser.error(f"--min-lr {args.min_lr}: must lie in [0, --lr {args.lr}]")
    if not 0.0 <= args.weight_decay <= _FLOAT32_MAX or args.adam_eps <= 0.0 or args.clip_grad < 0.0:
        parser.error(f"--weight-decay {args.weight_decay} must be >= 0, --adam-eps {args.adam_eps} > 0 and "
                     f"--clip-grad {args.clip_grad} >= 0 (0 = no clipping)")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must lie in [0, 1)")
    if (args.data_path is None) == (not args.mock_data):
        parser.error("give exactly one of --data-path and --mock-data")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0 (0 = read in the training process); got {args.num_workers}")
    for name in ("micro_batch_size", "train_iters", "tensor_model_parallel_size", "context_parallel_size",
                 "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.global_batch_size is not None and args.global_batch_size < 1:
        parser.error(f"--global-batch-size must be >= 1 (a multiple of --micro-batch-size x data-parallel size); "
                     f"got {args.global_batch_size}")
    if not 0.0 <= args.ema_decay <= 1.0:
        parser.error(f"--ema-decay must lie in [0, 1]; got {args.ema_decay}")
    if args.ema_start_iter < 0:
        parser.error(f"--ema-start-iter must be >= 0; got {args.ema_start_iter}")
    if args.max_skipped_iters < 1:
        parser.error(f"--max-skipped-iters must be >= 1; got {args.max_skipped_iters}")
    if args.lora_rank is None:
        args.lora_rank = default_lora_rank(args)
    if args.lora_alpha is None:
        args.lora_alpha = float(args.lora_rank)
    if args.lora_rank < 0:
        parser.error(f"--lora-rank must be >= 0; got {args.lora_rank}")
    if args.stage == "stage2" and args.lora_rank == 0:
        parser.error("stage 2 needs LoRA adapters (generator and fake score on one frozen base): --lora-rank > 0")
    if not 0 <= args.boundary_fraction + args.r_zero_fraction <= 1:
        parser.error("--boundary-fraction + --r-zero-fraction must lie in [0, 1]")
    if args.fp8_format and (args.backend != "te" or not args.bf16):
        parser.error(f"--fp8-format {args.fp8_format} needs --backend te and --bf16 (FP8 GEMMs come from "
                     "Transformer Engine)")
    if args.far_bidirectional_prob is None:
        args.far_bidirectional_prob = 0.1 if args.stage == "stage1" else 0.0
    if args.stage == "stage2" and args.far_bidirectional_prob > 0:
        parser.error(f"--far-bidirectional-prob {args.far_bidirectional_prob}: stage 2 co-trains FAR stage 1's causal "
                     "branch only (the reference's bidirectional_modeling_prob = 0)")
    for name in ("long_context_prob", "far_bidirectional_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"--{name.replace('_', '-')} must lie in [0, 1]; got {getattr(args, name)}")
    if not 0.0 <= args.i2v_prob <= 1.0:
        parser.error(f"--i2v-prob must lie in [0, 1]; got {args.i2v_prob}")
    if args.model == "far":
        if args.stage == "teacher":
            parser.error("--model far trains the causal student (stage1 / stage2); the teacher is bidirectional")
        if args.i2v_prob > 0:
            parser.error(f"--i2v-prob {args.i2v_prob} is not used with --model far: image-to-video comes from teacher "
                         "forcing (chunk 0 is the image); drop it")
        if args.chunk_partition is not None and any(c < 1 for c in args.chunk_partition):
            parser.error(f"--chunk-partition {args.chunk_partition}: every chunk needs >= 1 latent frame")
    elif args.chunk_partition is not None:
        parser.error(f"--chunk-partition {args.chunk_partition} needs --model far (got --model {args.model})")
    if args.save_interval is not None and args.save_interval < 1:
        parser.error("--save-interval must be >= 1")
    return args
