"""AnyFlow-FAR (causal) under TP / SP / CP against a single process on CPU with gloo.

    python tests/distributed/far_parallel_check.py reference REF.pt
    torchrun --nproc_per_node 2 tests/distributed/far_parallel_check.py compare REF.pt RESULT.json \
        --settings cp2,tp2sp
    torchrun --nproc_per_node 4 tests/distributed/far_parallel_check.py compare REF.pt RESULT.json \
        --settings tp2sp-cp2,tp2-cp2

The reference run builds the tiny FAR model in one process (TP = CP = 1) with fresh random weights
(``far_patch_embedding`` perturbed off its trilinear initialisation; with LoRA, B random too so every
adapter weight gets a gradient, and ``far_patch_embedding`` trainable next to the adapters as in FAR
training, docs/design/far.md 1.1), and saves weights, outputs, parameter and input gradients and the grad norm of:

- teacher forcing (`TRAIN`): batch 2, n = 5 chunks (two compressed context chunks, three noisy chunks and
  their clean copies), per-frame (t, r) on the noisy frames (context frames t = r = 0), clean copies at
  nonzero per-frame ``clean_t``; latents, clean latents and text require grad. Three layouts: ``tf``
  (the tiny preset's partition, 258 tokens: unpadded at 2 ranks, padded by 2 at CP x SP = 4), ``tf-fc4``
  (4 compressed frames, 264 tokens: unpadded at 4) and ``tf-odd`` (3 tokens per compressed frame, 129
  tokens: padded at 2 and at 4 ranks). Frame boundaries fall inside the CP / SP slices.
- the KV cache (`KV`, no gradient): generation of chunks 0..4 of the same partition, each chunk k a
  prefill of the clean prefix cp[:k] (k >= 1; from chunk 4 on the cache holds compressed chunks) and a
  cached step; the steps' outputs and every layer's cached K / V are saved. ``kv-odd``'s prefills of an
  odd token count are padded at 2 ranks.

The compare run builds the model at the setting's TP, CP and SP (one process group set-up per setting,
several settings per launch), loads the same weights, repeats every case, runs `finalize_model_grads`,
gathers each TP-sharded gradient back to the full layout and reports the largest relative error
(norm-wise, per tensor) over all ranks, that CP peers end with identical gradients, the padding each
layout got (from `FarLayout`, as `WanModel._forward_far` pads) and, for the cache, each rank's K / V
against the reference's heads for that rank (the post-exchange layout: the whole history, heads
``tp_rank * n / tp + cp_rank * n / (tp cp) + [0, n / (tp cp))``).
"""

import argparse
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cp_check import grad_errors  # noqa: E402  (the per-tensor gradient measure and its tolerance analysis)

# Tolerances: those of cp_check.py (its comment has the analysis): 1e-5 relative for outputs, grad
# norm, input gradients and cached K / V; per parameter tensor 1e-5 of the whole gradient's norm and
# 1e-5 relative for tensors holding >= 10 % of it. FAR changes nothing in that argument: the grouped
# attention runs the same dense kernel on every rank (after the Ulysses exchange each rank holds the
# whole sequence), padding tokens are exact zeros that no query attends to, and the parallel run only
# sums the same float32 terms in another order.

# name: (chunk_partition, latent H, latent W)
TRAIN = {
    "tf": ((1, 2, 2, 2, 1), 8, 12),
    "tf-fc4": ((2, 2, 2, 2, 1), 8, 12),
    "tf-odd": ((1, 2, 2, 2, 1), 4, 12),
}
KV = {
    "kv": ((1, 2, 2, 2, 1), 8, 12),
    "kv-odd": ((1, 2, 2, 2, 1), 4, 12),
}
# setting: (tp, cp, sequence parallel)
SETTINGS = {"cp2": (1, 2, False), "tp2sp": (2, 1, True),
            "tp2sp-cp2": (2, 2, True), "tp2-cp2": (2, 2, False)}
BATCH, TEXT_LEN, TEXT_DIM, CHANNELS = 2, 7, 384, 16


def build(lora: bool, tp: int, cp: int, sp: bool):
    from megatron_anyflow.models import lora as L
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.model import WanModel

    cfg = wan_config("tiny", far=True, chunk_partition=TRAIN["tf"][0], tensor_model_parallel_size=tp,
                     context_parallel_size=cp, sequence_parallel=sp and tp > 1)
    model = WanModel(cfg)
    if lora:
        L.apply_lora(model, ["gen", "fake"], rank=4, alpha=8.0)
        L.set_active_adapter(model, "gen")
        model.far_patch_embedding.requires_grad_(True)  # trained fully next to the adapters (docs/design/far.md 1.1)
    return model


def train_inputs(name):
    """Teacher-forcing inputs of case ``name``: latents [b, F, c, H, W] (context chunks then noisy chunks),
    per-frame t, r [b, F] (context frames 0), clean copies [b, Ff, c, H, W] at clean_t [b, Ff], text, and
    the output-gradient weights w [b, Ff, c, H, W]."""
    cp, H, W = TRAIN[name]
    g = torch.Generator().manual_seed(1)
    f, ff = sum(cp), sum(cp[-3:])
    x = torch.randn(BATCH, f, CHANNELS, H, W, generator=g)
    t = torch.rand(BATCH, f, generator=g) * 1000
    r = t * torch.rand(BATCH, f, generator=g)
    t[:, :f - ff] = 0
    r[:, :f - ff] = 0
    clean = torch.randn(BATCH, ff, CHANNELS, H, W, generator=g)
    clean_t = torch.rand(BATCH, ff, generator=g) * 1000
    txt = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g)
    w = torch.randn(BATCH, ff, CHANNELS, H, W, generator=g)
    return x.requires_grad_(), t, r, clean.requires_grad_(), clean_t, txt.requires_grad_(), w


def train_step(model, name):
    from megatron_anyflow.parallel.tensor_parallel import finalize_model_grads, grad_norm

    for p in model.parameters():
        p.grad = None
    x, t, r, clean, clean_t, txt, w = train_inputs(name)
    out = model(x, t, r, txt, chunk_partition=TRAIN[name][0], clean_latents=clean, clean_t=clean_t)
    (out * w).sum().backward()
    finalize_model_grads(model)
    gn = grad_norm([p for p in model.parameters() if p.requires_grad])
    return out.detach(), gn, {"latents": x.grad, "clean_latents": clean.grad, "text": txt.grad}


@torch.no_grad()
def kv_run(model, name):
    """Chunk-by-chunk generation with the KV cache: for every chunk k, prefill of the clean prefix
    cp[:k] (k >= 1; the given latents stand in for generated chunks) and the cached step of chunk k at
    per-frame (t, r). Returns the steps' outputs and each prefill's per-layer (K, V)."""
    from megatron_anyflow.models.wan.far import FarKVCache

    cp, H, W = KV[name]
    g = torch.Generator().manual_seed(2)
    f = sum(cp)
    clean = torch.randn(BATCH, f, CHANNELS, H, W, generator=g)
    noisy = torch.randn(BATCH, f, CHANNELS, H, W, generator=g)
    t = torch.rand(BATCH, f, generator=g) * 1000
    r = t * torch.rand(BATCH, f, generator=g)
    txt = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g)
    outs, caches = [], []
    cache = FarKVCache()
    for k in range(len(cp)):
        a, e = sum(cp[:k]), sum(cp[:k + 1])
        if k:
            cache = model.prefill(clean[:, :a], txt, cp[:k])
            caches.append([(kk.clone(), vv.clone()) for kk, vv in cache.layers])
        outs.append(model(noisy[:, a:e], t[:, a:e], r[:, a:e], txt, chunk_partition=cp[:k + 1], kv_cache=cache))
    return outs, caches


def reference(path):
    from megatron_anyflow.parallel.state import initialize_parallel

    initialize_parallel(1)
    res = {}
    for variant in ("full", "lora"):
        torch.manual_seed(0)
        model = build(variant == "lora", 1, 1, False)
        with torch.no_grad():
            model.far_patch_embedding.weight.add_(0.05 * torch.randn_like(model.far_patch_embedding.weight))
            model.far_patch_embedding.bias.add_(0.05 * torch.randn_like(model.far_patch_embedding.bias))
            if variant == "lora":
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.data.normal_(0, 0.05)
        res[variant] = {"state": {k: v.clone() for k, v in model.state_dict().items() if v is not None}}
        for name in TRAIN:
            out, gn, in_grads = train_step(model, name)
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            res[variant][name] = dict(out=out, grads=grads, grad_norm=gn, in_grads=in_grads)
        if variant == "full":
            for name in KV:
                outs, caches = kv_run(model, name)
                res[variant][name] = dict(outs=outs, caches=caches)
    torch.save(res, path)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _layout_pad(cp, H, W, parts, mode):
    from megatron_anyflow.models.wan.far import FarLayout

    if mode == "train":
        lay = FarLayout.train(cp, H, W, clean=True, pad_to=parts)
    else:
        lay = FarLayout.prefill(cp, H, W, pad_to=parts)
    return lay.valid_length, lay.pad


def compare_setting(ref, setting):
    from megatron.core import parallel_state
    from megatron_anyflow.models.wan.convert import load_full_state_dict
    from megatron_anyflow.parallel.state import initialize_parallel

    tp, cp, sp = SETTINGS[setting]
    initialize_parallel(tp, cp)
    assert parallel_state.get_context_parallel_world_size() == cp
    assert parallel_state.get_tensor_model_parallel_world_size() == tp
    parts = cp * (tp if sp else 1)
    tp_r, cp_r = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_context_parallel_rank()
    report = {}
    for variant in ("full", "lora"):
        model = build(variant == "lora", tp, cp, sp)
        load_full_state_dict(model, ref[variant]["state"], "reference")
        for name in TRAIN:
            rf = ref[variant][name]
            out, gn, in_grads = train_step(model, name)
            errs = {"output": _rel(out, rf["out"]),
                    "grad_norm": abs(gn.item() - rf["grad_norm"].item()) / rf["grad_norm"].item(),
                    "input_grads": max(_rel(in_grads[k], rf["in_grads"][k]) for k in in_grads)}
            per_tensor, missing, cp_spread = [], [], 0.0
            for n, p in model.named_parameters():
                if p.grad is None:
                    continue
                gr = p.grad
                peers = [torch.empty_like(gr) for _ in range(cp)]
                dist.all_gather(peers, gr.contiguous(), group=parallel_state.get_context_parallel_group())
                cp_spread = max(cp_spread, max((q - gr).abs().max().item() for q in peers))
                if getattr(p, "tensor_model_parallel", False) and tp > 1:
                    shards = [torch.empty_like(gr) for _ in range(tp)]
                    dist.all_gather(shards, gr.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
                    gr = torch.cat(shards, dim=p.partition_dim)
                rg = rf["grads"].get(n)
                if rg is None:
                    missing.append(n)
                    continue
                per_tensor.append((n, (gr - rg).norm().item(), rg.norm().item()))
            errs.update(grad_errors(per_tensor))
            valid, pad = _layout_pad(*TRAIN[name], parts, "train")
            errs.update(missing=missing, cp_spread=cp_spread, tokens=valid, pad=pad,
                        n_grads=sum(1 for p in model.parameters() if p.grad is not None),
                        n_ref_grads=len(rf["grads"]),
                        far_patch_grad="far_patch_embedding.weight" in rf["grads"])
            report[f"{setting}/{variant}/{name}"] = errs

        if variant == "full":
            n_local = model.config.num_attention_heads // (tp * cp)
            h0 = tp_r * (model.config.num_attention_heads // tp) + cp_r * n_local
            for name in KV:
                rf = ref[variant][name]
                outs, caches = kv_run(model, name)
                c_cp = KV[name][0]
                report[f"{setting}/kv/{name}"] = {
                    "outputs": max(_rel(o, ro) for o, ro in zip(outs, rf["outs"])),
                    "n_steps": len(outs),
                    "cache": max(_rel(x, rx[:, :, h0:h0 + n_local])
                                 for layers, rlayers in zip(caches, rf["caches"])
                                 for kv, rkv in zip(layers, rlayers) for x, rx in zip(kv, rkv)),
                    "cache_shapes_ok": all(x.shape == (rx.shape[0], rx.shape[1], n_local, rx.shape[3])
                                           for layers, rlayers in zip(caches, rf["caches"])
                                           for kv, rkv in zip(layers, rlayers) for x, rx in zip(kv, rkv)),
                    "prefill_pads": [_layout_pad(c_cp[:k], KV[name][1], KV[name][2], parts, "prefill")[1]
                                     for k in range(1, len(c_cp))],
                }
    return report


MAX_KEYS = ("output", "grad_norm", "input_grads", "worst_grad", "worst_grad_rel_large", "worst_grad_rel_any",
            "cp_spread", "outputs", "cache")


def compare(ref_path, out_path, settings):
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat

    enable_megatron_cpu_compat()
    ref = torch.load(ref_path)
    report = {}
    for setting in settings:
        report.update(compare_setting(ref, setting))

    # Worst case over all ranks (every rank checks its own CP / TP slices).
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        merged = reports[0]
        for rep in reports[1:]:
            for case, errs in rep.items():
                m = merged[case]
                for k in MAX_KEYS:
                    if k in errs and errs[k] > m[k]:
                        m[k] = errs[k]
                        if k + "_name" in errs:
                            m[k + "_name"] = errs[k + "_name"]
                if "missing" in errs:
                    m["missing"] = sorted(set(m["missing"]) | set(errs["missing"]))
                if "cache_shapes_ok" in errs:
                    m["cache_shapes_ok"] = m["cache_shapes_ok"] and errs["cache_shapes_ok"]
        with open(out_path, "w") as f:
            json.dump(merged, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["reference", "compare"])
    ap.add_argument("ref")
    ap.add_argument("out", nargs="?")
    ap.add_argument("--settings", default="cp2",
                    help=f"comma-separated, run in order in one launch: {', '.join(SETTINGS)}")
    a = ap.parse_args()
    if a.mode == "reference":
        reference(a.ref)
    else:
        compare(a.ref, a.out, a.settings.split(","))
    # every rank ends its groups after a barrier: a gloo group left to interpreter exit can abort a rank
    # whose peer is still writing (megatron_anyflow/cli.py, end_process_groups)
    from megatron_anyflow.cli import end_process_groups

    end_process_groups()
