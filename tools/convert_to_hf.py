#!/usr/bin/env python
"""Export a megatron_anyflow checkpoint to a diffusers transformer directory.

    python tools/convert_to_hf.py --input ckpt/stage2 --output export/anyflow --merge-lora generator

The output loads with ``AnyFlowTransformer3DModel.from_pretrained`` (a model with AnyFlow's delta
embedder) or ``WanTransformer3DModel.from_pretrained`` (without). Tensor-parallel shards of any TP size
are merged while loading (the distributed checkpoint reshards to one process). LoRA adapters are
merged into the base weights with ``--merge-lora NAME`` (e.g. ``generator`` after stage 1 / 2);
``--ema`` exports the EMA copy of the adapters when the checkpoint holds one. Without ``--merge-lora``
only the base weights are written. The export is written to ``OUTPUT.tmp`` and renamed when complete.
"""

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint root (with its tracker) or a checkpoint directory")
    p.add_argument("--output", required=True, help="diffusers transformer directory to create")
    p.add_argument("--merge-lora", default=None, metavar="ADAPTER", help="merge this LoRA adapter into the base")
    p.add_argument("--ema", action="store_true", help="merge the EMA weights of the adapter instead of the live ones")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the exported weights")
    p.add_argument("--verify", action="store_true", help="load the export with diffusers and compare one forward")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    import torch

    from megatron_anyflow.models.wan.convert import hf_config_from_arch, megatron_to_hf
    from megatron_anyflow.models.wan.hf_io import write_hf_transformer_dir
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.testing.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.training.checkpointing import read_meta, resolve_checkpoint_dir
    from megatron_anyflow.training.model_io import load_for_inference

    if os.path.exists(args.output):
        print(f"error: {args.output} exists; remove it or choose another --output", file=sys.stderr)
        return 2
    enable_megatron_cpu_compat()
    initialize_parallel(1)
    t0 = time.time()
    try:
        ckpt_dir = resolve_checkpoint_dir(args.input)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = read_meta(ckpt_dir)
    print(f"[1/4] {ckpt_dir} (stage {meta.get('stage', 'converted')}, iteration {meta.get('iteration')})", flush=True)
    lora = meta.get("lora")
    if args.merge_lora is not None and (not lora or args.merge_lora not in lora["adapters"]):
        have = lora["adapters"] if lora else []
        print(f"error: adapter {args.merge_lora!r} is not in the checkpoint (adapters: {have})", file=sys.stderr)
        return 2
    if lora and args.merge_lora is None:
        print(f"note: adapters {lora['adapters']} not merged (pass --merge-lora NAME); exporting the base", flush=True)
    print("[2/4] loading weights (following the base checkpoint; merging tensor-parallel shards)", flush=True)
    try:
        model = load_for_inference(ckpt_dir, adapter=args.merge_lora, ema=args.ema)
    except (KeyError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = model.config
    arch = meta["wan_config"]
    print(f"[3/4] {'merged adapter ' + repr(args.merge_lora) if args.merge_lora else 'base weights'}"
          f"{' (EMA)' if args.ema else ''}", flush=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    full = {k: v for k, v in model.state_dict().items() if v is not None}
    hf_sd = {k: v.to(dtype) for k, v in megatron_to_hf(full, cfg.head_dim).items()}
    hf_cfg = hf_config_from_arch(arch)
    print(f"[4/4] writing {args.output} as {hf_cfg['_class_name']}", flush=True)
    write_hf_transformer_dir(args.output, hf_cfg, hf_sd)
    if args.verify:
        err = verify(args.output, model, cfg, hf_cfg["_class_name"])
        print(f"verify: diffusers vs megatron_anyflow relative error {err:.2e}", flush=True)
    print(f"done in {time.time() - t0:.1f}s", flush=True)
    return 0


def verify(path, model, cfg, class_name):
    """Relative error between the exported diffusers model and ``model`` on one random input."""
    import diffusers
    import torch

    hf = getattr(diffusers, class_name).from_pretrained(path, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    pt, ph, pw = cfg.patch_size
    x = torch.randn(1, 2 * pt, cfg.in_channels, 4 * ph, 4 * pw, generator=g)
    t = torch.full((1, 2 * pt), 700.0)
    r = torch.full((1, 2 * pt), 300.0)
    txt = torch.randn(1, 8, cfg.text_dim, generator=g)
    model = model.float().eval()
    with torch.no_grad():
        ours = model(x, t, r, txt)
        if class_name == "AnyFlowTransformer3DModel":
            ref = hf(x, t, r, txt, return_dict=False)[0]
        else:
            ref = hf(x.permute(0, 2, 1, 3, 4), t[:, 0], txt, return_dict=False)[0].permute(0, 2, 1, 3, 4)
    return ((ours - ref).norm() / ref.norm()).item()


if __name__ == "__main__":
    sys.exit(main())
