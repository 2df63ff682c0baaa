"""The data loader: bf16 storage (and old float32 datasets), per-sample reads, the DataLoader reading exactly
the data-parallel sampler's micro-batches, bit-exact resume through the trainer, no leftover workers."""

import gc
import json
import multiprocessing
import os

import pytest
import torch

from megatron_anyflow.data.latent_dataset import (DataParallelSampler, LatentDataset, MockLatentDataset, collate,
                                                  write_latent_dataset)
from megatron_anyflow.data.loader import MicroBatchSampler, TrainingDataLoader

SHAPE = (3, 16, 4, 6)


def _samples(n, seed=0, text_len=5, text_dim=384):
    mock = MockLatentDataset(n, SHAPE, text_len, text_dim, seed=seed)
    return (torch.stack([mock[i][0] for i in range(n)]), torch.stack([mock[i][1] for i in range(n)]),
            mock.negative_text)


def _write_old_float32(path, latents, text, negative, samples_per_shard):
    """A dataset exactly as `write_latent_dataset` wrote it before bf16 storage: float32, no "dtype" key."""
    from safetensors.torch import save_file

    os.makedirs(path)
    shards = []
    for k, start in enumerate(range(0, latents.shape[0], samples_per_shard)):
        name = f"shard_{k:05d}.safetensors"
        part = slice(start, start + samples_per_shard)
        save_file({"latents": latents[part].contiguous(), "text": text[part].contiguous()}, os.path.join(path, name))
        shards.append({"file": name, "num_samples": int(latents[part].shape[0])})
    save_file({"text": negative.contiguous()}, os.path.join(path, "negative.safetensors"))
    index = dict(format="anyflow-latents-v1", num_samples=int(latents.shape[0]), latent_shape=list(latents.shape[1:]),
                 text_len=int(text.shape[1]), text_dim=int(text.shape[2]), shards=shards,
                 negative="negative.safetensors")
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump(index, f)


# -------------------------------------------------------------------------------------------------
# Storage
# -------------------------------------------------------------------------------------------------
def test_bf16_storage_round_trip(tmp_path):
    lat, txt, neg = _samples(7)
    write_latent_dataset(str(tmp_path / "d"), lat, txt, neg, {"note": "x"}, samples_per_shard=3)
    assert json.load(open(tmp_path / "d" / "index.json"))["dtype"] == "bfloat16"
    ds = LatentDataset(str(tmp_path / "d"))
    assert len(ds) == 7 and ds.dtype == torch.bfloat16 and ds.index["note"] == "x"
    for i in range(7):  # across shard boundaries (3 + 3 + 1)
        x, t = ds[i]
        assert x.dtype == t.dtype == torch.bfloat16
        assert torch.equal(x, lat[i].bfloat16()) and torch.equal(t, txt[i].bfloat16())
    assert torch.equal(ds.negative_text, neg.bfloat16())
    # bf16 halves the shard bytes of float32
    write_latent_dataset(str(tmp_path / "f"), lat, txt, neg, {}, samples_per_shard=3, dtype=torch.float32)
    size = lambda d: sum(os.path.getsize(tmp_path / d / f"shard_{k:05d}.safetensors") for k in range(3))  # noqa: E731
    assert size("d") < 0.51 * size("f")
    f32 = LatentDataset(str(tmp_path / "f"))
    assert f32.dtype == torch.float32 and torch.equal(f32[4][0], lat[4]) and torch.equal(f32[4][1], txt[4])
    with pytest.raises(ValueError, match="dtype torch.int8"):
        write_latent_dataset(str(tmp_path / "bad"), lat, txt, neg, {}, dtype=torch.int8)


def test_old_float32_dataset_reads_and_trains(tmp_path):
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    lat, txt, neg = _samples(6, seed=4)
    old = str(tmp_path / "old")
    _write_old_float32(old, lat, txt, neg, samples_per_shard=4)
    assert "dtype" not in json.load(open(os.path.join(old, "index.json")))
    ds = LatentDataset(old)
    assert ds.dtype == torch.float32
    assert all(torch.equal(ds[i][0], lat[i]) and torch.equal(ds[i][1], txt[i]) for i in range(6))
    # through the trainer's loader (2 workers): the stage sees exactly the stored float32 samples
    tr = Trainer(parse_args(["--stage", "teacher", "--data-path", old, "--micro-batch-size", "2",
                             "--global-batch-size", "4", "--lora-rank", "0", "--train-iters", "1",
                             "--log-interval", "100", "--num-workers", "2"]), log=lambda *a, **k: None)
    seen = []
    loss = tr.stage.loss
    tr.stage.loss = lambda it, j, x, text, carry, y=None: (seen.append((x.clone(), text.clone())),
                                                            loss(it, j, x, text, carry, y))[1]
    tr.train()
    micro = tr.sampler.micro_batches(0)
    assert len(seen) == len(micro) == 2
    for idx, (x, text) in zip(micro, seen):
        assert torch.equal(x, lat[idx]) and torch.equal(text, txt[idx])


def test_reads_one_sample_not_the_shard(tmp_path, monkeypatch):
    """Each read is ``get_slice(key)[j]`` of one sample on the memory-mapped shard: no ``load_file`` /
    ``get_tensor`` of a whole shard tensor, no multi-sample slice."""
    import safetensors
    import safetensors.torch

    lat, txt, neg = _samples(8, seed=1)
    write_latent_dataset(str(tmp_path / "d"), lat, txt, neg, {}, samples_per_shard=5)
    ds = LatentDataset(str(tmp_path / "d"))
    calls = []
    real_open = safetensors.safe_open

    class Slice:
        def __init__(self, key, inner):
            self.key, self.inner = key, inner

        def __getitem__(self, item):
            calls.append(("slice", self.key, item))
            return self.inner[item]

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class SpyOpen:
        def __init__(self, *a, **k):
            self.inner = real_open(*a, **k)

        def get_slice(self, key):
            return Slice(key, self.inner.get_slice(key))

        def get_tensor(self, key):
            raise AssertionError(f"whole-tensor read of {key!r}")

    def refuse(*a, **k):
        raise AssertionError("whole-shard load")

    monkeypatch.setattr(safetensors, "safe_open", SpyOpen)
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    ds._handles = {}  # reopen through the spy
    x, t = ds[6]  # shard 1, row 1
    assert calls == [("slice", "latents", 1), ("slice", "text", 1)]
    assert x.shape == SHAPE and torch.equal(x, lat[6].bfloat16()) and torch.equal(t, txt[6].bfloat16())
    # the open handles are per process and never pickled into a worker
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert clone._handles == {} and torch.equal(clone[6][0], x)


# -------------------------------------------------------------------------------------------------
# Order: the loader reads exactly the sampler's micro-batches
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dp_size,micro,global_batch", [(1, 2, 4), (2, 1, 4), (4, 2, 8), (2, 3, 6)])
def test_batch_sampler_is_the_sampler(dp_size, micro, global_batch):
    for rank in range(dp_size):
        s = DataParallelSampler(10, global_batch, micro, dp_size, rank, seed=3)
        for consumed in (0, global_batch, 7 * global_batch):  # 7 x global crosses epochs of 10 samples
            got = list(MicroBatchSampler(s, consumed, 3))
            want = [b for k in range(3) for b in s.micro_batches(consumed + k * global_batch)]
            assert got == want and len(MicroBatchSampler(s, consumed, 3)) == len(want)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("dp_size,rank,micro,global_batch", [(1, 0, 2, 4), (2, 1, 1, 4), (4, 3, 2, 16)])
def test_loader_yields_the_sampler_order_and_values(num_workers, dp_size, rank, micro, global_batch):
    ds = MockLatentDataset(11, SHAPE, 5, 16, seed=2)
    s = DataParallelSampler(len(ds), global_batch, micro, dp_size, rank, seed=5)
    loader = TrainingDataLoader(s, num_workers, torch.bfloat16)
    for consumed in (0, 3 * global_batch):  # a fresh start, then a "resume" at another offset
        for k in range(3):
            pos = consumed + k * global_batch
            got = loader.next_iteration(ds, pos, 3 - k)
            assert got == s.micro_batches(pos)
            for idx in got:
                x, t = loader.get(ds, idx)
                rx, rt = collate(ds, idx, torch.bfloat16, "cpu")
                assert x.dtype == torch.bfloat16 and torch.equal(x, rx) and torch.equal(t, rt)
        assert loader._it is None  # the last planned iteration shut the workers down
    assert loader.get(MockLatentDataset(11, SHAPE, 5, 16, seed=2), got[0]) is None  # another dataset object
    assert multiprocessing.active_children() == []


def test_loader_restarts_when_consumed_jumps():
    ds = MockLatentDataset(9, SHAPE, 5, 16)
    s = DataParallelSampler(len(ds), 4, 2, 1, 0, seed=1)
    loader = TrainingDataLoader(s, 1, torch.float32)
    assert loader.next_iteration(ds, 0, 5) == s.micro_batches(0)
    assert loader.next_iteration(ds, 12, 2) == s.micro_batches(12)  # not 4: restarted at 12
    assert loader.next_iteration(ds, 16, 1) == s.micro_batches(16)
    loader.close()
    assert multiprocessing.active_children() == []
    with pytest.raises(ValueError, match="num_workers must be >= 0.*-1"):
        TrainingDataLoader(s, -1, torch.float32)


# -------------------------------------------------------------------------------------------------
# Through the trainer
# -------------------------------------------------------------------------------------------------
BASE = ["--mock-data", "--mock-num-samples", "10", "--mock-latent-shape", *map(str, SHAPE), "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lora-rank", "4", "--lora-alpha", "4", "--lr", "1e-3", "--lr-warmup-iters", "1",
        "--log-interval", "100", "--ema-decay", "0.9"]


def _make(*extra):
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    return Trainer(parse_args(["--stage", "stage1", *BASE, *extra]), log=lambda *a, **k: None)


def _trainable(tr):
    return {k: p.detach().clone() for g in tr.groups.values() for k, p in g.params.items()}


def test_resume_with_workers_equals_in_process_run(tmp_path):
    """In-process straight run == 2-worker run interrupted and resumed (3 iterations, 10 samples: an epoch
    boundary inside), and the workers were really used and are gone after train()."""
    straight = _make("--train-iters", "3", "--num-workers", "0")
    straight.train()
    first = _make("--train-iters", "3", "--exit-after-iters", "2", "--save", str(tmp_path / "c"), "--num-workers", "2")
    alive = []
    step = first.stage.train_step
    first.stage.train_step = lambda it, micro: (alive.append(len(multiprocessing.active_children())), step(it, micro))[1]
    first.train()
    assert alive[0] == 2 and multiprocessing.active_children() == []
    resumed = _make("--train-iters", "3", "--load", str(tmp_path / "c"), "--num-workers", "2")
    assert resumed.consumed_samples == 8
    resumed.train()
    assert multiprocessing.active_children() == []
    a, b = _trainable(straight), _trainable(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_workers_end_when_training_fails():
    """A run that raises mid-training (after --max-skipped-iters) leaves no worker behind once the
    trainer is dropped."""
    from megatron_anyflow.training.nan_guard import NonFiniteTrainingError

    tr = _make("--train-iters", "8", "--lr", "1e30", "--max-skipped-iters", "1", "--num-workers", "2")
    with pytest.raises(NonFiniteTrainingError):
        tr.train()
    del tr
    gc.collect()
    assert multiprocessing.active_children() == []


def test_benchmark_loader_tool_runs(tmp_path):
    """tools/benchmark_loader.py at a tiny size: one row per loader, the assumption recorded."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "benchmark_loader", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                                         "benchmark_loader.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--num-samples", "4", "--latent-shape", "1", "2", "2", "2", "--text-len", "2", "--text-dim", "4",
                      "--samples-per-shard", "2", "--global-batch-size", "2", "--workers", "0", "1", "--repeats", "1",
                      "--consumer-ms-per-sample", "0", "--output-dir", str(tmp_path)]) == 0
    result = json.load(open(tmp_path / "loader.json"))
    assert [r["num_workers"] for r in result["rows"]][1:] == [0, 1]
    assert all(r["samples"] == 4 and r["samples_per_s"] > 0 for r in result["rows"])
    assert result["assumption"]["per_gpu_samples_per_s"] == pytest.approx(1 / 3.0)
    assert "samples/s" in (tmp_path / "loader.md").read_text()
    assert multiprocessing.active_children() == []
