"""Training fails loudly instead of losing work: non-finite losses and gradients, bad arguments, the
reference recipe (LoRA teacher -> stage 1 -> stage 2 -> export) end to end (CPU, float32, tiny preset)."""

import math
import os

import pytest

from conftest import pretrain_cli
import torch

from megatron_anyflow.anyflow.timesteps import to_model_scale
from megatron_anyflow.models import lora as L
from megatron_anyflow.models.wan.config import wan_config
from megatron_anyflow.models.wan.model import WanModel
from megatron_anyflow.checkpoint import store as ckpt
from megatron_anyflow.training.arguments import parse_args
from megatron_anyflow.checkpoint.model_io import load_as_model, load_for_inference
from megatron_anyflow.training.nan_guard import NonFiniteTrainingError
from megatron_anyflow.training.trainer import Trainer

BASE = ["--mock-data", "--mock-num-samples", "16", "--mock-latent-shape", "3", "16", "4", "6",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lora-rank", "4",
        "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--ema-decay", "0.9"]


def make(stage, *extra, log=None):
    return Trainer(parse_args(["--stage", stage, *BASE, *extra]), log=log or (lambda *a, **k: None))


def trainable(tr):
    return {k: p.detach().clone() for g in tr.groups.values() for k, p in g.params.items()}


# -------------------------------------------------------------------------------------------------
# Non-finite losses and gradients
# -------------------------------------------------------------------------------------------------
def test_nan_sample_skips_the_step_and_names_the_sample(tmp_path):
    lines = []
    root = str(tmp_path / "c")
    tr = make("stage1", "--train-iters", "4", "--save", root, "--save-interval", "1",
              log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    bad = tr.sampler.micro_batches(4)[1][0]  # iteration 2 (consumed 4): second micro-batch, first row
    clean = tr.dataset

    class Poisoned:
        negative_text = clean.negative_text

        def __len__(self):
            return len(clean)

        def __getitem__(self, i):
            x, t = clean[i]
            if i == bad:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            return x, t

    tr.dataset = Poisoned()
    snapshots, tags = [], []
    end_iteration = tr.guard.end_iteration

    def spy(iteration):
        skipped = end_iteration(iteration)
        snapshots.append(trainable(tr))
        tags.append(ckpt.read_tracker(root))
        return skipped

    tr.guard.end_iteration = spy
    start = trainable(tr)
    tr.train()
    seq = [start] + snapshots
    moved = [not all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(seq, seq[1:])]
    assert moved == [True, False, True, True], moved  # iteration 2 skipped, training went on
    warn = [l for l in lines if l.startswith("warning: iteration")]
    assert len(warn) == 1 and "iteration 2" in warn[0] and f"sample(s) [{bad}]" in warn[0], lines
    assert any("iteration 2 was skipped (non-finite): checkpoint deferred" in l for l in lines), lines
    # tracker seen at the end of iterations 1..4 (before that iteration's save): 2 was not saved, 3 was.
    assert tags == [None, "iter_0000001", "iter_0000001", "iter_0000003"], tags
    assert ckpt.read_tracker(root) == "iter_0000004"
    assert tr.guard.total == 1 and tr.guard.consecutive == 0


def test_exploding_lr_stops_after_max_skipped_iters(tmp_path):
    root = str(tmp_path / "c")
    tr = make("stage1", "--train-iters", "8", "--lr", "1e30", "--max-skipped-iters", "2", "--save", root,
              "--save-interval", "1")
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive iterations.*--max-skipped-iters 2"):
        tr.train()
    assert tr.guard.consecutive == 2
    # Every checkpoint written is finite, and none was written during the streak.
    # Iteration 1 stepped (lr 1e30: finite but exploded weights), 2 and 3 were non-finite: stopped at 3.
    assert tr.iteration == 2 and ckpt.read_tracker(root) == "iter_0000001"
    loaded = make("stage1", "--train-iters", "8", "--load", root)
    assert all(bool(torch.isfinite(v).all()) for v in trainable(loaded).values())


def test_no_checkpoint_with_nonfinite_weights(tmp_path):
    root = str(tmp_path / "c")
    tr = make("stage1", "--train-iters", "1", "--save", root)
    tr.train()
    p = next(iter(tr.groups["generator"].params.values()))
    with torch.no_grad():
        p.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteTrainingError, match="refusing to write checkpoint iteration 1.*NaN or inf"):
        tr.save(root)
    assert ckpt.read_tracker(root) == "iter_0000001"
    assert not os.path.exists(os.path.join(root, "iter_0000001.tmp"))


def test_stage2_nan_in_generator_skips_only_its_step():
    tr = make("stage2", "--train-iters", "1", "--simulation-steps", "2")
    fake_before = {k: p.detach().clone() for k, p in tr.groups["fake_score"].params.items()}
    gen_before = {k: p.detach().clone() for k, p in tr.groups["generator"].params.items()}
    orig = tr.stage._generator_loss

    def poisoned(*a, **k):
        loss, info = orig(*a, **k)
        return loss * float("nan"), info

    tr.stage._generator_loss = poisoned
    m = tr.stage.train_step(0, tr.sampler.micro_batches(0))
    assert float(m["generator/skipped"]) == 1.0 and "fake_score/skipped" not in m
    assert all(torch.equal(gen_before[k], p) for k, p in tr.groups["generator"].params.items())
    assert any(not torch.equal(fake_before[k], p) for k, p in tr.groups["fake_score"].params.items())


# -------------------------------------------------------------------------------------------------
# Bad input, named
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,needle", [
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1"),
    (["--global-batch-size", "-8"], "got -8"),
    (["--ema-decay", "1.5"], "--ema-decay must lie in [0, 1]; got 1.5"),
    (["--ema-decay", "-0.1"], "got -0.1"),
    (["--max-skipped-iters", "0"], "--max-skipped-iters must be >= 1"),
])
def test_bad_arguments_are_named(capsys, argv, needle):
    with pytest.raises(SystemExit):
        parse_args(["--stage", "stage1", "--mock-data", "--train-iters", "1", *argv])
    assert needle in capsys.readouterr().err


def test_defaults_follow_the_preset_and_the_reference():
    a = parse_args(["--stage", "stage1", "--mock-data", "--train-iters", "1"])
    assert (a.lora_rank, a.lora_alpha) == (8, 8.0)  # the tiny preset's own rank, not 256 on a 64-wide model
    a = parse_args(["--stage", "stage1", "--mock-data", "--train-iters", "1", "--model-preset", "tiny-video"])
    assert a.lora_rank == 32
    a = parse_args(["--stage", "stage1", "--mock-data", "--train-iters", "1", "--model-preset", "wan2.1-1.3b"])
    assert (a.lora_rank, a.lora_alpha) == (256, 256.0)
    # EMA warm-up as in the reference: 1000 iterations (teacher, stage 1), 200 (stage 2).
    for stage, start in (("teacher", 1000), ("stage1", 1000), ("stage2", 200)):
        assert parse_args(["--stage", stage, "--mock-data", "--train-iters", "1"]).ema_start_iter == start


def test_lora_rank_larger_than_layer():
    model = WanModel(wan_config("tiny"))
    with pytest.raises(ValueError, match=r"LoRA rank 100 on .* exceeds the layer's smaller dimension"):
        L.apply_lora(model, ["generator"], 100, 100.0)


def test_tp_must_divide_ffn_width():
    with pytest.raises(ValueError, match="ffn_hidden_size 160 is not divisible by the tensor-parallel size 3"):
        wan_config("tiny", tensor_model_parallel_size=3)


def test_split_counts_in_the_log():
    lines = []
    tr = Trainer(parse_args(["--stage", "stage1", "--mock-data", "--mock-latent-shape", "3", "16", "4", "6",
                             "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "1",
                             "--log-interval", "1"]), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    tr.train()
    assert any("boundary 4 | r0 2 | free 2" in l for l in lines), lines


# -------------------------------------------------------------------------------------------------
# The reference recipe: base -> LoRA teacher -> stage 1 -> stage 2 -> export
# -------------------------------------------------------------------------------------------------
def _out(model, z, T, R, text):
    with torch.no_grad():
        return model(z, T, R, text).double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_lora_teacher_recipe_end_to_end(tmp_path):
    base, teacher = str(tmp_path / "base"), str(tmp_path / "teacher")
    s1, s2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    make("teacher", "--lora-rank", "0", "--train-iters", "1", "--save", base).train()  # a full base
    # EMA from iteration 0 so the teacher's EMA and live adapters differ: the reference merges the EMA.
    make("teacher", "--pretrained", base, "--train-iters", "3", "--ema-start-iter", "0", "--lr", "3e-2",
         "--save", teacher).train()
    merged_teacher = load_for_inference(teacher, adapter="teacher", ema=True)  # base + EMA teacher LoRA
    live_teacher = load_for_inference(teacher, adapter="teacher")
    plain_base = load_for_inference(base)

    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 16, 4, 6, generator=g)
    text = torch.randn(2, 8, 384, generator=g)
    T = to_model_scale(torch.rand(2, 3, generator=g))
    ref = _out(merged_teacher, z, T, T, text)
    assert _rel(_out(plain_base, z, T, T, text), ref) > 1e-3  # the teacher LoRA moved the model (>> 1e-5)
    assert _rel(_out(live_teacher, z, T, T, text), ref) > 1e-4  # and EMA != live
    assert _rel(_out(load_as_model(teacher), z, T, T, text), ref) < 1e-6  # "the teacher" as a model

    # Stage 1 on the LoRA teacher: its base is the merged teacher, exactly, at t = r (delta = copy).
    tr1 = make("stage1", "--pretrained", teacher, "--train-iters", "2", "--save", s1)
    L.set_active_adapter(tr1.model, None)
    assert _rel(_out(tr1.model, z, T, T, text), ref) < 1e-5
    L.set_active_adapter(tr1.model, "generator")
    tr1.train()

    # Stage 2: the real score is the merged teacher; the fake score starts equal to it.
    tr2 = make("stage2", "--pretrained", teacher, "--init-adapters-from", s1, "--train-iters", "1",
               "--simulation-steps", "2", "--save", s2)
    for role in (None, "fake_score"):
        L.set_active_adapter(tr2.model, role)
        assert _rel(_out(tr2.model, z, T, T, text), ref) < 1e-5, role
    tr2.train()

    # Export: the student loaded back from the stage-2 checkpoint (base followed through the teacher's
    # checkpoint, teacher merged, generator merged) equals the trainer's generator.
    R = T * torch.rand(2, 3, generator=g)
    L.set_active_adapter(tr2.model, "generator")
    student = load_for_inference(s2, adapter="generator")
    assert _rel(_out(student, z, T, R, text), _out(tr2.model, z, T, R, text)) < 1e-5
    assert math.isfinite(_rel(_out(student, z, T, R, text), ref))

    # ... and so does the diffusers export (tools/convert_to_hf.py, --verify on), loaded by diffusers.
    import importlib.util

    from diffusers import AnyFlowTransformer3DModel

    spec = importlib.util.spec_from_file_location("convert_to_hf", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_to_hf.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out_dir = str(tmp_path / "export")
    assert tool.main(["--input", s2, "--output", out_dir, "--merge-lora", "generator", "--verify"]) in (0, None)
    # The export carries checksums.sha256 (sha256sum format) over every file it wrote (issue #18).
    listed = sorted(ckpt.read_checksums(out_dir) or {})
    assert listed and listed == sorted(n for n in os.listdir(out_dir) if n != ckpt.CHECKSUMS), listed
    assert ckpt.verify_checksums(out_dir) == len(listed)
    hf = AnyFlowTransformer3DModel.from_pretrained(out_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        exported = hf(z, T, R, text, return_dict=False)[0].double()
    assert _rel(exported, _out(tr2.model, z, T, R, text)) < 1e-5


def test_metric_collectives_run_on_the_training_device(monkeypatch):
    """NCCL rejects CPU tensors: the stage-2 metrics all-reduce once built ``torch.tensor(v)`` on the CPU
    and crashed at DP > 1 on GPUs. Here the trainer's device is set to ``meta`` (a device that is not the
    CPU) with DP = 2 faked, and every tensor handed to ``all_reduce`` must be on it."""
    import torch.distributed as dist

    from megatron_anyflow.training.stages import MetricAccumulator

    tr = make("stage2", "--train-iters", "1")
    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: seen.append(t.device))
    tr.device, tr.dp_size = torch.device("meta"), 2
    acc = MetricAccumulator(tr.device)
    acc.add_mean("dmd_loss", torch.ones((), device="meta"))
    acc.add_samples([0, 1], {"kind": torch.tensor([0, 2], device="meta"), "per_sample_loss": torch.ones(2, device="meta")})
    out = tr.reduce_metrics(acc)
    assert seen == [torch.device("meta")] and set(out) == {"dmd_loss", "boundary", "r0", "free"}
    assert all(v.device.type == "meta" for v in out.values())


def test_time_shift_reaches_every_stage2_time():
    from megatron_anyflow.training.stage2 import distill_config

    args = parse_args(["--stage", "stage2", "--mock-data", "--train-iters", "1", "--time-shift", "3"])
    cfg = distill_config(args)
    assert (cfg.shift, cfg.dmd_tau_shift, cfg.critic_time_shift) == (3.0, 3.0, 3.0)


def test_cli_fails_loudly_with_one_error_line(tmp_path):
    """The command line turns the two known fatal conditions into one 'error:' line and exit code 2."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "pretrain_anyflow.py", "--stage", "stage1", "--mock-data", "--micro-batch-size", "1",
           "--global-batch-size", "1", "--num-workers", "0", "--mock-latent-shape", "3", "16", "4", "6"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    root = str(tmp_path / "c")
    subprocess.run(cmd + ["--train-iters", "1", "--save", root], cwd=repo, env=env, check=True, capture_output=True)
    with open(os.path.join(root, "iter_0000001", "anyflow_meta.json"), "w") as f:
        f.write("{garbage")
    p = subprocess.run(cmd + ["--train-iters", "2", "--load", root], cwd=repo, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "error: cannot resume from" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = subprocess.run(cmd + ["--train-iters", "4", "--lr", "1e30", "--lr-warmup-iters", "1", "--max-skipped-iters", "2"],
                       cwd=repo, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "consecutive iterations with a non-finite loss" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


# -------------------------------------------------------------------------------------------------
# Resume refuses a checkpoint of another configuration (issue #18, F2): one line, exit 2
# -------------------------------------------------------------------------------------------------
FAR = ["--model", "far", "--chunk-partition", "1", "2", "1", "1", "1", "--mock-latent-shape", "6", "16", "4", "8"]


_cli = pretrain_cli  # in-process pretrain_anyflow.py (tests/conftest.py)


def _refused(stage, *argv):
    with pytest.raises(ckpt.CheckpointError) as err:
        make(stage, *argv)
    return str(err.value)


def test_far_checkpoint_is_not_resumed_by_a_bidirectional_run(tmp_path, capsys):
    far = str(tmp_path / "far")
    make("stage1", *FAR, "--train-iters", "1", "--save", far).train()
    meta = os.path.join(far, "iter_0000001", "anyflow_meta.json")
    # FAR -> bidirectional: once rc 0 (only the stage was compared; far_patch_embedding was ignored).
    msg = _refused("stage1", "--mock-latent-shape", "6", "16", "4", "8", "--train-iters", "2", "--load", far)
    assert msg == (f"--load {far}: model differs: checkpoint of model 'far' ({meta}), this run has model "
                   "'bidirectional'; resume with the checkpoint's settings or --load another root"), msg
    capsys.readouterr()
    rc = _cli(["--stage", "stage1", *BASE, "--mock-latent-shape", "6", "16", "4", "8", "--num-workers", "0",
               "--train-iters", "2", "--load", far])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, (rc, err)
    assert [l for l in err.splitlines() if l.strip()] == [l for l in err.splitlines() if "error: " + msg in l], err
    assert err.count("\n") == 1, err
    # A FAR architecture field (the chunk partition) differs.
    msg = _refused("stage1", *FAR[:2], "--chunk-partition", "2", "2", "2", *FAR[8:], "--train-iters", "2", "--load", far)
    assert msg.startswith(f"--load {far}: wan_config.chunk_partition differs: checkpoint of wan_config.chunk_partition "
                          f"[1, 2, 1, 1, 1] ({meta}), this run has wan_config.chunk_partition [2, 2, 2]"), msg
    # The same FAR configuration resumes.
    assert make("stage1", *FAR, "--train-iters", "2", "--load", far).iteration == 1


def test_other_mismatches_are_one_line_naming_the_field(tmp_path):
    bi = str(tmp_path / "bi")
    make("stage1", "--train-iters", "1", "--save", bi).train()
    meta = os.path.join(bi, "iter_0000001", "anyflow_meta.json")
    cases = {  # argv -> (field, checkpoint's value, this run's value)
        ("stage1", *FAR): ("model", "'bidirectional'", "'far'"),
        ("stage2", "--simulation-steps", "2"): ("stage", "'stage1'", "'stage2'"),
        ("stage1", "--lora-rank", "8"): ("lora_rank", "4", "8"),
        ("stage1", "--lora-alpha", "2"): ("lora_alpha", "4.0", "2.0"),
    }
    for (stage, *argv), (field, theirs, mine) in cases.items():
        msg = _refused(stage, *argv, "--train-iters", "2", "--load", bi)
        assert msg.startswith(f"--load {bi}: {field} differs: checkpoint of {field} {theirs} ({meta}), this run has "
                              f"{field} {mine};"), (argv, msg)
        assert "\n" not in msg
    assert make("stage1", "--train-iters", "2", "--load", bi).iteration == 1
