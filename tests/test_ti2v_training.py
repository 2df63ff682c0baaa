"""Wan2.2 TI2V end to end on the tiny preset (48 latent channels): the teacher, stage 1 and stage 2 trained
with ``--i2v-prob 0.5`` (half the samples conditioned on their clean first latent frame), then
``tools/generate.py --image-latents`` sampling the student with that frame held clean.

What could fail: a stage not passing the option on (checked by counting conditioned and plain samples in
the objectives' stats; in stage 2 in the condition handed to the generator's rollout + DMD and to the
critic), the option not reaching a finite loss on the 48-channel model, a checkpoint not loading on the
teacher it was trained on, or generation not holding the condition (checked against the hand-written
flow-map rollout of test_generate, with the tolerance TOL argued there: float32 rounding of the update only).
"""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_generate import TOL, generate, hand_rollout
from test_pipeline_export import rel

LATENT = (3, 48, 4, 6)  # f, c, h, w: frame 0 is the condition when a sample is conditioned


def _train(stage, root, extra, monkeypatch):
    """One tiny TI2V run of ``stage``; returns (checkpoint dir, i2v flags of every objective call)."""
    import megatron_anyflow.training.stages as stages_mod
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    import megatron_anyflow.training.stage2 as stage2_mod

    seen = []
    if stage == "stage2":  # the generator's (rollout + DMD) and the critic's condition: frame 0 of some samples
        for name in ("generator_loss", "critic_loss"):
            def spy(*a, _orig=getattr(stage2_mod, name), _name=name, **k):
                mask = k["condition"].mask
                assert not mask[:, 1:].any()
                if _name == "generator_loss":
                    seen.append(mask[:, 0].clone())
                loss, info = _orig(*a, **k)
                assert math.isfinite(float(loss.detach()))
                return loss, info

            monkeypatch.setattr(stage2_mod, name, spy)
    else:
        name = "flow_matching_loss" if stage == "teacher" else "stage1_loss"

        def spy(*a, _orig=getattr(stages_mod, name), **k):
            loss, stats = _orig(*a, **k)
            seen.append(stats["i2v"].clone())
            assert math.isfinite(float(loss.detach()))
            return loss, stats

        monkeypatch.setattr(stages_mod, name, spy)
    out = str(root / stage)
    args = parse_args(["--stage", stage, "--model-preset", "tiny-wan2.2-ti2v", "--mock-data", "--mock-num-samples", "8",
                       "--mock-latent-shape", *map(str, LATENT), "--micro-batch-size", "2", "--global-batch-size", "4",
                       "--lr", "1e-2", "--lr-warmup-iters", "0", "--train-iters", "2", "--log-interval", "100",
                       "--i2v-prob", "0.5", "--seed", "3", "--save", out, *extra])
    Trainer(args, log=lambda *a, **k: None).train()
    return out, torch.cat(seen)


def test_ti2v_teacher_stage1_stage2_and_image_latents_generation(tmp_path, monkeypatch):
    teacher, t_i2v = _train("teacher", tmp_path, ["--lora-rank", "0"], monkeypatch)
    s1, s1_i2v = _train("stage1", tmp_path, ["--pretrained", teacher, "--lora-rank", "4", "--lora-alpha", "4"],
                        monkeypatch)
    student, s2_i2v = _train("stage2", tmp_path, ["--pretrained", teacher, "--init-adapters-from", s1,
                                                  "--simulation-steps", "2", "--lr", "1e-3"], monkeypatch)
    for flags in (t_i2v, s1_i2v, s2_i2v):  # 2 iterations x 4 samples, each conditioned with probability 0.5
        assert flags.numel() == 8 and 0 < int(flags.sum()) < 8, flags

    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, (1,))))
    first = torch.randn(LATENT[1:], generator=g)
    save_file({"noise": torch.randn(2, *LATENT, generator=g), "prompt_embeds": torch.randn(2, 5, 384, generator=g)},
              str(tmp_path / "in.safetensors"))
    save_file({"latents": first}, str(tmp_path / "img.safetensors"))
    assert generate("--checkpoint", student, "--noise", tmp_path / "in.safetensors", "--prompt-embeds",
                    tmp_path / "in.safetensors", "--codec", "none", "--steps", 2, "--image-latents",
                    tmp_path / "img.safetensors", "--output", tmp_path / "gen", "--save-latents",
                    tmp_path / "gen" / "lat.safetensors") == 0
    out = load_file(str(tmp_path / "gen" / "lat.safetensors"))
    x0 = out["steps_2"]
    assert x0.shape == (2, *LATENT) and bool(torch.isfinite(x0).all())
    assert torch.equal(x0[:, 0], first.expand(2, -1, -1, -1))  # the condition frame is held exactly
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    model = load_for_inference(student, adapter="generator")
    ref = hand_rollout(model, out["noise"], out["prompt_embeds"], 2, first[None, None])
    assert rel(x0, ref) < TOL


def test_i2v_prob_range_is_checked(capsys):
    from megatron_anyflow.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--stage", "teacher", "--mock-data", "--train-iters", "1", "--i2v-prob", "1.5"])
    assert "--i2v-prob must lie in [0, 1]; got 1.5" in capsys.readouterr().err
