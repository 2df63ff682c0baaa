"""Tiny random pipeline components, built offline: the Wan2.1 VAE, the Wan2.2 VAE (TI2V-5B's family) and a
umT5 encoder with its tokenizer, at the tiny presets' sizes. The tests' fixtures and the tiny end-to-end
runs (examples/pretrain_anyflow_wan22_5b.sh --tiny) use them where the released components would be
gigabytes; their weights are random, so what they decode is noise, but every shape, config field and
normalisation is the real one.

    python -m megatron_anyflow.testing.tiny_components --wan22-vae DIR/vae --umt5 DIR   # DIR/text_encoder, tokenizer

Not imported by runtime code.
"""
from __future__ import annotations

import argparse
import os

import torch

#: What the tiny umT5's tokenizer is trained on (any prompt tokenizes; unknown pieces map to <unk>).
CORPUS = ["a rabbit eats grass in a sunny garden", "a man talks to the camera in a moving car",
          "a cyclist rides along a country road", "waves break on a rocky shore at sunset",
          "a red panda eating bamboo in a forest, cinematic lighting"]


def tiny_umt5(path: str, d_model: int = 384) -> None:
    """Write ``path/text_encoder`` (a random 1-layer ``UMT5EncoderModel``, width ``d_model`` = the tiny
    presets' text_dim) and ``path/tokenizer`` (a unigram tokenizer trained on `CORPUS`, ``</s>`` appended)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tk = Tokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(CORPUS * 8, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                                               unk_token="<unk>"))
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tk.token_to_id("</s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(os.path.join(path, "tokenizer"))
    model = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=d_model, d_kv=16, d_ff=64, num_layers=1,
                                        num_heads=4, relative_attention_num_buckets=8))
    model.save_pretrained(os.path.join(path, "text_encoder"))


def tiny_vae(path: str):
    """Write a tiny random Wan2.1 VAE (diffusers ``AutoencoderKLWan``: z_dim 16, 8x space, 4x time) with
    random latents_mean / latents_std to ``path``; returns it (eval mode)."""
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], latents_mean=torch.randn(16, generator=g).tolist(),
                           latents_std=(torch.rand(16, generator=g) + 0.5).tolist())
    vae.save_pretrained(path)
    return vae.eval()


def tiny_wan22_vae(path: str):
    """Write a tiny random Wan2.2 VAE (TI2V-5B's family: z_dim 48, residual blocks, 2x2 patchify, 16x space,
    4x time; decoder wider than encoder as in the release), with random latents_mean / latents_std, to
    ``path``; returns it (eval mode)."""
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(2)
    vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=12, z_dim=48, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           attn_scales=[], temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                           out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                           latents_mean=torch.randn(48, generator=g).tolist(),
                           latents_std=(torch.rand(48, generator=g) + 0.5).tolist())
    vae.save_pretrained(path)
    return vae.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wan-vae", default=None, metavar="DIR", help="write a tiny Wan2.1 VAE here")
    p.add_argument("--wan22-vae", default=None, metavar="DIR", help="write a tiny Wan2.2 VAE here")
    p.add_argument("--umt5", default=None, metavar="DIR", help="write DIR/text_encoder and DIR/tokenizer")
    args = p.parse_args(argv)
    if not (args.wan_vae or args.wan22_vae or args.umt5):
        p.error("nothing to write: pass --wan-vae, --wan22-vae and / or --umt5")
    if args.wan_vae:
        tiny_vae(args.wan_vae)
    if args.wan22_vae:
        tiny_wan22_vae(args.wan22_vae)
    if args.umt5:
        tiny_umt5(args.umt5)
    return 0


if __name__ == "__main__":  # pragma: no cover - the CLI of the docstring
    raise SystemExit(main())
