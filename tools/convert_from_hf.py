#!/usr/bin/env python
"""Convert a diffusers Wan / AnyFlow / AnyFlow-FAR transformer to a megatron_anyflow distributed checkpoint.

    python tools/convert_from_hf.py --input /path/Wan2.1-T2V-14B-Diffusers/transformer --output ckpt/wan14b
    torchrun --nproc_per_node 2 tools/convert_from_hf.py --input ... --output ... --tensor-model-parallel-size 2

Input: a directory with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a sharded
index), of class ``WanTransformer3DModel``, ``AnyFlowTransformer3DModel`` or
``AnyFlowFARTransformer3DModel`` (the causal AnyFlow-FAR model: ``far_patch_embedding`` and the FAR
config keys are kept); a pipeline directory with a ``transformer/`` sub-folder also works. A FAR config
in the reference's layout (no ``chunk_partition`` / ``full_chunk_limit`` / ``compressed_patch_size`` /
``gate_value``; extra ``qk_norm``, ``added_kv_proj_dim``, ``init_far_model``, ``init_flowmap_model``) is
read with diffusers' defaults filled in, and the tool prints each key it filled or ignored.
Wan2.2: TI2V-5B (a ``WanTransformer3DModel`` with 48 latent channels) converts like Wan2.1. A two-expert
A14B pipeline (``transformer`` + ``transformer_2`` and a ``boundary_ratio`` in ``model_index.json``) is
refused as a whole: each expert converts on its own (its sub-folder), and
the checkpoint records the boundary (``wan_config.boundary_ratio``), so the trainer refuses to train it.
Output: a checkpoint root (``release/`` + tracker) in megatron-core's torch_dist format. The format is
resharding-aware, so the checkpoint loads at any tensor-parallel size whatever size it was written
with; ``--tensor-model-parallel-size`` only decides how the weights are split while writing (each rank
holds 1/TP of the model).
Memory: the full diffusers state dict plus the model shard are held in host memory at once.

--output must be new or empty. ``--overwrite`` replaces a checkpoint this tool wrote there before
(``release/`` and the tracker) and nothing else: when the directory holds anything else (a training
run's ``iter_*``, your own files, foreign files inside ``release/``) the tool refuses and lists them,
so it never deletes what it did not write.
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace a checkpoint written by this tool at --output (refused if it holds anything else)")
    return p.parse_args(argv)


def output_problem(output, overwrite, foreign_entries):
    """Why conversion may not write to ``output`` (a message), or None when it may."""
    if not os.path.exists(output):
        return None
    if not os.path.isdir(output):
        return f"--output {output} exists and is not a directory"
    if not os.listdir(output):
        return None
    if not overwrite:
        return (f"--output {output} exists and is not empty; choose a new directory, or pass --overwrite to replace "
                "a checkpoint convert_from_hf wrote there")
    foreign = foreign_entries(output, ("release",))
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        return (f"--overwrite replaces only what convert_from_hf writes (release/ and the tracker), but {output} also "
                f"holds {shown}; move them away or choose another --output (nothing was deleted)")
    return None


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    import torch
    import torch.distributed as dist

    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.convert import (ConversionError, arch_from_hf_config, far_config_defaults_filled,
                                                     hf_to_megatron, load_full_state_dict)
    from megatron_anyflow.models.wan.hf_io import read_hf_transformer_dir, two_expert_boundary
    from megatron_anyflow.models.wan.model import WanModel
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.checkpoint.store import foreign_entries, save_checkpoint

    enable_megatron_cpu_compat()  # no-op with CUDA; megatron-core's collectives and saves on CPU
    initialize_parallel(args.tensor_model_parallel_size)
    rank = dist.get_rank()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    def fail(msg):
        if rank == 0:
            print(f"error: {msg}", file=sys.stderr)
        return 2

    # Rank 0 checks --output and tells the others, before any rank writes there. Checked on every rank, a
    # rank that got there late (tens of ms on a loaded machine) saw the release.tmp rank 0 had just created
    # in save_checkpoint, quit alone with exit 2, and left rank 0 in save_checkpoint's barrier ("Connection
    # closed by peer"). The broadcast is also the point every rank passes before anything is written.
    problem = output_problem(args.output, args.overwrite, foreign_entries) if rank == 0 else None
    if dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        return fail(problem)
    t0 = time.time()
    log(f"[1/4] reading {args.input}")
    try:
        boundary, role = two_expert_boundary(args.input)
        if role == "pipeline":
            return fail(f"{args.input} is a two-expert Wan2.2 pipeline (transformer for timesteps >= "
                        f"{boundary * 1000:g}, transformer_2 below; boundary_ratio {boundary}): converting both experts "
                        "into one checkpoint is not supported yet; convert one expert with --input "
                        f"{os.path.join(args.input, 'transformer')} (or transformer_2)")
        hf_cfg, hf_sd = read_hf_transformer_dir(args.input, progress=rank == 0)
        arch = arch_from_hf_config(hf_cfg)
    except (FileNotFoundError, ValueError) as err:  # ConversionError is a ValueError
        return fail(err)
    if boundary is not None:
        arch["boundary_ratio"] = boundary
        arch["expert"] = "high" if role == "transformer" else "low"
        log(f"note: {args.input} is the {arch['expert']}-noise expert ({role}) of a two-expert Wan2.2 model "
            f"(boundary_ratio {boundary}); both recorded in the checkpoint. Stage 1 trains it on its own time "
            f"range; convert_to_hf --expert-2 exports the pair")
    if arch.get("far"):
        assumed = far_config_defaults_filled(hf_cfg)
        log(f"      AnyFlow-FAR: chunk_partition {arch['chunk_partition']}, full_chunk_limit "
            f"{arch['full_chunk_limit']}, compressed_patch_size {arch['compressed_patch_size']}")
        if assumed:
            log(f"note: {args.input} config.json is not diffusers' complete FAR config: filled with diffusers' "
                f"defaults / ignored: {', '.join(assumed)}")
    if args.add_delta_embedder and arch["delta_embedder"]:
        trained = sorted(k for k in hf_sd if k.startswith("condition_embedder.delta_embedder."))
        return fail(f"--add-delta-embedder: {args.input} is an {hf_cfg.get('_class_name')} that already has a "
                    f"delta embedder ({len(trained)} tensors, e.g. {trained[:1]}); it would be overwritten by a "
                    "copy of the time embedder. Omit the flag to keep it")
    if args.add_delta_embedder:
        arch["delta_embedder"] = True
    dtype = torch.bfloat16 if args.params_dtype == "bf16" else torch.float32
    try:
        cfg = wan_config(None, **arch, tensor_model_parallel_size=args.tensor_model_parallel_size,
                         params_dtype=dtype, perform_initialization=False)
    except ValueError as err:  # e.g. a FAR chunk_partition / compressed_patch_size the model cannot take
        return fail(f"{args.input}: config.json: {err}")
    log(f"[2/4] building the model ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"TP={args.tensor_model_parallel_size})")
    model = WanModel(cfg)
    log(f"[3/4] converting {len(hf_sd)} tensors")
    try:
        full = hf_to_megatron(hf_sd, cfg.head_dim, hidden_size=cfg.hidden_size)
    except ConversionError as err:
        return fail(f"{args.input}: {err}")
    if args.add_delta_embedder:
        for k in [k for k in full if k.startswith("condition_embedder.time_embedder.")]:
            full[k.replace("time_embedder", "delta_embedder")] = full[k].clone()
    try:
        load_full_state_dict(model, full, source=args.input)
    except ConversionError as err:
        return fail(err)
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
    from megatron_anyflow.cli import main_guard

    main_guard(main)  # a user error: one line, exit 2 (megatron_anyflow/cli.py)
