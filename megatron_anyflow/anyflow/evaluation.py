"""Test-time scaling evaluation: quality against the number of sampling steps (the paper's Fig. 1).

From the same noise and prompts, the student's N-step flow-map Euler samples and the teacher's N-step
Euler ODE samples (CFG with the negative prompt) are compared with the teacher's many-step ODE
samples (the reference the teacher would produce given unlimited compute). Metrics per N: MSE in latent
space and, when a codec is given, MSE and PSNR of the decoded videos (pixel range [-1, 1], so
``PSNR = 10 log10(2^2 / MSE)``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler, TeacherEulerSampler


@dataclass
class ScalingResult:
    """Per method ("student", "teacher") and step count N: latent MSE, pixel MSE and PSNR (dB)."""

    steps: List[int]
    reference_steps: int
    metrics: Dict[str, Dict[int, Dict[str, float]]] = field(default_factory=dict)
    guidance: float = 3.0

    def teacher_label(self) -> str:
        return "no CFG" if self.guidance == 1.0 else f"CFG {self.guidance:g}"

    def to_json(self) -> dict:
        return {"steps": self.steps, "reference_steps": self.reference_steps, "guidance": self.guidance,
                "metrics": {m: {str(n): v for n, v in d.items()} for m, d in self.metrics.items()}}

    def markdown(self) -> str:
        has_px = any("psnr" in v for d in self.metrics.values() for v in d.values())
        head = "| steps (NFE) | " + " | ".join(
            f"{m} latent MSE" + (f" | {m} PSNR (dB)" if has_px else "") for m in self.metrics) + " |"
        sep = "|" + "---|" * (1 + len(self.metrics) * (2 if has_px else 1))
        rows = [head, sep]
        for n in self.steps:
            cells = []
            for m in self.metrics:
                v = self.metrics[m].get(n, {})
                cells.append(f"{v.get('latent_mse', float('nan')):.5f}")
                if has_px:
                    cells.append(f"{v.get('psnr', float('nan')):.2f}")
            rows.append(f"| {n} | " + " | ".join(cells) + " |")
        return "\n".join(rows) + (f"\n\nReference: the teacher's {self.reference_steps}-step Euler ODE samples "
                                   f"({self.teacher_label()}), from the same noise and prompts.\n")


def psnr(mse: float, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for ``mse`` at the given data range (2 for [-1, 1])."""
    return float("inf") if mse <= 0 else 10.0 * math.log10(data_range ** 2 / mse)


@torch.no_grad()
def evaluate_test_time_scaling(student, teacher, noise: torch.Tensor, text: torch.Tensor, negative_text: torch.Tensor,
                      steps: Sequence[int], reference_steps: int = 50, guidance: float = 3.0, shift: float = 5.0,
                      decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, keep_samples: Sequence[int] = (),
                      progress: Optional[Callable[[str], None]] = None):
    """Run the comparison; returns (ScalingResult, samples dict name -> latents for the requested N).

    Args:
        student: flow-map model ``(z, t, r, text) -> u`` (guidance fused: no CFG at sampling).
        teacher: single-time model ``(z, t, t, text) -> v`` sampled with CFG ``guidance``.
        noise: [b, f, c, h, w]; text: [b, L, d]; negative_text: [1 or b, L, d].
        steps: the N to evaluate; reference_steps: the teacher's reference N (50).
        decode: latents [b, f, c, h, w] -> video [b, 3, f, H, W] in [-1, 1] (optional, for PSNR).
        keep_samples: N values whose samples are returned (for the video grid).
    """
    log = progress or (lambda s: None)
    neg = negative_text.expand(noise.shape[0], -1, -1) if negative_text.shape[0] == 1 else negative_text
    log(f"teacher reference: {reference_steps} steps")
    ref = TeacherEulerSampler(reference_steps, shift=shift, guidance_scale=guidance)(teacher, noise, text, neg)
    ref_px = decode(ref).float() if decode is not None else None
    result = ScalingResult(list(steps), reference_steps, {"student": {}, "teacher": {}}, guidance=guidance)
    samples = {f"teacher-{reference_steps}": ref}
    for n in steps:
        for name in ("student", "teacher"):
            log(f"{name}: {n} steps")
            if name == "student":
                out = FlowMapEulerSampler(n, shift=shift)(student, noise, text)
            else:
                out = TeacherEulerSampler(n, shift=shift, guidance_scale=guidance)(teacher, noise, text, neg)
            m = {"latent_mse": float((out.float() - ref.float()).pow(2).mean())}
            if decode is not None:
                mse = float((decode(out).float() - ref_px).pow(2).mean())
                m.update(pixel_mse=mse, psnr=psnr(mse))
            result.metrics[name][n] = m
            if n in keep_samples:
                samples[f"{name}-{n}"] = out
    return result, samples


def write_report(result: ScalingResult, out_dir: str, title: str = "AnyFlow test-time scaling") -> Dict[str, str]:
    """Write ``scaling.json``, ``scaling.md`` and ``scaling.png`` (quality vs steps) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "scaling.json"), "markdown": os.path.join(out_dir, "scaling.md"),
             "plot": os.path.join(out_dir, "scaling.png")}
    with open(paths["json"], "w") as f:
        json.dump(result.to_json(), f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(f"# {title}\n\n" + result.markdown())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    use_psnr = any("psnr" in v for d in result.metrics.values() for v in d.values())
    key, label = ("psnr", "PSNR vs teacher reference (dB, higher is better)") if use_psnr else \
        ("latent_mse", "latent MSE vs teacher reference (lower is better)")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, style in (("student", "o-"), ("teacher", "s--")):
        xs = [n for n in result.steps if n in result.metrics[name]]
        ax.plot(xs, [result.metrics[name][n][key] for n in xs], style,
                label=("AnyFlow student (flow-map Euler)" if name == "student"
                       else f"teacher (Euler ODE, {result.teacher_label()})"))
    ax.set_xscale("log", base=2)
    ax.set_xticks(result.steps)
    ax.set_xticklabels([str(n) for n in result.steps])
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylabel(label)
    if key == "latent_mse":
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["plot"])
    plt.close(fig)
    return paths


def write_video_grid(videos: Dict[str, torch.Tensor], path: str, fps: int = 8, scale: int = 2) -> str:
    """An MP4 grid: one row per entry of ``videos`` (name -> [b, 3, f, H, W] in [-1, 1]), one column per
    sample, upscaled by ``scale`` (nearest), H.264 via PyAV. Returns ``path``."""
    import av
    import numpy as np

    rows = []
    for v in videos.values():
        v = ((v.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # b, 3, f, H, W
        rows.append(torch.cat(list(v), dim=-1))  # 3, f, H, b*W
    grid = torch.cat(rows, dim=-2)  # 3, f, rows*H, b*W
    grid = grid.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
    c, f, H, W = grid.shape
    H2, W2 = H + H % 2, W + W % 2
    frames = torch.zeros(f, H2, W2, 3, dtype=torch.uint8)
    frames[:, :H, :W] = grid.permute(1, 2, 3, 0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W2, H2, "yuv420p"
        for fr in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
