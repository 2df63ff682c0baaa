#!/usr/bin/env python
"""Export a megatron_anyflow checkpoint to a diffusers transformer directory.

    python tools/convert_to_hf.py --input ckpt/stage2 --output export/anyflow --merge-lora generator

The output loads with ``AnyFlowTransformer3DModel.from_pretrained`` (a model with AnyFlow's delta
embedder), ``AnyFlowFARTransformer3DModel.from_pretrained`` (the causal AnyFlow-FAR model, with its
``far_patch_embedding`` and FAR config: chunk_partition, full_chunk_limit, compressed_patch_size) or
``WanTransformer3DModel.from_pretrained`` (without a delta embedder). Tensor-parallel shards of any TP
size are merged while loading (the distributed checkpoint reshards to one process). LoRA adapters are
merged into the base weights with ``--merge-lora NAME`` (e.g. ``generator`` after stage 1 / 2);
``--ema`` exports the EMA copy of the adapters when the checkpoint holds one. Without ``--merge-lora``
only the base weights are written. The export is written to ``OUTPUT.tmp`` and renamed when complete.
Next to the transformer, ``scheduler_config.json`` records diffusers' ``FlowMapEulerDiscreteScheduler``
with the run's time shift (``--shift``, default: the checkpoint's ``--time-shift``, else 5; diffusers'
own default is 1, the wrong grid for Wan / AnyFlow).

A complete pipeline that ``AnyFlowPipeline.from_pretrained(OUTPUT)`` loads and runs offline:

    python tools/convert_to_hf.py --input ckpt/stage2 --output export/anyflow-pipeline --merge-lora generator \
        --ema --pipeline --vae Wan2.1-T2V-1.3B-Diffusers/vae --text-encoder Wan2.1-T2V-1.3B-Diffusers/text_encoder \
        --tokenizer Wan2.1-T2V-1.3B-Diffusers/tokenizer

writes ``model_index.json``, ``transformer/``, ``scheduler/`` (shift as above) and copies of the given
``vae/``, ``text_encoder/`` and ``tokenizer/`` directories. A FAR checkpoint gives an ``AnyFlowFARPipeline``
directory instead (``DiffusionPipeline.from_pretrained`` / ``AnyFlowFARPipeline.from_pretrained``).

The adapter alone, as a diffusers / PEFT LoRA that users load on the base export:

    python tools/convert_to_hf.py --input ckpt/stage2 --output export/base                      # the base
    python tools/convert_to_hf.py --input ckpt/stage2 --output export/lora --lora-only [--ema]  # the adapter

writes ``export/lora/pytorch_lora_weights.safetensors`` (``--lora-only NAME`` picks an adapter other than
``generator``), which ``pipe.load_lora_weights("export/lora")`` (``AnyFlowPipeline`` on ``export/base``) or
``transformer.load_lora_adapter(...)`` applies; the result equals the ``--merge-lora`` export. The base is
what the run trained on (its teacher, with the delta embedder the run started from), i.e. the export of the
same checkpoint without ``--merge-lora``. ``alpha / rank`` is folded into ``lora_B`` (the file's PEFT
config has ``lora_alpha == r``), so every loader convention applies the same scale. AnyFlow-FAR's
generator is not expressible as a LoRA (its ``far_patch_embedding`` is trained fully, not low-rank): it is
refused (export it merged). A two-expert stage-2 run (Wan2.2 A14B) gives one file per expert,
``high_noise_lora.safetensors`` and ``low_noise_lora.safetensors``, for the base pair's pipeline:
``pipe.load_lora_weights(DIR, weight_name="high_noise_lora.safetensors")`` and ``pipe.load_lora_weights(DIR,
weight_name="low_noise_lora.safetensors", load_into_transformer_2=True)``. The LoRA file's size and the
merged export's are printed. ``--verify`` loads the base and the file in diffusers and compares one forward
with the merged model (each expert's, for a pair).

Safety: weights with a non-finite value are never exported (the keys are named). ``--verify`` (on by
default; ``--no-verify`` skips it) loads the
export in diffusers and compares one forward with this project's model (FAR: a teacher-forcing forward
with a compressed context chunk and clean copies, through ``AnyFlowFARTransformer3DModel``); it fails
(exit 1) on a non-finite output or a relative error above ``--verify-tolerance`` (default 1e-4 for fp32
exports: the two float32 implementations agree to ~1e-6; 3e-2 for bf16 / 1e-2 for fp16, whose weight
rounding alone (unit roundoff 2^-9 / 2^-12 per weight) gives relative errors of ~1e-2 / ~1e-3 after a
few layers). With ``--pipeline`` (``AnyFlowPipeline``) it then loads the written directory with
``AnyFlowPipeline.from_pretrained`` and compares its final latents (2 steps, text-to-video and with a clean
first frame) with this project's sampler on the checkpoint's model, same tolerance; this covers the
pipeline's VAE factors, channels, scheduler shift and conditioning. The Wan2.2 TI2V-5B family exports the
same way, with ``--vae Wan2.2-TI2V-5B-Diffusers/vae`` (48 channels, 16x space): ``AnyFlowPipeline`` reads
the latent size from the VAE config (``scale_factor_spatial`` / ``_temporal``), the channels from the
transformer's ``in_channels`` and the normalisation from ``latents_mean`` / ``latents_std`` (``z_dim`` of
them).

A two-expert model (Wan2.2 A14B, each expert trained on its own time range) exports as one pipeline:

    python tools/convert_to_hf.py --input ckpt/high --expert-2 ckpt/low --output export/a14b --merge-lora generator \
        --ema --pipeline --vae ... --text-encoder ...

writes ``transformer/`` (high noise), ``transformer_2/`` (low noise), ``boundary_ratio`` in ``model_index.json``
and ``pipeline_anyflow_two_expert.py`` (`megatron_anyflow/anyflow/diffusers_two_expert.py`, copied as is: it
needs only diffusers), which ``DiffusionPipeline.from_pretrained(export, trust_remote_code=True)`` loads.
diffusers' own ``AnyFlowPipeline`` has one transformer and no boundary, and its ``WanPipeline`` has two but
samples the ODE, not a flow map; the class adds the second transformer, the boundary and the grid with the
boundary on it. ``--verify`` checks each expert's forward and the loaded pipeline's final latents against
this project's two-expert sampler (`anyflow.sampler.route_experts`). A two-expert stage-2 checkpoint holds
both experts: ``--input ckpt/stage2 --merge-lora generator --ema --pipeline ...`` (no ``--expert-2``).
Wan2.2 I2V-A14B experts (36 input channels) export the same way; the pipeline then takes ``image=`` and builds
the 20-channel condition as ``WanImageToVideoPipeline`` does, and ``--verify`` gives both sides the same image.
"""

import argparse
import math
import os
import shutil
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="checkpoint root (with its tracker) or a checkpoint directory")
    p.add_argument("--output", required=True, help="diffusers transformer directory to create")
    p.add_argument("--merge-lora", default=None, metavar="ADAPTER", help="merge this LoRA adapter into the base")
    p.add_argument("--lora-only", nargs="?", const="generator", default=None, metavar="ADAPTER",
                   help="write only this adapter (default: generator) as a diffusers / PEFT LoRA file "
                        "(pytorch_lora_weights.safetensors) for the base export of the same checkpoint")
    p.add_argument("--ema", action="store_true", help="merge the EMA weights of the adapter instead of the live ones")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the exported weights")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="load the export with diffusers and compare one forward (default: on; --no-verify skips it, "
                        "e.g. when a second copy of a 14B model does not fit in host memory)")
    p.add_argument("--verify-tolerance", type=float, default=None,
                   help="largest relative error --verify accepts (default: 1e-4 fp32, 3e-2 bf16, 1e-2 fp16)")
    p.add_argument("--shift", type=float, default=None,
                   help="time shift of the exported scheduler (default: the checkpoint's --time-shift, else 5)")
    p.add_argument("--pipeline", action="store_true",
                   help="write a complete AnyFlowPipeline (FAR: AnyFlowFARPipeline) directory (needs --vae, "
                        "--text-encoder, --tokenizer)")
    p.add_argument("--expert-2", default=None, metavar="CHECKPOINT",
                   help="the other expert of a two-expert model (Wan2.2 A14B): --input and --expert-2 are the "
                        "high- and low-noise experts' checkpoints (either order; each records its expert), exported "
                        "as one AnyFlowTwoExpertPipeline (needs --pipeline)")
    p.add_argument("--vae", default=None, help="--pipeline: diffusers AutoencoderKLWan directory to copy")
    p.add_argument("--text-encoder", default=None, help="--pipeline: transformers text encoder directory to copy")
    p.add_argument("--tokenizer", default=None,
                   help="--pipeline: tokenizer directory to copy (default: the text encoder's, or ../tokenizer)")
    return p.parse_args(argv)


VERIFY_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 1e-2}
# diffusers pipeline of each transformer class --pipeline can export (the class must take (t, r)).
PIPELINE_CLASS = {"AnyFlowTransformer3DModel": "AnyFlowPipeline", "AnyFlowFARTransformer3DModel": "AnyFlowFARPipeline"}


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    import torch

    from megatron_anyflow.models.wan.convert import hf_config_from_arch
    from megatron_anyflow.models.wan.hf_io import write_hf_transformer_dir
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.checkpoint.store import CheckpointError, read_meta, resolve_checkpoint_dir
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    if os.path.exists(args.output):
        print(f"error: {args.output} exists; remove it or choose another --output", file=sys.stderr)
        return 2
    components = None
    if args.pipeline and args.lora_only is not None:
        print("error: --lora-only writes a LoRA file, not a pipeline: drop --pipeline (export the base pipeline "
              "without --lora-only)", file=sys.stderr)
        return 2
    if args.expert_2 is not None and (not args.pipeline or args.lora_only is not None):
        print("error: --expert-2 exports a two-expert pipeline (the boundary lives in model_index.json): pass "
              "--pipeline with --vae / --text-encoder, and not --lora-only", file=sys.stderr)
        return 2
    if args.pipeline:
        try:
            components = pipeline_components(args.vae, args.text_encoder, args.tokenizer)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    elif args.lora_only is not None and args.merge_lora is not None:
        print("error: --lora-only writes the adapter alone, --merge-lora merges it into the base: pass one of them",
              file=sys.stderr)
        return 2
    elif args.vae or args.text_encoder or args.tokenizer:
        print("error: --vae / --text-encoder / --tokenizer are copied into a pipeline: pass --pipeline too",
              file=sys.stderr)
        return 2
    enable_megatron_cpu_compat()
    initialize_parallel(1)
    t0 = time.time()
    try:
        ckpt_dir = resolve_checkpoint_dir(args.input)
        meta = read_meta(ckpt_dir)
    except (FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[1/4] {ckpt_dir} (stage {meta.get('stage', 'converted')}, iteration {meta.get('iteration')})", flush=True)
    arch = meta.get("wan_config") or {}
    cc = arch.get("in_channels", 16) - (arch.get("out_channels") or arch.get("in_channels", 16))
    if args.pipeline and cc and not (args.expert_2 or meta.get("experts")):
        print(f"error: --pipeline: {ckpt_dir} is one expert of Wan2.2 I2V-A14B (a {cc}-channel image condition); "
              "its pipeline holds both experts: pass the stage-2 pair, or --expert-2 with the other expert",
              file=sys.stderr)
        return 2
    if components is not None:
        problem = vae_mismatch(components["vae"][0], meta["wan_config"])
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    lora = meta.get("lora")
    if meta.get("experts") and not args.pipeline and args.lora_only is None:
        print(f"error: {ckpt_dir} holds both experts of a two-expert model (a two-expert stage-2 run): it exports as "
              "one two-expert pipeline (--pipeline with --vae / --text-encoder) or as the two experts' LoRAs "
              "(--lora-only)", file=sys.stderr)
        return 2
    if args.lora_only is not None:
        return export_lora_only(args, ckpt_dir, meta, t0)
    if args.expert_2 is not None or meta.get("experts"):
        return export_two_experts(args, ckpt_dir, meta, components, t0)
    if args.merge_lora is not None and (not lora or args.merge_lora not in lora["adapters"]):
        have = lora["adapters"] if lora else []
        print(f"error: adapter {args.merge_lora!r} is not in the checkpoint (adapters: {have})", file=sys.stderr)
        return 2
    if lora and args.merge_lora is None:
        print(f"note: adapters {lora['adapters']} not merged (pass --merge-lora NAME); exporting the base", flush=True)
    print("[2/4] loading weights (following the base checkpoint; merging tensor-parallel shards)", flush=True)
    try:
        model = load_for_inference(ckpt_dir, adapter=args.merge_lora, ema=args.ema)
    except (KeyError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = model.config
    arch = meta["wan_config"]
    print(f"[3/4] {'merged adapter ' + repr(args.merge_lora) if args.merge_lora else 'base weights'}"
          f"{' (EMA)' if args.ema else ''}", flush=True)
    hf_sd = exportable_state_dict(model, args.dtype, ckpt_dir)
    if hf_sd is None:
        return 1
    hf_cfg = hf_config_from_arch(arch)
    pipeline_class = PIPELINE_CLASS.get(hf_cfg["_class_name"])
    if args.pipeline and pipeline_class is None:
        print(f"error: --pipeline writes an AnyFlowPipeline, whose transformer takes (t, r): {ckpt_dir} is a "
              f"{hf_cfg['_class_name']} without AnyFlow's delta embedder (a teacher or converted Wan base); export "
              "a stage-1 / stage-2 checkpoint, or drop --pipeline", file=sys.stderr)
        return 2
    shift = args.shift if args.shift is not None else float((meta.get("args") or {}).get("time_shift", 5.0))
    transformer_dir = os.path.join(args.output + ".tmp", "transformer") if args.pipeline else args.output
    if args.pipeline:
        if os.path.exists(args.output + ".tmp"):
            shutil.rmtree(args.output + ".tmp")
        os.makedirs(args.output + ".tmp")
    print(f"[4/4] writing {args.output} as {pipeline_class + ' with ' if args.pipeline else ''}"
          f"{hf_cfg['_class_name']} (scheduler shift {shift:g})", flush=True)
    write_hf_transformer_dir(transformer_dir, hf_cfg, hf_sd)
    write_scheduler_config(transformer_dir, shift)  # next to the transformer (also for a transformer-only export)
    from megatron_anyflow.checkpoint.store import write_checksums_for_tree

    if args.pipeline:
        write_pipeline(args.output + ".tmp", components, shift, hf_cfg["_class_name"], pipeline_class)
        write_checksums_for_tree(args.output + ".tmp")  # checksums.sha256 (sha256sum -c), before the rename
        os.replace(args.output + ".tmp", args.output)
        print(f"pipeline: {args.output}/model_index.json, transformer/, scheduler/, "
              f"{', '.join(name + '/' for name in components)}", flush=True)
    else:
        write_checksums_for_tree(args.output)  # checksums.sha256 of every file (sha256sum -c reads it)
    if args.verify:
        tol = args.verify_tolerance if args.verify_tolerance is not None else VERIFY_TOLERANCE[args.dtype]
        path = os.path.join(args.output, "transformer") if args.pipeline else args.output
        hf = load_hf(path, hf_cfg["_class_name"])
        err = verify(hf, model, cfg, hf_cfg["_class_name"])
        print(f"verify: diffusers vs megatron_anyflow relative error {err:.2e} (tolerance {tol:.0e})", flush=True)
        problem = verify_problem(err, tol, args.dtype, "output")
        if problem is None and args.pipeline and pipeline_class == "AnyFlowPipeline":
            problem = pipeline_problem("AnyFlowPipeline vs this project's sampler", tol, args.dtype,
                                       args.output, hf, model, shift)
        if problem:
            return verify_failed(args.output, problem)
    print(f"done in {time.time() - t0:.1f}s", flush=True)
    return 0


def pipeline_problem(label, tol, dtype, *args, **kwargs):
    """`verify_pipeline(*args, **kwargs)` with its line printed; the first reason it fails, or None."""
    try:
        errs = verify_pipeline(*args, **kwargs)
    except ValueError as exc:
        return str(exc)
    print(f"verify: the loaded {label}, final latents, relative error "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + f" (tolerance {tol:.0e})", flush=True)
    return next((p for p in (verify_problem(v, tol, dtype, f"the pipeline's {k} latents") for k, v in errs.items())
                 if p), None)


def verify_failed(output, problem):
    """Remove a failed export (it must not look usable) and report why; exit code 1."""
    shutil.rmtree(output)
    print(f"error: --verify: {problem}; removed {output}", file=sys.stderr)
    return 1


# the custom pipeline of a two-expert export: this project's file, copied as is (it imports only diffusers)
TWO_EXPERT_MODULE, TWO_EXPERT_CLASS = "pipeline_anyflow_two_expert", "AnyFlowTwoExpertPipeline"


def two_expert_pair(args, ckpt_dir, meta):
    """``{"high": (dir, meta), "low": (dir, meta)}`` of ``--input`` and ``--expert-2``, and the boundary; for a
    two-expert stage-2 checkpoint (``meta["experts"]``) both entries are ``--input``, each with its expert's
    architecture.

    Raises:
        ValueError: a checkpoint that is not one expert (no ``boundary_ratio`` / recorded ``expert``), two
            checkpoints of the same expert, boundaries that differ, or ``--expert-2`` with a checkpoint that
            holds both experts (all named)."""
    if meta.get("experts"):
        if args.expert_2 is not None:
            raise ValueError(f"--input {ckpt_dir} holds both experts (a two-expert stage-2 run); drop --expert-2")
        pair = {role: (ckpt_dir, dict(meta, wan_config=dict(meta["wan_config"], expert=role))) for role in ("high", "low")}
        return pair, float(meta["wan_config"]["boundary_ratio"])
    from megatron_anyflow.checkpoint.model_io import expert_pair

    pair, boundary = expert_pair(("--input", args.input), ("--expert-2", args.expert_2))
    return {role: (d, m) for role, (_, d, m) in pair.items()}, boundary


def export_two_experts(args, ckpt_dir, meta, components, t0):
    """``--expert-2``: both experts as one ``AnyFlowTwoExpertPipeline`` directory (module docstring).

    Returns the exit code: 0; 1 (non-finite weights, --verify failed); 2 (a bad request, named)."""
    from megatron_anyflow.models.wan.convert import hf_config_from_arch
    from megatron_anyflow.models.wan.hf_io import write_hf_transformer_dir
    from megatron_anyflow.checkpoint.store import CheckpointError, write_checksums_for_tree
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    try:
        pair, boundary = two_expert_pair(args, ckpt_dir, meta)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shift = args.shift if args.shift is not None else float((pair["high"][1].get("args") or {}).get("time_shift", 5.0))
    for d, m in pair.values():  # every request checked before anything is written
        lora = m.get("lora")
        if args.merge_lora is not None and (not lora or args.merge_lora not in lora["adapters"]):
            print(f"error: adapter {args.merge_lora!r} is not in {d} (adapters: {lora['adapters'] if lora else []})",
                  file=sys.stderr)
            return 2
        if hf_config_from_arch(m["wan_config"])["_class_name"] != "AnyFlowTransformer3DModel":
            print(f"error: {d} has no AnyFlow delta embedder (a converted base or a teacher); a two-expert AnyFlow "
                  "pipeline needs bidirectional stage-1 / stage-2 experts", file=sys.stderr)
            return 2
    root = args.output + ".tmp"
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    experts = {}
    for role, sub in (("high", "transformer"), ("low", "transformer_2")):
        d, m = pair[role]
        print(f"[2/4] the {role}-noise expert ({sub}): {d}", flush=True)
        try:
            model = load_for_inference(d, adapter=args.merge_lora, ema=args.ema,
                                       expert=role if meta.get("experts") else None)
        except (KeyError, FileNotFoundError, CheckpointError) as err:
            shutil.rmtree(root)
            print(f"error: {err}", file=sys.stderr)
            return 2
        hf_cfg = hf_config_from_arch(m["wan_config"])
        hf_sd = exportable_state_dict(model, args.dtype, d)
        if hf_sd is None:
            shutil.rmtree(root)  # no partial export is left behind
            return 1
        write_hf_transformer_dir(os.path.join(root, sub), hf_cfg, hf_sd)
        write_scheduler_config(os.path.join(root, sub), shift)
        experts[role] = (sub, model)
    print(f"[4/4] writing {args.output} as {TWO_EXPERT_CLASS} (boundary_ratio {boundary:g}, scheduler shift "
          f"{shift:g})", flush=True)
    write_pipeline(root, components, shift, "AnyFlowTransformer3DModel", [TWO_EXPERT_MODULE, TWO_EXPERT_CLASS],
                   extra={"transformer_2": ["diffusers", "AnyFlowTransformer3DModel"], "boundary_ratio": boundary})
    import megatron_anyflow.anyflow.diffusers_two_expert as two_expert

    shutil.copyfile(two_expert.__file__, os.path.join(root, f"{TWO_EXPERT_MODULE}.py"))
    write_checksums_for_tree(root)
    os.replace(root, args.output)
    print(f"pipeline: {args.output}/model_index.json, transformer/, transformer_2/, scheduler/, "
          f"{TWO_EXPERT_MODULE}.py, {', '.join(name + '/' for name in components)}", flush=True)
    if args.verify:
        tol = args.verify_tolerance if args.verify_tolerance is not None else VERIFY_TOLERANCE[args.dtype]
        hfs, problems = {}, []
        for role, (sub, model) in experts.items():
            hfs[role] = load_hf(os.path.join(args.output, sub), "AnyFlowTransformer3DModel")
            err = verify(hfs[role], model, model.config, "AnyFlowTransformer3DModel")
            print(f"verify: {sub}: diffusers vs megatron_anyflow relative error {err:.2e} (tolerance {tol:.0e})",
                  flush=True)
            problems.append(verify_problem(err, tol, args.dtype, f"{sub}'s output"))
        problem = next((p for p in problems if p), None)
        if problem is None:
            problem = pipeline_problem(f"{TWO_EXPERT_CLASS} vs this project's two-expert sampler", tol, args.dtype,
                                       args.output, hfs["high"], experts["high"][1], shift,
                                       expert_2=(hfs["low"], experts["low"][1]), boundary=boundary)
        if problem:
            return verify_failed(args.output, problem)
    print(f"done in {time.time() - t0:.1f}s", flush=True)
    return 0


def exportable_state_dict(model, dtype_name, ckpt_dir):
    """The diffusers state dict of ``model`` in ``dtype_name`` (fp32 / bf16 / fp16), its size printed; None
    (the reason printed) when a tensor holds a non-finite value: such weights are never exported."""
    import torch

    from megatron_anyflow.models.wan.convert import megatron_to_hf

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    full = {k: v for k, v in model.state_dict().items() if v is not None}
    hf_sd = {k: v.to(dtype) for k, v in megatron_to_hf(full, model.config.head_dim).items()}
    bad = non_finite_keys(hf_sd)
    print(f"transformer: {tensor_bytes(hf_sd) / 2**20:.2f} MiB of {dtype_name} tensors", flush=True)
    if bad:
        print(f"error: {len(bad)} tensor(s) of {ckpt_dir} hold non-finite values (NaN / inf) after conversion to "
              f"{dtype_name}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; refusing to export them "
              "(resume from an earlier checkpoint)", file=sys.stderr)
        return None
    return hf_sd


def verify_problem(err, tol, dtype, what):
    """None when ``err`` is finite and <= ``tol``, else the reason --verify fails (for the message)."""
    if not math.isfinite(err):
        return f"the export's {what} is not finite (relative error {err}); the weights or their dtype overflow"
    if err > tol:
        return (f"{what}: relative error {err:.2e} exceeds the tolerance {tol:.0e} ({dtype} export): the export "
                "does not reproduce the checkpoint")
    return None


def verify_pipeline(path, hf, model, shift, steps=2, expert_2=None, boundary=None):
    """The exported pipeline as a user loads it against this project's sampler.

    ``AnyFlowPipeline.from_pretrained(path)`` (its scheduler and VAE from the export; the text encoder is not
    loaded: prompt embeddings are given, and umT5-XXL would double the host memory; the transformer is
    ``hf``, the export's, already loaded by `verify`) samples ``steps`` flow-map steps in float32 from the
    same noise and random prompt embeddings as `anyflow.generation.sample_any_step` on ``model``, at
    ``shift``: text-to-video, and image-to-video with the first latent frame held clean (diffusers'
    ``video_latents``; Wan2.2 TI2V's layout). The latent size is 3 frames of 2 x 3 patches; the pixel size
    passed to the pipeline is that times the factors of the VAE's family (`data.codecs`: 16x space for the
    Wan2.2 VAE, 8x for Wan2.1's) and the pipeline draws the noise itself, so a pipeline that sized latents with another VAE factor,
    another channel count, another time grid or condition convention fails. Returns ``{"t2v": err, "i2v":
    err}``, relative Frobenius errors of the final latents [n, f, c, h, w] (``nan`` when non-finite).

    Two experts (``expert_2 = (hf_2, model_2)``, the low-noise pair, and ``boundary``): the export's own
    ``AnyFlowTwoExpertPipeline`` (``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)``) against
    ``FlowMapEulerSampler(N, shift, boundary)`` on ``route_experts(model, model_2, boundary)``, at N = 1 (the
    jump split at the boundary) and N = 4 (``steps`` is not used: at b = 0.875 the 2-step grid is the
    split 1-step one); keys ``"t2v N=1"`` etc. Wan2.2 I2V-A14B experts (``in_channels > out_channels``):
    one mode, ``"i2v-a14b"``: the pipeline given a random image against the sampler given that image's
    `data.channel_condition.encode_i2v_condition` through this project's codec of the export's VAE.

    Raises:
        ValueError: the pipeline's latents have another shape than the sampler's (named)."""
    import torch
    from diffusers import AnyFlowPipeline, DiffusionPipeline

    from megatron_anyflow.anyflow.generation import sample_any_step
    from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler, route_experts
    from megatron_anyflow.data.codecs import CODECS, vae_codec_name

    load = dict(transformer=hf, text_encoder=None, tokenizer=None, torch_dtype=torch.float32, local_files_only=True)
    if expert_2 is None:
        pipe = AnyFlowPipeline.from_pretrained(path, **load)
        counts = [steps]

        def sample(n, noise, text, c):
            return sample_any_step(model, noise, text, [n], shift=shift, condition_frames=c, progress=False)[n]
    else:
        pipe = DiffusionPipeline.from_pretrained(path, transformer_2=expert_2[0], trust_remote_code=True, **load)
        routed, counts = route_experts(model, expert_2[1], boundary), [1, 4]  # N = 2 is N = 1's grid at b = 0.875

        def sample(n, noise, text, c):
            c = None if c is None else c.expand(noise.shape[0], *c.shape[1:])
            return FlowMapEulerSampler(n, shift, boundary=boundary)(routed, noise, text, condition_frames=c)
    pipe.set_progress_bar_config(disable=True)
    cfg = model.config
    cc = cfg.in_channels - cfg.out_channels  # Wan2.2 I2V-A14B: the image through 20 condition channels
    pt, ph, pw = cfg.patch_size
    f, h, w = 3 * pt, 2 * ph, 3 * pw
    g = torch.Generator().manual_seed(1)
    text = torch.randn(2, 8, cfg.text_dim, generator=g)
    cond = torch.randn(1, 1, cfg.out_channels, h, w, generator=g)
    # The pixel size from this project's codec of that VAE family (16x space for the Wan2.2 VAE, 8x for
    # Wan2.1's; 4x time for both), not from the pipeline: the pipeline's own sizing is what is checked.
    codec_cls = CODECS[vae_codec_name(os.path.join(path, "vae"))]
    sf, tf = codec_cls.spatial, 4
    image = torch.rand(1, 3, h * sf, w * sf, generator=g)  # [0, 1], what the pipeline's video processor takes
    # The pipeline draws its own noise (diffusers' randn_tensor: one CPU generator, [n, C, f, h, w] float32),
    # so it sizes the latents from the pixel size and its VAE's factors; the sampler gets the same draw.
    noise = torch.randn(2, cfg.out_channels, f, h, w, generator=torch.Generator().manual_seed(2)).permute(0, 2, 1, 3, 4)
    if cc:  # the I2V pair: its condition from the image through this project's codec of the export's VAE
        from megatron_anyflow.data.channel_condition import encode_i2v_condition

        y = encode_i2v_condition(codec_cls(os.path.join(path, "vae"), device="cpu"), image * 2 - 1, (f - 1) * tf + 1)
        modes = (("i2v-a14b", None),)

        def run(n, noise, text, c):  # the pair's sampler, reading the condition channels (cc > 0: two experts)
            y_n = y.expand(noise.shape[0], -1, -1, -1, -1)
            return FlowMapEulerSampler(n, shift, boundary=boundary)(routed, noise, text, channel_condition=y_n)
    else:
        modes, run = (("t2v", None), ("i2v", cond)), sample
    out = {}
    for n in counts:
        for mode, c in modes:
            extra = dict(image=image) if cc else dict(video_latents=None if c is None else c.expand(2, -1, -1, -1, -1))
            with torch.no_grad():
                ours = run(n, noise, text, c)
                ref = pipe(prompt_embeds=text, generator=torch.Generator().manual_seed(2), num_inference_steps=n,
                           height=h * sf, width=w * sf, num_frames=(f - 1) * tf + 1, guidance_scale=1.0,
                           output_type="latent", **extra).frames.permute(0, 2, 1, 3, 4)
            if ref.shape != ours.shape:
                raise ValueError(f"the pipeline's latents have shape {tuple(ref.shape)}, the sampler's "
                                 f"{tuple(ours.shape)}")
            finite = bool(torch.isfinite(ours).all()) and bool(torch.isfinite(ref).all())
            out[mode if expert_2 is None else f"{mode} N={n}"] = (
                ((ours - ref).norm() / ref.norm()).item() if finite else float("nan"))
    return out


def non_finite_keys(sd):
    """Sorted keys of the tensors of ``sd`` holding a NaN or an infinity."""
    import torch

    return sorted(k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def write_scheduler_config(path, shift):
    """``scheduler_config.json`` of diffusers' ``FlowMapEulerDiscreteScheduler(num_train_timesteps=1000,
    shift=shift)`` in ``path`` (``FlowMapEulerDiscreteScheduler.from_pretrained(path)`` reads it)."""
    from diffusers import FlowMapEulerDiscreteScheduler

    FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).save_pretrained(path)


def _class_of(path, kind):
    """(library, class name) of a component directory, read from its config files."""
    import json

    if kind == "vae":
        cfg = os.path.join(path, "config.json")
        with open(cfg) as f:
            name = json.load(f).get("_class_name")
        if not name:
            raise ValueError(f"--vae {path}: {cfg} has no _class_name (expected a diffusers AutoencoderKLWan)")
        return "diffusers", name
    if kind == "text_encoder":
        cfg = os.path.join(path, "config.json")
        with open(cfg) as f:
            arch = json.load(f).get("architectures") or []
        if not arch:
            raise ValueError(f"--text-encoder {path}: {cfg} names no architectures (expected a transformers "
                             "model such as UMT5EncoderModel)")
        return "transformers", arch[0]
    cfg = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"--tokenizer {path}: no tokenizer_config.json (expected a transformers tokenizer "
                                "directory)")
    with open(cfg) as f:
        name = json.load(f).get("tokenizer_class") or "AutoTokenizer"
    import transformers

    if not hasattr(transformers, name):
        name = "AutoTokenizer"
    return "transformers", name


def vae_mismatch(vae, arch):
    """Why the VAE directory ``vae`` cannot decode the latents of the transformer ``arch`` (a checkpoint's
    ``wan_config``), or None: its ``z_dim`` must equal the transformer's ``out_channels`` (16: the Wan2.1 VAE,
    also Wan2.2 A14B's; 48: the Wan2.2 VAE of TI2V-5B)."""
    import json

    with open(os.path.join(vae, "config.json")) as f:
        z_dim = json.load(f).get("z_dim")
    if z_dim != arch["out_channels"]:
        return (f"--vae {vae}: a VAE with z_dim {z_dim}, but the transformer predicts {arch['out_channels']} latent "
                "channels (16: the Wan2.1 VAE, e.g. Wan2.1-T2V-1.3B-Diffusers/vae; 48: the Wan2.2 VAE, "
                "Wan2.2-TI2V-5B-Diffusers/vae); pass the VAE the model's latents came from")
    return None


def pipeline_components(vae, text_encoder, tokenizer):
    """name -> (source directory, (library, class)) for the pipeline's VAE, text encoder and tokenizer.

    Raises:
        ValueError / FileNotFoundError: a component missing or not a model directory (named).
    """
    if tokenizer is None and text_encoder is not None:
        for cand in (text_encoder, os.path.join(os.path.dirname(os.path.abspath(text_encoder)), "tokenizer")):
            if os.path.isfile(os.path.join(cand, "tokenizer_config.json")):
                tokenizer = cand
                break
    missing = [f"--{k}" for k, v in (("vae", vae), ("text-encoder", text_encoder), ("tokenizer", tokenizer)) if not v]
    if missing:
        raise ValueError(f"--pipeline needs {', '.join(missing)}: the directories of the Wan VAE, the umT5 text "
                         "encoder and its tokenizer to copy (e.g. from Wan2.1-T2V-1.3B-Diffusers)")
    out = {}
    for name, path in (("vae", vae), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such directory")
        if name != "tokenizer" and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no config.json")
        out[name] = (path, _class_of(path, name))
    return out


def write_pipeline(root, components, shift, transformer_class, pipeline_class="AnyFlowPipeline", extra=None):
    """``model_index.json`` (of ``pipeline_class``: a diffusers class name, or ``[module, class]`` of a custom
    pipeline file in ``root``; ``extra``: more index entries), ``scheduler/`` and copies of the components
    into ``root``."""
    import json

    import diffusers

    write_scheduler_config(os.path.join(root, "scheduler"), shift)
    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMapEulerDiscreteScheduler"],
             "transformer": ["diffusers", transformer_class], **(extra or {})}
    for name, (src, lib_cls) in components.items():
        shutil.copytree(src, os.path.join(root, name))
        index[name] = list(lib_cls)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(dict(sorted(index.items())), f, indent=2)


def load_hf(path, class_name):
    """The diffusers transformer ``class_name`` from the directory ``path``, float32, eval mode."""
    import diffusers
    import torch

    return getattr(diffusers, class_name).from_pretrained(path, torch_dtype=torch.float32).eval()


def tensor_bytes(sd):
    """Bytes of the tensors of a state dict (a safetensors file is this plus a small JSON header)."""
    return sum(v.numel() * v.element_size() for v in sd.values())


#: a two-expert stage-2 run's LoRA files (``--lora-only``): one per expert, diffusers' ``transformer`` then
#: ``transformer_2`` (``load_lora_weights(..., weight_name=..., load_into_transformer_2=True)`` for the second)
EXPERT_LORA_FILES = {"high": "high_noise_lora.safetensors", "low": "low_noise_lora.safetensors"}


def export_lora_only(args, ckpt_dir, meta, t0):
    """``--lora-only``: the adapter as ``OUTPUT/pytorch_lora_weights.safetensors`` (module docstring); for a
    two-expert stage-2 run, each expert's as ``OUTPUT/high_noise_lora.safetensors`` and
    ``OUTPUT/low_noise_lora.safetensors`` (`EXPERT_LORA_FILES`), each verified on its own expert.

    Returns the exit code: 0, 1 (non-finite adapter, --verify failed), 2 (bad request: no such adapter, a
    FAR generator, whose fully trained ``far_patch_embedding`` a LoRA cannot carry)."""
    import torch
    from diffusers.loaders import WanLoraLoaderMixin

    from megatron_anyflow.models import lora as L
    from megatron_anyflow.models.wan.convert import hf_config_from_arch, lora_to_diffusers, megatron_to_hf
    from megatron_anyflow.parallel.sharding import canonical_key
    from megatron_anyflow.checkpoint.store import CheckpointError, write_checksums_for_tree
    from megatron_anyflow.checkpoint.model_io import load_with_adapter

    adapter = args.lora_only
    lora = meta.get("lora")
    if not lora or adapter not in lora["adapters"]:
        print(f"error: --lora-only: adapter {adapter!r} not in {ckpt_dir} (adapters: {lora['adapters'] if lora else []}"
              "; a converted or fully fine-tuned checkpoint has no adapter to export: export it merged)",
              file=sys.stderr)
        return 2
    arch = meta["wan_config"]
    if arch.get("far") and adapter == "generator":
        print(f"error: --lora-only {adapter}: {ckpt_dir} is AnyFlow-FAR, whose generator also trains "
              "far_patch_embedding fully (not a low-rank update), which a diffusers LoRA cannot carry; export the "
              "merged model (--merge-lora generator)", file=sys.stderr)
        return 2
    # one model, or each expert of a two-expert stage-2 run: its own file, written and verified one expert at a
    # time (a 14B expert and its diffusers copy are held once), all in OUTPUT.tmp until every file passed
    files = EXPERT_LORA_FILES if meta.get("experts") else {None: "pytorch_lora_weights.safetensors"}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    hf_cfg = hf_config_from_arch(arch)
    tmp = args.output + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    for expert, name in files.items():
        what = f"the {expert}-noise expert's " if expert else "the "
        print(f"[2/4] loading {what}base and adapter {adapter!r}{' (EMA)' if args.ema else ''}", flush=True)
        try:
            model = load_with_adapter(ckpt_dir, adapter, ema=args.ema, expert=expert)
        except (KeyError, FileNotFoundError, CheckpointError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"error: {err}", file=sys.stderr)
            return 2
        cfg = model.config
        layers, lora_config = lora_to_diffusers(model, adapter, cfg.head_dim)
        layers = {k: v.to(dtype) for k, v in layers.items()}
        bad = non_finite_keys(layers)
        if bad:
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"error: {len(bad)} LoRA tensor(s) of {ckpt_dir}{' (' + expert + ')' if expert else ''} hold "
                  f"non-finite values in {args.dtype}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                  "refusing to export them", file=sys.stderr)
            return 1
        # The base as the diffusers model sees it (the LoRA linears' wrapped weights under their plain names).
        base = {canonical_key(k): v for k, v in model.state_dict().items() if v is not None and ".adapters." not in k}
        base_hf = megatron_to_hf(base, cfg.head_dim)
        del base
        print(f"[3/4] {what}LoRA: {len(lora_config['target_modules'])} diffusers modules, rank {lora_config['r']} "
              f"(alpha {lora['alpha']:g} / rank {lora['rank']} folded into lora_B)", flush=True)
        WanLoraLoaderMixin.save_lora_weights(tmp, transformer_lora_layers=layers, weight_name=name,
                                             transformer_lora_adapter_metadata=lora_config)
        merged_mib = sum(v.numel() for v in base_hf.values()) * dtype.itemsize / 2**20  # same shapes as the base
        print(f"[4/4] wrote {os.path.join(args.output, name)}: LoRA {os.path.getsize(os.path.join(tmp, name)) / 2**20:.3g}"
              f" MiB; the merged {hf_cfg['_class_name']} {'expert ' if expert else ''}export: {merged_mib:.3g} MiB of "
              f"{args.dtype} tensors", flush=True)
        if args.verify:
            import diffusers

            tol = args.verify_tolerance if args.verify_tolerance is not None else VERIFY_TOLERANCE[args.dtype]
            hf = getattr(diffusers, hf_cfg["_class_name"]).from_config(hf_cfg).float().eval()
            hf.load_state_dict({k: v.float() for k, v in base_hf.items()}, strict=True)
            hf.load_lora_adapter(tmp, weight_name=name, prefix="transformer")
            del base_hf
            L.merge_adapter(model, adapter)
            L.remove_lora(model)
            err = verify(hf, model, cfg, hf_cfg["_class_name"])
            print(f"verify: {name + ': ' if expert else ''}diffusers base + LoRA vs megatron_anyflow merged, relative "
                  f"error {err:.2e} (tolerance {tol:.0e})", flush=True)
            if not math.isfinite(err) or err > tol:
                return verify_failed(tmp, f"{name}: relative error {err:.2e} (tolerance {tol:.0e}): the LoRA on "
                                          "the base does not reproduce the merged checkpoint")
        del model
    write_checksums_for_tree(tmp)
    os.replace(tmp, args.output)
    print(f"done in {time.time() - t0:.1f}s", flush=True)
    return 0


def verify(hf, model, cfg, class_name):
    """Relative error ``|ours - ref| / |ref|`` (Frobenius) between the diffusers model ``hf`` and ``model``
    on one random float32 input; ``nan`` when either output holds a non-finite value. A
    ``WanTransformer3DModel`` (no delta embedder: a Wan2.1 / Wan2.2 teacher or base) is compared with
    per-token timesteps [1, S] in Wan2.2 TI2V's layout (first latent frame at 0).

    AnyFlow-FAR (``AnyFlowFARTransformer3DModel``): the teacher-forcing forward of `far_verify_inputs`
    (``full_chunk_limit + 1`` chunks, so the first is compressed through ``far_patch_embedding``, plus the
    clean copies), the path of every FAR weight; diffusers' FAR class has no bidirectional forward."""
    import warnings

    import torch

    g = torch.Generator().manual_seed(0)
    model = model.float().eval()
    with torch.no_grad(), warnings.catch_warnings():
        # diffusers' FAR attention is flex_attention, unfused outside torch.compile: fine for one check
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if class_name == "AnyFlowFARTransformer3DModel":
            x, t, r, txt, cp, clean, clean_t = far_verify_inputs(cfg, g)
            ours = model(x, t, r, txt, chunk_partition=cp, clean_latents=clean, clean_t=clean_t)
            ref = hf(hidden_states=x, timestep=t, r_timestep=r, encoder_hidden_states=txt, chunk_partition=list(cp),
                     clean_hidden_states=clean, clean_timestep=clean_t, return_dict=False)[0]
        else:
            pt, ph, pw = cfg.patch_size
            x = torch.randn(1, 2 * pt, cfg.in_channels, 4 * ph, 4 * pw, generator=g)
            t = torch.full((1, 2 * pt), 700.0)
            r = torch.full((1, 2 * pt), 300.0)
            txt = torch.randn(1, 8, cfg.text_dim, generator=g)
            if class_name == "AnyFlowTransformer3DModel":
                ours = model(x, t, r, txt)
                ref = hf(x, t, r, txt, return_dict=False)[0]
            else:
                # Per-token timesteps as diffusers' Wan2.2 pipeline passes them (expand_timesteps: the first
                # latent frame's tokens at 0, the rest at t); Wan2.1 transformers take them too.
                t_tok = torch.full((1, 2 * 4 * 4), 700.0)
                t_tok[:, :16] = 0.0
                ours = model(x, t_tok, None, txt)
                ref = hf(x.permute(0, 2, 1, 3, 4), t_tok, txt, return_dict=False)[0].permute(0, 2, 1, 3, 4)
    if not (bool(torch.isfinite(ours).all()) and bool(torch.isfinite(ref).all())):
        return float("nan")
    return ((ours - ref).norm() / ref.norm()).item()


def far_verify_inputs(cfg, g):
    """A small AnyFlow-FAR teacher-forcing input: chunks ``(1, 2, 1, ...)`` (``full_chunk_limit + 1`` of
    them: chunk 0 is compressed context at t = r = 0), latents of 2 x 3 compressed patches, the noisy
    full-resolution chunks at (t, r) = (700, 300) and their clean copies at per-frame t in [0, 100)."""
    import torch

    cp = (1, 2) + (1,) * (cfg.full_chunk_limit - 1)
    n_ctx = cp[0]
    f = sum(cp)
    _, ch, cw = cfg.compressed_patch_size
    x = torch.randn(1, f, cfg.in_channels, 2 * ch, 3 * cw, generator=g)
    t = torch.cat([torch.zeros(1, n_ctx), torch.full((1, f - n_ctx), 700.0)], 1)
    r = torch.cat([torch.zeros(1, n_ctx), torch.full((1, f - n_ctx), 300.0)], 1)
    clean = torch.randn(1, f - n_ctx, cfg.in_channels, 2 * ch, 3 * cw, generator=g)
    clean_t = torch.rand(1, f - n_ctx, generator=g) * 100
    txt = torch.randn(1, 8, cfg.text_dim, generator=g)
    return x, t, r, txt, cp, clean, clean_t


if __name__ == "__main__":
    sys.exit(main())
