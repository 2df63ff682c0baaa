"""Model configuration for the Wan2.1 / Wan2.2 / AnyFlow DiT.

`WanConfig` extends megatron-core's `TransformerConfig` (so TP / SP / CP sizes, dtypes, FP8 and
recomputation settings live where a Megatron user expects them) with the Wan-specific fields.
Presets follow diffusers' `WanTransformer3DModel` configs (docs/design/anyflow.md 2). Wan2.2 is the same
DiT (diffusers runs both with one class): TI2V-5B differs in its sizes, its 48 latent channels and its
per-token timesteps (`WanModel` takes t, r per token), A14B in being two experts split at a boundary time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (Wan's FFN activation, diffusers ``gelu-approximate``)."""
    return F.gelu(x, approximate="tanh")


ATTENTION_IMPLS = ("auto", "cudnn", "fa3", "flash", "sdpa", "math")


@dataclass
class WanConfig(TransformerConfig):
    """Configuration of the Wan2.1 / Wan2.2 DiT with AnyFlow's second time input.

    Fields beyond `TransformerConfig`:
        in_channels / out_channels: latent channels (16 for the Wan2.1 VAE, 48 for the Wan2.2 VAE of
            TI2V-5B; 36 in / 16 out for Wan2.2 I2V-A14B, whose input is the noisy latent concatenated with
            the image latent and its 4-channel mask).
        patch_size: (t, h, w) patch of the patch embedding, (1, 2, 2) for Wan2.1.
        text_dim: width of the text-encoder states (4096 for umT5-XXL).
        freq_dim: width of the sinusoidal timestep projection (256).
        rope_theta: base of the 3D rotary embedding (1e4); head dims split 44:42:42 (t:h:w) for 128.
        cross_attn_norm: affine LayerNorm before cross-attention (True for Wan2.1).
        delta_embedder: build AnyFlow's second time embedder (``condition_embedder.delta_embedder``).
        delta_gate: g in ``emb = (1 - g) emb_t(t) + g emb_r(r)`` (AnyFlow ref: 0.25).
        deltatime_type: ``"r"`` (the embedder sees r, AnyFlow default) or ``"t-r"``.
        backend: ``"local"`` (megatron-core tensor-parallel linears + PyTorch attention, runs on CPU)
            or ``"te"`` (Transformer Engine modules; FP8-capable, GPU only).
        attention_impl: core attention for the local backend (`layer.resolve_attention_impl`):
            ``"auto"`` (cuDNN fused attention on Hopper, else FlashAttention-3, flash-attn, SDPA),
            ``"cudnn"`` (SDPA with cuDNN first), ``"fa3"`` (``flash_attn_interface``), ``"flash"``
            (the flash-attn package), ``"sdpa"`` (PyTorch's own priority) or ``"math"``.
        recompute_policy: with ``recompute_granularity="selective"``: ``"modules"`` (checkpoint the
            modules named in ``recompute_modules``, megatron's behaviour) or ``"save-attention"`` (one
            selective checkpoint per block that keeps self-attention's q, k, v, output and
            log-sum-exp and recomputes everything else, `layer.save_attention_policy`).
        lora_merged_nograd: how LoRA runs under ``torch.no_grad()`` (`models.lora`): ``"per-call"``,
            ``"cache"`` or ``"off"`` (default: numerics bit-identical to the grad-enabled path).
        lora_rank / lora_alpha: LoRA adapter size (AnyFlow: 256 / 256).
        far: build the causal AnyFlow-FAR model (docs/design/far.md 1): adds ``far_patch_embedding`` (a
            Conv3d with kernel = stride = ``compressed_patch_size``) and enables the chunked forwards
            (teacher forcing, KV-cache prefill, cached generation step; `models.wan.far`). The
            bidirectional forward of the same weights stays available.
        compressed_patch_size: (t, h, w) patch of the compressed context frames, (1, 4, 4).
        full_chunk_limit: chunks kept at full resolution in a FAR forward (3: the current chunk and the
            two before it; older context is compressed).
        chunk_partition: latent frames per chunk of a whole video, (1, 3, 3, 3, 3, 3, 3, 2) for 21 latent
            frames (chunk 0 is the I2V image).
        boundary_ratio: None for a single model. Set (in (0, 1)) for one expert of Wan2.2's two-expert A14B
            models: diffusers' ``WanPipeline`` runs ``transformer`` (high noise) at timesteps
            ``>= boundary_ratio * 1000`` and ``transformer_2`` (low noise) below (0.875 T2V, 0.9 I2V in the
            released configs). The config describes one expert.
        expert: which expert of a two-expert model this is: ``"high"`` (diffusers' ``transformer``, times
            ``[b, 1]``) or ``"low"`` (``transformer_2``, times ``[0, b]``); None when unknown (a preset) or for
            a single model. `convert_from_hf` records it from the sub-folder; stage 1 trains an expert on its
            own time range (`expert_time_range`) and `convert_to_hf --expert-2` exports the pair.
        far_attention: the FAR attention kernel (`models.wan.far.FarAttention`): ``"grouped"`` (exact
            grouped dense attention on the backend's core attention; default), ``"flex"`` (flex attention
            with a block mask, as diffusers / the reference) or ``"dense"`` (masked SDPA, reference path).

    Raises:
        ValueError: for a hidden size not divisible by the heads, a head dim that is odd or too
            small for the 3D RoPE split, or an unknown backend.
    """

    in_channels: int = 16
    out_channels: int = 16
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    rope_theta: float = 10000.0
    rope_max_seq_len: int = 1024
    cross_attn_norm: bool = True
    delta_embedder: bool = True
    delta_gate: float = 0.25
    deltatime_type: str = "r"
    backend: str = "local"
    attention_impl: str = "sdpa"
    recompute_policy: str = "modules"
    lora_merged_nograd: str = "off"
    lora_rank: int = 256
    lora_alpha: float = 256.0
    far: bool = False
    compressed_patch_size: Tuple[int, int, int] = (1, 4, 4)
    full_chunk_limit: int = 3
    chunk_partition: Tuple[int, ...] = (1, 3, 3, 3, 3, 3, 3, 2)
    far_attention: str = "grouped"
    boundary_ratio: Optional[float] = None
    expert: Optional[str] = None

    def __post_init__(self):
        if self.kv_channels is None and self.num_attention_heads:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        super().__post_init__()
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 2 != 0 or head_dim < 6:
            raise ValueError(f"head dim {head_dim} must be even and >= 6 for the 3D RoPE split")
        if self.backend not in ("local", "te"):
            raise ValueError(f"backend={self.backend!r}; expected 'local' or 'te'")
        if self.deltatime_type not in ("r", "t-r"):
            raise ValueError(f"deltatime_type={self.deltatime_type!r}; expected 'r' or 't-r'")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        if self.recompute_policy not in ("modules", "save-attention"):
            raise ValueError(f"recompute_policy={self.recompute_policy!r}; expected 'modules' or 'save-attention'")
        if self.lora_merged_nograd not in ("per-call", "cache", "off"):
            raise ValueError(f"lora_merged_nograd={self.lora_merged_nograd!r}; expected 'per-call', 'cache' or 'off'")
        if self.fp8 and self.backend != "te":
            raise ValueError(f"fp8={self.fp8!r} needs backend='te' (Transformer Engine); the local backend has no "
                             "FP8 GEMMs")
        if self.boundary_ratio is not None and not 0.0 < float(self.boundary_ratio) < 1.0:
            raise ValueError(f"boundary_ratio={self.boundary_ratio!r}; expected None (one model) or a number in (0, 1) "
                             "(Wan2.2 A14B: 0.875 T2V, 0.9 I2V)")
        if self.expert not in (None, "high", "low"):
            raise ValueError(f"expert={self.expert!r}; expected None, 'high' or 'low'")
        if self.expert is not None and self.boundary_ratio is None:
            raise ValueError(f"expert={self.expert!r} needs a boundary_ratio (it names one expert of a two-expert "
                             "model)")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        self.compressed_patch_size = tuple(int(p) for p in self.compressed_patch_size)
        self.chunk_partition = tuple(int(c) for c in self.chunk_partition)
        if self.far:
            cps, ps = self.compressed_patch_size, self.patch_size
            if ps[0] != 1 or cps[0] != 1 or any(c % p for c, p in zip(cps[1:], ps[1:])):
                raise ValueError(f"far=True needs temporal patches of 1 and a compressed_patch_size "
                                 f"{cps} that is a multiple of patch_size {ps} in h and w")
            if self.full_chunk_limit < 2:
                raise ValueError(f"full_chunk_limit={self.full_chunk_limit}; expected >= 2 (the cache keeps "
                                 "full_chunk_limit - 1 chunks at full resolution)")
            if self.far_attention not in ("grouped", "flex", "dense"):
                raise ValueError(f"far_attention={self.far_attention!r}; expected 'grouped', 'flex' or 'dense'")
            if not self.chunk_partition or any(c < 1 for c in self.chunk_partition):
                raise ValueError(f"chunk_partition={self.chunk_partition}; expected positive frame counts")

    # Fields that define the architecture (what a checkpoint records); parallel / precision settings
    # are the run's business and are not stored.
    ARCH_FIELDS = ("hidden_size", "num_attention_heads", "num_layers", "ffn_hidden_size", "in_channels",
                   "out_channels", "patch_size", "text_dim", "freq_dim", "rope_theta", "rope_max_seq_len",
                   "cross_attn_norm", "delta_embedder", "delta_gate", "deltatime_type", "layernorm_epsilon",
                   "far", "compressed_patch_size", "full_chunk_limit", "chunk_partition", "boundary_ratio",
                   "expert")

    def arch_dict(self) -> dict:
        """The architecture fields as a JSON-serialisable dict (stored in checkpoints). The FAR fields
        are written only for FAR models and ``boundary_ratio`` / ``expert`` only for a two-expert model's
        expert, so other checkpoints keep their format."""
        d = {k: getattr(self, k) for k in self.ARCH_FIELDS}
        for k in ("patch_size", "compressed_patch_size", "chunk_partition"):
            d[k] = list(d[k])
        if not self.far:
            for k in ("far", "compressed_patch_size", "full_chunk_limit", "chunk_partition"):
                d.pop(k)
        for k in ("boundary_ratio", "expert"):
            if d[k] is None:
                d.pop(k)
        return d

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_split(self) -> Tuple[int, int, int]:
        """Head-dim split of the 3D RoPE (t, h, w): 44:42:42 for 128 (diffusers' rule)."""
        hw = 2 * (self.head_dim // 6)
        return self.head_dim - 2 * hw, hw, hw


# name -> architecture fields; the released sizes follow diffusers' transformer configs
# (Wan-AI/Wan2.1-T2V-*-Diffusers, Wan-AI/Wan2.2-*-Diffusers; the Wan2.2 boundaries from their model_index.json).
PRESETS = {
    "tiny": dict(hidden_size=64, num_attention_heads=4, num_layers=2, ffn_hidden_size=160, text_dim=384,
                 freq_dim=32, lora_rank=8, lora_alpha=8.0),
    # The CPU demo (examples/pretrain_anyflow_tiny.sh): pixel codec latents (4x4 space-to-depth of RGB,
    # 48 channels) and the 384-d MiniLM text encoder.
    "tiny-video": dict(hidden_size=128, num_attention_heads=4, num_layers=4, ffn_hidden_size=512, text_dim=384,
                       in_channels=48, out_channels=48, lora_rank=32, lora_alpha=32.0),
    "wan2.1-1.3b": dict(hidden_size=1536, num_attention_heads=12, num_layers=30, ffn_hidden_size=8960),
    "wan2.1-14b": dict(hidden_size=5120, num_attention_heads=40, num_layers=40, ffn_hidden_size=13824),
    # Wan2.2 TI2V-5B: 48-channel latents of the Wan2.2 VAE (16x16 spatial, 4x temporal), per-token timesteps.
    "wan2.2-ti2v-5b": dict(hidden_size=3072, num_attention_heads=24, num_layers=30, ffn_hidden_size=14336,
                           in_channels=48, out_channels=48),
    # Wan2.2 A14B: each expert is the Wan2.1-14B DiT; the boundary splits the timesteps between them.
    "wan2.2-t2v-a14b": dict(hidden_size=5120, num_attention_heads=40, num_layers=40, ffn_hidden_size=13824,
                            boundary_ratio=0.875),
    "wan2.2-i2v-a14b": dict(hidden_size=5120, num_attention_heads=40, num_layers=40, ffn_hidden_size=13824,
                            in_channels=36, out_channels=16, boundary_ratio=0.9),
    # Tiny members of the Wan2.2 families (tests): TI2V's 48 channels; I2V-A14B's 36 in / 16 out and boundary.
    # TI2V's width 256 > its 192-value patch (48 channels x 2 x 2), as 5B's 3072 is: at width 64 the DiT could not
    # carry a patch through (a rank-64 bottleneck; the Gaussian flow-map test stalled at the data-mean error).
    "tiny-wan2.2-ti2v": dict(hidden_size=256, num_attention_heads=4, num_layers=2, ffn_hidden_size=640, text_dim=384,
                             freq_dim=32, in_channels=48, out_channels=48, lora_rank=8, lora_alpha=8.0),
    "tiny-wan2.2-i2v-a14b": dict(hidden_size=64, num_attention_heads=4, num_layers=2, ffn_hidden_size=160,
                                 text_dim=384, freq_dim=32, in_channels=36, out_channels=16, boundary_ratio=0.9,
                                 lora_rank=8, lora_alpha=8.0),
    # T2V-A14B's family at the tiny size: each expert the "tiny" DiT, boundary 0.875.
    "tiny-wan2.2-t2v-a14b": dict(hidden_size=64, num_attention_heads=4, num_layers=2, ffn_hidden_size=160,
                                 text_dim=384, freq_dim=32, boundary_ratio=0.875, lora_rank=8, lora_alpha=8.0),
}


def expert_time_range(arch: dict, stage: str, expert: Optional[str], where: str,
                      model: str = "bidirectional") -> Optional[Tuple[float, float]]:
    """The time range a run trains, for one expert of a two-expert model (Wan2.2 A14B); None for one model.

    A two-expert model is distilled expert by expert, each on its own time range (docs/design/anyflow.md,
    "Wan2.2 A14B"): the high-noise expert (diffusers' ``transformer``) on ``[b, 1]``, the low-noise one
    (``transformer_2``) on ``[0, b]``, with ``b = boundary_ratio``. Each range's flow maps are the expert's own
    (its frozen base is the teacher there), and the two-expert sampler's grid puts ``b`` on the grid so that
    no jump crosses it (`anyflow.timesteps.two_expert_time_grid`): training and sampling route alike.

    Args:
        arch: a `WanConfig.arch_dict` (or a checkpoint's ``wan_config``); ``boundary_ratio`` / ``expert``.
        stage: the trainer's ``--stage`` (``teacher``, ``stage1``, ``stage2``).
        expert: the trainer's ``--expert`` (``"high"``, ``"low"`` or None: then the checkpoint's recorded one).
        where: what the architecture came from, for messages (``--model-preset X``, a path).
        model: the trainer's ``--model`` (``bidirectional`` or ``far``).
    Returns:
        ``(lo, hi)`` on the [0, 1] time scale, or None for a single model and for stage 2 of a two-expert model
        (which trains both experts over the whole range, each call routed to its expert).
    Raises:
        ValueError (a user error: the CLI prints it as one line, exit 2): ``--expert`` on a single model; a
        two-expert model outside bidirectional stages 1 and 2 (the teacher-LoRA stage and FAR experts are not
        supported); ``--expert`` in stage 2 (it trains both); in stage 1 no expert named anywhere, or
        ``--expert`` contradicting the checkpoint's recorded expert.
    """
    ratio = arch.get("boundary_ratio")
    if ratio is None:
        if expert is not None:
            raise ValueError(f"--expert {expert} names one expert of a two-expert model, but {where} is a single "
                             "model (no boundary_ratio)")
        return None
    head = (f"{where} is one expert of a two-expert Wan2.2 A14B model (boundary_ratio={ratio}: the high-noise "
            f"expert serves t >= {ratio * 1000:g}, the low-noise one below)")
    if stage == "stage2" and model == "bidirectional":
        if expert is not None:
            raise ValueError(f"--expert {expert}: stage 2 of a two-expert model trains both experts together (its "
                             "backward simulation runs through both ranges); drop --expert and give the other "
                             "expert with --pretrained-2 / --init-adapters-from-2")
        return None  # both experts, the whole range (the trainer builds the pair)
    if stage != "stage1" or model != "bidirectional":
        raise ValueError(f"{head}; two-expert models train bidirectional stage 1 (one expert per run on its time "
                         f"range: --stage stage1 --expert high|low) and stage 2 (both experts); --stage {stage} "
                         f"--model {model} is not supported for two experts yet (docs/design/anyflow.md, Wan2.2 A14B)")
    recorded = arch.get("expert")
    if expert is None and recorded is None:
        raise ValueError(f"{head}; name the expert this run trains: --expert high (t in [{ratio:g}, 1]) or "
                         f"--expert low (t in [0, {ratio:g}])")
    if expert is not None and recorded is not None and expert != recorded:
        raise ValueError(f"--expert {expert} contradicts {where}, which is the {recorded}-noise expert")
    which = expert or recorded
    b = float(ratio)
    return (b, 1.0) if which == "high" else (0.0, b)


def wan_config(preset: Optional[str] = "tiny", **overrides) -> WanConfig:
    """Build a `WanConfig` from a preset name (``tiny``, ``tiny-video``, ``wan2.1-1.3b``, ``wan2.1-14b``,
    ``wan2.2-ti2v-5b``, ``wan2.2-t2v-a14b``, ``wan2.2-i2v-a14b``, ``tiny-wan2.2-ti2v``, ``tiny-wan2.2-i2v-a14b``,
    ``tiny-wan2.2-t2v-a14b``)
    or None.

    With ``preset=None`` every architecture field must come from ``overrides`` (e.g. a checkpoint's
    `WanConfig.arch_dict`).

    ``overrides`` are any `WanConfig` / `TransformerConfig` fields (e.g. ``tensor_model_parallel_size=2,
    sequence_parallel=True, bf16=True``). Wan's fixed choices (eps 1e-6, biases, GELU-tanh, no dropout)
    are filled in unless overridden.

    Raises:
        ValueError: unknown preset name, an unknown field in ``overrides``, or a tensor-parallel size that
            does not divide ``ffn_hidden_size``, ``hidden_size`` or ``num_attention_heads`` (named).
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    known = {f.name for f in dataclasses.fields(WanConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown WanConfig field(s) {unknown}")
    kwargs = dict(
        layernorm_epsilon=1e-6,
        add_bias_linear=True,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        activation_func=gelu_tanh,
        gated_linear_unit=False,
        use_cpu_initialization=True,
        normalization="LayerNorm",
    )
    kwargs.update(PRESETS[preset] if preset is not None else {})
    kwargs.update(overrides)
    tp = int(kwargs.get("tensor_model_parallel_size", 1) or 1)
    for name in ("ffn_hidden_size", "hidden_size", "num_attention_heads"):
        if tp > 1 and name in kwargs and kwargs[name] % tp:
            raise ValueError(f"{name} {kwargs[name]} is not divisible by the tensor-parallel size {tp} "
                             f"(--tensor-model-parallel-size): each TP rank holds {name} / TP of every layer")
    if kwargs.get("bf16") and "params_dtype" not in overrides:
        kwargs["params_dtype"] = torch.bfloat16
    return WanConfig(**kwargs)
