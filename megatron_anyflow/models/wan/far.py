"""AnyFlow-FAR (causal, frame-autoregressive) token layout, attention pattern and KV cache.

One object, `FarLayout`, describes the token sequence of a FAR forward (docs/design/far.md 1.2-1.6):

    [compressed context chunks | full-resolution chunks | clean copies of the full chunks | padding]

Every consumer is derived from it, so the pieces cannot disagree:

- the patch embeddings of each segment (`far_patch_embedding` for compressed frames, `patch_embedding`
  otherwise) and the output slice (the noisy full-resolution frames);
- the modulation rows (one (t, r) row per latent frame; clean copies have their own rows);
- the RoPE angles at absolute frame positions, compressed tokens at fractional (row, col) positions
  ``2j + 0.5`` (`rope.rope_angles_at`, docs/design/far.md 1.4);
- the attention pattern, as exact *grouped* dense attention (`FarAttention`): each query group (a chunk of
  one kind) attends to at most three contiguous key ranges, so any dense kernel (SDPA / flash / TE) runs
  exactly the allowed pairs and no ``L x L`` mask exists; a group with several ranges attends each range
  on its own and merges the partial outputs exactly by their log-sum-exp (`range_attention`), so no key
  or value is copied; `FarLayout.dense_mask` is the reference for tests.

Three modes (diffusers `AnyFlowFARTransformer3DModel.forward`):

- ``"train"``: chunks ``cp`` (n = len(cp)); the last ``min(n, full_chunk_limit)`` chunks are full resolution
  (noisy), older ones compressed context; with clean copies the teacher-forcing mask of docs/design/far.md 1.5,
  without them plain block-causal attention over chunk ids.
- ``"prefill"``: the clean prefix ``cp[:j+1]`` at t = r = 0, the last ``full_chunk_limit - 1`` chunks full,
  block-causal; every layer writes its post-RoPE K and V (valid tokens) into a new `FarKVCache`.
- ``"step"``: the current chunk ``k`` only (full resolution, at its absolute frames), attending to the
  whole cache and itself (no mask).

Padding: a sequence that does not divide by CP x SP is padded with PAD tokens at the end; they are never
keys and their outputs are zero (docs/design/far.md 4.3).

Times are on the 0..1000 scale throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_anyflow.models.lora import _UNSET

CTX, NOISY, CLEAN, PAD = "ctx", "noisy", "clean", "pad"
MODES = ("train", "prefill", "step")


@dataclass(frozen=True)
class Segment:
    """A run of tokens of one chunk and kind.

    Attributes:
        kind: ``CTX`` / ``NOISY`` / ``CLEAN`` / ``PAD``.
        chunk: chunk index in the whole video's partition (-1 for padding).
        frame0: absolute latent frame of the first frame (RoPE position).
        frames: number of latent frames.
        tokens_per_frame: tokens of one frame (``(H/ph)(W/pw)`` full, ``(H/cph)(W/cpw)`` compressed).
        compressed: whether the frames are embedded by ``far_patch_embedding``.
        row0: modulation row of the first frame (rows index the per-frame (t, r) of the forward).
        start: offset of the first token in the sequence.
    """

    kind: str
    chunk: int
    frame0: int
    frames: int
    tokens_per_frame: int
    compressed: bool
    row0: int
    start: int

    @property
    def length(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def end(self) -> int:
        return self.start + self.length


def check_chunk_partition(chunk_partition: Sequence[int], what: str = "chunk_partition") -> Tuple[int, ...]:
    """``chunk_partition`` as a tuple of positive ints.

    Raises:
        ValueError: empty, or an entry that is not a positive integer (named).
    """
    cp = tuple(chunk_partition)
    if not cp or any(isinstance(c, bool) or int(c) != c or c < 1 for c in cp):
        raise ValueError(f"{what}={list(cp)}; expected a non-empty list of positive latent frame counts")
    return tuple(int(c) for c in cp)


@dataclass
class FarLayout:
    """The token layout of one FAR forward (see the module docstring).

    Build with `FarLayout.train`, `FarLayout.prefill` or `FarLayout.step`; ``pad_to`` pads the sequence
    to a multiple (CP x SP). Attributes: ``mode``, ``chunk_partition`` (the chunks of this forward),
    ``segments`` (in sequence order, padding last), ``full_grid`` / ``comp_grid`` (token rows, cols of a
    full / compressed frame), ``clean`` (teacher forcing with clean copies), ``num_rows`` (modulation rows).
    """

    mode: str
    chunk_partition: Tuple[int, ...]
    segments: List[Segment]
    full_grid: Tuple[int, int]
    comp_grid: Tuple[int, int]
    clean: bool
    num_rows: int
    _groups: Optional[list] = field(default=None, repr=False)

    # -------------------------------------------------------------------------------------------
    @staticmethod
    def _grids(height: int, width: int, patch_size, compressed_patch_size):
        ph, pw = patch_size[1:]
        ch, cw = compressed_patch_size[1:]
        if height % ch or width % cw:
            raise ValueError(f"latent height x width {height} x {width} must divide by the compressed patch "
                             f"{tuple(compressed_patch_size[1:])} for the FAR model")
        return (height // ph, width // pw), (height // ch, width // cw)

    @classmethod
    def _build(cls, mode, cp, height, width, patch_size, compressed_patch_size, num_full, clean, frame_offset,
               kinds_full, pad_to):
        full_grid, comp_grid = cls._grids(height, width, patch_size, compressed_patch_size)
        ftpf, ctpf = full_grid[0] * full_grid[1], comp_grid[0] * comp_grid[1]
        n = len(cp)
        nc = n - num_full
        segs: List[Segment] = []
        pos = 0
        frame = frame_offset
        for c in range(n):
            comp = c < nc
            kind = CTX if comp else kinds_full
            s = Segment(kind, c, frame, cp[c], ctpf if comp else ftpf, comp, frame - frame_offset, pos)
            segs.append(s)
            pos, frame = s.end, frame + cp[c]
        rows = frame - frame_offset
        if clean:
            row = rows
            for s in [s for s in segs if not s.compressed]:
                cs = Segment(CLEAN, s.chunk, s.frame0, s.frames, ftpf, False, row, pos)
                segs.append(cs)
                pos, row = cs.end, row + s.frames
            rows = row
        pad = (-pos) % max(1, int(pad_to))
        if pad:
            segs.append(Segment(PAD, -1, 0, 1, pad, False, 0, pos))
        return cls(mode, tuple(cp), segs, full_grid, comp_grid, clean, rows)

    @classmethod
    def train(cls, chunk_partition, height, width, patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
              full_chunk_limit=3, clean=False, pad_to=1) -> "FarLayout":
        """Training forward over ``chunk_partition`` (teacher forcing when ``clean``). Rows: one per latent
        frame of the input (0..F-1), then one per clean-copy frame."""
        cp = check_chunk_partition(chunk_partition)
        return cls._build("train", cp, height, width, patch_size, compressed_patch_size,
                          min(len(cp), full_chunk_limit), clean, 0, NOISY, pad_to)

    @classmethod
    def prefill(cls, chunk_partition, height, width, patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
                full_chunk_limit=3, pad_to=1) -> "FarLayout":
        """KV-cache prefill of the clean prefix ``chunk_partition`` = cp[:j+1] (all chunks context)."""
        cp = check_chunk_partition(chunk_partition)
        return cls._build("prefill", cp, height, width, patch_size, compressed_patch_size,
                          min(len(cp), full_chunk_limit - 1), False, 0, CTX, pad_to)

    @classmethod
    def step(cls, chunk_partition, height, width, patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
             full_chunk_limit=3, pad_to=1) -> "FarLayout":
        """Generation step of the last chunk of ``chunk_partition`` = cp[:k+1] against a cache of cp[:k]."""
        cp = check_chunk_partition(chunk_partition)
        lay = cls._build("step", cp[-1:], height, width, patch_size, compressed_patch_size, 1, False,
                         sum(cp[:-1]), NOISY, pad_to)
        lay.chunk_partition = cp
        # chunk ids are absolute: the current chunk is chunk k
        lay.segments = [Segment(s.kind, len(cp) - 1 if s.kind != PAD else -1, s.frame0, s.frames,
                                s.tokens_per_frame, s.compressed, s.row0, s.start) for s in lay.segments]
        return lay

    # -------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens of the sequence, padding included."""
        return self.segments[-1].end

    @property
    def valid_length(self) -> int:
        """Tokens without padding (padding is always last)."""
        return sum(s.length for s in self.segments if s.kind != PAD)

    @property
    def pad(self) -> int:
        return self.length - self.valid_length

    def of_kind(self, kind: str) -> List[Segment]:
        return [s for s in self.segments if s.kind == kind]

    @property
    def output_range(self) -> Tuple[int, int]:
        """Token range of the output frames (the noisy full-resolution chunks, contiguous)."""
        noisy = self.of_kind(NOISY)
        if not noisy:
            raise ValueError(f"a {self.mode!r} layout has no output frames (a prefill only writes the KV cache)")
        return noisy[0].start, noisy[-1].end

    @property
    def output_frames(self) -> int:
        return sum(s.frames for s in self.of_kind(NOISY))

    def frame_runs(self) -> List[Tuple[int, int]]:
        """(modulation row, token count) runs covering the whole sequence in order (padding: row 0)."""
        runs = []
        for s in self.segments:
            if s.kind == PAD:
                runs.append((0, s.length))
            else:
                runs.extend((s.row0 + i, s.tokens_per_frame) for i in range(s.frames))
        return runs

    def rope_positions(self) -> torch.Tensor:
        """float64 [L, 3] (frame, row, col) positions of every token; compressed tokens at the centre of
        the full-resolution patches they cover (``s j + (s - 1) / 2`` per axis, s the stride ratio:
        exactly the average-pooled, renormalised complex RoPE of diffusers / the reference, docs/design/far.md 1.4);
        padding at 0."""
        out = []
        fh, fw = self.full_grid
        ch, cw = self.comp_grid
        for s in self.segments:
            if s.kind == PAD:
                out.append(torch.zeros(s.length, 3, dtype=torch.float64))
                continue
            gh, gw = (ch, cw) if s.compressed else (fh, fw)
            sh, sw = fh // gh, fw // gw
            f = torch.arange(s.frame0, s.frame0 + s.frames, dtype=torch.float64)
            h = torch.arange(gh, dtype=torch.float64) * sh + (sh - 1) / 2
            w = torch.arange(gw, dtype=torch.float64) * sw + (sw - 1) / 2
            grid = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1)
            out.append(grid.reshape(-1, 3))
        return torch.cat(out)

    # -------------------------------------------------------------------------------------------
    def _allowed(self, q: Segment, k: Segment) -> bool:
        """The block rule of docs/design/far.md 1.5 (diffusers' ``mask_mod``) for a query and a key segment."""
        if q.kind == PAD or k.kind == PAD or k.chunk > q.chunk:
            return False
        if self.clean:
            if q.kind == CLEAN and k.kind == NOISY:
                return False
            if q.kind == NOISY and k.kind == NOISY and k.chunk != q.chunk:
                return False
            if q.kind == NOISY and k.kind == CLEAN and k.chunk == q.chunk:
                return False
        return True

    def attention_groups(self) -> List[Tuple[int, int, List[Tuple[int, int]]]]:
        """Exact decomposition of the mask: ``(q_start, q_end, [(k_start, k_end), ...])`` per query
        segment (adjacent allowed key segments merged into one range: at most 3 ranges). Padding
        queries have no group. In ``"step"`` mode the single group's keys are the current chunk; the
        cache is prepended by `FarAttention`."""
        if self._groups is None:
            groups = []
            for q in self.segments:
                if q.kind == PAD:
                    continue
                ranges: List[Tuple[int, int]] = []
                for k in self.segments:
                    if self._allowed(q, k):
                        if ranges and ranges[-1][1] == k.start:
                            ranges[-1] = (ranges[-1][0], k.end)
                        else:
                            ranges.append((k.start, k.end))
                groups.append((q.start, q.end, ranges))
            self._groups = groups
        return self._groups

    def dense_mask(self) -> torch.Tensor:
        """bool [L, L] (query, key) allowed pairs from the per-token rule (tests and the masked reference
        path; O(L^2) memory). Padding rows and columns are False."""
        L = self.length
        chunk = torch.full((L,), -1, dtype=torch.long)
        codes = {CTX: 0, NOISY: 1, CLEAN: 2, PAD: 3}
        kc = torch.full((L,), 3, dtype=torch.long)
        for s in self.segments:
            kc[s.start:s.end] = codes[s.kind]
            chunk[s.start:s.end] = s.chunk
        qk, kk = kc[:, None], kc[None, :]
        qc, kcn = chunk[:, None], chunk[None, :]
        m = (qk != 3) & (kk != 3) & (kcn <= qc)
        if self.clean:
            m &= ~((qk == 2) & (kk == 1))
            m &= ~((qk == 1) & (kk == 1) & (kcn != qc))
            m &= ~((qk == 1) & (kk == 2) & (kcn == qc))
        return m


@dataclass(frozen=True)
class FarKVCache:
    """KV cache of a FAR generation (docs/design/far.md 1.6): for every layer the post-RoPE K and the V of the clean
    prefix ``chunk_partition`` (= cp[:j+1]), encoded at t = r = 0 with the last ``full_chunk_limit - 1``
    chunks at full resolution and older ones compressed.

    ``layers[i] = (k, v)``, each ``[L_hist, b, n_local, d]`` in the attention's post-exchange layout
    (``n_local`` = heads / (TP x CP): the cache is sharded by heads over TP x CP and holds the whole
    history on every rank). Immutable: a prefill returns a new cache, so a graph built by earlier
    steps (stage-2 rollouts) keeps the tensors it read. ``height`` / ``width``: the latent size it was
    built for.
    """

    chunk_partition: Tuple[int, ...] = ()
    layers: Tuple[Tuple[torch.Tensor, torch.Tensor], ...] = ()
    height: int = 0
    width: int = 0

    @property
    def num_cached_chunks(self) -> int:
        return len(self.chunk_partition)

    @property
    def num_tokens(self) -> int:
        return self.layers[0][0].shape[0] if self.layers else 0

    def nbytes(self) -> int:
        """Bytes held by this rank's cache."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


class FarAttention:
    """The self-attention of one FAR forward: the layout's grouped attention, plus the cache read
    (``"step"``) or write (``"prefill"``).

    Called by `WanSelfAttention` after RoPE and the Ulysses exchange, on the whole (padded) sequence for
    the rank's heads: ``attend(core, q, k, v, layer)`` with q, k, v ``[L, b, n, d]`` returns ``[L, b, n*d]``
    (zeros for padding queries). ``core(q, k, v)`` is the block's dense core attention (no mask).

    Args:
        layout: the forward's `FarLayout`.
        cache: the `FarKVCache` read by a ``"step"`` forward.
        dense_mask: shorthand for ``impl="dense"``.
        impl: ``"grouped"`` (default: exact grouped dense attention, the block sparsity exploited by any
            dense kernel; a group with several key ranges runs one flash call per range and merges them
            by the log-sum-exp, so it saves for backward what one kernel over those keys would, without
            a K / V copy), ``"dense"`` (one masked SDPA over the whole sequence with `FarLayout.dense_mask`:
            the reference path for tests, O(L^2) memory, every pair computed) or ``"flex"``
            (`torch.nn.attention.flex_attention` with a `BlockMask` of the same rule, as diffusers and the
            reference; compiled on CUDA, eager elsewhere; skips empty 128 x 128 blocks, computes partial
            ones whole). The generation step has no mask and always runs one dense call.

    Raises:
        ValueError: a ``"step"`` layout without a cache; an unknown ``impl``.
    """

    IMPLS = ("grouped", "dense", "flex")

    def __init__(self, layout: FarLayout, cache: Optional[FarKVCache] = None, dense_mask: bool = False,
                 impl: Optional[str] = None):
        if layout.mode == "step" and cache is None:
            raise ValueError("a FAR generation step needs the KV cache of the previous chunks")
        impl = "dense" if dense_mask else (impl or "grouped")
        if impl not in self.IMPLS:
            raise ValueError(f"FAR attention impl={impl!r}; expected one of {self.IMPLS}")
        self.layout = layout
        self.cache = cache
        self.impl = impl
        self.written: dict = {}
        self._block_mask = None

    def attend(self, core, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
               core_ranges=None) -> torch.Tensor:
        """q, k, v [L, b, n, d] -> [L, b, n * d] (see the class docstring).

        ``core(q, k, v)`` runs the query groups with one key range; ``core_ranges(q, keys, values)``
        (lists of key / value views) the groups with several ranges and the cached step (cache +
        current chunk), merging the ranges exactly by their log-sum-exp without concatenating keys
        or values (`range_attention.multi_range_attention`; default when None: that op directly).
        """
        lay = self.layout
        L, b, n, d = q.shape
        if L != lay.length:
            raise RuntimeError(f"FAR attention got {L} tokens; the layout has {lay.length}")
        if core_ranges is None:
            core_ranges = _default_core_ranges
        nv = lay.valid_length
        # One contiguous copy of each of q, k, v at most (as the bidirectional layer makes for its kernel;
        # none when they already are): every key range below is a slice of it along the sequence, i.e. a
        # contiguous view, so nothing K- or V-sized is copied per group, and the KV cache a prefill writes
        # holds [L, b, n, d] storages (a view of the fused qkv output would keep all of it alive).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if lay.mode == "prefill":
            self.written[layer] = (k[:nv].detach(), v[:nv].detach())
        if lay.mode == "step":
            ck, cv = self.cache.layers[layer]
            out = core_ranges(q[:nv], [ck.to(k.dtype), k[:nv]], [cv.to(v.dtype), v[:nv]])
        elif self.impl == "dense":
            mask = lay.dense_mask().to(q.device)[:nv, :nv]
            qq, kk, vv = (t[:nv].permute(1, 2, 0, 3) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
            out = out.permute(2, 0, 1, 3).reshape(nv, b, n * d)
        elif self.impl == "flex":
            qq, kk, vv = (t[:nv].permute(1, 2, 0, 3).contiguous() for t in (q, k, v))
            out = _flex_attention(q.device)(qq, kk, vv, block_mask=self._flex_mask(nv, q.device))
            out = out.permute(2, 0, 1, 3).reshape(nv, b, n * d)
        else:
            outs = []
            for q0, q1, ranges in lay.attention_groups():
                if len(ranges) == 1:
                    a, e = ranges[0]
                    outs.append(core(q[q0:q1], k[a:e], v[a:e]))
                else:
                    outs.append(core_ranges(q[q0:q1], [k[a:e] for a, e in ranges], [v[a:e] for a, e in ranges]))
            out = torch.cat(outs)
        if nv < L:
            out = torch.cat([out, out.new_zeros(L - nv, b, out.shape[-1])])
        return out

    def _flex_mask(self, nv: int, device):
        """The layout's rule as a flex `BlockMask` over the valid tokens, from O(L) per-token vectors (no
        L x L tensor); built once per forward and shared by all layers."""
        if self._block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            codes = {CTX: 0, NOISY: 1, CLEAN: 2}
            kind = torch.empty(nv, dtype=torch.int8)
            chunk = torch.empty(nv, dtype=torch.int32)
            for sg in self.layout.segments:
                if sg.kind != PAD:
                    kind[sg.start:sg.end] = codes[sg.kind]
                    chunk[sg.start:sg.end] = sg.chunk
            kind, chunk = kind.to(device), chunk.to(device)
            clean = self.layout.clean

            def mask_mod(b, h, qi, ki):
                qk, kk, qc, kc = kind[qi], kind[ki], chunk[qi], chunk[ki]
                ok = kc <= qc
                if clean:
                    ok = ok & ~((qk == 2) & (kk == 1)) & ~((qk == 1) & (kk == 1) & (kc != qc)) \
                        & ~((qk == 1) & (kk == 2) & (kc == qc))
                return ok

            self._block_mask = create_block_mask(mask_mod, None, None, nv, nv, device=str(device))
        return self._block_mask

    def new_cache(self, height: int, width: int) -> FarKVCache:
        """The cache a ``"prefill"`` forward wrote (all layers)."""
        if self.layout.mode != "prefill":
            raise RuntimeError("only a prefill forward writes a KV cache")
        layers = tuple(self.written[i] for i in sorted(self.written))
        return FarKVCache(self.layout.chunk_partition, layers, height, width)


def _default_core_ranges(q: torch.Tensor, keys: List[torch.Tensor], values: List[torch.Tensor]) -> torch.Tensor:
    """`FarAttention.attend`'s multi-range core when the caller gives none (a core attention without
    ``forward_ranges``, e.g. Transformer Engine's, or a test's plain function): PyTorch's flash
    kernels with the log-sum-exp merge. q [sq, b, n, d], keys / values [sk_i, b, n, d] -> [sq, b, n * d]."""
    from megatron_anyflow.models.wan.range_attention import multi_range_attention

    sq, b = q.shape[:2]
    out = multi_range_attention(q.permute(1, 2, 0, 3), [t.permute(1, 2, 0, 3) for t in keys],
                                [t.permute(1, 2, 0, 3) for t in values])[0]
    return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


_FLEX = {}


def _flex_attention(device):
    """flex_attention, compiled once per process on CUDA (what makes it fast); eager elsewhere (tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    if torch.device(device).type != "cuda":
        return flex_attention
    if "compiled" not in _FLEX:
        _FLEX["compiled"] = torch.compile(flex_attention, dynamic=True)
    return _FLEX["compiled"]


def trilinear_far_patch_init(patch_weight: torch.Tensor, compressed_patch_size=(1, 4, 4)) -> torch.Tensor:
    """``far_patch_embedding`` weight from ``patch_embedding``'s (diffusers / reference ``setup_far_model``,
    docs/design/far.md 1.1): each ``[1, ph, pw]`` kernel trilinearly interpolated to ``compressed_patch_size``
    (``align_corners=False``).

    Args:
        patch_weight: ``[h, c, pt, ph, pw]``.
    Returns:
        ``[h, c, *compressed_patch_size]`` in patch_weight's dtype.
    """
    h, c = patch_weight.shape[:2]
    w = patch_weight.reshape(h * c, 1, *patch_weight.shape[2:])
    w = torch.nn.functional.interpolate(w, size=tuple(compressed_patch_size), mode="trilinear", align_corners=False)
    return w.reshape(h, c, *compressed_patch_size)


class FarModelRunner:
    """A FAR `WanModel` as the `anyflow.causal.CausalFlowMapModel` of the chunked sampler and the causal
    backward simulation: ``step`` = the cached generation forward, ``prefill`` = `WanModel.prefill`
    (no gradient; returns a new cache).

    Args:
        model: a `WanModel` with ``config.far``.
        adapter: the LoRA adapter every call runs (a name, or None for the base alone; omitted: the one
            `lora.set_active_adapter` selected).
    """

    def __init__(self, model, adapter=_UNSET):
        if not getattr(model.config, "far", False):
            raise ValueError("FarModelRunner needs a FAR model (WanConfig.far=True)")
        self.model = model
        self.kwargs = {} if adapter is _UNSET else {"adapter": adapter}

    def new_cache(self, batch_size: int) -> FarKVCache:
        return FarKVCache()

    def step(self, z, t, r, text, chunk_partition, cache):
        return self.model(z, t, r, text, chunk_partition=chunk_partition, kv_cache=cache, **self.kwargs)

    def prefill(self, prefix, text, chunk_partition, cache):
        return self.model.prefill(prefix, text, chunk_partition, **self.kwargs)
