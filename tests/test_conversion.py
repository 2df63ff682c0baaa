"""diffusers -> megatron_anyflow -> diffusers conversion: bit-exact at TP = 1 and TP = 2, clear errors."""

import json
import os
import sys

import pytest
import torch
from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel
from safetensors.torch import load_file, save_file

from conftest import run_cmd, torchrun
from megatron_anyflow.models.wan.hf_io import read_hf_transformer_dir, write_hf_transformer_dir

KW = dict(num_attention_heads=4, attention_head_dim=16, text_dim=384, freq_dim=32, ffn_dim=160, num_layers=2)
PY = sys.executable


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    AnyFlowTransformer3DModel(**KW).save_pretrained(root / "anyflow", max_shard_size="200KB")  # sharded
    WanTransformer3DModel(**KW).save_pretrained(root / "wan")
    return root


def same(a_dir, b_dir):
    ca, a = read_hf_transformer_dir(str(a_dir), progress=False)
    cb, b = read_hf_transformer_dir(str(b_dir), progress=False)
    assert ca["_class_name"] == cb["_class_name"]
    assert set(a) == set(b), set(a) ^ set(b)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def test_round_trip_tp1_bit_exact_and_loadable(hf_dirs, tmp_path):
    run_cmd([PY, "tools/convert_from_hf.py", "--input", str(hf_dirs / "anyflow"), "--output", str(tmp_path / "ckpt")])
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "release"
    proc = run_cmd([PY, "tools/convert_to_hf.py", "--input", str(tmp_path / "ckpt"), "--output",
                    str(tmp_path / "out"), "--verify"])
    err = float(proc.stdout.split("relative error")[1].split()[0])
    assert err < 1e-5
    same(hf_dirs / "anyflow", tmp_path / "out")
    AnyFlowTransformer3DModel.from_pretrained(tmp_path / "out")


def test_round_trip_through_tp2_bit_exact(hf_dirs, tmp_path):
    torchrun(["tools/convert_from_hf.py", "--input", str(hf_dirs / "anyflow"), "--output", str(tmp_path / "ckpt"),
              "--tensor-model-parallel-size", "2"])
    run_cmd([PY, "tools/convert_to_hf.py", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")])
    same(hf_dirs / "anyflow", tmp_path / "out")


def test_plain_wan_round_trip_exports_wan_class(hf_dirs, tmp_path):
    run_cmd([PY, "tools/convert_from_hf.py", "--input", str(hf_dirs / "wan"), "--output", str(tmp_path / "ckpt")])
    run_cmd([PY, "tools/convert_to_hf.py", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"),
             "--verify"])
    same(hf_dirs / "wan", tmp_path / "out")
    WanTransformer3DModel.from_pretrained(tmp_path / "out")


def test_add_delta_embedder_makes_anyflow_start(hf_dirs, tmp_path):
    run_cmd([PY, "tools/convert_from_hf.py", "--input", str(hf_dirs / "wan"), "--output", str(tmp_path / "ckpt"),
             "--add-delta-embedder"])
    run_cmd([PY, "tools/convert_to_hf.py", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["_class_name"] == "AnyFlowTransformer3DModel"
    sd = load_file(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(sd["condition_embedder.delta_embedder.linear_1.weight"],
                       sd["condition_embedder.time_embedder.linear_1.weight"])


def _broken_copy(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "diffusion_pytorch_model.safetensors")
    edit(sd)
    save_file(sd, dst / "diffusion_pytorch_model.safetensors")


def _fails(args, *needles):
    import subprocess

    proc = subprocess.run(args, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode != 0
    for n in needles:
        assert n in proc.stderr, proc.stderr[-2000:]


def test_missing_key_and_shape_mismatch_are_named(hf_dirs, tmp_path):
    _broken_copy(hf_dirs / "wan", tmp_path / "missing", lambda sd: sd.pop("blocks.1.ffn.net.2.weight"))
    _fails([PY, "tools/convert_from_hf.py", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "c1")],
           "missing keys", "blocks.1.mlp.linear_fc2.weight")
    _broken_copy(hf_dirs / "wan", tmp_path / "shape",
                 lambda sd: sd.__setitem__("proj_out.weight", torch.zeros(60, 64)))
    _fails([PY, "tools/convert_from_hf.py", "--input", str(tmp_path / "shape"), "--output", str(tmp_path / "c2")],
           "proj_out.weight: expected (64, 64), found (60, 64)")
    assert not (tmp_path / "c1" / "latest_checkpointed_iteration.txt").exists()
    _fails([PY, "tools/convert_to_hf.py", "--input", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")],
           "no checkpoint at")


def test_interrupted_export_leaves_no_complete_looking_directory(tmp_path, monkeypatch):
    import megatron_anyflow.models.wan.hf_io as hf_io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io, "save_file", boom)
    with pytest.raises(OSError):
        write_hf_transformer_dir(str(tmp_path / "export"), {"_class_name": "X"}, {"w": torch.randn(3)})
    assert not (tmp_path / "export").exists()
