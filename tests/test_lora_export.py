"""tools/convert_to_hf.py --lora-only: the student's adapter as a diffusers / PEFT LoRA file that
``AnyFlowPipeline.load_lora_weights`` applies on the base export, equal to the merged export; for the tiny
Wan2.1 preset and the Wan2.2 TI2V-5B family's tiny member (48 latent channels).

The checkpoint is a tiny stage-1 run (rank 4, alpha 8: scaling 2, so folding alpha / rank into lora_B is
exercised) whose generator adapter (live and EMA, different) is then overwritten with fresh random A and
B and saved again: a LoRA B that training barely moved would hide a wrong key, layout or scale.

Tolerances (float32 throughout):
- weights: the merged export is ``fl(W + fl(B' A))`` with ``B' = fl((alpha / rank) B)`` the file's lora_B;
  against the float64 product ``W + B' A`` each element is off by at most one rounding of the sum and
  the rank-r dot product's accumulated roundings: ``|err| <= (r + 2) u (|W| + |B'| |A|)``, u = 2^-24.
- one forward: diffusers' unfused LoRA ``W x + B' (A x)`` and the merged ``(W + B'A) x`` differ by float32
  reassociation only, ~1e-7 relative per layer (``--verify`` of a merged export measures ~1e-7 on these
  models), a few layers deep; the brief's bound 1e-5 leaves a 10x+ margin and sits far below what a
  wrong key, part order or scale gives (the adapter moves the output by > 1e-1 here, asserted).
"""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_pipeline_export import LATENT, LATENT_22, load_tool, rel, tiny_stage1_checkpoint

RANK, ALPHA = 4, 8.0
U = 2.0 ** -24


def _randomise_adapter(src, dst):
    """Save ``src``'s stage-1 checkpoint again at ``dst`` with fresh random generator A / B, live and EMA."""
    from megatron_anyflow.models import lora as L
    from megatron_anyflow.parallel.sharding import module_sharded_state_dict
    from megatron_anyflow.checkpoint import store as ckpt
    from megatron_anyflow.checkpoint.model_io import load_with_adapter

    d = ckpt.resolve_checkpoint_dir(src)
    meta = ckpt.read_meta(d)
    model = load_with_adapter(d, "generator")
    g = torch.Generator().manual_seed(1234)
    sd = {}
    for prefix in ("", "ema.generator."):
        for p in L.adapter_parameters(model, "generator"):
            # Rebind (not in place): the sharded state dict of the previous pass keeps its own tensors.
            p.data = torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 3 else 1.0 / p.shape[1] ** 0.5)
        # Live: the whole model (this random-init run's checkpoint holds its base too); EMA: the adapter.
        sd.update({k: v for k, v in module_sharded_state_dict(model, prefix).items()
                   if not prefix or ".adapters." in k})
    added = ("saved_ranks", "rank_states", "checksums", "writer")  # save_checkpoint writes these itself
    ckpt.save_checkpoint(dst, meta["iteration"], sd, {k: v for k, v in meta.items() if k not in added})
    return dst


# Wan2.1 (the tiny preset) and the Wan2.2 TI2V-5B family (48 latent channels, its tiny member).
PRESETS = {"tiny": LATENT, "tiny-wan2.2-ti2v": LATENT_22}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def exports(tmp_path_factory, request):
    torch.manual_seed(0)
    preset, latent = request.param, PRESETS[request.param]
    root = tmp_path_factory.mktemp("lora_export")
    trained = tiny_stage1_checkpoint(str(root / "trained"), iters=1,
                                     extra=["--lora-rank", str(RANK), "--lora-alpha", str(ALPHA), "--model-preset",
                                            preset, "--mock-latent-shape", *map(str, latent)])
    ckpt = _randomise_adapter(trained, str(root / "ckpt"))
    convert = load_tool("convert_to_hf")
    out = {"ckpt": ckpt, "root": root, "latent": latent}
    for name, extra in (("base", []), ("merged", ["--merge-lora", "generator"]),
                        ("merged_ema", ["--merge-lora", "generator", "--ema"])):
        out[name] = str(root / name)
        assert convert.main(["--input", ckpt, "--output", out[name], *extra]) == 0
    return out


def _forward_inputs(cfg, latent):
    g = torch.Generator().manual_seed(7)
    f, c, h, w = latent
    x = torch.randn(1, f, c, h, w, generator=g)
    t = torch.rand(1, f, generator=g) * 1000
    r = t * torch.rand(1, f, generator=g)
    txt = torch.randn(1, 8, cfg.text_dim, generator=g)
    return x, t, r, txt


@pytest.mark.parametrize("ema", [False, True])
def test_lora_only_on_base_equals_merged_export(exports, tmp_path, capsys, ema):
    from diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel, FlowMapEulerDiscreteScheduler

    lora_dir = str(tmp_path / "lora")
    flags = ["--ema"] if ema else []
    rc = load_tool("convert_to_hf").main(["--input", exports["ckpt"], "--output", lora_dir, "--lora-only", *flags])
    out = capsys.readouterr().out
    assert rc == 0
    assert "verify: diffusers base + LoRA vs megatron_anyflow merged" in out
    assert "LoRA" in out and "MiB" in out and "merged AnyFlowTransformer3DModel export" in out
    path = os.path.join(lora_dir, "pytorch_lora_weights.safetensors")
    lora = load_file(path)
    assert all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    with safe_open(path, "pt") as f:
        assert "lora_adapter_metadata" in f.metadata()  # diffusers reads r / lora_alpha / targets from it

    merged_dir = exports["merged_ema" if ema else "merged"]
    merged = load_file(os.path.join(merged_dir, "diffusion_pytorch_model.safetensors"))
    base = load_file(os.path.join(exports["base"], "diffusion_pytorch_model.safetensors"))
    # Weights: the merged export against the float64 formula W + B' A on every module the file adapts;
    # every other tensor of the merged export is the base's, bit for bit.
    modules = {k[len("transformer."):].rsplit(".lora_", 1)[0] for k in lora}
    assert {"blocks.0.attn1.to_q", "blocks.1.attn1.to_v", "blocks.1.ffn.net.2",
            "condition_embedder.delta_embedder.linear_2"} <= modules
    for m in modules:
        A, B, W = lora[f"transformer.{m}.lora_A.weight"], lora[f"transformer.{m}.lora_B.weight"], base[f"{m}.weight"]
        assert A.shape[0] == RANK and B.shape[1] == RANK
        ref = W.double() + B.double() @ A.double()
        bound = (RANK + 2) * U * (W.double().abs() + B.double().abs() @ A.double().abs())
        assert bool(((merged[f"{m}.weight"].double() - ref).abs() <= bound).all()), m
    for k in merged:
        if k.rsplit(".", 1)[0] not in modules:
            assert torch.equal(merged[k], base[k]), k

    # One forward: AnyFlowPipeline.load_lora_weights on the base export (unfused LoRA) vs the merged export.
    transformer = AnyFlowTransformer3DModel.from_pretrained(exports["base"], torch_dtype=torch.float32).eval()
    pipe = AnyFlowPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                           scheduler=FlowMapEulerDiscreteScheduler.from_pretrained(exports["base"]))
    ref_model = AnyFlowTransformer3DModel.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
    assert transformer.config.in_channels == exports["latent"][1]  # 16 (Wan2.1) / 48 (Wan2.2 TI2V-5B family)
    x, t, r, txt = _forward_inputs(transformer.config, exports["latent"])
    with torch.no_grad():
        plain = transformer(x, t, r, txt, return_dict=False)[0]
        pipe.load_lora_weights(lora_dir)
        ours = pipe.transformer(x, t, r, txt, return_dict=False)[0]
        ref = ref_model(x, t, r, txt, return_dict=False)[0]
    assert rel(plain, ref) > 1e-1  # the adapter matters: a dropped or zero LoRA cannot pass below
    assert rel(ours, ref) < 1e-5


def test_live_and_ema_files_differ(exports, tmp_path):
    convert = load_tool("convert_to_hf")
    files = []
    for name, flags in (("live", []), ("ema", ["--ema"])):
        assert convert.main(["--input", exports["ckpt"], "--output", str(tmp_path / name), "--lora-only",
                             "--no-verify", *flags]) == 0
        files.append(load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors")))
    assert files[0].keys() == files[1].keys()
    assert all(not torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_lora_only_refusals(exports, tmp_path, capsys, monkeypatch):
    convert = load_tool("convert_to_hf")
    rc = convert.main(["--input", exports["ckpt"], "--output", str(tmp_path / "a"), "--lora-only", "--merge-lora",
                       "generator"])
    assert rc == 2 and "pass one of them" in capsys.readouterr().err
    rc = convert.main(["--input", exports["ckpt"], "--output", str(tmp_path / "b"), "--lora-only", "fake_score"])
    err = capsys.readouterr().err
    assert rc == 2 and "'fake_score'" in err and "generator" in err and not (tmp_path / "b").exists()
    # A failed --verify leaves no file that looks complete.
    rc = convert.main(["--input", exports["ckpt"], "--output", str(tmp_path / "c"), "--lora-only",
                       "--verify-tolerance", "1e-12"])
    assert rc == 1 and "does not reproduce" in capsys.readouterr().err and not (tmp_path / "c").exists()
    # AnyFlow-FAR: the generator's far_patch_embedding is trained fully; refused before anything is loaded
    # (the checkpoint's metadata is narrowed to say FAR: a real FAR checkpoint differs only in what follows).
    from megatron_anyflow.checkpoint import store as ckpt

    real = ckpt.read_meta
    monkeypatch.setattr(ckpt, "read_meta", lambda d: {**real(d), "wan_config": {**real(d)["wan_config"], "far": True}})
    rc = convert.main(["--input", exports["ckpt"], "--output", str(tmp_path / "d"), "--lora-only"])
    err = capsys.readouterr().err
    assert rc == 2 and "far_patch_embedding" in err and "--merge-lora generator" in err


def test_non_finite_adapter_is_refused_and_named(exports, tmp_path, capsys, monkeypatch):
    from megatron_anyflow.checkpoint import model_io

    real = model_io.load_with_adapter

    def poisoned(*a, **k):
        model = real(*a, **k)
        qkv = model.get_submodule("blocks.1.self_attention.linear_qkv")
        with torch.no_grad():
            qkv.adapters["generator"].lora_B[2, 0, 0] = float("nan")
        return model

    monkeypatch.setattr(model_io, "load_with_adapter", poisoned)
    rc = load_tool("convert_to_hf").main(["--input", exports["ckpt"], "--output", str(tmp_path / "o"), "--lora-only"])
    err = capsys.readouterr().err
    # group 2 of the fused q/k/v adapter is diffusers' to_v: the tensor is named by its diffusers module
    assert rc == 1 and "blocks.1.attn1.to_v.lora_B.weight" in err and not (tmp_path / "o").exists()
