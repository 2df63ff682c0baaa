"""A checkpoint missing an adapter tensor is refused by name, never completed with a fresh initialisation.

Before this check, `_load_adapter_tensors` requested only the tensors the checkpoint had: a LoRA ``B``
missing from it stayed at its fresh value (zero) and `convert_to_hf --merge-lora`, `generate` and
`--init-adapters-from` ran to exit 0 on a model that differed from the trained one (4.4e-3 in a probe).
The checkpoint's tensor listing is narrowed here (as if one tensor had been lost from it) so the test does
not depend on the on-disk format.
"""

import pytest
import torch

from test_pipeline_export import tiny_stage1_checkpoint

from megatron_anyflow.models import lora as L
from megatron_anyflow.checkpoint import store as ckpt
from megatron_anyflow.checkpoint import model_io


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_stage1_checkpoint(str(tmp_path_factory.mktemp("strict") / "ckpt"))


def _drop(monkeypatch, predicate):
    real = ckpt.tensor_keys
    dropped = []

    def narrowed(d):
        keys = real(d)
        kept = [k for k in keys if not predicate(k)]
        dropped[:] = sorted(set(keys) - set(kept))
        return type(keys)(kept) if not isinstance(keys, (set, frozenset)) else set(kept)

    monkeypatch.setattr(ckpt, "tensor_keys", narrowed)
    return dropped


def test_complete_checkpoint_loads_and_moved_adapter_is_used(stage1):
    merged = model_io.load_for_inference(stage1, adapter="generator")
    base = model_io.load_for_inference(stage1)
    diffs = [float((a - b).abs().max()) for a, b in zip(merged.parameters(), base.parameters())]
    assert max(diffs) > 1e-4  # the trained adapter changes the merged weights


@pytest.mark.parametrize("ema", [False, True])
def test_missing_lora_tensor_is_named(stage1, monkeypatch, ema):
    prefix = "ema.generator." if ema else ""
    victim = {}

    def pred(k):
        if k.startswith(prefix) and ".adapters.generator." in k and k.endswith("lora_B") and not victim:
            if not ema and k.startswith(("ema.", "optimizer.")):
                return False
            victim["key"] = k
        return k == victim.get("key")

    _drop(monkeypatch, pred)
    with pytest.raises(ckpt.CheckpointError) as e:
        model_io.load_for_inference(stage1, adapter="generator", ema=ema)
    assert victim["key"] in str(e.value) and stage1.rstrip("/").split("/")[-1] in str(e.value)
    assert "never replaced by a fresh initialisation" in str(e.value)


def test_missing_tensor_refused_by_load_adapters(stage1, monkeypatch):
    """The path of stage 2's --init-adapters-from: LoRA model, one adapter loaded from a checkpoint."""
    d = ckpt.resolve_checkpoint_dir(stage1)
    meta = ckpt.read_meta(d)
    model = model_io.load_for_inference(stage1)
    lora = meta["lora"]
    L.apply_lora(model, ["generator"], lora["rank"], lora["alpha"], targets=lora["targets"])
    _drop(monkeypatch, lambda k: not k.startswith("ema.") and ".adapters.generator." in k and "lora_A" in k)
    with pytest.raises(ckpt.CheckpointError, match=r"lacks \d+ tensor"):
        model_io.load_adapters(model, stage1, ["generator"])
