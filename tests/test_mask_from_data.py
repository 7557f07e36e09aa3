"""`edge-zo tune --mask-from-data`: a Fisher mask on the training data, when no sidecar exists."""
from __future__ import annotations

import numpy as np

from edge_zo import run_dir
from edge_zo.adapter import SparseAdapter
from edge_zo.cli import main as cli
from edge_zo.constants import Sparse

from .conftest import write_jsonl

TOY = [{"prompt": f"Note {i}: my dog is called", "completion": " Rex"} for i in range(16)]


def test_mask_from_data_builds_a_fisher_sidecar_and_learns(tiny_q4, tmp_path, capsys):
    data = write_jsonl(tmp_path / "toy.jsonl", TOY)
    out = tmp_path / "run"
    assert cli(["tune", str(tiny_q4.path), str(data), "--mask-from-data", "--density", "0.01", "-o", str(out),
                "--steps", "20", "--optimizer", "sgd", "--lr", "1e-2", "--quiet", "--eval-every", "20"]) == 0
    assert "--mask-from-data" in capsys.readouterr().err
    mask = SparseAdapter.load(out / "mask.gguf")
    assert mask.metadata[Sparse.MASK_METHOD] == "fisher" and not np.any(mask.values)
    n_targets = sum(int(np.prod(s)) for s in [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]) * 2
    assert mask.n_params == round(0.01 * n_targets)
    valid = [r["valid_loss"] for r in run_dir.read_metrics(out) if "valid_loss" in r]
    assert valid[-1] < valid[0] - 0.5
