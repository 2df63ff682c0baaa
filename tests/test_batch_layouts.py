"""Every (DP, micro-batch, accumulation) layout of one global batch gives the split, the loss and the
gradients of one big micro-batch (stage 1 and the teacher, the real trainer, CPU float32).

Layouts of a global batch of 8: (DP, micro, accumulation) = (1, 1, 8), (2, 1, 4), (2, 2, 2), (1, 8, 1), on the
``tiny`` preset (16 latent channels); for the Wan2.2 TI2V-5B family (``tiny-wan2.2-ti2v``, 48 channels) stage 1
at (2, 2, 2), the layout that has DP, micro-batching and accumulation at once, against (1, 8, 1); for Wan2.2
I2V-A14B (``tiny-wan2.2-i2v-a14b``'s high expert: 16 latent channels and a 20-channel image condition per
sample) stage 1 at (1, 2, 4) against (1, 8, 1), with every model call's condition rows checked against its
samples' own (the condition travels with its sample; DP adds no path of its own for it).
What is checked, per layout:

- the split: global index i is a boundary sample iff i < floor(0.5 * 8) = 4, r = 0 iff 4 <= i < 6, free
  otherwise (the reference rule, `sample_t_r`), whatever step / rank holds it; the logged counts are
  ``boundary 4 | r0 2 | free 2``;
- the per-sample draws (t, r, text dropout, image-to-video choice: ``--i2v-prob 0.5`` in both stages) and
  per-sample losses are those of the big micro-batch, index by index (one generator per global index);
- the iteration's loss equals a float64 evaluation of paper eq. 7 over all 8 per-sample losses: boundary
  samples weigh 1, the others ``mean(boundary losses) / (loss_i + 1e-5)``, averaged over the 8 samples;
- the gradients handed to the optimizer equal the big micro-batch's.

Tolerances: the per-sample losses of one index come from the same float32 computation on the same inputs;
only the batch size of the GEMMs differs between layouts, which can change float32 summation order (a
relative difference of a few ulp, ~1e-7, amplified at most by the condition number of a mean of squares,
~1): 1e-5 relative. The loss against float64: the float32 kernel's rounding of 8 terms, < 1e-6. The
gradients are sums of the same per-sample gradients in a different order and with micro-batch scaling
1/n applied before the DP average instead of after: relative difference ~ (number of terms) x 2^-24 of
the gradient norm, far below 1e-5 of the norm.
"""
import math
import os
import sys

import pytest
import torch

from conftest import REPO, torchrun

sys.path.insert(0, os.path.join(REPO, "tests", "distributed"))
from layout_check import run_layout  # noqa: E402

GLOBAL = 8
LAYOUTS = [(1, 1), (2, 1), (2, 2), (1, 8)]  # (DP, micro); accumulation = 8 / (DP * micro)
STAGES = ["stage1", "teacher"]


def _run_layouts(tmp, layouts, stages, preset):
    """(dp, micro, stage) -> the per-rank records of `layout_check` for each layout (DP > 1 under torchrun)."""
    out = {}
    for dp, micro in layouts:
        prefix = str(tmp / f"dp{dp}_m{micro}")
        if dp == 1:
            run_layout(prefix, micro, GLOBAL, stages, preset=preset)
        else:
            torchrun([os.path.join(REPO, "tests", "distributed", "layout_check.py"), prefix, str(micro), str(GLOBAL),
                      *stages, "--preset", preset], nproc=dp)
        for stage in stages:
            out[(dp, micro, stage)] = [torch.load(f"{prefix}.{stage}.rank{r}.pt") for r in range(dp)]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return _run_layouts(tmp_path_factory.mktemp("layouts"), LAYOUTS, STAGES, "tiny")


@pytest.fixture(scope="module")
def runs_wan22(tmp_path_factory):
    return _run_layouts(tmp_path_factory.mktemp("layouts_wan22"), [(2, 2), (1, 8)], ["stage1"], "tiny-wan2.2-ti2v")


def _by_index(ranks):
    """global index -> per-sample record, over all ranks' calls."""
    rows = {}
    for rec in ranks:
        for c in rec["calls"]:
            for k in range(c["b"]):
                rows[c["offset"] + k] = {n: c[n][k] for n in ("per_sample_loss", "kind", "t", "r", "text_dropped", "i2v",
                                                             "scales") if n in c}
    assert sorted(rows) == list(range(GLOBAL)), sorted(rows)
    return rows


def _rule_kinds(n, boundary_fraction=0.5, r_zero_fraction=0.25):
    n_b = math.floor(boundary_fraction * n + 1e-9)
    n_r0 = math.floor(r_zero_fraction * n + 1e-9)
    return [0] * n_b + [1] * n_r0 + [2] * (n - n_b - n_r0)


@pytest.mark.parametrize("dp,micro", LAYOUTS)
def test_stage1_layout_matches_one_big_micro_batch(runs, dp, micro):
    _check_stage1_layout(runs[(dp, micro, "stage1")], runs[(1, 8, "stage1")], dp, micro)


def test_stage1_layout_matches_one_big_micro_batch_wan22_ti2v(runs_wan22):
    """The same checks on the Wan2.2 TI2V-5B family's tiny member (48-channel latents)."""
    big = runs_wan22[(1, 8, "stage1")]
    assert big[0]["model_channels"] == (48, 48)
    _check_stage1_layout(runs_wan22[(2, 2, "stage1")], big, 2, 2)


@pytest.fixture(scope="module")
def runs_i2v(tmp_path_factory):
    return _run_layouts(tmp_path_factory.mktemp("layouts_i2v"), [(1, 2), (1, 8)], ["stage1"], "tiny-wan2.2-i2v-a14b")


def test_layout_with_a_channel_condition_wan22_i2v_a14b(runs_i2v, stage="stage1"):
    """Wan2.2 I2V-A14B (16 latent + 20 condition channels, its high expert): micro 2 x accumulation 4 gives the
    big micro-batch's draws and losses, and every model call reads, row by row, its own samples' conditions
    (the rows of the loss's latents)."""
    small, big = runs_i2v[(1, 2, stage)], runs_i2v[(1, 8, stage)]
    for rec, micro in ((small[0], 2), (big[0], 8)):
        assert rec["model_channels"] == (36, 16)
        calls = rec["model_conditions"]
        per_micro = len(calls) // len(rec["micro"])
        assert per_micro == 4 and len(calls) == per_micro * len(rec["micro"])  # stage 1's four forwards
        for j, idx in enumerate(rec["micro"]):
            want = torch.stack([rec["dataset_conditions"][i] for i in idx])
            for y in calls[j * per_micro:(j + 1) * per_micro]:
                assert torch.equal(y, want), (stage, micro, j)
        # the samples' conditions differ (a swapped row would be seen)
        ys = list(rec["dataset_conditions"].values())
        assert len(ys) == GLOBAL and all(not torch.equal(ys[0][:, 4:], y[:, 4:]) for y in ys[1:])
    _check_stage1_layout(small, big, 1, 2, i2v_draws=False)


def _check_stage1_layout(ranks, big, dp, micro, i2v_draws=True):
    rows, ref = _by_index(ranks), _by_index(big)
    assert ranks[0]["layout"] == {"dp": dp, "micro": micro, "acc": GLOBAL // (dp * micro)}

    # The split over the whole global batch, by index, as the reference rule has it.
    assert [int(rows[i]["kind"]) for i in range(GLOBAL)] == _rule_kinds(GLOBAL)
    m = ranks[0]["metrics"]
    assert (m["boundary"], m["r0"], m["free"]) == (4, 2, 2)

    # Layout-independent per-sample draws and losses.
    for i in range(GLOBAL):
        for n in ("t", "r", "text_dropped", "i2v"):
            assert torch.equal(rows[i][n], ref[i][n]), (i, n)
        a, b = float(rows[i]["per_sample_loss"]), float(ref[i]["per_sample_loss"])
        assert abs(a - b) <= 1e-5 * abs(b), (i, a, b)
    # The draws are not degenerate: some prompts dropped, some i2v, some not.
    assert 0 < sum(bool(rows[i]["text_dropped"]) for i in range(GLOBAL)) < GLOBAL
    if i2v_draws:
        assert 0 < sum(bool(rows[i]["i2v"]) for i in range(GLOBAL)) < GLOBAL

    # Paper eq. 7 over the whole iteration, float64, from the per-sample losses.
    losses = [float(rows[i]["per_sample_loss"]) for i in range(GLOBAL)]
    kinds = _rule_kinds(GLOBAL)
    bmean = sum(l for l, k in zip(losses, kinds) if k == 0) / kinds.count(0)
    expect = sum(l if k == 0 else l * bmean / (l + 1e-5) for l, k in zip(losses, kinds)) / GLOBAL
    assert abs(m["loss"] - expect) <= 1e-6 * abs(expect), (m["loss"], expect)
    for i in range(GLOBAL):
        want = 1.0 if kinds[i] == 0 else bmean / (losses[i] + 1e-5)
        assert abs(float(rows[i]["scales"]) - want) <= 1e-5 * want, (i, float(rows[i]["scales"]), want)

    # Gradients (DP-reduced, identical on every rank) equal the big micro-batch's.
    ga, gb = ranks[0]["grads"], big[0]["grads"]
    assert ga.keys() == gb.keys() and len(ga) > 10
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in gb.values()))
    assert norm > 0
    worst = max(float((ga[k].double() - gb[k].double()).norm()) for k in ga) / norm
    assert worst < 1e-5, worst
    for r in ranks[1:]:
        assert all(torch.equal(r["grads"][k], ga[k]) for k in ga)


@pytest.mark.parametrize("dp,micro", LAYOUTS[:3])
def test_teacher_layout_matches_one_big_micro_batch(runs, dp, micro):
    _check_teacher_layout(runs[(dp, micro, "teacher")], runs[(1, 8, "teacher")], dp, micro)


def _check_teacher_layout(ranks, big, dp, micro):
    rows, ref = _by_index(ranks), _by_index(big)
    assert ranks[0]["layout"] == {"dp": dp, "micro": micro, "acc": GLOBAL // (dp * micro)}
    for i in range(GLOBAL):
        for n in ("t", "text_dropped", "i2v"):
            assert torch.equal(rows[i][n], ref[i][n]), (i, n)
        a, b = float(rows[i]["per_sample_loss"]), float(ref[i]["per_sample_loss"])
        assert abs(a - b) <= 1e-5 * abs(b), (i, a, b)
    assert 0 < sum(bool(rows[i]["i2v"]) for i in range(GLOBAL)) < GLOBAL  # conditioned and plain samples
    expect = sum(float(ref[i]["per_sample_loss"]) for i in range(GLOBAL)) / GLOBAL
    assert abs(ranks[0]["metrics"]["loss"] - expect) <= 1e-6 * expect
    ga, gb = ranks[0]["grads"], big[0]["grads"]
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in gb.values()))
    worst = max(float((ga[k].double() - gb[k].double()).norm()) for k in ga) / norm
    assert worst < 1e-5, worst


def test_old_per_step_split_would_differ():
    """The bug this guards against: drawing the split per accumulation step over micro x DP = 1 sample
    makes every sample free (no boundary, no r = 0, reweighting off)."""
    from megatron_anyflow.anyflow.timesteps import split_counts

    assert split_counts(1) == (0, 0, 1)
    assert split_counts(GLOBAL) == (4, 2, 2)
