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
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
                      progress: Optional[Callable[[str], None]] = None,
                      channel_condition: Optional[torch.Tensor] = None):
    """Run the comparison; returns (ScalingResult, samples dict name -> latents for the requested N).

    Args:
        student: flow-map model ``(z, t, r, text) -> u`` (guidance fused: no CFG at sampling). A two-expert
            student (`anyflow.two_expert.TwoExpertWanModel`, its ``boundary``) samples on the boundary grid
            (`timesteps.two_expert_time_grid`), as its exported pipeline does.
        teacher: single-time model ``(z, t, t, text) -> v`` sampled with CFG ``guidance``; a two-expert teacher
            (a `TwoExpertWanModel` of the bases) routes each Euler step by its timestep, as diffusers' ``WanPipeline``.
        noise: [b, f, c, h, w]; text: [b, L, d]; negative_text: [1 or b, L, d].
        steps: the N to evaluate; reference_steps: the teacher's reference N (50).
        decode: latents [b, f, c, h, w] -> video [b, 3, f, H, W] in [-1, 1] (optional, for PSNR).
        keep_samples: N values whose samples are returned (for the video grid).
        channel_condition: ``y`` ``[b, f, c_y, h, w]`` for models that read the image through input channels
            (Wan2.2 I2V-A14B, `data.channel_condition`): every sample of the student and the teacher, reference
            included, is drawn given its own.
    """
    log = progress or (lambda s: None)
    neg = negative_text.expand(noise.shape[0], -1, -1) if negative_text.shape[0] == 1 else negative_text
    log(f"teacher reference: {reference_steps} steps")
    y = channel_condition
    ref = TeacherEulerSampler(reference_steps, shift=shift, guidance_scale=guidance)(teacher, noise, text, neg,
                                                                                      channel_condition=y)
    ref_px = decode(ref).float() if decode is not None else None
    result = ScalingResult(list(steps), reference_steps, {"student": {}, "teacher": {}}, guidance=guidance)
    samples = {f"teacher-{reference_steps}": ref}
    for n in steps:
        for name in ("student", "teacher"):
            log(f"{name}: {n} steps")
            if name == "student":
                out = FlowMapEulerSampler(n, shift=shift, boundary=getattr(student, "boundary", None))(
                    student, noise, text, channel_condition=y)
            else:
                out = TeacherEulerSampler(n, shift=shift, guidance_scale=guidance)(teacher, noise, text, neg,
                                                                                   channel_condition=y)
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
    students = [m for m in result.metrics if m != "teacher"]
    for i, name in enumerate(students + ["teacher"]):
        if name not in result.metrics:
            continue
        xs = [n for n in result.steps if n in result.metrics[name]]
        style = "s--" if name == "teacher" else ["o-", "^-", "D-", "v-"][i % 4]
        label = (f"teacher (Euler ODE, {result.teacher_label()})" if name == "teacher"
                 else "AnyFlow student (flow-map Euler)" if name == "student" else name)
        ax.plot(xs, [result.metrics[name][n][key] for n in xs], style, label=label)
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


@torch.no_grad()
def evaluate_causal(students: Dict[str, object], teacher, noise: torch.Tensor, text: torch.Tensor,
                    negative_text: torch.Tensor, steps: Sequence[int], chunk_partition: Sequence[int],
                    reference_steps: int = 50, guidance: float = 3.0, shift: float = 5.0,
                    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, keep_samples: Sequence[int] = (),
                    progress: Optional[Callable[[str], None]] = None):
    """Test-time scaling and per-chunk error of AnyFlow-FAR students against the teacher's reference.

    Each student (a FAR `WanModel`) generates chunk by chunk with its KV cache
    (`anyflow.causal.sample_chunked`, T2V) at every N of ``steps``; the teacher (bidirectional) samples the
    whole video with its Euler ODE at N and at ``reference_steps`` (the reference). Errors are against the
    reference from the same noise and prompts.

    Per-chunk error (exposure bias, docs/design/far.md 2.3): for every student and N, the error restricted to the
    frames of each chunk of ``chunk_partition``: latent MSE, and pixel MSE / PSNR when ``decode`` keeps one
    decoded frame per latent frame (the pixel codec). A student trained only with teacher forcing
    (stage 1) sees its own, imperfect history at test time; its error grows with the chunk index.

    Args:
        students: name -> FAR model (``stage 1``, ``stage 2``, ...).
        teacher, noise [b, F, c, h, w], text, negative_text, steps, reference_steps, guidance, shift, decode,
            keep_samples, progress: as `evaluate_test_time_scaling`.
        chunk_partition: the students' chunks (sum = F).

    Returns:
        (ScalingResult with one method per student plus "teacher", per_chunk
        ``{name: {N: [{"latent_mse", "pixel_mse", "psnr"} per chunk]}}``, samples name-N -> latents).

    Raises:
        ValueError: ``chunk_partition`` does not sum to the frames of ``noise``.
    """
    from megatron_anyflow.anyflow.causal import sample_chunked
    from megatron_anyflow.models.wan.far import FarModelRunner

    cp = [int(c) for c in chunk_partition]
    if sum(cp) != noise.shape[1]:
        raise ValueError(f"chunk_partition {cp} covers {sum(cp)} latent frames; the noise has {noise.shape[1]}")
    log = progress or (lambda s: None)
    neg = negative_text.expand(noise.shape[0], -1, -1) if negative_text.shape[0] == 1 else negative_text
    log(f"teacher reference: {reference_steps} steps")
    ref = TeacherEulerSampler(reference_steps, shift=shift, guidance_scale=guidance)(teacher, noise, text, neg)
    ref_px = decode(ref).float() if decode is not None else None
    per_frame_px = ref_px is not None and ref_px.shape[2] == noise.shape[1]
    bounds = [(sum(cp[:i]), sum(cp[:i + 1])) for i in range(len(cp))]
    result = ScalingResult(list(steps), reference_steps, {**{n: {} for n in students}, "teacher": {}},
                           guidance=guidance)
    per_chunk: Dict[str, Dict[int, List[Dict[str, float]]]] = {n: {} for n in students}
    samples = {f"teacher-{reference_steps}": ref}
    for n in steps:
        outs = {}
        for name, model in students.items():
            log(f"{name}: {n} steps per chunk")
            outs[name] = sample_chunked(FarModelRunner(model), noise, text, cp, n, shift=shift)
        log(f"teacher: {n} steps")
        outs["teacher"] = TeacherEulerSampler(n, shift=shift, guidance_scale=guidance)(teacher, noise, text, neg)
        for name, out in outs.items():
            m = {"latent_mse": float((out.float() - ref.float()).pow(2).mean())}
            px = decode(out).float() if decode is not None else None
            if px is not None:
                mse = float((px - ref_px).pow(2).mean())
                m.update(pixel_mse=mse, psnr=psnr(mse))
            result.metrics[name][n] = m
            if name in per_chunk:
                rows = []
                for a, e in bounds:
                    c = {"latent_mse": float((out[:, a:e].float() - ref[:, a:e].float()).pow(2).mean())}
                    if per_frame_px:
                        mse = float((px[:, :, a:e] - ref_px[:, :, a:e]).pow(2).mean())
                        c.update(pixel_mse=mse, psnr=psnr(mse))
                    rows.append(c)
                per_chunk[name][n] = rows
            if n in keep_samples:
                samples[f"{name}-{n}"] = out
    return result, per_chunk, samples


def write_per_chunk_report(per_chunk: Dict[str, Dict[int, List[Dict[str, float]]]], chunk_partition: Sequence[int],
                           out_dir: str, title: str = "AnyFlow-FAR error by chunk (exposure bias)") -> Dict[str, str]:
    """Write ``per_chunk.json``, ``per_chunk.md`` (one row per chunk, one column per student and N) and
    ``per_chunk.png`` (error vs chunk index, one line per student and N) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"per_chunk_json": os.path.join(out_dir, "per_chunk.json"),
             "per_chunk_markdown": os.path.join(out_dir, "per_chunk.md"),
             "per_chunk_plot": os.path.join(out_dir, "per_chunk.png")}
    with open(paths["per_chunk_json"], "w") as f:
        json.dump({"chunk_partition": list(chunk_partition),
                   "per_chunk": {m: {str(n): v for n, v in d.items()} for m, d in per_chunk.items()}}, f, indent=1)
    use_psnr = all("psnr" in c for d in per_chunk.values() for rows in d.values() for c in rows)
    key, unit = ("psnr", "PSNR (dB)") if use_psnr else ("latent_mse", "latent MSE")
    cols = [(m, n) for m, d in per_chunk.items() for n in d]
    lines = [f"# {title}\n", f"{unit} against the teacher's reference, frames of each chunk only "
                             f"(chunk_partition {list(chunk_partition)}).\n",
             "| chunk (frames) | " + " | ".join(f"{m}, N={n}" for m, n in cols) + " |",
             "|" + "---|" * (1 + len(cols))]
    start = 0
    for i, c in enumerate(chunk_partition):
        cells = [f"{per_chunk[m][n][i][key]:.2f}" if use_psnr else f"{per_chunk[m][n][i][key]:.5f}" for m, n in cols]
        lines.append(f"| {i} ({start}-{start + c - 1}) | " + " | ".join(cells) + " |")
        start += c
    with open(paths["per_chunk_markdown"], "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m, n in cols:
        ys = [c[key] for c in per_chunk[m][n]]
        ax.plot(range(len(ys)), ys, "o-", label=f"{m}, N={n}")
    ax.set_xlabel("chunk index (generation order)")
    ax.set_ylabel(f"{unit} vs teacher reference" + (" (higher is better)" if use_psnr else " (lower is better)"))
    ax.set_xticks(range(len(chunk_partition)))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths["per_chunk_plot"])
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


# ------------------------------------------------------------------------------------------ labelled pictures
def _to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[b, 3, f, H, W] float in [-1, 1] -> uint8 [b, f, H, W, 3]."""
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def _check_rows(rows: Dict[str, torch.Tensor]) -> Tuple[int, int, int, int]:
    if not rows:
        raise ValueError("no videos to draw (rows is empty)")
    shapes = {k: tuple(v.shape) for k, v in rows.items()}
    first = next(iter(shapes.values()))
    for k, s in shapes.items():
        if len(s) != 5 or s[1] != 3:
            raise ValueError(f"row {k!r}: expected video [b, 3, f, H, W], got {s}")
        if (s[0], s[3], s[4]) != (first[0], first[3], first[4]):
            raise ValueError(f"row {k!r} has shape {s}; every row needs the same b, H, W as {first}")
    return first[0], max(s[2] for s in shapes.values()), first[3], first[4]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable DejaVu with FreeType (Pillow >= 10.1)
    except TypeError:  # pragma: no cover - old Pillow
        return ImageFont.load_default()


def _wrap(text: str, width_px: int, char_px: float, max_lines: int = 3) -> str:
    import textwrap

    lines = textwrap.wrap(text, max(8, int(width_px / char_px))) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:-1] + "…"
    return "\n".join(lines)


def loop_schedule(num_frames: int, fps: int, min_seconds: float) -> Tuple[int, int]:
    """(hold, repeats) making a ``num_frames`` clip at ``fps`` last at least ``min_seconds``.

    Each frame is held ``hold = ceil(fps / num_frames)`` times (one pass lasts >= 1 s: a 5-frame clip at 8
    fps is shown at 5 distinct frames per second), and the pass is looped ``repeats`` times.
    """
    hold = max(1, math.ceil(fps / max(1, num_frames)))
    repeats = max(1, math.ceil(min_seconds * fps / (num_frames * hold)))
    return hold, repeats


def write_labelled_video(rows: Dict[str, torch.Tensor], path: str, column_labels: Optional[Sequence[str]] = None,
                         title: str = "", fps: int = 8, min_seconds: float = 4.0, scale: Optional[int] = None) -> str:
    """A labelled MP4 grid: one row per entry of ``rows`` (label -> video ``[b, 3, f, H, W]`` in [-1, 1]),
    one column per sample; row labels on the left, ``column_labels`` (e.g. prompts, wrapped) on top, and
    ``title`` plus a frame counter in a header. Clips shorter than the longest row hold their last frame.
    Short clips are slowed and looped to last at least ``min_seconds`` (:func:`loop_schedule`). Cells
    are upscaled ``scale`` x (nearest; default: the smallest factor making a cell >= 160 px wide). Text is
    drawn with PIL's default font. H.264 (yuv420p, even size) via PyAV. Returns ``path``.

    Raises:
        ValueError: empty ``rows``, rows of different b / H / W, ``column_labels`` of the wrong length.
    """
    import av
    import numpy as np
    from PIL import Image, ImageDraw

    b, f, H, W = _check_rows(rows)
    if column_labels is not None and len(column_labels) != b:
        raise ValueError(f"{len(column_labels)} column labels for {b} samples per row")
    vids = {k: _to_uint8(v) for k, v in rows.items()}
    scale = scale or max(1, math.ceil(160 / W))
    ch, cw = H * scale, W * scale
    font, line, pad = _font(12), 15, 6
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    row_text = [_wrap(k, 170, 7.0, 3) for k in rows]
    left = int(max(measure(ln, font=font) for t in row_text for ln in t.split("\n"))) + 2 * pad
    col_text = [_wrap(str(c), cw, 7.0, 3) for c in (column_labels or [])]
    col_h = line * max((t.count("\n") + 1 for t in col_text), default=0)
    head = line + pad + (col_h + pad if col_text else 0)
    row_h = [max(ch, line * (t.count("\n") + 1)) for t in row_text]
    full_title = f"{title}   frame {f}/{f}".strip()
    Wt = max(left + b * (cw + pad), int(measure(full_title, font=font)) + 2 * pad)
    Ht = head + sum(h + pad for h in row_h)
    Wt, Ht = Wt + Wt % 2, Ht + Ht % 2
    base = Image.new("RGB", (Wt, Ht), (255, 255, 255))
    draw = ImageDraw.Draw(base)
    for j, t in enumerate(col_text):
        draw.multiline_text((left + j * (cw + pad), line + pad), t, fill=(0, 0, 0), font=font, spacing=3)
    ys = [head + sum(h + pad for h in row_h[:i]) for i in range(len(rows))]
    for y, h, t in zip(ys, row_h, row_text):
        n_lines = t.count("\n") + 1
        draw.multiline_text((pad, y + (h - line * n_lines) // 2), t, fill=(0, 0, 0), font=font, spacing=3)
    hold, repeats = loop_schedule(f, fps, min_seconds)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = Wt, Ht, "yuv420p"
        for _ in range(repeats):
            for t in range(f):
                img = base.copy()
                ImageDraw.Draw(img).text((pad, 2), f"{title}   frame {t + 1}/{f}".strip(), fill=(0, 0, 0), font=font)
                for y, h, v in zip(ys, row_h, vids.values()):
                    fr = v[:, min(t, v.shape[1] - 1)]  # b, H, W, 3
                    for j in range(b):
                        cell = Image.fromarray(fr[j].numpy()).resize((cw, ch), Image.NEAREST)
                        img.paste(cell, (left + j * (cw + pad), y + (h - ch) // 2))
                frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
                for _h in range(hold):
                    for packet in stream.encode(frame):
                        container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_contact_sheet(rows: Dict[str, torch.Tensor], path: str, column_labels: Optional[Sequence[str]] = None,
                        title: str = "", frames_per_cell: int = 4) -> str:
    """A labelled PNG contact sheet (matplotlib): one row per entry of ``rows`` (label -> video
    ``[b, 3, f, H, W]`` in [-1, 1]), one column per sample; each cell shows ``frames_per_cell`` evenly
    spaced frames left to right (first and last included). Row labels on the left, ``column_labels``
    (wrapped) above the columns, ``title`` and which frames are shown in the figure title. Returns ``path``.

    Raises:
        ValueError: empty ``rows``, rows of different b / H / W, ``column_labels`` of the wrong length.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    b, f, H, W = _check_rows(rows)
    if column_labels is not None and len(column_labels) != b:
        raise ValueError(f"{len(column_labels)} column labels for {b} samples per row")
    k = max(1, min(frames_per_cell, f))
    idx = sorted({round(i * (f - 1) / max(1, k - 1)) for i in range(k)})
    sep = max(1, W // 32)
    nr = len(rows)
    cell_w_in = max(2.0, 0.9 * len(idx) * W / max(H, 1))
    fig, axes = plt.subplots(nr, b, figsize=(1.6 + b * cell_w_in, 1.2 + nr * 1.1), dpi=110, squeeze=False)
    for i, (label, v) in enumerate(rows.items()):
        u8 = _to_uint8(v).numpy()  # b, f, H, W, 3
        for j in range(b):
            parts = []
            for t in idx:
                parts.append(u8[j, min(t, u8.shape[1] - 1)])
                parts.append(np.full((H, sep, 3), 255, np.uint8))
            ax = axes[i][j]
            ax.imshow(np.concatenate(parts[:-1], axis=1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            if i == 0 and column_labels is not None:
                # ~0.6 em per character at 8 pt; the axes get ~80 % of the cell's width
                ax.set_title(_wrap(str(column_labels[j]), int(0.8 * cell_w_in * 72), 0.6 * 8, 3), fontsize=8)
    shown = ", ".join(str(t + 1) for t in idx)
    fig.suptitle(f"{title}\n(each cell: frames {shown} of {f}, left to right)".strip(), fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def dataset_captions(index: dict, indices: Sequence[int]) -> List[str]:
    """Captions of dataset samples ``indices`` from a ``LatentDataset`` index (``shards[k].samples[j].caption``,
    in sample order); ``"sample i"`` where the dataset records none (mock or synthesised data)."""
    flat: List[Optional[str]] = []
    for shard in index.get("shards", []):
        samples = shard.get("samples")
        flat.extend([s.get("caption") for s in samples] if samples else [None] * int(shard.get("num_samples", 0)))
    return [flat[i] if i < len(flat) and flat[i] else f"sample {i}" for i in indices]


def sample_row_labels(samples: Dict[str, torch.Tensor], reference_steps: int, video_steps: Sequence[int],
                      guidance: float) -> Dict[str, str]:
    """Row label per sample key of :func:`evaluate_test_time_scaling` (``teacher-50``, ``student-4`` ...),
    in display order: the reference, then student and teacher at each N."""
    cfg = "no CFG" if guidance == 1.0 else f"CFG {guidance:g}"
    order = [(f"teacher-{reference_steps}", f"teacher {reference_steps} steps (reference, {cfg})")]
    for n in video_steps:
        s = "step" if n == 1 else "steps"
        order += [(f"student-{n}", f"AnyFlow student {n} {s}"), (f"teacher-{n}", f"teacher {n} {s} ({cfg})")]
    return {k: label for k, label in order if k in samples}


def write_sample_pictures(samples: Dict[str, torch.Tensor], decode: Callable[[torch.Tensor], torch.Tensor],
                          out_dir: str, captions: Sequence[str], reference_steps: int, video_steps: Sequence[int],
                          guidance: float, fps: int = 8, min_seconds: float = 6.0) -> Dict[str, str]:
    """The evaluation's pictures: ``samples.mp4`` (labelled grid, rows = reference / student N / teacher N,
    columns = prompts, looped to last >= ``min_seconds``) and ``samples.png`` (the same as a contact sheet).
    ``samples``: name -> latents ``[b, f, c, h, w]``; ``decode``: latents -> video ``[b, 3, F, H, W]`` in [-1, 1]."""
    labels = sample_row_labels(samples, reference_steps, video_steps, guidance)
    rows = {label: decode(samples[k]) for k, label in labels.items()}
    title = "AnyFlow student vs teacher, same noise and prompts"
    return {"video": write_labelled_video(rows, os.path.join(out_dir, "samples.mp4"), captions, title=title, fps=fps,
                                          min_seconds=min_seconds),
            "contact_sheet": write_contact_sheet(rows, os.path.join(out_dir, "samples.png"), captions,
                                                 title=title + " (rows: method and sampling steps)")}
