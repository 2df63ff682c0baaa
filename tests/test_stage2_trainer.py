"""Stage 2 in the trainer: three roles on one base, schedules, resume, TP = 2 (CPU, float32)."""


import pytest
import torch

from conftest import torchrun
from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.convert import load_full_state_dict
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.training.arguments import parse_args
from megatron_anyflow.training.trainer import Trainer

COMMON = ["--mock-data", "--mock-num-samples", "16", "--mock-latent-shape", "3", "16", "4", "6",
          "--micro-batch-size", "2", "--log-interval", "100"]


@pytest.fixture(scope="module")
def stage1_ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("s1") / "ckpt")
    Trainer(parse_args(["--stage", "stage1", *COMMON, "--train-iters", "3", "--lora-rank", "4", "--lora-alpha", "4",
                        "--lr", "1e-3", "--save", root]), log=lambda *a, **k: None).train()
    return root


def stage2(stage1_ckpt, *extra):
    return Trainer(parse_args(["--stage", "stage2", *COMMON, "--global-batch-size", "4", "--lr", "1e-3",
                               "--init-adapters-from", stage1_ckpt, "--simulation-steps", "2", "4", *extra]),
                   log=lambda *a, **k: None)


def adapters(tr):
    return {k: p.detach().clone() for g in tr.groups.values() for k, p in g.params.items()}


def test_roles_share_one_base_and_equal_separate_models(stage1_ckpt):
    tr = stage2(stage1_ckpt, "--train-iters", "1")
    tr.train()  # moves both adapters away from their start
    model = tr.model
    lin = model.blocks[0].mlp.linear_fc1
    assert set(lin.adapters) == {"generator", "fake_score"}
    base_ptrs = {p.data_ptr() for n, p in model.named_parameters() if ".adapters." not in n}
    n_base = sum(1 for n, _ in model.named_parameters() if ".adapters." not in n)
    assert len(base_ptrs) == n_base  # each base tensor exists once, shared by the three roles
    base_sd = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k and v is not None}
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(2, 3, 16, 4, 6, generator=g), torch.randn(2, 5, 384, generator=g)
    t, r = torch.full((2, 3), 700.0), torch.full((2, 3), 250.0)
    for adapter, call_r in ((None, t), ("fake_score", t), ("generator", r)):
        separate = WanModel(wan_config(None, **tr.arch))
        load_full_state_dict(separate, base_sd, strict=False)
        if adapter is not None:
            L.apply_lora(separate, [adapter], tr.args.lora_rank, tr.args.lora_alpha)
            own = {k: v for k, v in model.state_dict().items() if f".adapters.{adapter}." in k}
            separate.load_state_dict(own, strict=False)
            L.merge_adapter(separate, adapter)
        with torch.no_grad():
            ours = tr.stage.role(adapter)(x, t, call_r, txt)
            ref = separate(x, t, call_r, txt)
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-5, adapter


def test_pipelined_equals_sequential_with_frozen_generator(stage1_ckpt):
    runs = {}
    for schedule in ("sequential", "pipelined"):
        tr = stage2(stage1_ckpt, "--train-iters", "2", "--schedule", schedule, "--lr", "0", "--critic-lr", "1e-3")
        tr.train()
        runs[schedule] = adapters(tr)
    a, b = runs["sequential"], runs["pipelined"]
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:4]
    assert any("fake_score" in k and "lora_B" in k and a[k].abs().sum() > 0 for k in a)  # the critic trained


def test_generator_learns_and_resume_is_bit_exact(stage1_ckpt, tmp_path):
    start = stage2(stage1_ckpt, "--train-iters", "4")
    init = adapters(start)
    start.train()
    end = adapters(start)
    assert any(not torch.equal(init[k], end[k]) for k in init if "generator" in k)
    first = stage2(stage1_ckpt, "--train-iters", "4", "--exit-after-iters", "2", "--save", str(tmp_path / "c"))
    first.train()
    resumed = stage2(stage1_ckpt, "--train-iters", "4", "--load", str(tmp_path / "c"))
    resumed.train()
    again = adapters(resumed)
    assert all(torch.equal(end[k], again[k]) for k in end)


def test_stage2_tp2_matches_tp1(stage1_ckpt, tmp_path):
    out = tmp_path / "tp2.pt"
    torchrun(["tests/distributed/stage2_tp_check.py", stage1_ckpt, str(out)])
    tp2 = torch.load(out)
    for schedule in ("sequential", "pipelined"):
        tr = Trainer(parse_args(["--stage", "stage2", *COMMON, "--global-batch-size", "2", "--train-iters", "2",
                                 "--lr", "1e-3", "--init-adapters-from", stage1_ckpt, "--simulation-steps", "4",
                                 "--schedule", schedule]), log=lambda *a, **k: None)
        tr.train()
        ref = adapters(tr)
        assert ref.keys() == tp2[schedule].keys()
        for k in ref:
            err = ((tp2[schedule][k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)).item()
            assert err < 1e-4, (schedule, k, err)


def test_stage2_needs_a_stage1_generator(tmp_path):
    root = str(tmp_path / "teacher")
    Trainer(parse_args(["--stage", "teacher", *COMMON, "--train-iters", "1", "--lora-rank", "4", "--save", root]),
            log=lambda *a, **k: None).train()
    with pytest.raises(ValueError, match="no 'generator' adapter"):
        stage2(root, "--train-iters", "1")
