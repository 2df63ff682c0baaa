"""The op / byte counter behind tools/count_layer_ops.py counts what it says (exact, hand-computed)."""

import importlib.util
import json
import os

import torch
from conftest import REPO

from megatron_anyflow.measure.op_counter import OpCounter, saved_bytes


def test_counts_ops_and_bytes_and_skips_views():
    a, b, c = torch.randn(4, 8), torch.randn(8, 3), torch.randn(4, 3)
    with OpCounter() as cnt:
        y = (a @ b).t().contiguous().t() + c  # mm, (view), clone, (view), add
    assert dict(cnt.ops) == {"aten.mm": 1, "aten.clone": 1, "aten.add": 1}
    f = 4  # float32
    assert cnt.bytes["aten.mm"] == (32 + 24 + 12) * f
    assert cnt.bytes["aten.clone"] == (12 + 12) * f and cnt.bytes["aten.add"] == (12 + 12 + 12) * f
    assert cnt.views == 2 and cnt.total_ops == 3 and y.shape == (4, 3)


def test_saved_bytes_are_unique_storages_packed_for_backward():
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(5, 8)
    # mm saves x (input, excluded) and w (excluded); sin saves its input h (5 x 8 fp32); mul saves both
    # of its inputs (h and sin(h)): unique storages h and sin(h) -> 2 x 160 bytes.
    got = saved_bytes(lambda: (lambda h: h * h.sin())(x @ w), exclude=[x, w])
    assert got == {"total": 320, "float32": 320}


def test_cli_writes_a_table(tmp_path):
    spec = importlib.util.spec_from_file_location("count_layer_ops", os.path.join(REPO, "tools", "count_layer_ops.py"))
    count_layer_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(count_layer_ops)

    rows = count_layer_ops.main(["--preset", "tiny", "--grid", "1", "2", "4", "--text-len", "3", "--out-dir",
                                 str(tmp_path), "--label", "t", "--cases", "bf16 LoRA, no recompute"])
    assert [r["config"] for r in rows] == ["bf16 LoRA, no recompute"] and rows[0]["tokens"] == 8
    data = json.loads(next(tmp_path.glob("layer_ops_*_cpu_t.json")).read_text())
    assert data["rows"][0]["ops fwd"] > 0 and (tmp_path / next(tmp_path.glob("*.md")).name).exists()
