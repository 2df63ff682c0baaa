#!/usr/bin/env python
"""Test-time scaling of an AnyFlow student against its teacher (the paper's Fig. 1 at any scale).

    python tools/evaluate_anyflow.py --teacher ckpt/teacher --student ckpt/stage2 --data-path data/tiny \
        --output results/ --steps 1 2 4 8 16 32 --num-samples 8

From the same noise and prompts (taken from the dataset), the student's N-step flow-map Euler samples
and the teacher's N-step Euler ODE samples (CFG with the dataset's negative prompt) are compared with the
teacher's ``--reference-steps``-step ODE samples. Writes ``scaling.json``, ``scaling.md`` (table),
``scaling.png`` (quality vs steps), ``samples.mp4`` and ``samples.png`` (labelled: rows = teacher
reference, student at each ``--video-steps`` N, teacher at the same N; columns = the prompts; the clip
looped to last ``--video-seconds``). With ``--diffusers-export DIR`` it also loads an export made by
``tools/convert_to_hf.py`` in diffusers and checks one sampling step (``AnyFlowTransformer3DModel`` +
``FlowMapEulerDiscreteScheduler``) against this project's sampler.

Two experts (Wan2.2 A14B: ``--teacher HIGH --teacher-2 LOW --student STAGE2``): the teacher and the student
route each call by its time range; the four 14B experts wait in host memory and only the one being called is on
the GPU (`anyflow.two_expert.one_resident`; ``--bf16`` halves them: 29 GB each). Wan2.2 I2V-A14B: every sample is
drawn given its clip's image condition (a dataset prepared with ``--i2v-condition``).
"""

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher checkpoint (full model, or adapter 'teacher' in it)")
    p.add_argument("--teacher-adapter", default=None, help="merge this adapter of --teacher (LoRA teacher)")
    p.add_argument("--teacher-2", default=None,
                   help="two-expert models (Wan2.2 A14B): the other expert's base; --teacher and --teacher-2 are the "
                        "teacher (each Euler step on the expert of its timestep), and --student a two-expert stage-2 "
                        "checkpoint (sampled on the grid with the boundary on it)")
    p.add_argument("--student", required=True, help="stage-1 or stage-2 checkpoint with the 'generator' adapter")
    p.add_argument("--ema", action="store_true", help="use the student's EMA weights")
    p.add_argument("--data-path", required=True, help="dataset whose prompts (text embeddings) and negative are used")
    p.add_argument("--output", required=True)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--reference-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0, help="teacher CFG scale (v_u + g (v_c - v_u))")
    p.add_argument("--shift", type=float, default=5.0)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--video-steps", type=int, nargs="+", default=[1, 4], help="N shown in the MP4 grid")
    p.add_argument("--video-seconds", type=float, default=6.0, help="loop the sample clips to last this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 weights and forwards for the teacher and the student (the Euler states stay float32): "
                        "half the memory; a two-expert evaluation keeps one of its four experts on the GPU at a time")
    p.add_argument("--diffusers-export", default=None, help="diffusers export of the student to check one step")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from megatron_anyflow.anyflow.evaluation import (dataset_captions, evaluate_test_time_scaling, write_report,
                                                     write_sample_pictures)
    from megatron_anyflow.data.latent_dataset import LatentDataset
    from megatron_anyflow.parallel.state import initialize_parallel
    from megatron_anyflow.parallel.cpu_compat import enable_megatron_cpu_compat
    from megatron_anyflow.checkpoint.model_io import load_for_inference

    enable_megatron_cpu_compat()
    initialize_parallel(1)
    t0 = time.time()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    log = lambda s: print(f"[{time.time() - t0:6.1f}s] {s}", flush=True)  # noqa: E731
    from megatron_anyflow.checkpoint import store as ckpt

    pair_student = bool(ckpt.read_meta(ckpt.resolve_checkpoint_dir(args.student)).get("experts"))
    if pair_student != bool(args.teacher_2):
        raise ValueError(f"--student {args.student} is a two-expert stage-2 run: give the teacher's other expert with "
                         "--teacher-2" if pair_student else
                         f"--teacher-2 names a two-expert teacher, but --student {args.student} holds one model")
    dtype = dict(bf16=True) if args.bf16 else {}
    if args.teacher_2 and args.diffusers_export:
        raise ValueError(f"--diffusers-export {args.diffusers_export}: the one-step check is of one transformer; a "
                         "two-expert export is checked by tools/convert_to_hf.py --verify")
    if args.teacher_2:  # a two-expert model (Wan2.2 A14B): both teacher bases and both student experts
        from megatron_anyflow.anyflow.sampler import route_experts
        from megatron_anyflow.anyflow.two_expert import load_expert_pair, load_stage2_pair, one_resident

        t_pair = load_expert_pair(args.teacher, args.teacher_2,
                                  lambda p: load_for_inference(p, adapter=args.teacher_adapter, **dtype))
        s_pair = load_stage2_pair(args.student, adapter="generator", ema=args.ema, **dtype)
        configs = (t_pair.config, s_pair.config)
        # four 14B experts do not fit one GPU: only the one being called is on it (on the CPU nothing moves); the
        # calls route as TwoExpertWanModel does (`route_experts`: the same rule, per call)
        fns = one_resident({"teacher-high": t_pair.high, "teacher-low": t_pair.low, "student-high": s_pair.high,
                            "student-low": s_pair.low}, device)
        teacher = route_experts(fns["teacher-high"], fns["teacher-low"], t_pair.boundary)
        student = route_experts(fns["student-high"], fns["student-low"], s_pair.boundary)
    else:
        teacher = load_for_inference(args.teacher, adapter=args.teacher_adapter, **dtype).to(device)
        student = load_for_inference(args.student, adapter="generator", ema=args.ema, **dtype).to(device)
        configs = (teacher.config, student.config)
    ds = LatentDataset(args.data_path)
    idx, text, neg, noise, decode = evaluation_inputs(ds, args.num_samples, args.seed, device)
    # Wan2.2 I2V-A14B: every sample is drawn given its clip's image condition (the dataset's, --i2v-condition)
    from megatron_anyflow.data.channel_condition import condition_channels

    cc, cc_teacher = condition_channels(configs[1]), condition_channels(configs[0])
    if cc != cc_teacher or (cc and ds.condition_channels != cc):
        raise ValueError(f"--student {args.student} reads {cc or 'no'} image-condition channels, --teacher "
                         f"{args.teacher} {cc_teacher or 'none'}, --data-path "
                         f"{args.data_path} holds {ds.condition_channels or 'no'} condition channels; all three must "
                         "agree (an I2V-A14B dataset: prepare_dataset.py --i2v-condition)")
    if cc and args.diffusers_export:
        raise ValueError(f"--diffusers-export {args.diffusers_export}: the one-step check gives no image; an I2V-A14B "
                         "export is checked by tools/convert_to_hf.py --verify")
    y = torch.stack([ds[i][2] for i in idx]).to(device, torch.float32) if cc else None
    result, samples = evaluate_test_time_scaling(
        student, teacher, noise, text, neg, args.steps, args.reference_steps, args.guidance, args.shift,
        decode=decode, keep_samples=args.video_steps, progress=log, channel_condition=y)
    paths = write_report(result, args.output)
    print(result.markdown(), flush=True)
    if decode is not None:
        fps = int(round(ds.index.get("video", {}).get("fps", 8)))
        paths.update(write_sample_pictures(samples, decode, args.output, dataset_captions(ds.index, idx),
                                           args.reference_steps, args.video_steps, args.guidance, fps=fps,
                                           min_seconds=args.video_seconds))
    if args.diffusers_export:
        err = check_diffusers_one_step(args.diffusers_export, student, noise[:2], text[:2], args.shift)
        paths["diffusers_one_step_rel_error"] = err
        print(f"diffusers export: one flow-map step matches this project's sampler, relative error {err:.2e}")
        if err > 1e-4:
            print("error: the diffusers export does not reproduce the student", file=sys.stderr)
            return 1
    with open(os.path.join(args.output, "outputs.json"), "w") as f:
        json.dump(paths, f, indent=1)
    log(f"wrote {', '.join(str(v) for v in paths.values())}")
    return 0


def evaluation_inputs(ds, num_samples: int, seed: int, device):
    """(dataset indices, prompts [n, L, d], negative [1, L, d], noise [n, f, c, h, w], decode or None) of an
    evaluation: ``n = min(num_samples, len(ds))`` prompts spread evenly over the dataset, noise from
    ``seed``; shared by evaluate_anyflow.py and evaluate_far.py so both compare the same samples."""
    import torch

    n = min(num_samples, len(ds))
    stride = max(1, len(ds) // n)
    idx = [i * stride for i in range(n)]
    text = torch.stack([ds[i][1] for i in idx]).to(device)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *ds.latent_shape), generator=g).to(device)
    return idx, text, ds.negative_text.to(device), noise, _decoder(ds.index.get("codec", {}))


def _decoder(codec_cfg):
    """latents -> video in [-1, 1] for the dataset's codec (the pixel codec only; VAE decoding is costly)."""
    if codec_cfg.get("name") != "pixel":
        return None
    from megatron_anyflow.data.codecs import codec_from_config

    codec = codec_from_config(codec_cfg)
    return lambda z: codec.decode(z.float().cpu()).clamp(-1, 1)


def check_diffusers_one_step(path, student, noise, text, shift):
    """One sampling step of the diffusers export (transformer + FlowMapEulerDiscreteScheduler) against
    this project's `FlowMapEulerSampler(1)`; returns the relative error."""
    import torch
    from diffusers import AnyFlowTransformer3DModel, FlowMapEulerDiscreteScheduler

    from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler

    hf = AnyFlowTransformer3DModel.from_pretrained(path).to(noise.device).eval()
    sched = FlowMapEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(1, device=noise.device)
    with torch.no_grad():
        ours = FlowMapEulerSampler(1, shift=shift)(student, noise, text)
        t = sched.timesteps[0]
        b, f = noise.shape[:2]
        T = torch.full((b, f), float(t), device=noise.device)
        R = torch.full((b, f), float(sched.sigmas[1]) * 1000.0, device=noise.device)
        u = hf(noise, T, R, text, return_dict=False)[0]
        theirs = sched.step(u, t, noise, return_dict=False)[0]
    return float((theirs.float() - ours.float()).norm() / ours.float().norm())


if __name__ == "__main__":
    from megatron_anyflow.cli import main_guard

    main_guard(main)  # a user error: one line, exit 2 (megatron_anyflow/cli.py)
