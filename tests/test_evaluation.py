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
