"""``pretrain_anyflow.py --dry-run``: validate a launch without GPUs or process groups.

Checks that every size divides (world size by TP x CP, heads by TP x CP, the token count by TP x CP
under sequence parallelism, the global batch by micro batch x DP), builds the model on the meta device
to count parameters (total, per-GPU shard, LoRA), and prints what it found. Exit status 0 when every
check passes, 1 otherwise. The memory plan is `tools/memory_plan.py` (the launch scripts print both).
"""

from __future__ import annotations

import os

import torch

from megatron_anyflow.models.wan.config import wan_config
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
        from megatron_anyflow.training import checkpointing as ckpt

        try:
            arch = dict(ckpt.read_meta(ckpt.resolve_checkpoint_dir(args.pretrained))["wan_config"])
            log(f"architecture from {args.pretrained}")
        except (FileNotFoundError, KeyError, ckpt.CheckpointError) as err:
            log(f"note: {err}; using preset {args.model_preset}")
    arch["delta_embedder"] = arch["delta_embedder"] or args.stage != "teacher"
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
    checks = []
    checks.append((world % (tp * cp) == 0, f"world size {world} divisible by TP {tp} x CP {cp}"))
    dp = max(world // (tp * cp), 1)
    gbs = args.global_batch_size or args.micro_batch_size * dp
    checks.append((cfg.num_attention_heads % (tp * cp) == 0,
                   f"{cfg.num_attention_heads} heads divisible by TP x CP = {tp * cp}"))
    split = tp * cp if sp else cp
    checks.append((tokens % split == 0, f"{tokens} tokens per sample (latents {f_}x{h_}x{w_}) divisible by "
                                        f"{'TP x CP' if sp else 'CP'} = {split}"))
    checks.append((gbs % (args.micro_batch_size * dp) == 0,
                   f"global batch {gbs} divisible by micro batch {args.micro_batch_size} x DP {dp}"))
    checks.append((c_ == cfg.in_channels, f"latent channels {c_} == model in_channels {cfg.in_channels}"))
    checks.append((cfg.hidden_size % tp == 0 and cfg.ffn_hidden_size % tp == 0,
                   f"hidden {cfg.hidden_size} and FFN {cfg.ffn_hidden_size} divisible by TP {tp}"))
    with torch.device("meta"):
        model = WanModel(cfg)
        lora_params = 0
        if args.lora_rank > 0:
            adapters = {"teacher": ["teacher"], "stage1": ["generator"], "stage2": ["generator", "fake_score"]}[args.stage]
            L.apply_lora(model, adapters, args.lora_rank, args.lora_alpha)
            lora_params = sum(p.numel() for n, p in model.named_parameters() if ".adapters." in n)
    base = sum(p.numel() for n, p in model.named_parameters() if ".adapters." not in n)
    sharded = sum(p.numel() for n, p in model.named_parameters()
                  if ".adapters." not in n and getattr(p, "tensor_model_parallel", False))
    per_gpu = (base - sharded) + sharded // tp
    log(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads: "
        f"{base / 1e9:.3f}B base parameters ({per_gpu / 1e9:.3f}B per GPU at TP {tp}), "
        f"LoRA {lora_params / 1e6:.1f}M (rank {args.lora_rank})")
    log(f"layout: world {world} = TP {tp} x CP {cp} x DP {dp}; sequence parallel {'on' if sp else 'off'}; "
        f"global batch {gbs} = micro {args.micro_batch_size} x DP {dp} x accumulation "
        f"{gbs // max(args.micro_batch_size * dp, 1)}; {tokens} tokens per sample, "
        f"{tokens // (tp * cp if sp else cp)} per GPU in the blocks")
    ok = True
    for passed, what in checks:
        log(f"  [{'ok' if passed else 'FAIL'}] {what}")
        ok &= passed
    return 0 if ok else 1
