"""convert_from_hf on bad input: every error names the file / key / value; nothing the user owns is deleted."""

import importlib.util
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AnyFlowTransformer3DModel, WanTransformer3DModel
from safetensors.torch import load_file, save_file

from megatron_anyflow.models.wan.convert import ConversionError, hf_to_megatron
from megatron_anyflow.checkpoint import store as ckpt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(num_attention_heads=4, attention_head_dim=16, text_dim=384, freq_dim=32, ffn_dim=160, num_layers=2)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


convert_from_hf = _tool("convert_from_hf")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(random.randrange(2**31))
    WanTransformer3DModel(**KW).save_pretrained(root / "wan")
    AnyFlowTransformer3DModel(**KW).save_pretrained(root / "anyflow")
    return root


def _copy(src, dst, edit=None):
    shutil.copytree(src, dst)
    if edit is not None:
        sd = load_file(dst / WEIGHTS)
        edit(sd)
        save_file(sd, dst / WEIGHTS)
    return dst


def _convert(capsys, *argv):
    """Run the tool in-process; returns (exit code, stderr)."""
    rc = convert_from_hf.main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _snapshot(path):
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


@pytest.mark.parametrize("kind", ["weight", "bias"])
def test_wrong_shape_inside_fused_qkv_names_the_key(hf, tmp_path, capsys, kind):
    block, part = random.randrange(KW["num_layers"]), random.choice(["attn1.to_q", "attn1.to_k", "attn1.to_v",
                                                                     "attn2.to_k", "attn2.to_v"])
    key = f"blocks.{block}.{part}.{kind}"
    bad = (60, 64) if kind == "weight" else (48,)
    src = _copy(hf / "wan", tmp_path / "bad", lambda sd: sd.__setitem__(key, torch.randn(*bad)))
    rc, err = _convert(capsys, "--input", src, "--output", tmp_path / "out")
    good = "(64, 64)" if kind == "weight" else "(64,)"
    assert rc == 2 and f"{key}: expected {good}" in err and f"found {bad}" in err, err
    fused = "self_attention.linear_qkv" if part.startswith("attn1") else "cross_attention.linear_kv"
    assert f"blocks.{block}.{fused}.{kind}" in err
    assert not (tmp_path / "out").exists()


def test_fused_parts_that_disagree_are_named_without_a_config():
    sd = {f"blocks.0.attn1.to_{p}.weight": torch.randn(32, 32) for p in "qkv"}
    sd["blocks.0.attn1.to_v.weight"] = torch.randn(32, 31)
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn1\.to_v\.weight: expected \(32, 32\) "
                                              r"\(the shape of blocks\.0\.attn1\.to_q\.weight.*found \(32, 31\)"):
        hf_to_megatron(sd, head_dim=16)
    sd = {f"blocks.1.attn2.to_{p}.bias": torch.randn(40) for p in "kv"}
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn2\.to_k\.bias: 40 rows do not split into heads of "
                                              r"attention_head_dim 16"):
        hf_to_megatron(sd, head_dim=16)


def test_garbage_or_truncated_safetensors_names_the_file(hf, tmp_path, capsys):
    src = _copy(hf / "wan", tmp_path / "garbage")
    (src / WEIGHTS).write_bytes(os.urandom(4096))
    rc, err = _convert(capsys, "--input", src, "--output", tmp_path / "o1")
    assert rc == 2 and f"{src / WEIGHTS}: not a readable safetensors file (4096 bytes" in err, err
    src = _copy(hf / "wan", tmp_path / "truncated")
    data = (src / WEIGHTS).read_bytes()
    (src / WEIGHTS).write_bytes(data[: len(data) // 3])
    rc, err = _convert(capsys, "--input", src, "--output", tmp_path / "o2")
    assert rc == 2 and f"{src / WEIGHTS}: not a readable safetensors file" in err, err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_garbage_config_names_the_file(hf, tmp_path, capsys):
    src = _copy(hf / "wan", tmp_path / "cfg")
    (src / "config.json").write_bytes(b'{"_class_name": "WanTransformer3DModel", ' + os.urandom(16))
    rc, err = _convert(capsys, "--input", src, "--output", tmp_path / "o")
    assert rc == 2 and f"{src / 'config.json'}: not a valid JSON diffusers config" in err, err
    (src / "config.json").write_text("[1, 2, 3]")
    rc, err = _convert(capsys, "--input", src, "--output", tmp_path / "o")
    assert rc == 2 and f"{src / 'config.json'}: expected a JSON object (diffusers config), found a list" in err, err


def test_existing_output_is_never_deleted(hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    note = os.urandom(32)
    (out / "notes.txt").write_bytes(note)
    rc, err = _convert(capsys, "--input", hf / "wan", "--output", out)
    assert rc == 2 and "exists and is not empty" in err
    rc, err = _convert(capsys, "--input", hf / "wan", "--output", out, "--overwrite")
    assert rc == 2 and str(out / "notes.txt") in err and "nothing was deleted" in err, err
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_bytes() == note

    # A previous conversion is replaced with --overwrite, and only that.
    conv = tmp_path / "conv"
    assert _convert(capsys, "--input", hf / "wan", "--output", conv)[0] == 0
    rc, err = _convert(capsys, "--input", hf / "wan", "--output", conv)
    assert rc == 2 and "--overwrite" in err
    assert _convert(capsys, "--input", hf / "anyflow", "--output", conv, "--overwrite")[0] == 0
    assert ckpt.read_meta(ckpt.resolve_checkpoint_dir(str(conv)))["hf_class"] == "AnyFlowTransformer3DModel"
    # ... but not when the user put something inside release/ or next to it.
    (conv / "release" / "README").write_text("mine")
    (conv / "eval").mkdir()
    before = _snapshot(conv)
    rc, err = _convert(capsys, "--input", hf / "wan", "--output", conv, "--overwrite")
    assert rc == 2 and str(conv / "release" / "README") in err and str(conv / "eval") in err, err
    assert _snapshot(conv) == before and (conv / "eval").is_dir()


def test_overwrite_refuses_a_training_run(tmp_path, hf, capsys):
    root = tmp_path / "run"
    ckpt.save_checkpoint(str(root), 3, {}, {"iteration": 3})
    before = _snapshot(root)
    rc, err = _convert(capsys, "--input", hf / "wan", "--output", root, "--overwrite")
    assert rc == 2 and str(root / "iter_0000003") in err, err
    assert _snapshot(root) == before and ckpt.read_tracker(str(root)) == "iter_0000003"


def test_add_delta_embedder_refuses_a_trained_one(hf, tmp_path, capsys):
    rc, err = _convert(capsys, "--input", hf / "anyflow", "--output", tmp_path / "o", "--add-delta-embedder")
    assert rc == 2 and "already has a delta embedder" in err and "condition_embedder.delta_embedder." in err, err
    assert not (tmp_path / "o").exists()


def test_diffusers_directory_as_checkpoint_says_to_convert(hf, tmp_path):
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    src = str(hf / "wan")
    with pytest.raises(FileNotFoundError, match=r"diffusers model directory.*tools/convert_from_hf\.py --input"):
        Trainer(parse_args(["--stage", "stage1", "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1",
                            "--train-iters", "1", "--pretrained", src]), log=lambda *a, **k: None)
    with pytest.raises(ckpt.CheckpointError, match=r"--load .* is a diffusers model directory.*convert_from_hf"):
        ckpt.find_resume_checkpoint(src)
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--input", src, "--output", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode != 0 and "tools/convert_from_hf.py" in proc.stderr, proc.stderr[-2000:]
