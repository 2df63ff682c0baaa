"""``pretrain_anyflow.py --dry-run``: validate a launch without GPUs or process groups.

Checks that every size divides (world size by TP x CP, heads by TP x CP, the token count by TP x CP
under sequence parallelism, the global batch by micro batch x DP), builds the model on the meta device
to count parameters (total, per-GPU shard, LoRA), and prints what it found. Exit status 0 when every
check passes, 1 otherwise. The memory plan is `measure.memory` (CLI `tools/memory_plan.py`; the launch scripts print both).

``--model far`` (AnyFlow-FAR): the FAR config as the trainer builds it (``far`` on, ``--chunk-partition``
or the default (1, 3, 3, 3, 3, 3, 3, 2)); checks that the chunk partition covers the clip (stage 2:
sums to its latent frames; stage 1: at most them, the clip is cut to the partition), that the heads
divide by TP x CP (the FAR attention runs after the Ulysses exchange) and that Transformer Engine's own
CP attention is not in the way (``--backend te`` with CP > 1 cannot express the FAR mask). FAR sequences
that do not divide by CP x SP are padded by the model, not rejected: the padding is printed.
"""

from __future__ import annotations

import os

import torch

from megatron_anyflow.data.channel_condition import condition_channels
from megatron_anyflow.models.wan.config import expert_time_range, wan_config
from megatron_anyflow.models.wan.model import WanModel


def _world_size(args) -> int:
    if args.world_size:
        return args.world_size
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("NNODES", 1)) * int(os.environ.get("GPUS_PER_NODE", 1))


def dry_run(args, log=print) -> int:
    """Run the checks for parsed arguments; returns 0 if the launch is consistent, else 1."""
    from megatron_anyflow.models import lora as L

    arch = wan_config(args.model_preset).arch_dict()
    if args.pretrained:
        from megatron_anyflow.checkpoint import store as ckpt

        try:
            arch = dict(ckpt.read_meta(ckpt.resolve_checkpoint_dir(args.pretrained))["wan_config"])
            log(f"architecture from {args.pretrained}")
        except (FileNotFoundError, KeyError, ckpt.CheckpointError) as err:
            log(f"note: {err}; using preset {args.model_preset}")
    arch["delta_embedder"] = arch["delta_embedder"] or args.stage != "teacher"
    far = getattr(args, "model", "bidirectional") == "far"
    checks = []
    if far:  # as Trainer._build_model: the bidirectional base + far_patch_embedding and the FAR fields
        arch["far"] = True
        if args.chunk_partition is not None:
            arch["chunk_partition"] = list(args.chunk_partition)
        for k, v in wan_config(None, **arch).arch_dict().items():
            arch.setdefault(k, v)
    elif arch.get("far"):
        checks.append((False, f"--pretrained {args.pretrained} is an AnyFlow-FAR checkpoint: pass --model far"))
    try:  # as Trainer._build_model: one expert of a two-expert model (Wan2.2 A14B) per stage-1 run, both in stage 2
        expert_time_range(arch, args.stage, getattr(args, "expert", None),
                          f"--pretrained {args.pretrained}" if args.pretrained
                          else f"--model-preset {args.model_preset}", getattr(args, "model", "bidirectional"))
    except ValueError as err:
        checks.append((False, str(err)))
    n_experts = 2 if arch.get("boundary_ratio") is not None and args.stage == "stage2" else 1
    if n_experts == 2 and args.pretrained:
        checks.append((bool(getattr(args, "pretrained_2", None)),
                       "two-expert stage 2: both experts' bases (--pretrained and --pretrained-2), both resident"))
    cfg = wan_config(None, **arch, perform_initialization=False)
    world = _world_size(args)
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    sp = args.sequence_parallel and tp > 1
    if args.data_path and os.path.isfile(os.path.join(args.data_path, "index.json")):
        import json

        with open(os.path.join(args.data_path, "index.json")) as f:
            f_, c_, h_, w_ = json.load(f)["latent_shape"]
    else:
        f_, c_, h_, w_ = args.mock_latent_shape
    pt, ph, pw = cfg.patch_size
    tokens = (f_ // pt) * (h_ // ph) * (w_ // pw)
    if far:
        chunks = tuple(cfg.chunk_partition)
        frames_used = sum(chunks)
        if args.stage == "stage2":
            checks.append((frames_used == f_, f"chunk partition {list(chunks)} sums to {frames_used} latent frames "
                                              f"== the clip's {f_} (stage 2 rolls out whole clips)"))
        else:
            checks.append((frames_used <= f_, f"chunk partition {list(chunks)} sums to {frames_used} latent frames "
                                              f"<= the clip's {f_} (stage 1 keeps the first {frames_used})"))
        tokens = (min(frames_used, f_) // pt) * (h_ // ph) * (w_ // pw)  # the bidirectional forward's clip
        checks.append((h_ % cfg.compressed_patch_size[1] == 0 and w_ % cfg.compressed_patch_size[2] == 0,
                       f"latent {h_}x{w_} divisible by the compressed patch {tuple(cfg.compressed_patch_size[1:])}"))
        checks.append((not (args.backend == "te" and cp > 1),
                       "FAR attention without context parallelism" if cp == 1 else
                       f"FAR attention over CP {cp} through the local backend's Ulysses exchange (--backend "
                       f"{args.backend}; Transformer Engine's own CP attention has no FAR mask)"))
    checks.append((world % (tp * cp) == 0, f"world size {world} divisible by TP {tp} x CP {cp}"))
    dp = max(world // (tp * cp), 1)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    checks.append((cfg.num_attention_heads % (tp * cp) == 0,
                   f"{cfg.num_attention_heads} heads divisible by TP x CP = {tp * cp}"))
    split = tp * cp if sp else cp
    checks.append((tokens % split == 0, f"{tokens} tokens per sample (latents {f_}x{h_}x{w_}) divisible by "
                                        f"{'TP x CP' if sp else 'CP'} = {split}"
                                        + (" (the bidirectional forward; FAR sequences are padded)" if far else "")))
    checks.append((gbs % (args.micro_batch_size * dp) == 0,
                   f"global batch {gbs} divisible by micro batch {args.micro_batch_size} x DP {dp}"))
    cc = condition_channels(cfg)  # Wan2.2 I2V-A14B: 16 latent + 20 condition channels in
    checks.append((c_ == cfg.in_channels - cc, f"latent channels {c_} == model in_channels {cfg.in_channels}"
                   + (f" - {cc} image-condition channels" if cc else "")))
    checks.append((cfg.hidden_size % tp == 0 and cfg.ffn_hidden_size % tp == 0,
                   f"hidden {cfg.hidden_size} and FFN {cfg.ffn_hidden_size} divisible by TP {tp}"))
    with torch.device("meta"):
        model = WanModel(cfg)
        lora_params = 0
        if args.lora_rank > 0:
            adapters = {"teacher": ["teacher"], "stage1": ["generator"], "stage2": ["generator", "fake_score"]}[args.stage]
            L.apply_lora(model, adapters, args.lora_rank, args.lora_alpha)
            lora_params = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)
    base = n_experts * sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n)
    sharded = n_experts * sum(p.numel() for n, p in model.named_parameters()
                              if ".adapters." not in n and getattr(p, "tensor_model_parallel", False))
    lora_params *= n_experts
    per_gpu = (base - sharded) + sharded // tp
    log(f"model: {'two experts (Wan2.2 A14B stage 2, both resident) of ' if n_experts == 2 else ''}"
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads: "
        f"{base / 1e9:.3f}B base parameters ({per_gpu / 1e9:.3f}B per GPU at TP {tp}), "
        f"LoRA {lora_params / 1e6:.1f}M (rank {args.lora_rank})")
    log(f"layout: world {world} = TP {tp} x CP {cp} x DP {dp}; sequence parallel {'on' if sp else 'off'}; "
        f"global batch {gbs} = micro {args.micro_batch_size} x DP {dp} x accumulation "
        f"{gbs // max(args.micro_batch_size * dp, 1)}; {tokens} tokens per sample, "
        f"{tokens // (tp * cp if sp else cp)} per GPU in the blocks")
    if far and frames_used <= f_ and not (h_ % cfg.compressed_patch_size[1] or w_ % cfg.compressed_patch_size[2]):
        _log_far_sequences(cfg, chunks, h_, w_, cp * (tp if sp else 1), log)
    ok = True
    for passed, what in checks:
        log(f"  [{'ok' if passed else 'FAIL'}] {what}")
        ok &= passed
    return 0 if ok else 1


def _log_far_sequences(cfg, chunks, height: int, width: int, pad_to: int, log) -> None:
    """The FAR sequences of a launch (docs/design/far.md 1.2) and the padding the model adds to each to divide by
    CP x SP = ``pad_to`` (padding is not an error: pad tokens are no keys and their outputs are zero)."""
    from megatron_anyflow.models.wan.far import FarLayout

    geo = dict(height=height, width=width, patch_size=cfg.patch_size, compressed_patch_size=cfg.compressed_patch_size,
               full_chunk_limit=cfg.full_chunk_limit, pad_to=pad_to)
    n0 = min(3, len(chunks))
    rows = [(f"teacher forcing n={n}", FarLayout.train(chunks[:n], clean=True, **geo)) for n in range(n0, len(chunks) + 1)]
    rows += [(f"prefill of chunks 0..{j}", FarLayout.prefill(chunks[:j + 1], **geo)) for j in range(len(chunks) - 1)]
    rows += [(f"step of chunk {k}", FarLayout.step(chunks[:k + 1], **geo)) for k in range(1, len(chunks))]
    padded = [(name, lay) for name, lay in rows if lay.pad]
    tf = ", ".join(f"{lay.valid_length}" for name, lay in rows if name.startswith("teacher"))
    pre = ", ".join(f"{lay.valid_length}" for name, lay in rows if name.startswith("prefill"))
    log(f"AnyFlow-FAR: chunks {list(chunks)}; teacher-forcing tokens n={n0}..{len(chunks)}: {tf}; KV-cache prefills: "
        f"{pre} (largest cache {max((lay.valid_length for n, lay in rows if n.startswith('prefill')), default=0)})")
    if not padded:
        log(f"  every FAR sequence divides by CP x SP = {pad_to}: no padding")
        return
    log(f"  padded to a multiple of CP x SP = {pad_to} (pad tokens masked, not an error): "
        + ", ".join(f"{name}: {lay.valid_length} + {lay.pad}" for name, lay in padded))
