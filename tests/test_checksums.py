"""Checkpoint checksums (issue #18, F3): every file's SHA-256 is recorded at save and verified at load.

A flipped byte inside a tensor, or a same-size garbage shard, makes a checkpoint damaged like a truncated
one: resume falls back to the newest complete checkpoint with a warning naming the file, and
``tools/verify_checkpoint.py`` reports it. Checkpoints from before checksums still load (unverified).
"""

import importlib.util
import json
import os
import random
import shutil
import subprocess

import pytest
import torch
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_anyflow.checkpoint import store as ckpt
from megatron_anyflow.checkpoint.store import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"w.big": (256, 256), "w.b": (7,)}  # w.big: 256 KiB of tensor bytes to flip bits in


def _sharded(tensors):
    return {k: ShardedTensor.from_rank_offsets(k, v, replica_id=0) for k, v in tensors.items()}


def _save(root, iteration):
    tensors = {k: torch.randn(*s) for k, s in SHAPES.items()}
    ckpt.save_checkpoint(str(root), iteration, _sharded(tensors), {"iteration": iteration},
                         {"torch_rng": torch.get_rng_state(), "cuda_rng": None})
    return tensors


def _load(d):
    return ckpt.load_checkpoint(d, _sharded({k: torch.zeros(*s) for k, s in SHAPES.items()}))


def _resume(root):
    warnings = []
    return ckpt.find_resume_checkpoint(str(root), warn=warnings.append), warnings


def _tool():
    path = os.path.join(REPO, "tools", "verify_checkpoint.py")
    spec = importlib.util.spec_from_file_location("verify_checkpoint", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _verify(capsys, *argv):
    capsys.readouterr()
    rc = _tool().main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def two(tmp_path):
    root = tmp_path / "ckpt"
    saved = {2: _save(root, 2), 4: _save(root, 4)}
    return root, saved


def _tensor_bytes(d, key):
    """(offset, length) of tensor ``key``'s record in its shard file, from the torch_dist index."""
    index = ckpt.read_dcp_index(str(d))
    for idx, info in index.storage_data.items():
        if idx.fqn == key:
            return info.relative_path, info.offset, info.length
    raise KeyError(key)


def test_bit_flips_inside_a_tensor_are_detected(two, capsys):
    """One flipped bit at each of 5 random offsets inside a tensor's bytes: 5 / 5 detected. Resume falls
    back to the older checkpoint with a warning naming the shard; verify_checkpoint reports it."""
    root, saved = two
    d4 = root / "iter_0000004"
    rel, off, length = _tensor_bytes(d4, "w.big")
    shard = d4 / rel
    original = shard.read_bytes()
    rng = random.Random(18)
    offsets = sorted(rng.sample(range(off + 4096, off + length - 4096), 5))  # inside the raw tensor data
    detected = []
    for o in offsets:
        data = bytearray(original)
        data[o] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(data))
        d, warnings = _resume(root)
        assert d is not None, o
        if d == str(root / "iter_0000002"):
            assert len(warnings) == 1 and f"{shard}: sha256 mismatch" in warnings[0], warnings
            rc, out, _ = _verify(capsys, root)
            assert rc == 1 and out == f"iter_0000004 DAMAGED: {rel}: sha256 mismatch\n", (rc, out)
            loaded = _load(d)
            assert all(torch.equal(loaded[k], saved[2][k]) for k in SHAPES)
            detected.append(o)
    assert detected == offsets, f"silently resumed with a flipped bit at {sorted(set(offsets) - set(detected))}"
    shard.write_bytes(original)
    assert _resume(root) == (str(d4), [])
    rc, out, _ = _verify(capsys, root, "--all")
    assert rc == 0 and [l.split(" files")[0] for l in out.splitlines()] == [
        "iter_0000002 ok 7", "iter_0000004 ok 7"], out


def test_same_size_garbage_shard_falls_back_like_a_truncated_one(two, capsys):
    root, saved = two
    shard = root / "iter_0000004" / "__0_0.distcp"
    shard.write_bytes(os.urandom(shard.stat().st_size))
    d, warnings = _resume(root)
    assert d == str(root / "iter_0000002") and len(warnings) == 1, (d, warnings)
    assert "resuming from the newest complete checkpoint" in warnings[0] and f"{shard}: sha256 mismatch" in warnings[0]
    # With the older one damaged too, nothing is left: an error, never a fresh start.
    (root / "iter_0000002" / "__0_0.distcp").write_bytes(os.urandom(shard.stat().st_size))
    with pytest.raises(CheckpointError, match="no complete iter_\\* checkpoint to fall back to"):
        _resume(root)
    rc, out, _ = _verify(capsys, root, "--all")
    assert rc == 1 and out.splitlines() == ["iter_0000002 DAMAGED: __0_0.distcp: sha256 mismatch",
                                            "iter_0000004 DAMAGED: __0_0.distcp: sha256 mismatch"], out


def test_manifest_is_sha256sum_format_and_covers_every_file(two):
    root, _ = two
    d = root / "iter_0000004"
    sums = ckpt.read_checksums(str(d))
    files = sorted(n for n in os.listdir(d) if n != ckpt.CHECKSUMS)
    assert sorted(sums) == files, (sorted(sums), files)  # shards, index, common.pt, metadata.json, meta, rank
    meta = ckpt.read_meta(str(d))
    assert meta["checksums"] == ckpt.CHECKSUMS and meta["writer"]["pid"] == os.getpid()
    if shutil.which("sha256sum"):
        p = subprocess.run(["sha256sum", "-c", "--quiet", ckpt.CHECKSUMS], cwd=d, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr


def test_checkpoint_without_checksums_loads_unverified(two, capsys):
    root, saved = two
    d = root / "iter_0000004"
    (d / ckpt.CHECKSUMS).unlink()
    meta = json.loads((d / ckpt.META).read_text())
    meta.pop("checksums")
    (d / ckpt.META).write_text(json.dumps(meta))
    assert _resume(root) == (str(d), [])
    loaded = _load(str(d))
    assert all(torch.equal(loaded[k], saved[4][k]) for k in SHAPES)
    notes = []
    assert ckpt.note_unverified(str(d), log=notes.append) is False
    assert len(notes) == 1 and "has no checksums.sha256" in notes[0] and "unverified" in notes[0]
    rc, out, _ = _verify(capsys, root)
    assert rc == 0 and out.startswith("iter_0000004 ok (unverified: no checksums.sha256"), out


def test_verify_tool_usage_and_targets(two, tmp_path, capsys):
    root, _ = two
    rc, out, err = _verify(capsys, tmp_path / "nowhere")
    assert rc == 2 and "no such directory" in err and out == ""
    (tmp_path / "empty").mkdir()
    rc, out, err = _verify(capsys, tmp_path / "empty")
    assert rc == 2 and "no checkpoint there" in err
    with pytest.raises(SystemExit) as e:
        _tool().main([])
    assert e.value.code == 2
    rc, out, _ = _verify(capsys, root)  # default: the tracker's checkpoint only
    assert rc == 0 and out.startswith("iter_0000004 ok 7 files ") and out.count("\n") == 1, out
    rc, out, _ = _verify(capsys, root / "iter_0000002")  # one checkpoint directory
    assert rc == 0 and out.startswith("iter_0000002 ok 7 files "), out
    (root / "iter_0000004" / "rank_00000.pt").unlink()
    rc, out, _ = _verify(capsys, root)
    assert rc == 1 and out.startswith("iter_0000004 DAMAGED: ") and "rank_00000.pt" in out, out


def test_checksums_of_an_export_tree(tmp_path, capsys):
    """The manifest convert_to_hf writes for an export (nested files), and the tool reading it."""
    d = tmp_path / "export"
    (d / "transformer").mkdir(parents=True)
    (d / "model_index.json").write_text("{}")
    (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(1000))
    ckpt.write_checksums_for_tree(str(d))
    assert sorted(ckpt.read_checksums(str(d))) == ["model_index.json",
                                                   "transformer/diffusion_pytorch_model.safetensors"]
    rc, out, _ = _verify(capsys, d)
    assert rc == 0 and out.startswith("export ok 3 files"), out
    (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(os.urandom(1000))
    rc, out, _ = _verify(capsys, d)
    assert rc == 1 and out == "export DAMAGED: transformer/diffusion_pytorch_model.safetensors: sha256 mismatch\n", out


def test_two_ranks_hash_their_own_files_and_resume_together(tmp_path):
    """Each rank hashes the shard and rank file it wrote, rank 0 gathers them into one manifest; the
    resume is verified once (rank 0) and both ranks continue from the checkpoint it chose."""
    from conftest import torchrun

    root = tmp_path / "c"
    args = ["pretrain_anyflow.py", "--stage", "stage1", "--mock-data", "--mock-num-samples", "8",
            "--mock-latent-shape", "3", "16", "4", "6", "--micro-batch-size", "1", "--global-batch-size", "2",
            "--lora-rank", "4", "--num-workers", "0", "--log-interval", "100", "--save", str(root)]
    torchrun(args + ["--train-iters", "2", "--save-interval", "1"], nproc=2, timeout=400)
    d = root / "iter_0000002"
    sums = ckpt.read_checksums(str(d))
    assert {"__0_0.distcp", "__1_0.distcp", "rank_00000.pt", "rank_00001.pt", ckpt.META} <= set(sums), sorted(sums)
    assert ckpt.verify_checksums(str(d)) == len(sums) == len(os.listdir(d)) - 1
    # Rank 1's own file (at DP 2 its shard __1_0.distcp is empty: rank 0 writes the replicated tensors).
    (d / "rank_00001.pt").write_bytes(os.urandom((d / "rank_00001.pt").stat().st_size))
    out = torchrun(args + ["--train-iters", "3", "--load", str(root)], nproc=2, timeout=400)
    rank0 = out.rank_logs[0][0] + out.rank_logs[0][1]
    assert "rank_00001.pt: sha256 mismatch" in rank0 and "resuming from the newest complete checkpoint" in rank0, rank0
    assert f"resumed from {root / 'iter_0000001'} at iteration 1" in rank0, rank0
    assert ckpt.read_tracker(str(root)) == "iter_0000003"
