"""The 14B launch script validates itself on a CPU machine (DRY_RUN=1): sizes divide, the memory plan
fits 8 x 80 GB at 81 x 480 x 832 for stage 1 and stage 2; a bad layout fails loudly. The Wan2.2 TI2V-5B
script's plan (one H200, 121 x 704 x 1280) likewise."""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(**env):
    full = dict(os.environ, DRY_RUN="1", PYTHONWARNINGS="ignore", **env)
    return subprocess.run(["bash", "examples/pretrain_anyflow_14b.sh"], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_14b_dry_run_fits_one_node(stage):
    proc = dry_run(STAGE=stage)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[FAIL]" not in out and out.count("[ok]") >= 6
    assert "32760 tokens per sample" in out
    assert "-> fits in 79.6 GiB" in out, out[-2000:]


def test_14b_dry_run_rejects_bad_layout():
    proc = dry_run(STAGE="stage1", TP="3", CP="1")
    assert proc.returncode != 0
    assert "[FAIL] 40 heads divisible by TP x CP = 3" in proc.stdout


# ------------------------------------------------------------------------------------------------
# AnyFlow-FAR: MODEL=far in the 14B script, and the 1.3B FAR script
# ------------------------------------------------------------------------------------------------
def test_14b_far_dry_run_plans_the_kv_caches():
    """MODEL=far: TP 8 x CP 1 by default (TE's own CP attention has no FAR mask), the FAR arguments reach the
    trainer's dry run (chunk partition == the 21 latent frames, padding to CP x SP = 8 printed, not failed)
    and the memory plan, which adds the rollout's KV caches and still fits 8 x 80 GB."""
    proc = dry_run(STAGE="stage2", MODEL="far")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[FAIL]" not in out and "TP 8 x CP 1" in out
    assert "[ok] chunk partition [1, 3, 3, 3, 3, 3, 3, 2] sums to 21 latent frames == the clip's 21" in out
    assert "teacher forcing n=7: 31980 + 4" in out  # padded to CP x SP = 8
    assert "AnyFlow-FAR stage 2" in out and "KV caches alive during the rollout: 68250 tokens" in out
    assert "-> fits in 79.6 GiB" in out


def test_far_1_3b_script_dry_run():
    """examples/pretrain_anyflow_far_1.3b.sh DRY_RUN=1: FAR stage 1 and stage 2 validate (no teacher, data or
    GPU needed) and both plans fit 8 x 80 GB."""
    full = dict(os.environ, DRY_RUN="1", PYTHONWARNINGS="ignore", TEACHER="/nonexistent")
    proc = subprocess.run(["bash", "examples/pretrain_anyflow_far_1.3b.sh"], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[FAIL]" not in out and out.count("[ok]") >= 18
    assert "global batch 32 = micro 1 x DP 8 x accumulation 4" in out
    assert "AnyFlow-FAR stage 1" in out and "n=7: 31980" in out and "bidirectional branch (32760 tokens)" in out
    assert "AnyFlow-FAR stage 2" in out and "KV caches alive during the rollout: 68250 tokens" in out
    assert out.count("-> fits in 79.6 GiB") == 2


def test_wan22_5b_script_dry_run_fits_one_h200():
    """examples/pretrain_anyflow_wan22_5b.sh DRY_RUN=1: stage 1 and stage 2 of the real 5B (48-channel latents of
    the Wan2.2 VAE, 31 x 44 x 80 -> 27,280 tokens) validate on one GPU and both plans fit one H200 (139 GiB)."""
    full = dict(os.environ, DRY_RUN="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", "examples/pretrain_anyflow_wan22_5b.sh"], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[FAIL]" not in out and out.count("[ok]") >= 12
    assert out.count("5.010B base parameters") == 2
    assert out.count("27280 tokens per sample (latents 31x44x80)") == 2
    assert out.count("[ok] latent channels 48 == model in_channels 48") == 2
    for stage in (1, 2):
        assert f"wan2.2-ti2v-5b stage {stage}: TP=1 CP=1 DP=1 SP=False 121x704x1280 (27280 tokens" in out
    assert out.count("-> fits in 139.0 GiB") == 2


def test_wan22_a14b_script_dry_run_plans_both_experts_and_two_expert_stage_2():
    """examples/pretrain_anyflow_wan22_a14b.sh DRY_RUN=1: each expert's stage 1 (one 14B at TP 4 x CP 2 on 8 GPUs,
    with --expert) and the pair's stage 2 pass the trainer's launch checks, and the two-expert stage-2 plan holds
    both experts' weights:
    its weight components are exactly twice the one-expert stage-2 plan's (tools/memory_plan.py --experts 1), and
    its activations one generator forward more (the rollout's shortcut split at the boundary)."""
    full = dict(os.environ, DRY_RUN="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", "examples/pretrain_anyflow_wan22_a14b.sh"], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "[FAIL]" not in out and out.count("14.316B base parameters") == 2
    assert out.count("wan2.2-t2v-a14b stage 1: TP=4 CP=2 DP=1") == 2
    assert "wan2.2-t2v-a14b stage 2: TP=4 CP=2 DP=1" in out and "x 2 experts" in out
    # stage 2 through the trainer's launch checks: both experts resident (28.6B base parameters), --pretrained-2
    assert "two experts (Wan2.2 A14B stage 2, both resident) of 40 layers" in out and "28.632B base parameters" in out
    assert "[ok] two-expert stage 2: both experts' bases (--pretrained and --pretrained-2)" in out
    from megatron_anyflow.measure.memory import PlanConfig, plan

    one, two = (plan(PlanConfig(preset="wan2.2-t2v-a14b", stage=2, tp=4, cp=2, dp=1, experts=x)) for x in (1, 2))
    for (k1, v1), (k2, v2) in zip(one["components"].items(), two["components"].items()):
        weight = not (k1.startswith("activations") or k1.startswith("transient") or k1.startswith("reserve"))
        if k1.startswith("activations"):  # the chain's 3 generator forwards, plus the shortcut split at b
            assert k1.startswith("activations: 3 generator") and k2.startswith("activations: 4 generator"), (k1, k2)
            assert v2 == pytest.approx(4 / 3 * v1), k1
            continue
        assert k2 == (k1 + " x 2 experts" if weight else k1) and v2 == pytest.approx(2 * v1 if weight else v1), k1
    with pytest.raises(ValueError, match="stage 1 trains one expert per run"):
        plan(PlanConfig(preset="wan2.2-t2v-a14b", stage=1, tp=4, cp=2, dp=1, experts=2))


def test_wan22_5b_tiny_run_refuses_a_user_directory(tmp_path):
    """--tiny replaces its own earlier output folder only: a non-empty OUT without the run's marker file is
    refused (exit 2) before anything is written or removed."""
    (tmp_path / "notes.txt").write_text("mine")
    full = dict(os.environ, OUT=str(tmp_path), PYTHONWARNINGS="ignore")
    proc = subprocess.run(["bash", "examples/pretrain_anyflow_wan22_5b.sh", "--tiny"], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not an earlier --tiny run" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
