"""`training.dry_run` for AnyFlow-FAR launches (``--model far``), in process: the FAR config as the trainer
builds it, the chunk partition against the clip, TE's CP attention refused, FAR padding printed (not an
error). The launch scripts' FAR dry runs are in tests/test_launch_scripts.py."""

from megatron_anyflow.training.arguments import parse_args
from megatron_anyflow.training.dry_run import dry_run

BASE = ["--model-preset", "wan2.1-1.3b", "--mock-data", "--mock-latent-shape", "21", "16", "60", "104",
        "--train-iters", "1", "--lora-rank", "256", "--lora-alpha", "256", "--dry-run"]


def _run(*argv):
    lines = []
    rc = dry_run(parse_args([*BASE, *argv]), log=lines.append)
    return rc, "\n".join(lines)


def test_far_padding_is_printed_not_failed():
    rc, out = _run("--stage", "stage1", "--model", "far", "--context-parallel-size", "4", "--world-size", "8")
    assert rc == 0, out
    assert "[ok] chunk partition [1, 3, 3, 3, 3, 3, 3, 2] sums to 21 latent frames <= the clip's 21" in out
    assert "teacher-forcing tokens n=3..8: 21840, 28470, 29640, 30810, 31980, 30030" in out
    assert "KV-cache prefills: 1560, 6240, 9750, 10920, 12090, 13260, 14430 (largest cache 14430)" in out
    # odd compressed frame counts (n = 4, 6, 8) do not divide by 4: padded by the model
    assert "padded to a multiple of CP x SP = 4" in out and "teacher forcing n=4: 28470 + 2" in out
    assert "[ok] FAR attention over CP 4 through the local backend's Ulysses exchange" in out
    assert "[ok] 12 heads divisible by TP x CP = 4" in out


def test_far_launch_errors():
    # stage 2 rolls out whole clips: the partition must cover the 21 latent frames exactly
    rc, out = _run("--stage", "stage2", "--model", "far", "--chunk-partition", "1", "3", "3", "--world-size", "1")
    assert rc == 1 and "[FAIL] chunk partition [1, 3, 3] sums to 7 latent frames == the clip's 21" in out
    # ... stage 1 cuts the clip to the partition
    rc, out = _run("--stage", "stage1", "--model", "far", "--chunk-partition", "1", "3", "3", "--world-size", "1")
    assert rc == 0 and "10920 tokens per sample" in out, out
    # Transformer Engine's own CP attention cannot run the FAR mask
    rc, out = _run("--stage", "stage1", "--model", "far", "--backend", "te", "--context-parallel-size", "2",
                   "--world-size", "2")
    assert rc == 1 and "[FAIL] FAR attention over CP 2" in out
    # heads must divide by TP x CP (the exchange is over heads)
    rc, out = _run("--stage", "stage1", "--model", "far", "--context-parallel-size", "8", "--world-size", "8")
    assert rc == 1 and "[FAIL] 12 heads divisible by TP x CP = 8" in out
    # a sum larger than the clip
    rc, out = _run("--stage", "stage1", "--model", "far", "--chunk-partition", "4", "4", "4", "4", "4", "4",
                   "--world-size", "1")
    assert rc == 1 and "[FAIL] chunk partition" in out
