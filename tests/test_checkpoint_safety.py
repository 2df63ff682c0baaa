"""Checkpoints never silently restart, name every corrupt file, run no code on load, leave no orphan.

Small checkpoints are written with `save_checkpoint` directly (random tensors, fresh each test); one
in-process Trainer resume and one SIGKILLed trainer subprocess cover the real callers.
"""

import os
import pickle
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest
import torch
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_anyflow.checkpoint import store as ckpt
from megatron_anyflow.checkpoint.store import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"w.a": (6, 5), "w.b": (7,)}


def _sharded(tensors):
    return {k: ShardedTensor.from_rank_offsets(k, v, replica_id=0) for k, v in tensors.items()}


def _save(root, iteration):
    tensors = {k: torch.randn(*s) for k, s in SHAPES.items()}
    rank_state = {"torch_rng": torch.get_rng_state(), "cuda_rng": None}
    ckpt.save_checkpoint(str(root), iteration, _sharded(tensors), {"iteration": iteration}, rank_state)
    return tensors


def _load(d):
    return ckpt.load_checkpoint(d, _sharded({k: torch.zeros(*s) for k, s in SHAPES.items()}))


@pytest.fixture
def two(tmp_path):
    """A root with complete iter_0000002 and iter_0000004 (tracker: 4); returns (root, {it: tensors})."""
    root = tmp_path / "ckpt"
    saved = {2: _save(root, 2), 4: _save(root, 4)}
    assert ckpt.read_tracker(str(root)) == "iter_0000004"
    return root, saved


def _resume(root):
    warnings = []
    d = ckpt.find_resume_checkpoint(str(root), warn=warnings.append)
    return d, warnings


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_first_launch_starts_from_scratch(tmp_path):
    assert _resume(tmp_path / "nowhere") == (None, [])
    (tmp_path / "empty").mkdir()
    assert _resume(tmp_path / "empty") == (None, [])
    # A first save that never finished: still a first launch, the leftover is named.
    (tmp_path / "crashed" / "iter_0000001.tmp").mkdir(parents=True)
    d, warnings = _resume(tmp_path / "crashed")
    assert d is None and len(warnings) == 1 and "iter_0000001.tmp" in warnings[0]


def test_intact_checkpoint_resumes_without_warning(two):
    root, saved = two
    d, warnings = _resume(root)
    assert d == str(root / "iter_0000004") and warnings == []
    loaded = _load(d)
    assert all(torch.equal(loaded[k], saved[4][k]) for k in SHAPES)
    assert isinstance(ckpt.load_rank_state(d)["torch_rng"], torch.Tensor)


DAMAGE = {  # name -> (edit(root), iteration resumed, words the warning must contain)
    "tracker names a missing iteration": (
        lambda r: (r / ckpt.TRACKER).write_text("99"), 4, ["iter_0000099", "does not exist"]),
    "tracker empty": (lambda r: (r / ckpt.TRACKER).write_text(""), 4, [ckpt.TRACKER, "is empty"]),
    "tracker binary": (lambda r: (r / ckpt.TRACKER).write_bytes(bytes([0xFF, 0xFE, 0x00, 0x9C]) * 4), 4,
                       [ckpt.TRACKER, "not text"]),
    "tracker garbage": (lambda r: (r / ckpt.TRACKER).write_text("iter_four\n"), 4, ["'iter_four'"]),
    "newest iter dir deleted": (lambda r: __import__("shutil").rmtree(r / "iter_0000004"), 2,
                                ["iter_0000004", "does not exist"]),
    "meta missing": (lambda r: (r / "iter_0000004" / ckpt.META).unlink(), 2, ["iter_0000004", ckpt.META, "not found"]),
    "meta garbage": (lambda r: (r / "iter_0000004" / ckpt.META).write_bytes(b"\x00{not json"), 2,
                     [ckpt.META, "not valid JSON"]),
    "dcp index missing": (lambda r: (r / "iter_0000004" / ".metadata").unlink(), 2, ["iter_0000004", ".metadata"]),
    "shard truncated": (lambda r: _truncate(r / "iter_0000004" / "__0_0.distcp"), 2,
                        ["__0_0.distcp", "truncated", "expected at least"]),
    "rank file missing": (lambda r: (r / "iter_0000004" / "rank_00000.pt").unlink(), 2, ["rank_00000.pt", "missing"]),
    "common.pt garbage": (lambda r: (r / "iter_0000004" / "common.pt").write_bytes(b"garbage"), 2, ["common.pt"]),
    # Same length, other bytes: only the checksums see these (issue #18, F3).
    "shard same-size garbage": (lambda r: _garble(r / "iter_0000004" / "__0_0.distcp"), 2,
                                ["iter_0000004/__0_0.distcp: sha256 mismatch"]),
    "rank file same-size garbage": (lambda r: _garble(r / "iter_0000004" / "rank_00000.pt"), 2,
                                    ["iter_0000004/rank_00000.pt: sha256 mismatch"]),
    "meta value edited": (lambda r: _edit_meta_iteration(r / "iter_0000004"), 2,
                          ["iter_0000004/anyflow_meta.json: sha256 mismatch"]),
    "checksums missing": (lambda r: (r / "iter_0000004" / ckpt.CHECKSUMS).unlink(), 2,
                          ["iter_0000004/checksums.sha256 is missing"]),
    "checksums garbage": (lambda r: (r / "iter_0000004" / ckpt.CHECKSUMS).write_text("not a checksum\n"), 2,
                          ["checksums.sha256 line 1"]),
    "checksums omit a file": (lambda r: _drop_from_manifest(r / "iter_0000004", "rank_00000.pt"), 2,
                              ["rank_00000.pt is not listed in"]),
}


def _garble(path):
    """Overwrite a file with random bytes of the same length."""
    path.write_bytes(os.urandom(path.stat().st_size))


def _edit_meta_iteration(d):
    """A plausible edit that keeps anyflow_meta.json valid JSON (what a flipped digit would do)."""
    text = (d / ckpt.META).read_text()
    assert '"iteration": 4' in text
    (d / ckpt.META).write_text(text.replace('"iteration": 4', '"iteration": 5'))


def _drop_from_manifest(d, name):
    lines = (d / ckpt.CHECKSUMS).read_text().splitlines(keepends=True)
    (d / ckpt.CHECKSUMS).write_text("".join(l for l in lines if not l.rstrip().endswith("  " + name)))


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_falls_back_to_newest_complete_with_warning(two, case):
    root, saved = two
    edit, expect_iter, words = DAMAGE[case]
    edit(root)
    tracker_before = (root / ckpt.TRACKER).read_bytes() if (root / ckpt.TRACKER).exists() else None
    d, warnings = _resume(root)
    assert d == str(root / f"iter_{expect_iter:07d}"), (d, warnings)
    assert len(warnings) == 1 and "resuming from the newest complete checkpoint" in warnings[0]
    for w in words:
        assert w in warnings[0], (w, warnings[0])
    loaded = _load(d)
    assert all(torch.equal(loaded[k], saved[expect_iter][k]) for k in SHAPES)
    # Resolving is read-only: the tracker is left as it was for the user to inspect.
    now = (root / ckpt.TRACKER).read_bytes() if (root / ckpt.TRACKER).exists() else None
    assert now == tracker_before


def test_iter_dirs_without_tracker_resume_newest_complete(two):
    root, saved = two
    (root / ckpt.TRACKER).unlink()
    d, warnings = _resume(root)
    assert d == str(root / "iter_0000004") and "no latest_checkpointed_iteration.txt" in warnings[0]
    # A truncated rank file keeps a complete-looking layout; its checksum gives it away.
    _truncate(root / "iter_0000004" / "rank_00000.pt")
    d, warnings = _resume(root)
    assert d == str(root / "iter_0000002"), warnings
    assert "no latest_checkpointed_iteration.txt" in warnings[0] and "rank_00000.pt: sha256 mismatch" in warnings[0]
    with pytest.raises(CheckpointError, match=r"iter_0000004/rank_00000\.pt is unreadable"):
        ckpt.load_rank_state(str(root / "iter_0000004"))


def test_nothing_complete_fails_naming_every_problem(two):
    root, _ = two
    (root / ckpt.TRACKER).write_text("99")
    (root / "iter_0000004" / ckpt.META).write_text("[1, 2")
    _truncate(root / "iter_0000002" / "__0_0.distcp", keep=0.9)
    with pytest.raises(CheckpointError) as err:
        _resume(root)
    msg = str(err.value)
    for w in ["iter_0000099", "iter_0000004/anyflow_meta.json", "iter_0000002/__0_0.distcp", "truncated"]:
        assert w in msg, (w, msg)


def test_direct_readers_name_the_file(two, tmp_path):
    root, _ = two
    d4 = root / "iter_0000004"
    (root / ckpt.TRACKER).write_bytes(b"\x80\x81\x82")
    with pytest.raises(CheckpointError, match=r"latest_checkpointed_iteration\.txt is not text"):
        ckpt.read_tracker(str(root))
    with pytest.raises(CheckpointError, match="newest complete checkpoint there is .*iter_0000004"):
        ckpt.resolve_checkpoint_dir(str(root))
    (root / ckpt.TRACKER).write_text("4")
    (d4 / ckpt.META).write_bytes(os.urandom(64) + b"\xff")
    with pytest.raises(CheckpointError, match=r"iter_0000004/anyflow_meta\.json is not valid JSON"):
        ckpt.read_meta(str(d4))
    with pytest.raises(CheckpointError, match=r"names 'iter_0000004', which is incomplete.*anyflow_meta\.json"):
        ckpt.resolve_checkpoint_dir(str(root))
    # A truncated shard / rank file, read directly.
    d2 = root / "iter_0000002"
    _truncate(d2 / "rank_00000.pt")
    with pytest.raises(CheckpointError, match=r"iter_0000002/rank_00000\.pt is unreadable"):
        ckpt.load_rank_state(str(d2))
    _truncate(d2 / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"shard .*iter_0000002/__0_0\.distcp is truncated"):
        _load(str(d2))


def test_corrupt_shard_bytes_are_named_with_the_checkpoint(two):
    """Same size, garbage content: the checksum names the file before anything reads it; in a checkpoint
    from before checksums, megatron-core's own reader fails and the error still names the checkpoint."""
    root, _ = two
    shard = root / "iter_0000004" / "__0_0.distcp"
    shard.write_bytes(os.urandom(shard.stat().st_size))
    with pytest.raises(ckpt.ChecksumError, match=r"checkpoint .*iter_0000004: .*iter_0000004/__0_0\.distcp: sha256 mismatch"):
        _load(str(root / "iter_0000004"))
    _strip_checksums(root / "iter_0000004")  # as written before checksums
    with pytest.raises(CheckpointError, match=r"checkpoint .*iter_0000004: reading the shards failed in .*iter_0000004/__0_0\.distcp"):
        _load(str(root / "iter_0000004"))


def _strip_checksums(d):
    """Make ``d`` look like a checkpoint of the version before checksums (no manifest, no meta marker)."""
    import json

    (d / ckpt.CHECKSUMS).unlink()
    meta = json.loads((d / ckpt.META).read_text())
    meta.pop("checksums"), meta.pop("writer")
    (d / ckpt.META).write_text(json.dumps(meta))


def test_diffusers_directory_says_to_convert(tmp_path):
    d = tmp_path / "Wan2.1-T2V-1.3B-Diffusers"
    (d / "transformer").mkdir(parents=True)
    (d / "transformer" / "config.json").write_text("{}")
    (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (d / "model_index.json").write_text("{}")
    for p in (d, d / "transformer"):
        with pytest.raises(FileNotFoundError, match="diffusers model directory.*tools/convert_from_hf.py"):
            ckpt.resolve_checkpoint_dir(str(p))


def test_trainer_load_uses_older_checkpoint_when_tracker_is_wrong(tmp_path):
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    base = ["--stage", "stage1", "--mock-data", "--mock-num-samples", "8", "--mock-latent-shape", "3", "16", "4", "6",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--lora-rank", "4", "--lr", "1e-3",
            "--log-interval", "100"]
    root = tmp_path / "c"
    Trainer(parse_args(base + ["--train-iters", "2", "--save", str(root), "--save-interval", "1"]),
            log=lambda *a, **k: None).train()
    (root / ckpt.TRACKER).write_text("99")
    lines = []
    tr = Trainer(parse_args(base + ["--train-iters", "3", "--load", str(root)]), log=lambda *a, **k: lines.append(a[0]))
    assert tr.iteration == 2 and tr.consumed_samples == 4
    assert any("iter_0000099" in l and "iter_0000002" in l for l in lines), lines


# ---------------------------------------------------------------------------------------------------
# Loading runs no code from the checkpoint


class _Payload:
    """Unpickling this object creates the directory ``marker`` (stands in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_rank_file_is_refused_and_runs_nothing(two, tmp_path):
    root, _ = two
    d = root / "iter_0000004"
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    torch.save({"torch_rng": torch.get_rng_state(), "cuda_rng": _Payload(marker)}, d / "rank_00000.pt")
    with pytest.raises(CheckpointError, match=r"refused to load .*iter_0000004/rank_00000\.pt.*GLOBAL posix\.mkdir"):
        ckpt.load_rank_state(str(d))
    assert not marker.exists()
    # The file really is dangerous: the old reader (weights_only=False) runs the payload.
    torch.load(d / "rank_00000.pt", weights_only=False)
    assert marker.exists()


def test_crafted_dcp_index_and_common_are_refused_and_run_nothing(two, tmp_path):
    root, _ = two
    d = root / "iter_0000004"
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    (d / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"iter_0000004/\.metadata is unreadable or unsafe.*posix\.mkdir"):
        _load(str(d))
    d2, warnings = _resume(root)  # resume does not unpickle it either: it falls back
    assert d2 == str(root / "iter_0000002") and ".metadata" in warnings[0]
    assert not marker.exists()
    torch.save(_Payload(marker), root / "iter_0000002" / "common.pt")
    with pytest.raises(CheckpointError, match=r"iter_0000002/common\.pt is unreadable or unsafe"):
        _load(str(root / "iter_0000002"))
    assert not marker.exists()


def test_rank_state_that_weights_only_cannot_read_is_refused_at_save(tmp_path):
    with pytest.raises(TypeError, match="weights_only=True"):
        ckpt.save_checkpoint(str(tmp_path / "c"), 1, _sharded({"w.a": torch.randn(3)}), {},
                             rank_state={"x": _Payload(tmp_path / "m")})
    assert not (tmp_path / "c" / ckpt.TRACKER).exists() and not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------
# A trainer SIGKILLed while saving leaves no process behind


def _tagged(tag):
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("ANYFLOW_KILL_TEST") == tag:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_during_save_leaves_no_process(tmp_path, workers):
    """Every process the trainer started carries a unique environment tag; none may outlive a SIGKILL.

    With ``--num-workers 0`` the trainer must start no process at all (the checkpoint writer runs in
    the calling thread); with data-loader workers, they must exit once the trainer is gone.
    """
    tag = uuid.uuid4().hex
    root = tmp_path / "c"
    env = dict(os.environ, ANYFLOW_KILL_TEST=tag, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "pretrain_anyflow.py", "--stage", "stage1", "--mock-data", "--model-preset", "tiny",
           "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "400", "--log-interval", "1000",
           "--save", str(root), "--save-interval", "1", "--num-workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    survivors = []
    try:
        deadline, saving, seen_children = time.time() + 90, False, {}
        while time.time() < deadline and proc.poll() is None:
            try:
                for c in psutil.Process(proc.pid).children(recursive=True):
                    seen_children.setdefault(c.pid, c)
            except psutil.NoSuchProcess:
                break
            # Kill inside a save after the first one completed (the writer is busy with shards).
            if (root / ckpt.TRACKER).exists() and any(n.endswith(".tmp") for n in os.listdir(root)):
                saving = True
                break
            time.sleep(0.002)
        assert saving, f"never caught the trainer saving (rc {proc.poll()}): {proc.stderr.read()[-2000:]!r}"
        workers_before = [p for p in _tagged(tag) if p.pid != proc.pid]
        if workers:
            assert len(workers_before) >= workers, "the data-loader workers were not running at the kill"
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=30)
        # Data-loader workers die with the trainer (PR_SET_PDEATHSIG), within 1 s; PyTorch's own check
        # alone took 4-5 s (issue #18, F7).
        while time.monotonic() < killed + 1.0:
            survivors = _tagged(tag)
            if not survivors:
                break
            time.sleep(0.02)
        gone_after = time.monotonic() - killed
        assert not survivors, (f"{len(survivors)} process(es) alive {gone_after:.2f} s after the SIGKILL",
                               [(p.pid, p.ppid(), p.cmdline()[:6]) for p in survivors])
        if workers == 0:
            assert not seen_children, f"the trainer started child processes: {sorted(seen_children)}"
        # The interrupted save is ignored; the last committed one is complete.
        d, warnings = _resume(root)
        assert d is not None and ckpt.incomplete_reason(d) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for p in survivors or _tagged(tag):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
