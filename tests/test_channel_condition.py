"""Wan2.2 I2V-A14B's channel condition (`data.channel_condition`): the 36-channel input, against diffusers,
through the data, both stages, generation and the export.

(a) `encode_i2v_condition` through the project's VAE codec equals what diffusers' ``WanImageToVideoPipeline``
    builds in ``prepare_latents`` (mask + normalised latents of [image, 0, ...]) from the same image and VAE.
    Tolerance: the same VAE forward on both sides; the normalisation is ``(z - m) / s`` here and
    ``(z - m) * (1 / s)`` there, one rounding apart (2^-24 relative); the mask is exact. Bound 1e-6 relative.
(b) The teacher's Euler sampler with two tiny I2V experts (converted from diffusers) and the condition equals
    ``WanImageToVideoPipeline`` with ``transformer`` + ``transformer_2`` + ``boundary_ratio`` 0.9 on the same
    weights, image, noise and embeddings (fp32, ``FlowMapEulerDiscreteScheduler(shift=5)``, whose grid is the
    project's: tests/test_two_expert_synthesis.py). Tolerance as that file's (a): the same float operations
    up to the forwards' summation order, ~1e-6 relative per forward, a few 1e-6 on the state; bound 5e-6.
    Controls: the condition of another image, and no mask, must miss by orders more.
(c) The flow-map sampler passes the condition to every call of the routed experts: equal to a loop written
    here (cat([z, y]) per call, the expert chosen by the jump, the float64 update).
(d) Bad conditions are refused by shape.
(e) Training: stage 1 from a conditioned dataset (loader workers = in process), the refusals, the teacher data
    (`synthesize_dataset`), stage 2 (every role's call reads its micro-batch's conditions).
(f) ``generate.py --image`` and the ``convert_to_hf --pipeline`` export of the stage-2 pair equal the library."""

import json

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMapEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

from test_two_expert_synthesis import _random_expert as random_expert
from test_wan22 import ok, tool  # in-process tools/NAME.py under the CLI error policy
from megatron_anyflow.data import channel_condition as C
from megatron_anyflow.anyflow.sampler import FlowMapEulerSampler, TeacherEulerSampler, route_experts
from megatron_anyflow.anyflow.timesteps import to_model_scale

# tiny-wan2.2-i2v-a14b's sizes: test_two_expert_synthesis's experts (64 wide, FFN 160, text 384, 2 layers), 36 -> 16
B = 0.9
F_, H_, W_ = 3, 4, 6  # latent frames / height / width: 9 video frames of 32 x 48 through the Wan2.1 VAE
NUM_FRAMES, HEIGHT, WIDTH = 4 * (F_ - 1) + 1, 8 * H_, 8 * W_


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _random_expert(seed):
    """A diffusers I2V expert (36 in, 16 out) with every tensor perturbed off its init (so the experts and a
    misrouting differ)."""
    return random_expert(seed, in_channels=36, out_channels=16)


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """A diffusers I2V-A14B-shaped pipeline directory: two tiny random experts, a tiny Wan2.1 VAE, the index
    with ``boundary_ratio`` 0.9 (what convert_from_hf reads an expert's role and boundary from)."""
    from megatron_anyflow.testing.tiny_components import tiny_vae

    root = tmp_path_factory.mktemp("i2v_a14b")
    for sub, seed in (("transformer", 11), ("transformer_2", 12)):
        _random_expert(seed).save_pretrained(root / sub)
    tiny_vae(str(root / "vae"))
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanImageToVideoPipeline", "boundary_ratio": B, "vae": ["diffusers", "AutoencoderKLWan"],
        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    return root


def _convert(root, capsys):
    from megatron_anyflow.checkpoint.model_io import load_as_model

    models = {}
    for name, sub in (("high", "transformer"), ("low", "transformer_2")):
        out = root / "ckpt" / name
        if not out.exists():
            ok("convert_from_hf", ["--input", root / sub, "--output", out, "--add-delta-embedder"], capsys)
        models[name] = load_as_model(str(out)).eval()
    return models


def _image(seed):
    """A random image in [0, 1], [1, 3, H, W] (what the pipeline's video processor maps to [-1, 1])."""
    return torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def _pipeline(root):
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=AutoencoderKLWan.from_pretrained(root / "vae").eval(),
        scheduler=FlowMapEulerDiscreteScheduler(shift=5.0), image_processor=None, image_encoder=None,
        transformer=WanTransformer3DModel.from_pretrained(root / "transformer").eval(),
        transformer_2=WanTransformer3DModel.from_pretrained(root / "transformer_2").eval(), boundary_ratio=B)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _codec(root):
    from megatron_anyflow.data.codecs import WanVAECodec

    return WanVAECodec(str(root / "vae"), device="cpu", sample=True)  # sample=True: the condition still uses the mode


def test_condition_equals_diffusers_prepare_latents(i2v):
    root = i2v
    pipe, img = _pipeline(root), _image(0)
    with torch.no_grad():
        pre = pipe.video_processor.preprocess(img, height=HEIGHT, width=WIDTH).float()
        _, ref = pipe.prepare_latents(pre, 2, 16, HEIGHT, WIDTH, NUM_FRAMES, torch.float32, torch.device("cpu"),
                                      latents=torch.zeros(2, 16, F_, H_, W_))
    ref = ref.permute(0, 2, 1, 3, 4)  # [b, f, 20, h, w]
    y = C.encode_i2v_condition(_codec(root), img * 2 - 1, NUM_FRAMES).expand(2, -1, -1, -1, -1)
    assert y.shape == (2, F_, 20, H_, W_)
    assert torch.equal(y[:, :, :4], ref[:, :, :4])  # the mask: frame 0 all ones, then zeros
    assert float(y[:, 0, :4].min()) == 1.0 and float(y[:, 1:, :4].abs().max()) == 0.0
    assert rel(y[:, :, 4:], ref[:, :, 4:]) < 1e-6
    # frames >= 1 carry the encoded zeros after the image (the causal VAE's memory), not zeros
    assert float(y[:, 1:, 4:].abs().max()) > 1e-2


@pytest.mark.parametrize("n", [4, 7])
def test_teacher_sampler_with_condition_equals_wan_image_to_video_pipeline(i2v, capsys, n):
    root = i2v
    experts = _convert(root, capsys)
    g = torch.Generator().manual_seed(n)
    noise, text, neg = (torch.randn(2, F_, 16, H_, W_, generator=g), torch.randn(2, 7, 384, generator=g),
                        torch.randn(2, 5, 384, generator=g))
    img = _image(1)
    pipe = _pipeline(root)
    with torch.no_grad():
        ref = pipe(image=img, latents=noise.permute(0, 2, 1, 3, 4).clone(), prompt_embeds=text,
                   negative_prompt_embeds=neg, guidance_scale=3.0, guidance_scale_2=2.0, num_inference_steps=n,
                   height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES, output_type="latent",
                   return_dict=False)[0].permute(0, 2, 1, 3, 4)
    codec = _codec(root)
    y = C.encode_i2v_condition(codec, img * 2 - 1, NUM_FRAMES).expand(2, -1, -1, -1, -1)
    sampler = TeacherEulerSampler(n, 5.0, guidance_scale=3.0, boundary=B, guidance_scale_2=2.0)
    assert "high" in sampler.experts and "low" in sampler.experts
    out = sampler(experts["high"], noise, text, neg, model_2=experts["low"], channel_condition=y)
    assert out.shape == noise.shape
    err = rel(out, ref)
    assert err < 5e-6, err
    # controls: another image's condition, and the latents without their mask
    other = C.encode_i2v_condition(codec, _image(2) * 2 - 1, NUM_FRAMES).expand(2, -1, -1, -1, -1)
    no_mask = torch.cat([torch.zeros_like(y[:, :, :4]), y[:, :, 4:]], 2)
    for yy in (other, no_mask):
        miss = rel(sampler(experts["high"], noise, text, neg, model_2=experts["low"], channel_condition=yy), ref)
        assert miss > 1e3 * max(err, 1e-8), (miss, err)


def test_flow_map_sampler_feeds_the_condition_to_every_routed_call(i2v, capsys):
    root = i2v
    experts = _convert(root, capsys)
    g = torch.Generator().manual_seed(3)
    noise, text = torch.randn(2, F_, 16, H_, W_, generator=g), torch.randn(2, 7, 384, generator=g)
    y = C.i2v_condition(torch.randn(2, F_, 16, H_, W_, generator=g))
    for n in (1, 3):
        s = FlowMapEulerSampler(n, 5.0, boundary=B)
        out = s(route_experts(experts["high"], experts["low"], B), noise, text, channel_condition=y)
        z, ts = noise.clone(), s.times.tolist()
        Bm = float(to_model_scale(B))
        with torch.no_grad():
            for t, r in zip(ts[:-1], ts[1:]):
                T, R = (to_model_scale(v).expand(2, F_).clone() for v in (t, r))
                m = experts["high"] if float(R.min()) >= Bm else experts["low"]
                u = m(torch.cat([z, y], 2), T, R, text)
                z = (z.double() - (t - r) * u.double()).float()
        assert torch.equal(out, z), (n, rel(out, z))


def test_bad_conditions_are_refused(i2v, capsys):
    root = i2v
    experts = _convert(root, capsys)
    noise, text = torch.randn(1, F_, 16, H_, W_), torch.randn(1, 7, 384)
    s = FlowMapEulerSampler(2, 5.0, boundary=B)
    model = route_experts(experts["high"], experts["low"], B)
    with pytest.raises(ValueError, match=r"channel_condition must be \[b, f, c_y, h, w\].*\(1, 3, 16, 4, 6\)"):
        s(model, noise, text, channel_condition=torch.randn(1, F_ - 1, 20, H_, W_))
    with pytest.raises(ValueError, match="latents have 32 channels; the model expects in_channels=36"):
        s(model, noise, text, channel_condition=torch.randn(1, F_, 16, H_, W_))
    with pytest.raises(ValueError, match="36"):  # the experts read 36 channels: latents alone are refused
        s(model, noise, text)
    with pytest.raises(ValueError, match=r"condition image must be \[b, 3, H, W\]"):
        C.encode_i2v_condition(_codec(root), torch.rand(3, HEIGHT, WIDTH), NUM_FRAMES)
    with pytest.raises(ValueError, match="none was given"):
        C.check_channel_condition(None, noise.shape, 20)
    with pytest.raises(ValueError, match="reads its latents alone"):
        C.check_channel_condition(torch.randn(1, F_, 20, H_, W_), noise.shape, 0)
    cfg = experts["high"].config
    assert C.condition_channels(cfg) == 20


# ---------------------------------------------------------------------------------------------------
# Training an I2V-A14B expert on a dataset with conditions
# ---------------------------------------------------------------------------------------------------
TRAIN = ["--stage", "stage1", "--model-preset", "tiny-wan2.2-i2v-a14b", "--expert", "high", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lora-rank", "4", "--lora-alpha", "4", "--train-iters", "2",
         "--log-interval", "100", "--seed", "3"]


def _dataset(path, condition=True, n=6):
    from megatron_anyflow.data.latent_dataset import write_latent_dataset

    g = torch.Generator().manual_seed(8)
    lat = torch.randn(n, F_, 16, H_, W_, generator=g)
    y = C.i2v_condition(torch.randn(n, F_, 16, H_, W_, generator=g)) if condition else None
    write_latent_dataset(str(path), lat, torch.randn(n, 7, 384, generator=g), torch.randn(1, 7, 384, generator=g),
                         {}, samples_per_shard=4, dtype=torch.float32, condition=y)
    return str(path)


def _trainer(argv):
    from megatron_anyflow.training.arguments import parse_args
    from megatron_anyflow.training.trainer import Trainer

    return Trainer(parse_args(argv), log=lambda *a, **k: None)


def test_stage1_trains_an_i2v_expert_from_a_conditioned_dataset(tmp_path):
    """Two iterations of stage 1 read (latents, text, condition) through the loader's worker processes and in
    the training process alike (the same metrics and adapters, bit for bit: the same float32 operations on the
    same tensors), and the adapters move."""
    data = _dataset(tmp_path / "ds")
    results = []
    for workers in ("0", "1"):
        tr = _trainer([*TRAIN, "--data-path", data, "--num-workers", workers])
        before = {k: v.detach().clone() for k, v in tr.named_trainable(lambda n: "lora_B" in n).items()}
        m = tr.train()
        after = {k: v.detach().clone() for k, v in tr.named_trainable(lambda n: "lora_B" in n).items()}
        assert any(not torch.equal(before[k], after[k]) for k in before)
        results.append((m["loss"], after))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_trainer_refuses_what_an_i2v_expert_cannot_train(tmp_path):
    plain = _dataset(tmp_path / "plain", condition=False)
    with pytest.raises(ValueError, match=r"has no channel condition.*prepare_dataset.py --i2v-condition"):
        _trainer([*TRAIN, "--data-path", plain])
    with pytest.raises(ValueError, match=r"has a 20-channel condition; the model reads none"):
        _trainer(["--stage", "stage1", "--model-preset", "tiny-wan2.2-t2v-a14b", "--expert", "low", "--train-iters", "1",
                  "--data-path", _dataset(tmp_path / "cond")])
    with pytest.raises(ValueError, match=r"--i2v-prob 0.5: .*20 condition channels"):
        _trainer([*TRAIN, "--mock-data", "--mock-latent-shape", "3", "16", "4", "6", "--i2v-prob", "0.5"])


def test_synthesize_dataset_draws_each_sample_given_its_clips_condition(i2v, tmp_path, capsys):
    """``synthesize_dataset`` with the two I2V experts on a conditioned dataset = the teacher sampler with each
    source clip's condition on the CLI's noise stream (the same calls on the same tensors: bitwise), and the
    output keeps the conditions; a dataset without conditions is refused by name."""
    root = i2v
    experts = _convert(root, capsys)
    src = _dataset(tmp_path / "src", n=3)
    ok("synthesize_dataset", ["--teacher", root / "ckpt" / "low", "--teacher-2", root / "ckpt" / "high",
                              "--data-path", src, "--output", tmp_path / "out", "--steps", "3", "--guidance", "2",
                              "--batch-size", "2", "--seed", "4"], capsys)
    from megatron_anyflow.data.latent_dataset import LatentDataset

    a, b = LatentDataset(src), LatentDataset(str(tmp_path / "out"))
    assert b.condition_channels == 20 and len(b) == 3
    g = torch.Generator().manual_seed(4)
    sampler = TeacherEulerSampler(3, 5.0, guidance_scale=2.0, boundary=B)
    for start in (0, 2):
        rows = range(start, min(start + 2, 3))
        noise = torch.randn((len(rows), *a.latent_shape), generator=g)
        y = torch.stack([a[i][2] for i in rows])
        ref = sampler(experts["high"], noise, torch.stack([a[i][1] for i in rows]), a.negative_text.expand(len(rows), -1, -1),
                      model_2=experts["low"], channel_condition=y)
        for k, i in enumerate(rows):
            assert torch.equal(b[i][0], ref[k]) and torch.equal(b[i][2], a[i][2]), i
    rc, _, err = tool("synthesize_dataset", ["--teacher", root / "ckpt" / "high", "--teacher-2", root / "ckpt" / "low",
                                             "--data-path", _dataset(tmp_path / "plain", condition=False),
                                             "--output", tmp_path / "x", "--steps", "2"], capsys)
    assert rc == 2 and "20-channel image condition" in err and "--i2v-condition" in err, err
    assert not (tmp_path / "x").exists()


def test_stage2_feeds_each_samples_condition_to_every_role(tmp_path):
    """Two-expert stage 2 of the tiny I2V pair (mock data with a condition per sample): every call of the pair
    (rollout, real and fake score, critic) reads one micro-batch's conditions row by row, those of the micro-batch
    whose prompts it reads; every call of one expert (the routed rows, and the co-trained stage-1 loss on its
    range) reads rows of them; both experts' generator and fake-score adapters move."""
    tr = _trainer(["--stage", "stage2", "--model-preset", "tiny-wan2.2-i2v-a14b", "--mock-data", "--mock-latent-shape",
                   "3", "16", "4", "6", "--micro-batch-size", "2", "--global-batch-size", "4", "--lora-rank", "4",
                   "--lora-alpha", "4", "--train-iters", "2", "--seed", "5", "--num-workers", "0"])
    batches, bad, counts = [], [], {"pair": 0, "high": 0, "low": 0}  # this iteration's micro-batches: (text, y)
    inputs = tr.stage._micro_inputs

    def micro_inputs(iteration, j, idx):
        out = inputs(iteration, j, idx)
        if j == 0:
            batches.clear()
        batches.append((out[1], torch.stack([tr.dataset[i][2] for i in idx])))
        return out

    def pair_hook(m, a):
        # a whole micro-batch's conditions, and, for a call with the prompts (not the negative text), its own
        counts["pair"] += 1
        y, text = a[0][:, :, 16:], a[3]
        if not any(torch.equal(y, yb) and (torch.equal(text, tb) or not any(torch.equal(text, t2) for t2, _ in batches))
                   for tb, yb in batches):
            bad.append(("pair", a[0].shape))

    def expert_hook(name):
        def hook(m, a):
            counts[name] += 1
            for row in a[0][:, :, 16:]:
                if not any(torch.equal(row, y) for _, yb in batches for y in yb):
                    bad.append((name, a[0].shape))
        return hook

    tr.stage._micro_inputs = micro_inputs
    hooks = [tr.model.register_forward_pre_hook(pair_hook)]
    hooks += [getattr(tr.model, e).register_forward_pre_hook(expert_hook(e)) for e in ("high", "low")]
    before = {k: v.detach().clone() for k, v in tr.named_trainable(lambda n: "lora_B" in n).items()}
    try:
        m = tr.train()
    finally:
        for h in hooks:
            h.remove()
    assert not bad, bad[:5]
    assert counts["pair"] > 0 and counts["high"] > 0 and counts["low"] > 0, counts
    moved = {k for k, v in tr.named_trainable(lambda n: "lora_B" in n).items() if not torch.equal(before[k], v)}
    for e in ("high", "low"):
        assert any(k.startswith(f"{e}.") and ".generator." in k for k in moved), (e, sorted(moved)[:4])
        assert any(k.startswith(f"{e}.") and ".fake_score." in k for k in moved), (e, sorted(moved)[:4])
    assert all(torch.isfinite(torch.tensor(v)) for v in m.values() if isinstance(v, float))


@pytest.fixture(scope="module")
def stage2_pair(tmp_path_factory):
    """A two-expert I2V stage-2 checkpoint (tiny preset, random bases, one iteration on mock conditioned data; a
    large learning rate, so that one Adam step moves the zero-initialised ``lora_B`` by ~1e-2 and the adapters
    change the outputs visibly: what the export tests compare must depend on them)."""
    out = tmp_path_factory.mktemp("i2v_s2") / "s2"
    _trainer(["--stage", "stage2", "--model-preset", "tiny-wan2.2-i2v-a14b", "--mock-data", "--mock-latent-shape",
              "3", "16", "4", "6", "--micro-batch-size", "1", "--global-batch-size", "1", "--lora-rank", "4",
              "--lora-alpha", "4", "--train-iters", "1", "--seed", "2", "--lr", "1e-2", "--critic-lr", "1e-2",
              "--lr-warmup-iters", "0", "--save", str(out)]).train()
    return out


def test_generate_samples_an_i2v_pair_from_an_image(i2v, stage2_pair, tmp_path, capsys):
    """``generate.py --image`` on a two-expert I2V stage-2 checkpoint = the library: `load_stage2_pair`,
    `encode_i2v_condition` of the same PNG through the same VAE, the flow-map sampler on the boundary grid with
    the CLI's noise (the same calls on the same tensors: 1e-6 absolute leaves room only for a kernel choosing
    another summation order; a missing or wrong condition is off by > 1e-2, test above). Without ``--image``, or
    with clean latent frames, it refuses by name."""
    import numpy as np
    from PIL import Image

    from megatron_anyflow.anyflow import generation as G
    from megatron_anyflow.anyflow.two_expert import load_stage2_pair
    from megatron_anyflow.data.codecs import WanVAECodec

    root, s2 = i2v, stage2_pair
    png = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(0).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)).save(png)
    g = torch.Generator().manual_seed(6)
    from safetensors.torch import save_file

    save_file({"prompt_embeds": torch.randn(1, 7, 384, generator=g)}, str(tmp_path / "emb.safetensors"))
    common = ["--checkpoint", s2, "--prompt-embeds", tmp_path / "emb.safetensors", "--codec", "wan-vae",
              "--vae", root / "vae", "--frames", NUM_FRAMES, "--height", HEIGHT, "--width", WIDTH, "--seed", "3"]
    ok("generate", [*common, "--image", png, "--steps", "1", "3", "--output", tmp_path / "gen",
                    "--save-latents", tmp_path / "gen" / "latents.safetensors", "--no-progress"], capsys)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "gen" / "latents.safetensors"))
    pair = load_stage2_pair(str(s2), adapter="generator")
    codec = WanVAECodec(str(root / "vae"), device="cpu")
    y = C.encode_i2v_condition(codec, G.read_image(str(png), HEIGHT, WIDTH), NUM_FRAMES)
    for n in (1, 3):
        ref = FlowMapEulerSampler(n, 5.0, boundary=B)(pair, saved["noise"], saved["prompt_embeds"], channel_condition=y)
        assert saved[f"steps_{n}"].shape == (1, F_, 16, H_, W_)
        assert float((saved[f"steps_{n}"] - ref).abs().max()) < 1e-6, n
    rc, _, err = tool("generate", [*common, "--steps", "1", "--output", tmp_path / "x"], capsys)
    assert rc == 2 and "20-channel image condition" in err and "pass --image" in err, err[-2000:]
    rc, _, err = tool("generate", [*common, "--image", png, "--condition-r", "zero", "--steps", "1",
                                   "--output", tmp_path / "x"], capsys)
    assert rc == 2 and "--condition-r" in err and "pass --image only" in err, err[-2000:]
    assert not (tmp_path / "x").exists()


def test_pipeline_export_of_an_i2v_pair(i2v, stage2_pair, tmp_path, capsys):
    """``convert_to_hf --pipeline --verify`` exports the I2V stage-2 pair as one ``AnyFlowTwoExpertPipeline`` that
    takes ``image=``; its own check (the loaded pipeline given an image vs this project's sampler given that
    image's condition, N = 1 and 4) passes at fp32 precision, and as a user loads it (``trust_remote_code``, a PIL
    image), it gives the library's latents. One expert alone is refused: its pipeline needs both.

    Tolerance: the same weights and the same operations up to summation order (the diffusers transformer fuses
    q/k/v; the condition's normalisation multiplies by 1 / std where ours divides): a few float32 ulp per
    forward, ~1e-7 relative on the state (measured 8.7e-8 / 8.3e-8); the bound 1e-5 (tighter than the export's
    own fp32 tolerance, 1e-4) leaves room, while a missing mask or another image's condition misses by > 1e-2
    (the teacher-sampler test above)."""
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    from megatron_anyflow.anyflow import generation as G
    from megatron_anyflow.anyflow.two_expert import load_stage2_pair
    from megatron_anyflow.data.codecs import WanVAECodec
    from megatron_anyflow.testing.tiny_components import tiny_umt5

    root = i2v
    tiny_umt5(str(tmp_path / "te"))
    comp = ["--vae", root / "vae", "--text-encoder", tmp_path / "te" / "text_encoder",
            "--tokenizer", tmp_path / "te" / "tokenizer"]
    out = ok("convert_to_hf", ["--input", stage2_pair, "--output", tmp_path / "exp", "--merge-lora", "generator",
                               "--pipeline", *comp, "--verify"], capsys)
    line = next(ln for ln in out.splitlines() if "final latents" in ln)
    errs = [float(v.split()[1].rstrip(",")) for v in line.split("i2v-a14b N=")[1:]]  # "1 8.7e-08, ..."
    assert len(errs) == 2 and max(errs) < 1e-5, line
    pipe = DiffusionPipeline.from_pretrained(str(tmp_path / "exp"), trust_remote_code=True, text_encoder=None,
                                             tokenizer=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    png = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(1).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)).save(png)
    g = torch.Generator().manual_seed(3)
    text = torch.randn(1, 7, 384, generator=g)
    with torch.no_grad():
        got = pipe(image=Image.open(png), prompt_embeds=text, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                   num_frames=NUM_FRAMES, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(4)).frames.permute(0, 2, 1, 3, 4)
    noise = torch.randn(1, 16, F_, H_, W_, generator=torch.Generator().manual_seed(4)).permute(0, 2, 1, 3, 4)
    y = C.encode_i2v_condition(WanVAECodec(str(root / "vae"), device="cpu"), G.read_image(str(png), HEIGHT, WIDTH),
                               NUM_FRAMES)
    ref = FlowMapEulerSampler(2, 5.0, boundary=B)(load_stage2_pair(str(stage2_pair)), noise, text, channel_condition=y)
    assert rel(got, ref) < 1e-5, rel(got, ref)
    with pytest.raises(ValueError, match="pass image="):
        pipe(prompt_embeds=text, num_inference_steps=1, height=HEIGHT, width=WIDTH, num_frames=NUM_FRAMES,
             output_type="latent")
    _convert(root, capsys)
    rc, _, err = tool("convert_to_hf", ["--input", root / "ckpt" / "high", "--output", tmp_path / "one",
                                        "--pipeline", *comp], capsys)
    assert rc == 2 and "one expert of Wan2.2 I2V-A14B" in err and "--expert-2" in err, err[-2000:]
    assert not (tmp_path / "one").exists()


def test_evaluate_an_i2v_pair_against_its_teacher(i2v, stage2_pair, tmp_path, capsys):
    """``evaluate_anyflow --teacher-2`` on a conditioned dataset, in fp32 and with ``--bf16``: every sample (the
    teacher's reference, the student at each N) is drawn given its clip's condition; the student's rows equal an
    independent computation (the sampler's own two-expert teacher path with ``model_2``, and the student pair on
    the boundary grid, on models loaded in the same dtype; the same samples to float32 rounding: 1e-4 relative on
    an MSE). A dataset without conditions is refused by name."""
    from megatron_anyflow.anyflow.two_expert import load_stage2_pair
    from megatron_anyflow.checkpoint.model_io import load_for_inference
    from megatron_anyflow.data.latent_dataset import LatentDataset
    from test_pipeline_export import load_tool

    root = i2v
    _convert(root, capsys)
    data = _dataset(tmp_path / "data", n=2)
    tool_mod = load_tool("evaluate_anyflow")
    ds = LatentDataset(data)
    idx, text, neg, noise, _ = tool_mod.evaluation_inputs(ds, 2, 0, torch.device("cpu"))
    y = torch.stack([ds[i][2] for i in idx])
    for extra in ([], ["--bf16"]):
        out = tmp_path / f"eval{len(extra)}"
        argv = ["--teacher", root / "ckpt" / "high", "--teacher-2", root / "ckpt" / "low", "--student", stage2_pair,
                "--data-path", data, "--output", out, "--steps", 1, 2, "--reference-steps", 4, "--num-samples", 2,
                "--guidance", 2, *extra]
        assert load_tool("evaluate_anyflow").main([str(a) for a in argv]) == 0
        res = json.load(open(out / "scaling.json"))
        dtype = dict(bf16=True) if extra else {}
        high, low = (load_for_inference(str(root / "ckpt" / e), **dtype) for e in ("high", "low"))
        student = load_stage2_pair(str(stage2_pair), **dtype)
        with torch.no_grad():
            ref = TeacherEulerSampler(4, guidance_scale=2, boundary=B)(high, noise, text, neg.expand(2, -1, -1),
                                                                       model_2=low, channel_condition=y)
            for n in (1, 2):
                x0 = FlowMapEulerSampler(n, boundary=B)(student, noise, text, channel_condition=y)
                mse = float((x0.float() - ref.float()).pow(2).mean())
                got = res["metrics"]["student"][str(n)]["latent_mse"]
                assert got == pytest.approx(mse, rel=1e-4), (extra, n, got, mse)
    argv[argv.index(data)] = _dataset(tmp_path / "plain", condition=False, n=2)
    with pytest.raises(ValueError, match="all three must agree"):
        load_tool("evaluate_anyflow").main([str(a) for a in argv])

def test_dry_run_plans_an_i2v_expert_with_its_condition_channels():
    """The launch checks (``--dry-run``, what examples/pretrain_anyflow_wan22_a14b.sh PRESET=wan2.2-i2v-a14b
    DRY_RUN=1 runs per stage) count the 16 latent channels against in_channels 36 less the 20 condition channels,
    for one expert's stage 1 and the pair's stage 2; 36-channel latents fail the check."""
    from megatron_anyflow.training import dry_run as D
    from megatron_anyflow.training.arguments import parse_args

    base = ["--model-preset", "wan2.2-i2v-a14b", "--mock-data", "--train-iters", "1", "--dry-run", "--world-size", "8",
            "--tensor-model-parallel-size", "4", "--context-parallel-size", "2", "--sequence-parallel",
            "--mock-text-len", "512"]
    for stage in (["--stage", "stage1", "--expert", "high"], ["--stage", "stage2"]):
        lines = []
        assert D.dry_run(parse_args([*stage, *base, "--mock-latent-shape", "21", "16", "60", "104"]),
                         log=lines.append) == 0, lines
        assert any("[ok] latent channels 16 == model in_channels 36 - 20 image-condition channels" in ln
                   for ln in lines), lines
    lines = []
    assert D.dry_run(parse_args(["--stage", "stage1", "--expert", "low", *base, "--mock-latent-shape", "21", "36",
                                 "60", "104"]), log=lines.append) == 1
    assert any("[FAIL] latent channels 36" in ln for ln in lines), lines


def test_generate_refuses_one_expert_alone(i2v, tmp_path, capsys):
    """One expert of a pair (here the I2V high-noise expert, as any A14B expert) knows only its time range:
    ``generate.py`` refuses it by name and range instead of sampling the whole range with it."""
    root = i2v
    _convert(root, capsys)
    for role, span in (("high", "[0.9, 1]"), ("low", "[0, 0.9]")):
        rc, _, err = tool("generate", ["--checkpoint", root / "ckpt" / role, "--prompt", "a cat", "--codec", "none",
                                       "--latent-shape", F_, 16, H_, W_, "--output", tmp_path / "gen"], capsys)
        assert rc == 2 and f"the {role}-noise expert" in err and span in err and "--expert-2" in err, err[-2000:]
    assert not (tmp_path / "gen").exists()


def test_lora_only_of_a_pair_loads_into_both_experts(i2v, stage2_pair, tmp_path, capsys):
    """``convert_to_hf --lora-only`` on a two-expert stage-2 run writes one LoRA per expert, each verified on its
    own expert (printed); a user loads them into the base pair's pipeline (``load_lora_weights``, the second with
    ``load_into_transformer_2=True``) and gets the merged export's latents. Tolerance: the same weights, W + B A
    formed in another order than the merge (a few float32 ulp per weight, ~1e-7 on the output); 1e-5 relative."""
    from diffusers import DiffusionPipeline

    from megatron_anyflow.testing.tiny_components import tiny_umt5

    root = i2v
    tiny_umt5(str(tmp_path / "te"))
    comp = ["--vae", root / "vae", "--text-encoder", tmp_path / "te" / "text_encoder",
            "--tokenizer", tmp_path / "te" / "tokenizer"]
    out = ok("convert_to_hf", ["--input", stage2_pair, "--output", tmp_path / "lora", "--lora-only"], capsys)
    for name in ("high_noise_lora.safetensors", "low_noise_lora.safetensors"):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"verify: {name}"))
        assert float(line.split("relative error ")[1].split()[0]) < 1e-5, line
        assert (tmp_path / "lora" / name).is_file()
    ok("convert_to_hf", ["--input", stage2_pair, "--output", tmp_path / "base", "--pipeline", *comp, "--no-verify"],
       capsys)
    ok("convert_to_hf", ["--input", stage2_pair, "--output", tmp_path / "merged", "--merge-lora", "generator",
                         "--pipeline", *comp, "--no-verify"], capsys)
    kw = dict(trust_remote_code=True, text_encoder=None, tokenizer=None, torch_dtype=torch.float32)
    base, merged = (DiffusionPipeline.from_pretrained(str(tmp_path / d), **kw) for d in ("base", "merged"))
    base.load_lora_weights(str(tmp_path / "lora"), weight_name="high_noise_lora.safetensors")
    base.load_lora_weights(str(tmp_path / "lora"), weight_name="low_noise_lora.safetensors",
                           load_into_transformer_2=True)
    text = torch.randn(1, 7, 384, generator=torch.Generator().manual_seed(9))
    image = _image(3)
    outs = []
    for pipe in (base, merged):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            outs.append(pipe(image=image, prompt_embeds=text, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                             num_frames=NUM_FRAMES, guidance_scale=1.0, output_type="latent",
                             generator=torch.Generator().manual_seed(1)).frames)
    assert rel(outs[0], outs[1]) < 1e-5, rel(outs[0], outs[1])
    # the LoRA matters: the base pair alone is far from the merged one (measured 2.5e-3; bound 50x the equality's)
    plain = DiffusionPipeline.from_pretrained(str(tmp_path / "base"), **kw)
    plain.set_progress_bar_config(disable=True)
    with torch.no_grad():
        alone = plain(image=image, prompt_embeds=text, num_inference_steps=2, height=HEIGHT, width=WIDTH,
                      num_frames=NUM_FRAMES, guidance_scale=1.0, output_type="latent",
                      generator=torch.Generator().manual_seed(1)).frames
    assert rel(alone, outs[1]) > 5e-4
