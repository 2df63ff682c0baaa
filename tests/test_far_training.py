"""AnyFlow-FAR training (docs/design/far.md 2), CPU, float32 unless stated.

1. `far_stage1_loss` with a deterministic toy model of the FAR call signature, against an independent
   float64 evaluation: the context / target split by n, context unchanged at t = r = 0 in all four calls,
   clean copies == target at clean_t = 0, finite differences on the target frames only, eps of the target's
   shape, and the loss / scales / gradient of paper eq. 3, 4, 6, 7 recomputed in float64 from the recorded
   calls (measured: per-sample 1.6e-7, loss 8e-8, gradient 3e-7 relative; tolerance 1e-5).
2. `sample_far_num_chunks`: distribution (5-sigma binomial test), two draws always, a function of the state.
3. Batch layouts of the real trainer, (DP, micro, acc) = (1, 1, 4), (2, 1, 2) under torchrun, (1, 4, 1), with
   n = 5 chunks (compressed context) and with / without the bidirectional branch
   (tests/distributed/far_layout_check.py; measured: per-sample losses 2.5e-7, gradients 4e-7 of the norm,
   far_patch_embedding's own gradient 1.2e-6 of its norm, loss vs float64 eq. 7 6e-8; tolerance 1e-5 / 1e-6).
4. Bit-exact resume of FAR stage 1 (4 vs 2 + 2) and stage 2 (3 vs 2 + 1), every saved tensor.
5. The stage-1 checkpoint's far_patch_embedding (live, EMA, moments), `load_for_inference` with / without
   EMA, generation from the checkpoint and its frame-count error.
6. Argument errors.

Shapes are tiny (latents 6 x 16 x 4 x 8, chunk partition (1, 2, 1, 1, 1)); one stage-1 checkpoint (module
fixture) serves the resume, checkpoint, generation and stage-2 tests.
"""
import copy
import math
import os
import sys

import pytest
import torch

from conftest import REPO, torchrun
from megatron_anyflow.anyflow.objective import (
    FlowMapObjectiveConfig,
    far_stage1_loss,
    guidance_fused,
    sample_far_num_chunks,
)
from megatron_anyflow.anyflow.timesteps import TimeSamplerConfig, sample_t_r
from megatron_anyflow.checkpoint import store as ckpt
from megatron_anyflow.training.arguments import parse_args
from megatron_anyflow.training.trainer import Trainer

sys.path.insert(0, os.path.join(REPO, "tests", "distributed"))
from far_layout_check import CHUNKS, run_far_layout  # noqa: E402

QUIET = dict(log=lambda *a, **k: None)


# =====================================================================================================
# 1. far_stage1_loss against an independent float64 evaluation
# =====================================================================================================
class ToyFar(torch.nn.Module):
    """A deterministic model with the FAR teacher-forcing signature, in any dtype.

    ``u = tanh((M^T z) (1 + T/2000) + 0.3 R/1000 + mean(context) + 0.2 P^T mean(text) + 0.1 mean(clean)
    (1 + clean_t/1000)) + 0.5 z`` on the last ``Ff = sum(cp[-min(n, 3):])`` frames of ``latents``: every
    input the loss hands over changes the output, so a wrong split, context, text or clean copy cannot go
    unnoticed in the recorded calls. Records every call's arguments and output."""

    def __init__(self, channels, text_dim, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        eye = torch.eye(channels, dtype=torch.float64)
        self.mix = torch.nn.Parameter((eye + 0.3 * torch.randn(channels, channels, generator=g, dtype=torch.float64)
                                       ).to(dtype))
        self.register_buffer("proj", (torch.randn(text_dim, channels, generator=g, dtype=torch.float64)
                                      / text_dim ** 0.5).to(dtype))
        self.calls = []

    def forward(self, latents, T, R, text, *, chunk_partition, clean_latents, clean_t):
        self.calls.append({"latents": latents.detach().clone(), "T": T.clone(), "R": R.clone(),
                           "text": text.clone(), "cp": tuple(chunk_partition), "clean": clean_latents.clone(),
                           "clean_t": clean_t.clone(), "grad": torch.is_grad_enabled()})
        cp = list(chunk_partition)
        ff = sum(cp[-min(len(cp), 3):])
        fc = latents.shape[1] - ff
        b, _, c = latents.shape[:3]
        z = latents[:, fc:]
        ctx = latents[:, :fc].mean(dim=(1, 3, 4)) if fc else latents.new_zeros(b, c)
        bc = lambda v: v[:, None, :, None, None]  # noqa: E731  [b, c] -> [b, 1, c, 1, 1]
        tt = T[:, fc:, None, None, None].to(latents.dtype)
        rr = R[:, fc:, None, None, None].to(latents.dtype)
        h = torch.einsum("bfchw,cd->bfdhw", z, self.mix)
        cl = clean_latents.mean(dim=(1, 3, 4)) * (1 + clean_t.to(latents.dtype)[:, None] / 1000)
        out = torch.tanh(h * (1 + tt / 2000) + 0.3 * rr / 1000 + bc(ctx) + 0.2 * bc(text.mean(1) @ self.proj)
                         + 0.1 * bc(cl)) + 0.5 * z
        self.calls[-1]["out"] = out.detach().clone()
        return out


def beta_weight64(t):
    """w(t) of the reference (beta08: t (1 - t)^0.5 on the shift-5 grid of 1001 points, summing to 1000),
    nearest grid point; float64, written from docs/design/anyflow.md 1.3 / docs/design/far.md 2.1, not from
    `timesteps.loss_weight`."""
    x = torch.linspace(0, 1, 1001, dtype=torch.float64)
    grid = 5 * x / (1 + 4 * x)
    y = grid * (1 - grid) ** 0.5
    w = y * 1000 / y.sum()
    return torch.stack([w[(grid - float(ti)).abs().argmin()] for ti in t])


CP1 = (1, 2, 2, 1, 2)  # 8 frames; the clips below have 9 (the cut to sum(cp[:n]) is part of the check)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_far_stage1_loss_matches_float64_evaluation(n):
    b, c, h, w, L, d = 4, 4, 2, 3, 5, 12
    g = torch.Generator().manual_seed(100 + n)
    x = torch.randn(b, 9, c, h, w, generator=g)
    text = torch.randn(b, L, d, generator=g)
    neg = torch.randn(1, L, d, generator=g)
    cfg = FlowMapObjectiveConfig(text_dropout=0.5, kernel_backend="torch")
    seeds = [1000 * n + k for k in range(b)]
    toy = ToyFar(c, d)
    time_gen = torch.Generator().manual_seed(77 + n)
    loss, stats = far_stage1_loss(
        toy, x, text, neg, cfg, chunk_partition=CP1, num_chunks=n,
        time_generator=torch.Generator().manual_seed(77 + n),
        noise_generator=[torch.Generator().manual_seed(s) for s in seeds], global_batch=b, global_offset=0)
    loss.backward()

    # The split (docs/design/far.md 2.1): n <= 3 -> every chunk is a target; n > 3 -> the first n - 3 chunks are
    # clean context. Written out for CP1, independently of the code's arithmetic.
    frames = sum(CP1[:n])
    fc = {1: 0, 2: 0, 3: 0, 4: 1, 5: 3}[n]
    ff = frames - fc
    assert float(stats["num_chunks"]) == n and float(stats["target_frames"]) == ff
    context, target = x[:, :fc], x[:, fc:frames]

    # Independent draws: (t, r, kind) of the global split, then per sample eps of the TARGET's shape and
    # the two uniforms (text dropout, i2v), in that order (stage1_loss docstring, step 2).
    t32, r32, kind = sample_t_r(b, time_gen, TimeSamplerConfig())
    assert torch.equal(stats["t"], t32) and torch.equal(stats["r"], r32) and torch.equal(stats["kind"], kind)
    eps, drop = [], []
    for s in seeds:
        gs = torch.Generator().manual_seed(s)
        eps.append(torch.randn((1, ff, c, h, w), generator=gs))
        drop.append(bool(torch.rand((2, 1), generator=gs)[0, 0] < cfg.text_dropout))
    eps = torch.cat(eps).double()
    drop = torch.tensor(drop)
    assert torch.equal(stats["text_dropped"], drop)
    t64, r64 = t32.double(), r32.double()
    x64 = target.double()
    z64 = (1 - t64.view(b, 1, 1, 1, 1)) * x64 + t64.view(b, 1, 1, 1, 1) * eps
    v64 = eps - x64
    T_exp, R_exp = (t64 * 1000).float(), (r64 * 1000).float()  # to_model_scale: float64 product, one rounding
    used = torch.where(drop.view(b, 1, 1), neg.expand(b, -1, -1), text)

    # The four calls: conditional (grad), null, +, - (stage1_loss step 4).
    calls = toy.calls
    assert len(calls) == 4 and [cl["grad"] for cl in calls] == [True, False, False, False]
    sign = {0: 0.0, 1: 0.0, 2: 1.0, 3: -1.0}
    for k, cl in enumerate(calls):
        assert cl["cp"] == CP1[:n]
        assert cl["latents"].shape == (b, frames, c, h, w) and cl["out"].shape == (b, ff, c, h, w)
        # context unchanged (bitwise) at t = r = 0 in every call, the finite-difference calls included
        assert torch.equal(cl["latents"][:, :fc], context)
        assert torch.equal(cl["T"][:, :fc], torch.zeros(b, fc)) and torch.equal(cl["R"][:, :fc], torch.zeros(b, fc))
        # clean copies == the target's clean latents, at clean_t = 0
        assert torch.equal(cl["clean"], target) and torch.equal(cl["clean_t"], torch.zeros(b))
        # target frames: z (+/- v e/1000 in the finite-difference calls), one (t, r) per sample for all
        # of them. Tolerance: z is formed in float32 from |x|, |eps| < ~5 and rounded once more after
        # adding the step: <= ~3 ulp(5) = 1.5e-6 from the float64 value.
        want = z64 + sign[k] * v64 * (cfg.fd_eps / 1000)
        assert (cl["latents"][:, fc:].double() - want).abs().max() < 2e-6, k
        step_T = torch.full((b, ff), sign[k] * cfg.fd_eps)
        assert torch.equal(cl["T"][:, fc:], T_exp[:, None].expand(b, ff) + step_T), k  # same float32 op
        assert torch.equal(cl["R"][:, fc:], R_exp[:, None].expand(b, ff)), k
        assert torch.equal(cl["text"], neg.expand(b, -1, -1) if k == 1 else used), k
    # The finite-difference calls really perturb the target (by ~ e/1000 |v|, far above the tolerance).
    assert (calls[2]["latents"][:, fc:] - calls[0]["latents"][:, fc:]).abs().max() > 1e-3

    # Paper eq. 6 (guidance fusion), eq. 4 (central difference), eq. 3 (MeanFlow target), w(t), eq. 7,
    # in float64 from the recorded outputs.
    gd, e = cfg.guidance, cfg.fd_eps
    uc, un, up, um = (cl["out"].double() for cl in calls)
    dt = (1000 * (t64 - r64)).view(b, 1, 1, 1, 1)

    def per_sample64(u_cond):
        u = (u_cond - (1 - gd) * un) / gd
        tgt = v64 - dt * (up - um) / (2 * e * gd)
        return beta_weight64(t32) * (u - tgt).square().reshape(b, -1).mean(1)

    ps = per_sample64(uc)
    bnd = kind == 0
    bmean = ps[bnd].mean()
    scales = torch.where(bnd, torch.ones_like(ps), bmean / (ps + 1e-5))
    loss64 = (scales * ps).mean()
    # Tolerances. Per-sample: the same float32 inputs; the float32 kernel rounds u, the target and the
    # squares (a few ulp each; no catastrophic cancellation since |u - u_tgt| ~ |u|) and the mean over
    # Ff*c*h*w <= 120 terms; the float64 side differs also by T - R rounded to float32 (|dT| <= 6e-5 of
    # 1000 t, times du/dt ~ 1e-3): together < 1e-6 relative; 1e-5 leaves margin. Eq. 7 adds 4 float32
    # products and a mean (< 1e-6): 1e-5.
    rel = ((stats["per_sample_loss"].double() - ps).abs() / ps).max()
    assert rel < 1e-5, rel
    assert abs(float(loss.detach()) - float(loss64)) <= 1e-5 * float(loss64), (float(loss.detach()), float(loss64))
    assert torch.allclose(stats["scales"].double(), scales, rtol=1e-5, atol=0)
    assert kind.tolist() == [0, 0, 1, 2]  # the 4-sample split: the reweighting is exercised

    # Gradient: only the conditional call carries it (u_null, u_+/-, the target and the eq. 7 scales are
    # stop-gradient). float64 re-run of the toy on the recorded conditional inputs. Tolerance: the float32
    # forward/backward of 4*Ff*c*h*w elements vs float64, each term a few ulp (1e-7), summed: < 1e-6 of the
    # gradient norm; 1e-5.
    toy64 = copy.deepcopy(toy).double()
    toy64.calls = []
    c0 = calls[0]
    u64 = toy64(c0["latents"].double(), c0["T"].double(), c0["R"].double(), c0["text"].double(),
                chunk_partition=c0["cp"], clean_latents=c0["clean"].double(), clean_t=c0["clean_t"].double())
    (scales.detach() * per_sample64(u64)).mean().backward()
    g32, g64 = toy.mix.grad.double(), toy64.mix.grad
    assert g64.norm() > 0
    assert (g32 - g64).norm() / g64.norm() < 1e-5, float((g32 - g64).norm() / g64.norm())


def test_far_stage1_loss_errors_and_explicit_noise():
    b, c, h, w, d = 2, 4, 2, 3, 12
    g = torch.Generator().manual_seed(5)
    x, text, neg = torch.randn(b, 8, c, h, w, generator=g), torch.randn(b, 3, d, generator=g), torch.randn(1, 3, d)
    kw = dict(chunk_partition=CP1, time_generator=torch.Generator().manual_seed(1), noise_generator=None,
              global_batch=b, global_offset=0)
    for bad in (0, 6):
        with pytest.raises(ValueError, match=f"num_chunks={bad}; expected 1..5"):
            far_stage1_loss(ToyFar(c, d), x, text, neg, num_chunks=bad, **kw)
    with pytest.raises(ValueError, match=r"latents \(2, 5, 4, 2, 3\): 5 chunks of \[1, 2, 2, 1, 2\] need 8"):
        far_stage1_loss(ToyFar(c, d), x[:, :5], text, neg, num_chunks=5, **kw)
    with pytest.raises(ValueError, match="i2v_prob=0.5"):
        far_stage1_loss(ToyFar(c, d), x, text, neg, FlowMapObjectiveConfig(i2v_prob=0.5), num_chunks=4, **kw)
    # eps is of the target's shape (n = 4: context 1 frame, target 5 frames): a whole-clip noise is refused,
    # a target-shaped one is used as is.
    with pytest.raises(ValueError, match=r"noise must have x's shape \(2, 5, 4, 2, 3\)"):
        far_stage1_loss(ToyFar(c, d), x, text, neg, num_chunks=4, noise=torch.randn(b, 8, c, h, w), **kw)
    noise = torch.randn(b, 5, c, h, w, generator=g)
    toy = ToyFar(c, d)
    _, stats = far_stage1_loss(toy, x, text, neg, FlowMapObjectiveConfig(text_dropout=0.0), num_chunks=4,
                               noise=noise, **kw)
    t = stats["t"].view(b, 1, 1, 1, 1)
    z = ((1 - t) * x[:, 1:6] + t * noise)
    assert (toy.calls[0]["latents"][:, 1:] - z).abs().max() < 2e-6


def test_guidance_fused_is_eq6_with_stop_gradient():
    toy_calls = []
    wgt = torch.nn.Parameter(torch.tensor(1.5))

    def model(z, T, R, txt):
        toy_calls.append((txt.clone(), torch.is_grad_enabled()))
        return torch.tanh(wgt * z + txt.mean((1, 2)).view(-1, 1, 1, 1, 1) + T[:, :, None, None, None] / 1000)

    g = torch.Generator().manual_seed(9)
    z, T = torch.randn(3, 2, 2, 2, 2, generator=g), torch.rand(3, 2, generator=g) * 1000
    txt, neg = torch.randn(3, 4, 5, generator=g), torch.randn(1, 4, 5, generator=g)
    assert guidance_fused(model, neg, 1.0) is model
    u = guidance_fused(model, neg, 3.0)(z, T, T, txt)
    assert [c[1] for c in toy_calls] == [True, False]
    assert torch.equal(toy_calls[1][0], neg.expand(3, -1, -1))
    with torch.no_grad():
        uc, un = model(z, T, T, txt), model(z, T, T, neg.expand(3, -1, -1))
    assert torch.allclose(u, (uc + 2 * un) / 3, rtol=0, atol=1e-6)
    u.sum().backward()
    # d/dw of (u_c + 2 sg(u_null)) / 3 = (1/3) d u_c / dw
    wd = wgt.detach().double().requires_grad_(True)
    (torch.tanh(wd * z.double() + txt.double().mean((1, 2)).view(-1, 1, 1, 1, 1)
                + T.double()[:, :, None, None, None] / 1000).sum() / 3).backward()
    assert abs(float(wgt.grad) - float(wd.grad)) <= 1e-5 * abs(float(wd.grad))


# =====================================================================================================
# 2. sample_far_num_chunks
# =====================================================================================================
@pytest.mark.parametrize("K,p", [(8, 0.5), (5, 0.25)])
def test_far_num_chunks_distribution(K, p):
    """P(n = 3) = 1 - p + p / (K - 2), P(n = k) = p / (K - 2) for k = 4..K. Frequency test over M seeded
    draws: each count is Binomial(M, P) -> within 5 standard deviations (a false failure has
    probability ~6e-7 per cell)."""
    M = 20000
    g = torch.Generator().manual_seed(2024 + K)
    counts = [0] * (K + 1)
    for _ in range(M):
        counts[sample_far_num_chunks(g, K, p)] += 1
    assert sum(counts[3:]) == M
    for k in range(3, K + 1):
        P = p / (K - 2) + (1 - p if k == 3 else 0.0)
        sd = math.sqrt(M * P * (1 - P))
        assert abs(counts[k] - M * P) <= 5 * sd, (k, counts[k], M * P, sd)


def test_far_num_chunks_is_a_function_of_the_generator_state():
    for p in (0.0, 0.5, 1.0):
        for seed in range(20):
            g1, g2, g3 = (torch.Generator().manual_seed(seed) for _ in range(3))
            a = [sample_far_num_chunks(g1, 8, p) for _ in range(10)]
            assert a == [sample_far_num_chunks(g2, 8, p) for _ in range(10)]
            if p == 0.0:
                assert a == [3] * 10
            # always exactly two draws (rand, randint), whatever the outcome
            for _ in range(10):
                torch.rand((), generator=g3)
                torch.randint(3, 9, (), generator=g3)
            assert torch.equal(g1.get_state(), g3.get_state()), (p, seed)
    g = torch.Generator().manual_seed(0)
    assert {sample_far_num_chunks(g, 2, 1.0) for _ in range(20)} == {2}  # fewer chunks than 3: all of them
    assert {sample_far_num_chunks(g, 3, 1.0) for _ in range(20)} == {3}
    with pytest.raises(ValueError, match="long_context_prob must lie in"):
        sample_far_num_chunks(g, 8, 1.5)


# =====================================================================================================
# 3. Batch layouts: FAR stage 1 in the real trainer
# =====================================================================================================
LAYOUT_GLOBAL = 4
FAR_LAYOUTS = [(1, 1), (2, 1), (1, 4)]  # (DP, micro); accumulation = 4 / (DP * micro): 4, 2, 1
FAR_CASES = ["causal", "bidirectional"]


@pytest.fixture(scope="module")
def far_layouts(tmp_path_factory):
    out = {}
    tmp = tmp_path_factory.mktemp("far_layouts")
    for dp, micro in FAR_LAYOUTS:
        prefix = str(tmp / f"dp{dp}_m{micro}")
        if dp == 1:
            run_far_layout(prefix, micro, LAYOUT_GLOBAL, FAR_CASES)
        else:
            torchrun([os.path.join(REPO, "tests", "distributed", "far_layout_check.py"), prefix, str(micro),
                      str(LAYOUT_GLOBAL), *FAR_CASES], nproc=dp)
        for case in FAR_CASES:
            out[(dp, micro, case)] = [torch.load(f"{prefix}.{case}.rank{r}.pt") for r in range(dp)]
    return out


def _far_rows(ranks):
    """global index -> what the loss and the model calls did for that sample, over all ranks."""
    rows = {}
    for rec in ranks:
        for c in rec["calls"]:
            for k in range(c["b"]):
                row = {n: c[n][k] for n in ("per_sample_loss", "kind", "t", "r", "text_dropped", "scales", "x")}
                row["num_chunks"], row["target_frames"] = float(c["num_chunks"]), float(c["target_frames"])
                row["calls"] = [{n: (v[k] if torch.is_tensor(v) else v) for n, v in mc.items()}
                                for mc in c["model_calls"]]
                rows[c["offset"] + k] = row
        for c in rec["bi_calls"]:
            for k in range(c["b"]):
                rows[c["offset"] + k]["bi"] = {n: c[n][k] for n in ("per_sample_loss", "t", "text", "x")}
    assert sorted(rows) == list(range(LAYOUT_GLOBAL)), sorted(rows)
    return rows


@pytest.mark.parametrize("case", FAR_CASES)
@pytest.mark.parametrize("dp,micro", FAR_LAYOUTS)
def test_far_stage1_layout_matches_one_big_micro_batch(far_layouts, dp, micro, case):
    ranks, big = far_layouts[(dp, micro, case)], far_layouts[(1, LAYOUT_GLOBAL, case)]
    rows, ref = _far_rows(ranks), _far_rows(big)
    assert ranks[0]["layout"] == {"dp": dp, "micro": micro, "acc": LAYOUT_GLOBAL // (dp * micro)}
    # The same iteration plan everywhere: n = 5 chunks (2 compressed context chunks), branch per case.
    assert ranks[0]["iteration"] == big[0]["iteration"]
    assert tuple(ranks[0]["plan"]) == (len(CHUNKS), case == "bidirectional")
    fc, ff = 3, 3  # context = chunks 0, 1 (1 + 2 frames), target = chunks 2..4
    m = ranks[0]["metrics"]
    assert m["chunks"] == len(CHUNKS) and (m["boundary"], m["r0"], m["free"]) == (2, 1, 1)

    for i in range(LAYOUT_GLOBAL):
        a, r = rows[i], ref[i]
        assert a["num_chunks"] == len(CHUNKS) and a["target_frames"] == ff
        assert torch.equal(a["x"], r["x"]), i  # the same clip at the same global index
        for n in ("t", "r", "kind", "text_dropped"):
            assert torch.equal(a[n], r[n]), (i, n)
        assert len(a["calls"]) == 4
        for k, (ca, cr) in enumerate(zip(a["calls"], r["calls"])):
            assert ca["chunk_partition"] == list(CHUNKS)
            # split: clean compressed context at t = r = 0, clean copies of the target at clean_t = 0
            assert torch.equal(ca["latents"][:fc], a["x"][:fc]), (i, k)
            assert not ca["T"][:fc].any() and not ca["R"][:fc].any() and not ca["clean_t"].any()
            assert torch.equal(ca["clean_latents"], a["x"][fc:fc + ff]), (i, k)
            # times, noise (z and its +/- perturbations) and prompts of the sample: bitwise the same
            # (elementwise float32 arithmetic on the same per-sample draws)
            for n in ("latents", "T", "R", "text"):
                assert torch.equal(ca[n], cr[n]), (i, k, n)
        pa, pb = float(a["per_sample_loss"]), float(r["per_sample_loss"])
        assert abs(pa - pb) <= 1e-5 * abs(pb), (i, pa, pb)
        if case == "bidirectional":
            # whole clip, the prompts after the causal branch's dropout, layout-independent draws
            assert torch.equal(a["bi"]["x"], a["x"]) and torch.equal(a["bi"]["text"], a["calls"][0]["text"])
            assert torch.equal(a["bi"]["t"], r["bi"]["t"])
            qa, qb = float(a["bi"]["per_sample_loss"]), float(r["bi"]["per_sample_loss"])
            assert abs(qa - qb) <= 1e-5 * abs(qb), (i, qa, qb)
        else:
            assert "bi" not in a
    assert 0 < sum(bool(rows[i]["text_dropped"]) for i in range(LAYOUT_GLOBAL)) < LAYOUT_GLOBAL

    # The iteration's loss: paper eq. 7 over all 4 causal per-sample losses (float64) + the bidirectional
    # branch's mean. Tolerance: float32 rounding of a handful of terms, < 1e-6 relative.
    losses = [float(rows[i]["per_sample_loss"]) for i in range(LAYOUT_GLOBAL)]
    kinds = [int(rows[i]["kind"]) for i in range(LAYOUT_GLOBAL)]
    assert kinds == [0, 0, 1, 2]
    bmean = sum(l for l, k in zip(losses, kinds) if k == 0) / kinds.count(0)
    expect = sum(l if k == 0 else l * bmean / (l + 1e-5) for l, k in zip(losses, kinds)) / LAYOUT_GLOBAL
    if case == "bidirectional":
        bi = sum(float(rows[i]["bi"]["per_sample_loss"]) for i in range(LAYOUT_GLOBAL)) / LAYOUT_GLOBAL
        assert abs(m["bidirectional"] - bi) <= 1e-6 * bi
        expect += bi
    assert abs(m["loss"] - expect) <= 1e-6 * abs(expect), (m["loss"], expect)

    # Gradients handed to the optimizer (LoRA + far_patch_embedding; DP-reduced, identical on every rank)
    # equal the big micro-batch's. Same per-sample gradients summed in another order, scaled by 1/n before
    # the DP mean instead of after: ~ (terms) x 2^-24 relative, far below 1e-5 of the norm.
    ga, gb = ranks[0]["grads"], big[0]["grads"]
    assert ga.keys() == gb.keys() and {"far_patch_embedding.weight", "far_patch_embedding.bias"} <= ga.keys()
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in gb.values()))
    worst = max(float((ga[k].double() - gb[k].double()).norm()) for k in ga) / norm
    assert worst < 1e-5, worst
    # far_patch_embedding (the compressed context's embedding) gets a gradient, equal to 1e-5 of its own norm
    for k in ("far_patch_embedding.weight", "far_patch_embedding.bias"):
        fn = float(gb[k].double().norm())
        assert fn > 0, k
        assert float((ga[k].double() - gb[k].double()).norm()) < 1e-5 * fn, k
    for r in ranks[1:]:
        assert all(torch.equal(r["grads"][k], ga[k]) for k in ga)


# =====================================================================================================
# 4. Bit-exact resume (stage 1 and stage 2), 5. checkpoint content and loading
# =====================================================================================================
FAR_COMMON = ["--model", "far", "--chunk-partition", *map(str, CHUNKS), "--mock-data", "--mock-num-samples", "16",
              "--mock-latent-shape", str(sum(CHUNKS)), "16", "4", "8", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--lora-rank", "4", "--lora-alpha", "4", "--lr", "1e-3",
              "--ema-decay", "0.9", "--ema-start-iter", "0", "--log-interval", "100", "--long-context-prob", "0.5"]
S1 = ["--stage", "stage1", *FAR_COMMON, "--lr-warmup-iters", "1", "--far-bidirectional-prob", "0.5"]


def far_s2(init, *extra):
    return Trainer(parse_args(["--stage", "stage2", *FAR_COMMON, "--init-adapters-from", init,
                               "--simulation-steps", "2", "4", *extra]), **QUIET)


def saved_tensors(d, trainer):
    """Every tensor of checkpoint ``d``: the trainer's sharded state names them, loaded into fresh NaN
    tensors (megatron-core loads in place: the trainer's own tensors must not be the targets, and a tensor
    the load did not fill stays NaN, which no comparison below accepts)."""
    from megatron.core.dist_checkpointing import ShardedTensor

    keys = ckpt.tensor_keys(d)
    state = trainer._sharded_state()
    assert set(state) == keys, sorted(set(state) ^ keys)[:5]
    req = {k: ShardedTensor.from_rank_offsets(k, torch.full_like(v.data, float("nan")), replica_id=0)
           for k, v in state.items()}
    return ckpt.load_checkpoint(d, req)


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:8]


@pytest.fixture(scope="module")
def far_s1(tmp_path_factory):
    """FAR stage 1, 4 iterations straight, saved: (trainer, checkpoint root)."""
    root = str(tmp_path_factory.mktemp("far_s1") / "ckpt")
    tr = Trainer(parse_args([*S1, "--train-iters", "4", "--save", root]), **QUIET)
    tr.train()
    return tr, root




def test_far_stage1_resume_is_bit_exact(far_s1, tmp_path):
    straight, root = far_s1
    plans = [straight.stage.iteration_plan(i) for i in range(4)]
    # the 4 iterations exercise n = 3, n > 3 (compressed context) and the bidirectional branch, with an
    # n > 3 iteration after the resume point
    assert any(n > 3 for n, _ in plans[2:]) and any(n == 3 for n, _ in plans) and any(bi for _, bi in plans)
    part = str(tmp_path / "c")
    Trainer(parse_args([*S1, "--train-iters", "4", "--exit-after-iters", "2", "--save", part]), **QUIET).train()
    assert ckpt.read_tracker(part) == "iter_0000002"
    resumed = Trainer(parse_args([*S1, "--train-iters", "4", "--load", part, "--save", part]), **QUIET)
    assert resumed.iteration == 2 and resumed.consumed_samples == 8
    resumed.train()
    d_straight, d_resumed = (ckpt.resolve_checkpoint_dir(r) for r in (root, part))
    assert d_resumed.endswith("iter_0000004")
    a, b = saved_tensors(d_straight, straight), saved_tensors(d_resumed, straight)
    assert {"far_patch_embedding.weight", "ema.generator.far_patch_embedding.weight",
            "optimizer.generator.far_patch_embedding.bias.exp_avg_sq"} <= a.keys()
    assert_bitwise(a, b)


def test_far_stage2_resume_is_bit_exact(far_s1, tmp_path):
    _, s1_root = far_s1
    straight = far_s2(s1_root, "--train-iters", "3", "--save", str(tmp_path / "straight"))
    # n > 3 in the resumed iteration (the co-trained stage-1 loss trains far_patch_embedding there); no
    # bidirectional branch in stage 2 by default
    plans = [straight.stage.iteration_plan(i) for i in range(3)]
    assert plans[2][0] > 3 and not any(bi for _, bi in plans), plans
    straight.train()
    part = str(tmp_path / "part")
    far_s2(s1_root, "--train-iters", "3", "--exit-after-iters", "2", "--save", part).train()
    resumed = far_s2(s1_root, "--train-iters", "3", "--load", part, "--save", part)
    assert resumed.iteration == 2
    resumed.train()
    a = saved_tensors(ckpt.resolve_checkpoint_dir(str(tmp_path / "straight")), straight)
    b = saved_tensors(ckpt.resolve_checkpoint_dir(part), straight)
    assert {"far_patch_embedding.weight", "ema.generator.far_patch_embedding.weight",
            "optimizer.generator.far_patch_embedding.weight.exp_avg"} <= a.keys()
    assert not any(k.startswith("ema.fake_score.far_patch") for k in a)  # the critic never owns it
    assert_bitwise(a, b)


def test_far_stage2_starts_from_the_stage1_ema(far_s1):
    tr, s1_root = far_s1
    s2 = far_s2(s1_root, "--train-iters", "1")
    ema = tr.groups["generator"].ema.shadow
    assert torch.equal(s2.model.far_patch_embedding.weight, ema["far_patch_embedding.weight"])
    assert not torch.equal(s2.model.far_patch_embedding.weight, tr.model.far_patch_embedding.weight)


def test_far_checkpoint_content_and_loading(far_s1):
    from megatron_anyflow.models.wan.far import trilinear_far_patch_init
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    tr, root = far_s1
    d = ckpt.resolve_checkpoint_dir(root)
    saved = saved_tensors(d, tr)
    for p in ("weight", "bias"):
        live, ema = saved[f"far_patch_embedding.{p}"], saved[f"ema.generator.far_patch_embedding.{p}"]
        assert torch.equal(live, getattr(tr.model.far_patch_embedding, p))
        assert torch.equal(ema, tr.groups["generator"].ema.shadow[f"far_patch_embedding.{p}"])
        assert not torch.equal(live, ema)  # EMA decay 0.9 from iteration 0: it lags the live weights
        assert saved[f"optimizer.generator.far_patch_embedding.{p}.exp_avg"].abs().max() > 0
        assert saved[f"optimizer.generator.far_patch_embedding.{p}.exp_avg_sq"].abs().max() > 0
    init_w = trilinear_far_patch_init(tr.model.patch_embedding.weight.detach().float(),
                                      tr.model.config.compressed_patch_size)
    assert not torch.equal(saved["far_patch_embedding.weight"], init_w)  # it trained

    for use_ema in (True, False):
        m = load_for_inference(root, adapter="generator", ema=use_ema)
        assert m.config.far and tuple(m.config.chunk_partition) == CHUNKS
        key = "ema.generator.far_patch_embedding." if use_ema else "far_patch_embedding."
        assert torch.equal(m.far_patch_embedding.weight, saved[key + "weight"]), use_ema
        assert torch.equal(m.far_patch_embedding.bias, saved[key + "bias"]), use_ema
        assert not torch.equal(m.far_patch_embedding.weight, init_w)


def test_far_generation_from_checkpoint(far_s1):
    from megatron_anyflow.anyflow.generation import GenerationError, load_model, sample_any_step

    _, root = far_s1
    lm = load_model(root, ema=True)
    assert lm.adapter == "generator" and lm.model.config.far
    g = torch.Generator().manual_seed(11)
    F = sum(CHUNKS)
    noise, text = torch.randn(2, F, 16, 4, 8, generator=g), torch.randn(2, 8, 384, generator=g)
    out = sample_any_step(lm.model, noise, text, [1, 2], shift=lm.shift, progress=False)
    for N in (1, 2):
        assert out[N].shape == (2, F, 16, 4, 8) and torch.isfinite(out[N]).all(), N
    assert not torch.equal(out[1], out[2])
    with pytest.raises(GenerationError) as err:
        sample_any_step(lm.model, noise[:, :F - 1], text, [1], progress=False)
    msg = str(err.value)
    assert "[1, 2, 1, 1, 1]" in msg and f"covers {F}" in msg and f"has {F - 1}" in msg, msg


# =====================================================================================================
# 6. Argument errors
# =====================================================================================================
BASE_ARGS = ["--mock-data", "--train-iters", "1"]


@pytest.mark.parametrize("argv,needles", [
    (["--stage", "teacher", "--model", "far"], ["--model far", "teacher"]),
    (["--stage", "stage1", "--chunk-partition", "1", "2"], ["--chunk-partition", "--model far"]),
    (["--stage", "stage1", "--model", "far", "--i2v-prob", "0.5"], ["--i2v-prob", "--model far"]),
    (["--stage", "stage1", "--model", "far", "--chunk-partition", "1", "0", "2"], ["--chunk-partition [1, 0, 2]"]),
    (["--stage", "stage1", "--model", "far", "--long-context-prob", "1.5"], ["--long-context-prob", "1.5"]),
    (["--stage", "stage1", "--model", "far", "--far-bidirectional-prob", "-0.1"], ["--far-bidirectional-prob", "-0.1"]),
])
def test_far_argument_errors_are_named(capsys, argv, needles):
    with pytest.raises(SystemExit):
        parse_args([*BASE_ARGS, *argv])
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("argv,value", [
    (["--stage", "stage1", "--chunk-partition", "1", "2"], "[1, 2]"),
    (["--stage", "stage1", "--model", "far", "--i2v-prob", "0.5"], "0.5"),
])
def test_far_argument_errors_name_the_value(capsys, argv, value):
    with pytest.raises(SystemExit):
        parse_args([*BASE_ARGS, *argv])
    assert value in capsys.readouterr().err


@pytest.mark.parametrize("stage,needle", [
    ("stage1", r"--chunk-partition \[1, 2, 1, 1, 1, 2\] needs 8 latent frames per clip; the dataset has 6"),
    ("stage2", r"--chunk-partition \[1, 2, 1, 1, 1, 2\] covers 8 latent frames; the dataset's clips have 6"),
])
def test_far_chunk_partition_longer_than_the_clips(stage, needle):
    argv = ["--stage", stage, "--model", "far", "--chunk-partition", "1", "2", "1", "1", "1", "2", "--mock-data",
            "--mock-num-samples", "4", "--mock-latent-shape", "6", "16", "4", "8", "--micro-batch-size", "2",
            "--train-iters", "1", "--lora-rank", "4", "--lora-alpha", "4"]
    with pytest.raises(ValueError, match=needle):
        Trainer(parse_args(argv), **QUIET)
