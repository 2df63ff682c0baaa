"""Generation never reports a useless result as success: non-finite inputs are refused (exit 2) and a model
whose outputs turn NaN / inf ends the run with exit 1, naming N, the step and the chunk, with no video and
no generation.json written (a probe found `generate` writing NaN latents with exit 0 from diverged weights
and from NaN prompt embeddings)."""

import os

import pytest
import torch
from safetensors.torch import save_file

from test_pipeline_export import LATENT, load_tool, tiny_stage1_checkpoint

from megatron_anyflow.anyflow import generation as G


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("nonfinite")
    path = tiny_stage1_checkpoint(str(root / "ckpt"))
    embeds = str(root / "embeds.safetensors")
    save_file({"prompt_embeds": torch.randn(1, 8, 384)}, embeds)
    return {"root": root, "ckpt": path, "embeds": embeds}


def _gen(*argv):
    return load_tool("generate").main([*map(str, argv), "--no-progress"])


class _NanAfter:
    """A flow-map model whose output turns NaN from its ``k``-th call on (1-based)."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def __call__(self, z, t, r, text):
        self.calls += 1
        u = torch.zeros_like(z) + 0.1
        return u * float("nan") if self.calls >= self.k else u


def test_api_names_n_and_step():
    noise, text = torch.randn(2, 3, 4, 2, 2), torch.randn(2, 5, 8)
    out = G.sample_any_step(_NanAfter(10 ** 6), noise, text, [1, 4], progress=False)
    assert all(torch.isfinite(x).all() for x in out.values())
    with pytest.raises(G.NonFiniteSampleError, match=r"N = 4, step 2 of 4 \(samples 0\.\.1\)"):
        G.sample_any_step(_NanAfter(3), noise, text, [1, 4], progress=False)  # call 1: N = 1; calls 2.. : N = 4


@pytest.mark.parametrize("which", ["noise", "text", "condition"])
def test_api_refuses_non_finite_inputs(which):
    noise, text, cond = torch.randn(1, 3, 4, 2, 2), torch.randn(1, 5, 8), torch.randn(1, 1, 4, 2, 2)
    {"noise": noise, "text": text, "condition": cond}[which].view(-1)[1] = float("inf")
    with pytest.raises(G.GenerationError, match="non-finite values"):
        G.sample_any_step(_NanAfter(10 ** 6), noise, text, [2], progress=False, condition_frames=cond)


def test_cli_nan_prompt_embeddings_exit_2(ckpt, tmp_path):
    bad = str(tmp_path / "nan.safetensors")
    save_file({"prompt_embeds": torch.full((1, 8, 384), float("nan"))}, bad)
    out = tmp_path / "out"
    rc = _gen("--checkpoint", ckpt["ckpt"], "--prompt-embeds", bad, "--codec", "none", "--latent-shape", *LATENT,
              "--steps", "1", "--output", out)
    assert rc == 2
    assert not (out / "generation.json").exists()


def test_cli_diverged_weights_exit_1_and_write_nothing(ckpt, tmp_path, monkeypatch, capsys):
    real = G.load_model

    def poisoned(*a, **k):
        lm = real(*a, **k)
        with torch.no_grad():
            next(lm.model.parameters()).mul_(float("nan"))  # as the weights of a run that diverged
        return lm

    monkeypatch.setattr(G, "load_model", poisoned)
    out = tmp_path / "out"
    rc = _gen("--checkpoint", ckpt["ckpt"], "--prompt-embeds", ckpt["embeds"], "--codec", "none", "--latent-shape",
              *LATENT, "--steps", "1", "2", "--output", out, "--save-latents", tmp_path / "lat.safetensors")
    assert rc == 1
    err = capsys.readouterr().err
    assert "not finite at N = 1, step 1 of 1" in err
    assert not (out / "generation.json").exists() and not (tmp_path / "lat.safetensors").exists()
    assert not out.exists() or not [p for p in os.listdir(out) if p.endswith((".mp4", ".png"))]
