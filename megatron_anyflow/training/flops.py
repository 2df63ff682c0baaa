"""Model FLOPs of the Wan DiT and of each AnyFlow training step (ANYFLOW.md section 7).

One forward of one sample, S video tokens, C text tokens, hidden h, FFN width F, L layers
(a multiply-add counts 2 FLOPs):

    self-attention   2 S h (3h)  [q, k, v]  + 4 S^2 h  [scores and values]  + 2 S h h  [out]
    cross-attention  2 S h h     [q]        + 4 C h h  [k, v of the text]   + 4 S C h [scores, values] + 2 S h h [out]
    MLP              4 S h F
    embeddings       2 S (c p) h [patch] + 2 C (d_text h + h h) [text] + 2 S h (c_out p) [head]
                     + per frame: 2 (256 h + h h) x (1 or 2 time embedders) + 2 h (6h) [time projection]

Backward of a forward with grad costs 2x its forward (data and weight gradients; the convention for
model FLOPs, also for a frozen base with LoRA, whose weight-gradient GEMMs are skipped: the hardware
then does less than the model-FLOP count says). So a forward with grad counts 3x, a no-grad forward 1x:

    teacher step     3 F_fwd                                   (1 forward with grad)
    stage-1 step     3 F_fwd + 3 F_fwd                         (cond with grad; null, plus, minus)
    stage-2 step     generator: segments with grad x 3 + real score 2 (cond, uncond) + fake 1 (+ stage-1 co-training 6)
                     critic: rollout segments x 1 + fake score with grad 3
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_anyflow.models.wan.config import WanConfig


def forward_flops(cfg: WanConfig, frames: int, height: int, width: int, text_len: int = 512,
                  per_frame_time: bool = False) -> float:
    """FLOPs of one forward of one sample at latent size (frames, height, width) (see module docstring)."""
    pt, ph, pw = cfg.patch_size
    S = (frames // pt) * (height // ph) * (width // pw)
    C, h, F, L = text_len, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    p = pt * ph * pw
    self_attn = 2 * S * h * 3 * h + 4 * S * S * h + 2 * S * h * h
    cross_attn = 2 * S * h * h + 4 * C * h * h + 4 * S * C * h + 2 * S * h * h
    mlp = 4 * S * h * F
    n_time = (frames // pt) if per_frame_time else 1
    embedders = 2 if cfg.delta_embedder else 1
    emb = (2 * S * cfg.in_channels * p * h + 2 * C * (cfg.text_dim * h + h * h) + 2 * S * h * cfg.out_channels * p
           + n_time * (embedders * 2 * (cfg.freq_dim * h + h * h) + 2 * h * 6 * h))
    return float(L * (self_attn + cross_attn + mlp) + emb)


def tokens(cfg: WanConfig, frames: int, height: int, width: int) -> int:
    pt, ph, pw = cfg.patch_size
    return (frames // pt) * (height // ph) * (width // pw)


@dataclass
class StepFlops:
    """Forward-equivalents per sample of one training step, and their FLOPs."""

    forward_equivalents: float
    flops_per_sample: float


def step_flops(cfg: WanConfig, stage: str, frames: int, height: int, width: int, text_len: int = 512,
               rollout_grad_segments: float = 3.0, rollout_segments: float = 3.0, cotrain: bool = True) -> StepFlops:
    """Model FLOPs per sample of a ``teacher``, ``stage1``, ``stage2_generator`` or ``stage2_critic`` step.

    ``rollout_grad_segments`` / ``rollout_segments``: generator calls of the backward simulation with
    gradient (generator step) and without (critic step); at most 3, fewer when k = 0 or k = N - 1
    (expected value over k ~ U{0..N-1}: 3 - 2/N).
    """
    f = forward_flops(cfg, frames, height, width, text_len)
    eq = {
        "teacher": 3.0,
        "stage1": 6.0,
        "stage2_generator": 3.0 * rollout_grad_segments + 3.0 + (6.0 if cotrain else 0.0),
        "stage2_critic": rollout_segments + 3.0,
    }
    if stage not in eq:
        raise ValueError(f"stage {stage!r}; expected one of {sorted(eq)}")
    return StepFlops(eq[stage], eq[stage] * f)


def expected_segments(num_steps_choices) -> float:
    """Expected generator calls of one flow-map backward simulation, N uniform over the choices and
    k ~ U{0..N-1}: 3 - 2/N (N >= 2), 1 for N = 1."""
    vals = [1.0 if n == 1 else 3.0 - 2.0 / n for n in num_steps_choices]
    return sum(vals) / len(vals)


def mfu(tflops_per_gpu: float, peak_tflops: float) -> float:
    """Model FLOP utilisation: achieved model TFLOP/s per GPU over the measured bf16 matmul rate."""
    return tflops_per_gpu / peak_tflops if peak_tflops > 0 and math.isfinite(peak_tflops) else float("nan")
