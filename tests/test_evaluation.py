"""Test-time scaling evaluation on the Gaussian ground truth: an exact flow-map student matches the
reference at every N, the teacher's Euler error falls with N; the report files are written."""

import json

import torch

from megatron_anyflow.anyflow.evaluation import evaluate_test_time_scaling, psnr, write_report, write_video_grid
from megatron_anyflow.anyflow.gaussian import GaussianData


def test_exact_student_matches_reference_at_every_step_count(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = GaussianData(torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64) * 0.3, 0.5)
    student = data.exact_model()  # exact average velocity: flow-map Euler is exact at any N
    velocity = data.exact_model()  # at r = t the same callable is the exact instantaneous velocity
    noise = torch.randn(3, 1, 3, 4, 4, generator=g, dtype=torch.float64)
    text = torch.zeros(3, 2, 4, dtype=torch.float64)
    res, samples = evaluate_test_time_scaling(student, velocity, noise, text, text[:1], [1, 2, 8], reference_steps=400,
                                              guidance=1.0, decode=lambda z: z[:, :, :3].permute(0, 2, 1, 3, 4).tanh(),
                                              keep_samples=[2])
    exact = data.flow_map(noise, 1.0, 0.0)
    assert (samples["teacher-400"] - exact).abs().max() < 0.05  # Euler's first-order error at 400 steps
    assert (samples["student-2"] - exact).abs().max() < 1e-6  # the exact flow map is exact at any N
    t_err = [res.metrics["teacher"][n]["latent_mse"] for n in (1, 2, 8)]
    s_err = [res.metrics["student"][n]["latent_mse"] for n in (1, 2, 8)]
    assert t_err[0] > t_err[1] > t_err[2] > s_err[2]
    assert max(s_err) - min(s_err) < 1e-10  # same samples whatever N
    paths = write_report(res, str(tmp_path))
    saved = json.loads(open(paths["json"]).read())
    assert saved["guidance"] == 1.0 and set(saved["metrics"]) == {"student", "teacher"}
    md = open(paths["markdown"]).read()
    assert "| 8 |" in md and "no CFG" in md
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    video = write_video_grid({"a": torch.rand(2, 3, 4, 6, 8) * 2 - 1}, str(tmp_path / "v.mp4"), fps=4)
    import av

    with av.open(video) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4
    assert abs(psnr(0.04) - 10 * torch.log10(torch.tensor(4 / 0.04)).item()) < 1e-9


def test_loop_schedule_makes_short_clips_last():
    from megatron_anyflow.anyflow.evaluation import loop_schedule

    assert loop_schedule(5, 8, 6.0) == (2, 5)  # 5 frames held twice = 1.25 s per pass, 5 passes = 6.25 s
    assert loop_schedule(81, 16, 4.0) == (1, 1)  # a 5 s Wan clip is shown as is
    for f, fps, sec in [(1, 8, 4.0), (9, 8, 6.0), (17, 16, 3.0)]:
        hold, rep = loop_schedule(f, fps, sec)
        assert f * hold >= fps and f * hold * rep >= sec * fps and f * hold * (rep - 1) < sec * fps


def test_evaluation_tool_writes_labelled_samples(tmp_path):
    """tools/evaluate_anyflow.py on a tiny pixel-codec dataset: samples.mp4 lasts >= --video-seconds with a
    labelled layout (rows = reference / student N / teacher N, columns = the dataset's captions), samples.png."""
    import importlib.util
    import os

    import av
    from PIL import Image

    from megatron_anyflow.data.codecs import PixelCodec
    from megatron_anyflow.data.latent_dataset import MockLatentDataset, write_latent_dataset
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    shape = (3, 48, 2, 4)  # pixel codec (4 x 4 space-to-depth): 3 frames of 8 x 16
    common = ["--mock-data", "--mock-num-samples", "4", "--mock-latent-shape", *map(str, shape), "--model-preset",
              "tiny-video", "--micro-batch-size", "2", "--train-iters", "1", "--log-interval", "100"]
    Trainer(parse_args(["--stage", "teacher", *common, "--lora-rank", "0", "--save", str(tmp_path / "teacher")]),
            log=lambda *a, **k: None).train()
    Trainer(parse_args(["--stage", "stage1", *common, "--lora-rank", "4", "--lora-alpha", "4", "--pretrained",
                        str(tmp_path / "teacher"), "--save", str(tmp_path / "student")]), log=lambda *a, **k: None).train()
    mock = MockLatentDataset(3, shape, 5, 384, seed=3)
    captions = ["a rabbit eats grass", "waves on a rocky shore", "a cyclist on a country road"]
    write_latent_dataset(str(tmp_path / "data"), torch.stack([mock[i][0] for i in range(3)]),
                         torch.stack([mock[i][1] for i in range(3)]), mock.negative_text,
                         {"codec": PixelCodec().config(), "video": {"fps": 8}})
    index = json.load(open(tmp_path / "data" / "index.json"))
    index["shards"][0]["samples"] = [{"caption": c} for c in captions]
    json.dump(index, open(tmp_path / "data" / "index.json", "w"))
    spec = importlib.util.spec_from_file_location("evaluate_anyflow", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "evaluate_anyflow.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "eval"
    assert tool.main(["--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"), "--data-path",
                      str(tmp_path / "data"), "--output", str(out), "--steps", "1", "2", "--reference-steps", "4",
                      "--num-samples", "3", "--video-steps", "1", "2", "--guidance", "1", "--video-seconds", "5"]) == 0
    with av.open(str(out / "samples.mp4")) as c:
        n_frames = sum(1 for _ in c.decode(video=0))
        rate = c.streams.video[0].average_rate
    assert n_frames / float(rate) >= 5.0
    sheet = Image.open(out / "samples.png")
    assert sheet.width > 3 * 3 * 16 and sheet.height > 5 * 8  # 3 columns of 3-frame strips, 5 rows
    paths = json.load(open(out / "outputs.json"))
    assert paths["video"].endswith("samples.mp4") and paths["contact_sheet"].endswith("samples.png")


def test_row_labels_and_captions():
    from megatron_anyflow.anyflow.evaluation import dataset_captions, sample_row_labels

    samples = {k: None for k in ("teacher-50", "student-1", "teacher-1", "student-4", "teacher-4")}
    labels = sample_row_labels(samples, 50, [1, 4], 3.0)
    assert list(labels.values()) == ["teacher 50 steps (reference, CFG 3)", "AnyFlow student 1 step",
                                     "teacher 1 step (CFG 3)", "AnyFlow student 4 steps", "teacher 4 steps (CFG 3)"]
    index = {"shards": [{"num_samples": 2, "samples": [{"caption": "a"}, {"caption": "b"}]}, {"num_samples": 2}]}
    assert dataset_captions(index, [1, 2, 3]) == ["b", "sample 2", "sample 3"]


def test_evaluate_causal_rows_are_the_chunked_samples_errors():
    """`evaluate_causal` (tools/evaluate_far.py): each student's row at N is the error of `sample_chunked` at N
    against the teacher's reference Euler samples, its per-chunk rows are that error on each chunk's frames
    (their frame-weighted mean is the whole error), and the teacher's row is its own N-step Euler samples'. The
    same calls on the same tensors as the recomputation here: float32 rounding of an MSE, 1e-6 relative."""
    import pytest

    from megatron_anyflow.anyflow.causal import sample_chunked
    from megatron_anyflow.anyflow.evaluation import evaluate_causal
    from megatron_anyflow.anyflow.sampler import TeacherEulerSampler
    from megatron_anyflow.models.wan.config import wan_config
    from megatron_anyflow.models.wan.far import FarModelRunner
    from megatron_anyflow.models.wan.model import WanModel

    cp = (1, 2, 2)
    torch.manual_seed(0)
    student = WanModel(wan_config("tiny", far=True, chunk_partition=cp)).eval()
    teacher = WanModel(wan_config("tiny")).eval()
    g = torch.Generator().manual_seed(4)
    noise, text, neg = torch.randn(2, 5, 16, 4, 4, generator=g), torch.randn(2, 6, 384, generator=g), \
        torch.randn(1, 6, 384, generator=g)
    with torch.no_grad():
        result, per_chunk, samples = evaluate_causal({"s": student}, teacher, noise, text, neg, [1, 2], cp,
                                                     reference_steps=4, guidance=2.0, keep_samples=[2])
        ref = TeacherEulerSampler(4, guidance_scale=2.0)(teacher, noise, text, neg.expand(2, -1, -1))
        for n in (1, 2):
            out = sample_chunked(FarModelRunner(student), noise, text, cp, n)
            mse = float((out - ref).pow(2).mean())
            assert result.metrics["s"][n]["latent_mse"] == pytest.approx(mse, rel=1e-6)
            rows = per_chunk["s"][n]
            assert len(rows) == 3 and rows[0]["latent_mse"] == pytest.approx(
                float((out[:, :1] - ref[:, :1]).pow(2).mean()), rel=1e-6)
            assert sum(r["latent_mse"] * c for r, c in zip(rows, cp)) / 5 == pytest.approx(mse, rel=1e-6)
            t_n = TeacherEulerSampler(n, guidance_scale=2.0)(teacher, noise, text, neg.expand(2, -1, -1))
            assert result.metrics["teacher"][n]["latent_mse"] == pytest.approx(float((t_n - ref).pow(2).mean()),
                                                                               rel=1e-6)
    assert set(samples) == {"teacher-4", "s-2", "teacher-2"}
    with pytest.raises(ValueError, match=r"chunk_partition \[1, 2\] covers 3 latent frames; the noise has 5"):
        evaluate_causal({"s": student}, teacher, noise, text, neg, [1], (1, 2), reference_steps=2)
