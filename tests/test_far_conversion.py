"""AnyFlow-FAR checkpoints through the converters (docs/design/far.md 5.1, E10): diffusers `AnyFlowFARTransformer3DModel`
-> megatron_anyflow -> diffusers bit-exactly (incl. far_patch_embedding and the FAR config), at TP = 1 and
through TP = 2; ``--verify`` runs a FAR forward through diffusers' FAR class; a config in the reference's
layout imports with diffusers' defaults and the converter says which keys it filled / ignored; ``--pipeline``
writes an ``AnyFlowFARPipeline`` that diffusers loads and that samples like the project's chunked sampler;
``generation.load_model`` reads a FAR export as a FAR model.

Tolerance of the sampling comparison: rel < 1e-5 (float32; the two implementations differ per forward by
~1e-7, see tests/test_far_model.py).
"""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import AnyFlowFARTransformer3DModel
from safetensors.torch import load_file, save_file

from conftest import REPO, run_cmd, torchrun
from megatron_anyflow.models.wan.convert import arch_from_hf_config, far_config_defaults_filled
from megatron_anyflow.models.wan.hf_io import read_hf_transformer_dir

KW = dict(num_attention_heads=4, attention_head_dim=16, text_dim=384, freq_dim=32, ffn_dim=160, num_layers=2)
CP = [1, 2, 2, 2, 1]
PY = sys.executable
REFERENCE_ONLY = dict(qk_norm="rms_norm_across_heads", added_kv_proj_dim=None, init_far_model=True,
                      init_flowmap_model=True)
DIFFUSERS_FAR_KEYS = ("chunk_partition", "full_chunk_limit", "compressed_patch_size", "gate_value")


def far_model(seed=0, **kw):
    torch.manual_seed(seed)
    hf = AnyFlowFARTransformer3DModel(**KW, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # trained-looking: far_patch_embedding off its trilinear init, delta embedder own
        for p in [*hf.far_patch_embedding.parameters(), *hf.condition_embedder.delta_embedder.parameters()]:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return hf


@pytest.fixture(scope="module")
def far_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("far")
    far_model(chunk_partition=CP).save_pretrained(root / "far", max_shard_size="200KB")  # sharded
    # the reference's layout: no chunk_partition / full_chunk_limit / compressed_patch_size / gate_value (the
    # weights are those of the defaults: 4x4 compressed patches, gate 0.25), plus reference-only keys
    ref = root / "reference"
    far_model(seed=5).save_pretrained(ref)
    cfg = json.loads((ref / "config.json").read_text())
    for k in DIFFUSERS_FAR_KEYS:
        cfg.pop(k)
    cfg.update(REFERENCE_ONLY)
    (ref / "config.json").write_text(json.dumps(cfg))
    return root


def same_weights(a_dir, b_dir):
    _, a = read_hf_transformer_dir(str(a_dir), progress=False)
    _, b = read_hf_transformer_dir(str(b_dir), progress=False)
    assert set(a) == set(b), set(a) ^ set(b)
    assert {"far_patch_embedding.weight", "far_patch_embedding.bias"} <= set(a)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def verify_error(stdout):
    return float(stdout.split("relative error")[1].split()[0])


def test_far_round_trip_tp1_bit_exact_verified_and_loadable(far_dirs, tmp_path):
    proc = run_cmd([PY, "tools/convert_from_hf.py", "--input", str(far_dirs / "far"), "--output",
                    str(tmp_path / "ckpt")])
    assert "AnyFlow-FAR: chunk_partition [1, 2, 2, 2, 1], full_chunk_limit 3" in proc.stdout
    assert "note:" not in proc.stdout  # a complete diffusers config: nothing filled
    arch = json.loads((tmp_path / "ckpt" / "release" / "anyflow_meta.json").read_text())["wan_config"]
    assert arch["far"] and arch["chunk_partition"] == CP and arch["full_chunk_limit"] == 3
    assert arch["compressed_patch_size"] == [1, 4, 4]
    proc = run_cmd([PY, "tools/convert_to_hf.py", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"),
                    "--verify"])
    assert verify_error(proc.stdout) < 1e-5, proc.stdout
    same_weights(far_dirs / "far", tmp_path / "out")
    src = json.loads((far_dirs / "far" / "config.json").read_text())
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["_class_name"] == "AnyFlowFARTransformer3DModel"
    for k in (*DIFFUSERS_FAR_KEYS, "deltatime_type", "patch_size", "num_layers", "ffn_dim", "text_dim"):
        assert out[k] == src[k], k
    assert not set(REFERENCE_ONLY) & set(out)
    loaded = AnyFlowFARTransformer3DModel.from_pretrained(tmp_path / "out")
    assert list(loaded.config.chunk_partition) == CP


def test_far_round_trip_through_tp2_bit_exact(far_dirs, tmp_path):
    """far_patch_embedding is replicated over TP (like patch_embedding): written by TP = 2, read back whole."""
    torchrun(["tools/convert_from_hf.py", "--input", str(far_dirs / "far"), "--output", str(tmp_path / "ckpt"),
              "--tensor-model-parallel-size", "2"])
    run_cmd([PY, "tools/convert_to_hf.py", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")])
    same_weights(far_dirs / "far", tmp_path / "out")


def test_tp2_conversion_with_a_late_rank(far_dirs, tmp_path):
    """Regression (the test above crashed once in a full-suite run): every rank used to check --output itself;
    rank 1, descheduled for a few tens of ms on a loaded machine (measured margin: 20-90 ms), found the
    release.tmp that rank 0 had just created in save_checkpoint, returned 2 without a word, and rank 0 failed
    in the barrier with "Connection closed by peer". Rank 0 now decides and broadcasts. Here rank 1 arrives
    2 s late (tests/distributed/late_rank.py), which failed every time before the fix."""
    torchrun(["tests/distributed/late_rank.py", "1", "2", "tools/convert_from_hf.py", "--input", str(far_dirs / "far"),
              "--output", str(tmp_path / "ckpt"), "--tensor-model-parallel-size", "2"])
    meta = json.loads((tmp_path / "ckpt" / "release" / "anyflow_meta.json").read_text())
    assert meta["saved_ranks"] == 2 and meta["wan_config"]["far"]


def test_reference_layout_config_imports_with_defaults_and_says_so(far_dirs, tmp_path):
    src = json.loads((far_dirs / "reference" / "config.json").read_text())
    arch = arch_from_hf_config(src)
    assert arch["far"] and arch["chunk_partition"] == [1, 3, 3, 3, 3, 3, 3, 2] and arch["full_chunk_limit"] == 3
    assert arch["compressed_patch_size"] == [1, 4, 4] and arch["delta_gate"] == 0.25
    assumed = far_config_defaults_filled(src)
    assert assumed == ["compressed_patch_size=[1, 4, 4]", "full_chunk_limit=3",
                       "chunk_partition=[1, 3, 3, 3, 3, 3, 3, 2]", "gate_value=0.25", "qk_norm (ignored)",
                       "added_kv_proj_dim (ignored)", "init_far_model (ignored)", "init_flowmap_model (ignored)"]
    assert far_config_defaults_filled(json.loads((far_dirs / "far" / "config.json").read_text())) == []

    proc = run_cmd([PY, "tools/convert_from_hf.py", "--input", str(far_dirs / "reference"), "--output",
                    str(tmp_path / "ckpt")])
    note = [line for line in proc.stdout.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and all(a in note[0] for a in assumed), proc.stdout
    proc = run_cmd([PY, "tools/convert_to_hf.py", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"),
                    "--verify"])
    assert verify_error(proc.stdout) < 1e-5
    same_weights(far_dirs / "reference", tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["_class_name"] == "AnyFlowFARTransformer3DModel" and not set(REFERENCE_ONLY) & set(out)
    assert out["chunk_partition"] == [1, 3, 3, 3, 3, 3, 3, 2] and out["gate_value"] == 0.25
    AnyFlowFARTransformer3DModel.from_pretrained(tmp_path / "out")

    from megatron_anyflow.anyflow.generation import load_model

    loaded = load_model(str(far_dirs / "reference"))  # generate reads the reference directory as well
    assert loaded.model.config.far and loaded.info["far_config_assumed"] == assumed


def test_bad_far_config_is_named(far_dirs, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((far_dirs / "reference" / "config.json").read_text())
    cfg["chunk_partition"] = [1, 0, 3]
    (bad / "config.json").write_text(json.dumps(cfg))
    save_file(load_file(far_dirs / "reference" / "diffusion_pytorch_model.safetensors"),
              bad / "diffusion_pytorch_model.safetensors")
    proc = subprocess.run([PY, "tools/convert_from_hf.py", "--input", str(bad), "--output", str(tmp_path / "c")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "chunk_partition=(1, 0, 3)" in proc.stderr and "config.json" in proc.stderr, \
        proc.stderr[-2000:]


def test_far_pipeline_export_loads_and_samples_like_generate(far_dirs, tmp_path):
    """--pipeline on a FAR checkpoint: an AnyFlowFARPipeline directory (model_index.json) that
    DiffusionPipeline.from_pretrained loads offline; its latents (N = 2, chunks [1, 2]) equal the project's
    chunked sampler on the model generation.load_model reads from the same directory (a FAR WanModel)."""
    from diffusers import AnyFlowFARPipeline, DiffusionPipeline
    from test_pipeline_export import tiny_umt5, tiny_vae

    from megatron_anyflow.anyflow.causal import sample_chunked
    from megatron_anyflow.anyflow.generation import load_model
    from megatron_anyflow.models.wan.far import FarModelRunner

    run_cmd([PY, "tools/convert_from_hf.py", "--input", str(far_dirs / "far"), "--output", str(tmp_path / "ckpt")])
    tiny_vae(str(tmp_path / "wan" / "vae"))
    tiny_umt5(str(tmp_path / "wan"))
    out = tmp_path / "pipeline"
    proc = run_cmd([PY, "tools/convert_to_hf.py", "--input", str(tmp_path / "ckpt"), "--output", str(out), "--pipeline",
                    "--verify", "--vae", str(tmp_path / "wan" / "vae"), "--text-encoder",
                    str(tmp_path / "wan" / "text_encoder")])
    assert "as AnyFlowFARPipeline with AnyFlowFARTransformer3DModel" in proc.stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "AnyFlowFARPipeline"
    assert index["transformer"] == ["diffusers", "AnyFlowFARTransformer3DModel"]
    pipe = DiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert isinstance(pipe, AnyFlowFARPipeline) and pipe.scheduler.config.shift == 5.0
    assert list(pipe.transformer.config.chunk_partition) == CP
    pipe.set_progress_bar_config(disable=True)

    loaded = load_model(str(out))
    assert loaded.model.config.far and list(loaded.model.config.chunk_partition) == CP and loaded.shift == 5.0
    assert loaded.info["far_config_assumed"] == []
    g = torch.Generator().manual_seed(3)
    cp, H, W = [1, 2], 16, 32
    noise = torch.randn(1, 16, sum(cp), H, W, generator=g)
    pe = torch.randn(1, 7, 384, generator=g)
    ref = pipe(prompt_embeds=pe, latents=noise.clone(), height=8 * H, width=8 * W, num_frames=4 * (sum(cp) - 1) + 1,
               num_inference_steps=2, chunk_partition=cp, output_type="latent", return_dict=False)[0]
    ours = sample_chunked(FarModelRunner(loaded.model), noise.permute(0, 2, 1, 3, 4).contiguous(), pe, cp, 2,
                          shift=loaded.shift).permute(0, 2, 1, 3, 4)
    err = float((ours.double() - ref.double()).norm() / ref.double().norm())
    assert err < 1e-5, err
