#!/usr/bin/env python
"""Convert a diffusers Wan / AnyFlow transformer to a megatron_anyflow distributed checkpoint.

    python tools/convert_from_hf.py --input /path/Wan2.1-T2V-14B-Diffusers/transformer --output ckpt/wan14b
    torchrun --nproc_per_node 2 tools/convert_from_hf.py --input ... --output ... --tensor-model-parallel-size 2

Input: a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a sharded
index), of class ``WanTransformer3DModel`` or ``AnyFlowTransformer3DModel``; a pipeline directory with
a ``transformer/`` sub-folder also works. Output: a checkpoint root (``release/`` + tracker) in
megatron-core's torch_dist format. The format is resharding-aware, so the checkpoint loads at any
tensor-parallel size whatever size it was written with; ``--tensor-model-parallel-size`` only decides
how the weights are split while writing (each rank holds 1/TP of the model).
Memory: the full diffusers state dict plus the model shard are held in host memory at once.
"""

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="diffusers transformer (or pipeline) directory")
    p.add_argument("--output", required=True, help="checkpoint root to create")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP size to write with (run under torchrun with a multiple of it)")
    p.add_argument("--params-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the converted weights (fp32 keeps any source exactly)")
    p.add_argument("--add-delta-embedder", action="store_true",
                   help="for a plain Wan checkpoint: add AnyFlow's delta embedder as a copy of the time "
                        "embedder (the stage-1 starting point; exactly the base model at t = r)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --output")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    import torch
    import torch.distributed as dist

    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.convert import ConversionError, arch_from_hf_config, hf_to_megatron, load_full_state_dict
    from megatron_anyflow.models.wan.hf_io import read_hf_transformer_dir
    from megatron_anyflow.models.wan.model import WanModel
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.testing.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.training.checkpointing import TRACKER, save_checkpoint

    enable_megatron_cpu_compat()  # no-op with CUDA; megatron-core's collectives and saves on CPU
    initialize_parallel(args.tensor_model_parallel_size)
    rank = dist.get_rank()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    if os.path.exists(os.path.join(args.output, TRACKER)) and not args.overwrite:
        if rank == 0:
            print(f"error: {args.output} already holds a checkpoint; pass --overwrite to replace it", file=sys.stderr)
        return 2
    t0 = time.time()
    log(f"[1/4] reading {args.input}")
    hf_cfg, hf_sd = read_hf_transformer_dir(args.input, progress=rank == 0)
    try:
        arch = arch_from_hf_config(hf_cfg)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.add_delta_embedder:
        arch["delta_embedder"] = True
    dtype = torch.bfloat16 if args.params_dtype == "bf16" else torch.float32
    cfg = wan_config(None, **arch, tensor_model_parallel_size=args.tensor_model_parallel_size,
                     params_dtype=dtype, perform_initialization=False)
    log(f"[2/4] building the model ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"TP={args.tensor_model_parallel_size})")
    model = WanModel(cfg)
    log(f"[3/4] converting {len(hf_sd)} tensors")
    full = hf_to_megatron(hf_sd, cfg.head_dim)
    if args.add_delta_embedder:
        for k in [k for k in full if k.startswith("condition_embedder.time_embedder.")]:
            full[k.replace("time_embedder", "delta_embedder")] = full[k].clone()
    try:
        load_full_state_dict(model, full, source=args.input)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    del hf_sd, full
    log(f"[4/4] writing {args.output}")
    meta = {"format": "megatron_anyflow", "wan_config": cfg.arch_dict(), "source": os.path.abspath(args.input),
            "hf_class": hf_cfg.get("_class_name"), "iteration": None}
    save_checkpoint(args.output, None, model.sharded_state_dict(), meta)
    tp = args.tensor_model_parallel_size
    n = sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in model.parameters())
    log(f"done in {time.time() - t0:.1f}s: {args.output} ({n / 1e6:.1f}M parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
