"""Where does stage 1's many-step floor come from? Two probes of the synthetic training set (issue #17).

    python benchmarks/results/stage1_sweep/many_step_floor_probe.py TEACHER SYNTHETIC EVAL_DATA CKPT [CKPT ...]

Probe 1, memorisation of the training samples.

Why it could be: stage 1's target on boundary samples is the conditional velocity ``v = eps - x`` of the
training latents ``x`` (objective.py), so its minimiser is the velocity field of the *training set*, not the
teacher's. The mini set-up's synthetic set holds 256 teacher samples of 4 prompts (64 each, from noise seed
0); the evaluation asks for the same prompts from other noise (seed 7). The text-conditional field of a
finite set carries every noise to (near) one of the set's samples of its prompt, while the teacher carries
fresh noise to fresh samples. A student that fits the set's field better than it generalises lands near
training samples, the more so the more closely it integrates that field, i.e. the more steps it takes.

Prints, per N and model (the teacher's N-step Euler sampler, then each student's N-step flow-map sampler,
EMA weights), the latent PSNR (peak 2, of the mean MSE over the 16 samples) of its samples against
    ref    the teacher's 50-step samples from the same noise (the sweep's metric), and
    nn     each sample's nearest training sample of its prompt (latent MSE),
and "closer": how many samples are nearer a training sample than their reference. The first line gives the
50-step reference's own nn PSNR: how close fresh teacher samples come to the training set.

Probe 2, the boundary velocity's generalisation gap. At many steps a flow-map sampler integrates the
student's instantaneous velocity u(z, t, t) (the boundary samples' target: the flow-matching loss with
``v = eps - x``). Printed per model and t band: that loss (unweighted mean over the same fixed (t, eps)
draws) on the training samples and on as many fresh teacher samples of the same prompts (50-step, noise
seed 11: never trained on), and the instantaneous velocity's distance to the teacher's own,
||u(z, t, t) - v_teacher(z, t)||^2 / ||v_teacher||^2 on the fresh samples. A gap that opens (train falls,
fresh rises) means the velocity fits the finite training set rather than the teacher's field.
"""
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
from evaluate_anyflow import evaluation_inputs  # noqa: E402

from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler, TeacherEulerSampler  # noqa: E402
from megatron_anyflow.data.latent_dataset import LatentDataset  # noqa: E402
from megatron_anyflow.parallel.state import initialize_parallel  # noqa: E402
from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat  # noqa: E402
from megatron_anyflow.checkpoint.model_io import load_for_inference  # noqa: E402

STEPS = (1, 2, 4, 8, 16, 32)


def psnr(a, b):
    """Per-sample latent PSNR (peak-to-peak 2) [n] and the PSNR of the mean MSE (the sweep's figure)."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse), 10 * math.log10(4.0 / float(mse.mean()))


def main():
    teacher_dir, synth_dir, eval_dir, *ckpts = sys.argv[1:]
    enable_megatron_cpu_compat()
    initialize_parallel(1)
    torch.set_num_threads(1)
    ev = LatentDataset(eval_dir)
    _, text, neg, noise, _ = evaluation_inputs(ev, 16, 7, torch.device("cpu"))
    syn = LatentDataset(synth_dir)
    syn_text = torch.stack([syn[i][1] for i in range(len(syn))])
    pools = []  # per eval prompt: its training samples [m, f, c, h, w]
    for p in text:
        hit = (syn_text == p).flatten(1).all(1).nonzero().flatten()
        if len(hit) == 0:
            raise SystemExit(f"an evaluation prompt has no training sample in {synth_dir}")
        pools.append(torch.stack([syn[int(i)][0] for i in hit]).float())
    teacher = load_for_inference(teacher_dir)
    negs = neg.expand(noise.shape[0], -1, -1)
    with torch.no_grad():
        ref = TeacherEulerSampler(50, shift=5.0, guidance_scale=1.0)(teacher, noise, text, negs)
    def nearest(out):  # each sample's nearest training sample of its prompt
        return torch.stack([pool[(pool - o).pow(2).flatten(1).mean(1).argmin()] for o, pool in zip(out, pools)])

    _, ref_nn = psnr(ref, nearest(ref))
    print(f"50-step reference: nn {ref_nn:.2f} dB ({len(ref)} prompts, {sum(map(len, pools))} training samples "
          f"among them)")
    print(f"{'model':<28} {'N':>3} {'ref':>7} {'nn':>7} {'closer':>7}")
    models = [("teacher (Euler)", None)] + [(os.path.relpath(c, os.path.dirname(os.path.dirname(c))), c)
                                            for c in ckpts]
    for name, ckpt in models:
        student = None if ckpt is None else load_for_inference(ckpt, adapter="generator", ema=True)
        for n in STEPS:
            with torch.no_grad():
                out = (TeacherEulerSampler(n, shift=5.0, guidance_scale=1.0)(teacher, noise, text, negs)
                       if student is None else FlowMapEulerSampler(n, shift=5.0)(student, noise, text))
            per_ref, p_ref = psnr(out, ref)
            per_train, p_train = psnr(out, nearest(out))
            closer = int((per_train > per_ref).sum())
            print(f"{name:<28} {n:>3} {p_ref:7.2f} {p_train:7.2f} {closer:>4}/{len(ref)}", flush=True)

    # Probe 2: the boundary (r = t) flow-matching loss on training vs fresh samples, per t band.
    m = 64  # samples per set (evenly spread over the training set: all prompts)
    idx = [i * (len(syn) // m) for i in range(m)]
    x_train = torch.stack([syn[i][0] for i in idx]).float()
    txt = syn_text[idx].float()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        x_fresh = TeacherEulerSampler(50, shift=5.0, guidance_scale=1.0)(
            teacher, torch.randn(x_train.shape, generator=g), txt, neg.expand(m, -1, -1))
    bands = ((0.0, 0.3), (0.3, 0.7), (0.7, 1.0))
    draws = []  # fixed (t, eps) per band: 4 draws per sample, t uniform in the band
    for lo, hi in bands:
        draws.append([(lo + (hi - lo) * torch.rand(m, generator=g), torch.randn(x_train.shape, generator=g))
                      for _ in range(4)])
    print()
    print("boundary flow-matching loss (train / fresh) and ||u - v_teacher||^2 / ||v_teacher||^2 (fresh), by t band")
    print(f"{'model':<28} " + " ".join(f"{f't {lo:.1f}-{hi:.1f}':>26}" for lo, hi in bands))
    for name, ckpt in models:
        net = teacher if ckpt is None else load_for_inference(ckpt, adapter="generator", ema=True)
        cols = []
        for band in draws:
            fm = {"train": 0.0, "fresh": 0.0}
            rel = 0.0
            for t, eps in band:
                T = (1000.0 * t)[:, None].expand(m, x_train.shape[1]).contiguous()
                for key, x in (("train", x_train), ("fresh", x_fresh)):
                    z = (1 - t.view(-1, 1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1, 1) * eps
                    with torch.no_grad():
                        u = net(z, T, T, txt)
                    fm[key] += float((u - (eps - x)).pow(2).mean()) / len(band)
                    if key == "fresh":
                        with torch.no_grad():
                            vt = teacher(z, T, T, txt)
                        rel += float((u - vt).pow(2).sum() / vt.pow(2).sum()) / len(band)
            cols.append(f"{fm['train']:.4f} / {fm['fresh']:.4f} / {rel:.2e}")
        print(f"{name:<28} " + " ".join(f"{c:>26}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
