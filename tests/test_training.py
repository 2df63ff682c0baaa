"""Trainer: bit-exact resume, crash-safe saves, the teacher and stage-1 loops (CPU, float32)."""

import os

import pytest
import torch

from megatron_anyflow.checkpoint import store as ckpt
from megatron_anyflow.training.arguments import parse_args
from megatron_anyflow.training.trainer import Trainer

BASE = ["--mock-data", "--mock-num-samples", "24", "--mock-latent-shape", "3", "16", "4", "6",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lora-rank", "4", "--lora-alpha", "4",
        "--lr", "1e-3", "--lr-warmup-iters", "2", "--log-interval", "100", "--ema-decay", "0.9"]


def make(stage, *extra):
    return Trainer(parse_args(["--stage", stage, *BASE, *extra]), log=lambda *a, **k: None)


def state(tr):
    out = {f"p.{k}": p.detach().clone() for g in tr.groups.values() for k, p in g.params.items()}
    for g in tr.groups.values():
        out.update({f"ema.{k}": v.clone() for k, v in g.ema.shadow.items()})
        for p, st in g.optimizer.state.items():
            out[f"m.{id(p)}"] = st["exp_avg"].clone()
        out.update({f"v.{k}": g.optimizer.state[p]["exp_avg_sq"].clone() for k, p in g.params.items()})
    return out


@pytest.mark.parametrize("stage", ["stage1", "teacher"])
def test_resume_is_bit_exact(tmp_path, stage):
    straight = make(stage, "--train-iters", "6")
    straight.train()
    first = make(stage, "--train-iters", "6", "--exit-after-iters", "3", "--save", str(tmp_path / "c"))
    first.train()
    assert ckpt.read_tracker(str(tmp_path / "c")) == "iter_0000003"
    resumed = make(stage, "--train-iters", "6", "--load", str(tmp_path / "c"))
    assert resumed.iteration == 3 and resumed.consumed_samples == 12
    resumed.train()
    a = {k: v for k, v in state(straight).items() if not k.startswith("m.")}
    b = {k: v for k, v in state(resumed).items() if not k.startswith("m.")}
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    # The run moved: the adapters are no longer at their (B = 0) start.
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.startswith("p.") and "lora_B" in k)


def test_interrupted_save_never_loaded(tmp_path):
    root = str(tmp_path / "c")
    tr = make("stage1", "--train-iters", "4", "--exit-after-iters", "2", "--save", root)
    tr.train()
    saved = state(tr)
    tr.args.exit_after_iters = None
    tr.args.save = None
    tr.train()  # iterations 2 -> 4, not saved yet

    def crash():
        raise RuntimeError("node lost during save")

    with pytest.raises(RuntimeError, match="node lost"):
        tr.save(root, before_commit=crash)
    assert ckpt.read_tracker(root) == "iter_0000002"
    assert os.path.isdir(os.path.join(root, "iter_0000004.tmp"))
    resumed = make("stage1", "--train-iters", "4", "--load", root)
    assert resumed.iteration == 2
    now = state(resumed)
    assert all(torch.equal(saved[k], now[k]) for k in saved if not k.startswith("m."))


def test_stage1_full_finetune_and_errors(tmp_path):
    tr = make("stage1", "--train-iters", "2", "--lora-rank", "0", "--save", str(tmp_path / "full"))
    assert "model" in tr.groups and len(tr.groups["model"].params) > 50
    tr.train()
    with pytest.raises(ValueError, match="checkpoint of stage 'stage1'"):
        make("teacher", "--train-iters", "2", "--lora-rank", "0", "--load", str(tmp_path / "full"))
    with pytest.raises(SystemExit):
        parse_args(["--stage", "stage1", "--train-iters", "2"])  # no data source


def test_teacher_loss_goes_down():
    tr = make("teacher", "--train-iters", "30", "--lora-rank", "0", "--lr", "2e-3", "--text-dropout", "0")
    first = tr.stage.train_step(0, tr.sampler.micro_batches(0))["loss"]
    tr.iteration, tr.consumed_samples = 1, 4
    last = tr.train()["loss"]
    assert last < 0.8 * first, (first, last)


def test_stage1_checkpoint_exports_to_diffusers_with_merged_adapter(tmp_path):
    import subprocess
    import sys

    from diffusers import AnyFlowTransformer3DModel

    from megatron_anyflow.models import lora as L

    root = str(tmp_path / "s1")
    tr = make("stage1", "--train-iters", "3", "--save", root)
    tr.train()
    out = str(tmp_path / "hf")
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--input", root, "--output", out,
                           "--merge-lora", "generator"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = AnyFlowTransformer3DModel.from_pretrained(out).eval()
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(2, 3, 16, 4, 6, generator=g), torch.randn(2, 5, 384, generator=g)
    t, r = torch.full((2, 3), 800.0), torch.full((2, 3), 100.0)
    with torch.no_grad():
        ours = tr.model(x, t, r, txt)  # generator adapter active
        ref = hf(x, t, r, txt, return_dict=False)[0]
        with L.use_adapter(tr.model, None):
            base = tr.model(x, t, r, txt)
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
    assert not torch.allclose(ours, base)


def test_synthesize_dataset_writes_teacher_samples(tmp_path):
    """tools/synthesize_dataset.py: a LatentDataset whose latents are the teacher's ODE samples."""
    import subprocess
    import sys

    from megatron_anyflow.anyflow.sampler import TeacherEulerSampler
    from megatron_anyflow.data.latent_dataset import LatentDataset, MockLatentDataset, write_latent_dataset
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    teacher_root = str(tmp_path / "teacher")
    make("teacher", "--train-iters", "1", "--lora-rank", "0", "--save", teacher_root).train()
    mock = MockLatentDataset(3, (3, 16, 4, 6), 5, 384, seed=2)
    src = str(tmp_path / "src")
    write_latent_dataset(src, torch.stack([mock[i][0] for i in range(3)]), torch.stack([mock[i][1] for i in range(3)]),
                         mock.negative_text, {"note": "test"}, dtype=torch.float32)  # exact values; kept by the tool
    out = str(tmp_path / "syn")
    proc = subprocess.run([sys.executable, "tools/synthesize_dataset.py", "--teacher", teacher_root, "--data-path", src,
                           "--output", out, "--steps", "3", "--guidance", "2", "--samples-per-prompt", "2",
                           "--batch-size", "4", "--seed", "5"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    syn = LatentDataset(out)
    assert len(syn) == 6 and syn.latent_shape == (3, 16, 4, 6)
    teacher = load_for_inference(teacher_root)
    g = torch.Generator().manual_seed(5)
    texts = torch.stack([mock[i % 3][1] for i in range(6)])
    noise = torch.randn((4, 3, 16, 4, 6), generator=g)
    with torch.no_grad():
        ref = TeacherEulerSampler(3, guidance_scale=2.0)(teacher, noise, texts[:4], mock.negative_text.expand(4, -1, -1))
    assert torch.allclose(torch.stack([syn[i][0] for i in range(4)]), ref, atol=1e-5)
    assert torch.equal(syn[4][1], mock[1][1])
