"""The 14B launch script validates itself on a CPU machine (DRY_RUN=1): sizes divide, the memory plan
fits 8 x 80 GB at 81 x 480 x 832 for stage 1 and stage 2; a bad layout fails loudly."""

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
