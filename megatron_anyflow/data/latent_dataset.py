"""Datasets of precomputed latents and text embeddings, and the resumable data-parallel sampler.

On-disk format (written by ``tools/prepare_dataset.py``)::

    DATASET/index.json                {"format": "anyflow-latents-v1", "num_samples": N,
                                       "latent_shape": [f, c, h, w], "text_len": L, "text_dim": d,
                                       "dtype": "bfloat16",
                                       "shards": [{"file": "shard_00000.safetensors", "num_samples": n}, ...],
                                       "negative": "negative.safetensors", ...}
    DATASET/shard_00000.safetensors   "latents" [n, f, c, h, w], "text" [n, L, d]  (both in "dtype")
                                      [+ "condition" [n, f, c_y, h, w] when the index has "condition"]
    DATASET/negative.safetensors      "text" [1, L, d]  (the negative-prompt embedding)

Image-conditioned datasets (Wan2.2 I2V-A14B, ``tools/prepare_dataset.py --i2v-condition``) also store each
clip's channel condition ``y`` (`data.channel_condition`: the mask and the VAE latents of [frame 0, zeros])
under ``"condition"``; the index records ``"condition": {"kind": "wan2.2-i2v", "channels": c_y}``, and samples
read as ``(latents, text, condition)`` instead of ``(latents, text)``.

Latents are already normalised by the codec (the Wan VAE's latents mean / std, or the tiny preset's
pixel codec); ``text`` is the text encoder's last hidden state, zero beyond the prompt's tokens
(Wan's convention).

Storage dtype: `write_latent_dataset` stores bfloat16 by default (half the bytes of float32; training
runs in bf16 anyway) and records it as ``"dtype"``. Datasets written before that (no ``"dtype"`` key,
float32 shards, e.g. by ``tools/prepare_dataset.py``) read unchanged: the dtype is then taken from the
first shard's header. `LatentDataset` reads one sample at a time (``safe_open(...).get_slice("latents")[j]``
is a view of that sample in the memory-mapped shard: only its pages are read from disk), never a whole
shard.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from megatron_anyflow.data.channel_condition import i2v_condition

FORMAT = "anyflow-latents-v1"


STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class LatentDataset:
    """Random access to a precomputed-latent dataset directory, one sample per read.

    ``ds[i]`` returns (latents [f, c, h, w], text [L, d]) in the stored dtype (`dtype`: bfloat16 for
    datasets written by `write_latent_dataset`, float32 for older ones), plus condition [f, c_y, h, w] for an
    image-conditioned dataset (`condition_channels` = c_y > 0; module docstring); `negative_text` is [1, L, d]
    in the same dtype. Each read is a view of one sample in its memory-mapped shard
    (``safe_open(...).get_slice(key)[j]``; only its pages are read from disk): no whole-shard loads, so a
    random order costs nothing extra.
    The open shard handles are per process (rebuilt after fork and dropped when pickled), so the dataset
    can be handed to `torch.utils.data.DataLoader` workers.

    Raises:
        FileNotFoundError: no ``index.json`` or a listed shard is missing (named).
        ValueError: the index has another format, inconsistent counts or an unknown ``"dtype"``.
    """

    def __init__(self, path: str):
        index_path = os.path.join(path, "index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"{index_path} not found: expected a dataset written by tools/prepare_dataset.py")
        with open(index_path) as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.path = path
        self.shards = self.index["shards"]
        self.offsets = [0]
        for s in self.shards:
            if not os.path.isfile(os.path.join(path, s["file"])):
                raise FileNotFoundError(f"dataset shard {os.path.join(path, s['file'])} is missing")
            self.offsets.append(self.offsets[-1] + s["num_samples"])
        if self.offsets[-1] != self.index["num_samples"]:
            raise ValueError(f"{index_path}: shards hold {self.offsets[-1]} samples, index says "
                             f"{self.index['num_samples']}")
        self.latent_shape = tuple(self.index["latent_shape"])
        cond = self.index.get("condition")
        if cond is not None and (not isinstance(cond, dict) or not isinstance(cond.get("channels"), int)
                                 or cond["channels"] < 1):
            raise ValueError(f"{index_path}: 'condition' is {cond!r}; expected {{'kind': ..., 'channels': c_y >= 1}}")
        self.condition_channels = int(cond["channels"]) if cond else 0
        self._handles: dict = {}
        self._handles_pid = os.getpid()
        if "dtype" in self.index:
            if self.index["dtype"] not in STORAGE_DTYPES:
                raise ValueError(f"{index_path}: dtype {self.index['dtype']!r}, expected one of "
                                 f"{sorted(STORAGE_DTYPES)}")
            self.dtype = STORAGE_DTYPES[self.index["dtype"]]
        elif self.shards:  # written before the index recorded it (float32)
            stored = self._handle(0).get_slice("latents").get_dtype()
            if stored not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{os.path.join(path, self.shards[0]['file'])}: latents dtype {stored}, expected "
                                 f"one of {sorted(_SAFETENSORS_DTYPES)}")
            self.dtype = _SAFETENSORS_DTYPES[stored]
        else:
            self.dtype = torch.float32
        from safetensors.torch import load_file

        self.negative_text = load_file(os.path.join(path, self.index["negative"]))["text"]

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # safe_open handles do not pickle; each process opens its own
        return state

    def _handle(self, k: int):
        """The (per-process, memory-mapped) ``safe_open`` handle of shard ``k``."""
        if self._handles_pid != os.getpid():  # a forked worker: do not share the parent's handles
            self._handles, self._handles_pid = {}, os.getpid()
        h = self._handles.get(k)
        if h is None:
            from safetensors import safe_open

            h = self._handles[k] = safe_open(os.path.join(self.path, self.shards[k]["file"]), framework="pt")
        return h

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range [0, {len(self)})")
        k = bisect.bisect_right(self.offsets, i) - 1
        j = i - self.offsets[k]
        h = self._handle(k)
        if self.condition_channels:
            return h.get_slice("latents")[j], h.get_slice("text")[j], h.get_slice("condition")[j]
        return h.get_slice("latents")[j], h.get_slice("text")[j]


class MockLatentDataset:
    """Deterministic random latents and text for runs without a dataset (``--mock-data``).

    Sample ``i`` is drawn from a generator seeded with (seed, i), so any rank and any resume sees the
    same sample for the same index. Latents are smooth in space (a low-frequency field plus noise) so a
    model has something to learn; text [L, d] standard normal. ``condition_channels`` > 0 (a model reading a
    channel condition, Wan2.2 I2V-A14B): samples also carry ``y`` [f, condition_channels, h, w], the
    `channel_condition.i2v_condition` of the sample's own latents with frames >= 1 replaced by noise (the
    image's information, in frame 0, is the clip's).
    """

    def __init__(self, num_samples: int, latent_shape: Sequence[int], text_len: int, text_dim: int, seed: int = 0,
                 condition_channels: int = 0):
        self.num = num_samples
        self.latent_shape = tuple(latent_shape)
        self.condition_channels = int(condition_channels)
        if self.condition_channels and self.condition_channels != 4 + self.latent_shape[1]:
            raise ValueError(f"a mock channel condition has 4 mask + {self.latent_shape[1]} latent channels; "
                             f"{self.condition_channels} asked")
        self.text_len, self.text_dim, self.seed = text_len, text_dim, seed
        g = torch.Generator().manual_seed(seed + 7919)
        self.negative_text = torch.randn(1, text_len, text_dim, generator=g)

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.num:
            raise IndexError(f"sample {i} out of range [0, {self.num})")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        f, c, h, w = self.latent_shape
        coarse = torch.randn(f, c, max(h // 4, 1), max(w // 4, 1), generator=g)
        x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        x = x + 0.1 * torch.randn(f, c, h, w, generator=g)
        text = torch.randn(self.text_len, self.text_dim, generator=g)
        if not self.condition_channels:
            return x, text
        c_lat = torch.cat([x[:1], torch.randn(f - 1, c, h, w, generator=g)])
        return x, text, i2v_condition(c_lat[None])[0]


@dataclass
class DataParallelSampler:
    """Which sample indices each data-parallel rank reads, per iteration and micro-batch.

    The global sample stream is a concatenation of per-epoch permutations (seeded by (seed, epoch)).
    Iteration covering stream positions [consumed, consumed + global_batch) is split into
    ``num_micro = global_batch / (micro_batch * dp)`` micro-steps; in micro-step j, DP rank d reads
    positions ``consumed + j * micro_batch * dp + d * micro_batch + [0, micro_batch)``. So within one
    micro-step the DP ranks together hold one "data-parallel micro-batch" whose sample ``d * micro_batch
    + i`` is rank d's row i (the index the AnyFlow time sampler splits on).

    Resuming only needs ``consumed_samples``.

    Raises:
        ValueError: global_batch not divisible by micro_batch * dp, or an empty dataset.
    """

    num_samples: int
    global_batch: int
    micro_batch: int
    dp_size: int
    dp_rank: int
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError("the dataset is empty")
        if self.global_batch % (self.micro_batch * self.dp_size):
            raise ValueError(f"global batch {self.global_batch} is not divisible by micro batch {self.micro_batch} "
                             f"x data-parallel size {self.dp_size}")
        self.num_micro = self.global_batch // (self.micro_batch * self.dp_size)
        self._perm_cache: Tuple[int, torch.Tensor] = (-1, torch.empty(0))

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(self.num_samples, generator=g))
        return self._perm_cache[1]

    def _stream(self, pos: int) -> int:
        return int(self._perm(pos // self.num_samples)[pos % self.num_samples])

    def micro_batches(self, consumed_samples: int) -> List[List[int]]:
        """The sample indices of this rank's micro-batches for the iteration starting at ``consumed_samples``."""
        out = []
        for j in range(self.num_micro):
            base = consumed_samples + j * self.micro_batch * self.dp_size + self.dp_rank * self.micro_batch
            out.append([self._stream(base + i) for i in range(self.micro_batch)])
        return out


def collate(dataset, indices: Sequence[int], dtype: torch.dtype, device) -> Tuple[torch.Tensor, ...]:
    """Stack samples into (latents [b, f, c, h, w], text [b, L, d][, condition [b, f, c_y, h, w]]) on ``device``
    in ``dtype`` (one stacked tensor per field of ``dataset[i]``)."""
    items = [dataset[i] for i in indices]
    return tuple(torch.stack([it[k] for it in items]).to(device=device, dtype=dtype) for k in range(len(items[0])))


def write_latent_dataset(path: str, latents: torch.Tensor, text: torch.Tensor, negative_text: torch.Tensor,
                         extra_index: dict, samples_per_shard: int = 256,
                         dtype: torch.dtype = torch.bfloat16, condition: Optional[torch.Tensor] = None) -> None:
    """Write latents [n, f, c, h, w] and text [n, L, d] (negative_text [1, L, d]) in this module's format,
    all stored in ``dtype`` (bfloat16 by default, recorded in the index as ``"dtype"``; float32 keeps the
    values exactly). ``condition`` [n, f, c_y, h, w]: each sample's channel condition (Wan2.2 I2V-A14B,
    module docstring). ``index.json`` is written last, atomically, so an interrupted write never looks
    complete.

    Raises:
        ValueError: latents, text and condition disagree on n (or condition on f, h, w), or ``dtype`` is not
            bfloat16 / float16 / float32.
    """
    from safetensors.torch import save_file

    names = {v: k for k, v in STORAGE_DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"write_latent_dataset {path}: dtype {dtype}, expected one of {sorted(STORAGE_DTYPES)}")
    if latents.shape[0] != text.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {text.shape[0]} text embeddings")
    if condition is not None and (condition.dim() != 5 or condition.shape[:2] != latents.shape[:2]
                                  or condition.shape[3:] != latents.shape[3:]):
        raise ValueError(f"condition {tuple(condition.shape)} does not match latents {tuple(latents.shape)} (same n, f, "
                         "h, w expected)")
    os.makedirs(path, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, latents.shape[0], samples_per_shard)):
        name = f"shard_{k:05d}.safetensors"
        part = slice(start, start + samples_per_shard)
        fields = {"latents": latents[part], "text": text[part]}
        if condition is not None:
            fields["condition"] = condition[part]
        save_file({k: v.to(dtype).contiguous() for k, v in fields.items()}, os.path.join(path, name))
        shards.append({"file": name, "num_samples": int(latents[part].shape[0])})
    save_file({"text": negative_text.to(dtype).contiguous()}, os.path.join(path, "negative.safetensors"))
    index = dict(extra_index, format=FORMAT, num_samples=int(latents.shape[0]), latent_shape=list(latents.shape[1:]),
                 text_len=int(text.shape[1]), text_dim=int(text.shape[2]), dtype=names[dtype], shards=shards,
                 negative="negative.safetensors")
    if condition is not None:
        index["condition"] = {"kind": "wan2.2-i2v", "channels": int(condition.shape[2])}
    tmp = os.path.join(path, "index.json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(path, "index.json"))
