"""eval, generate and export find the sidecar beside the model as tune does (DIR/sidecar.gguf
beside DIR/model.gguf), attach it first, and say which adapters they attached: under
`--split zero` the model alone has its most sensitive weights at zero."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_zo.adapter import SparseAdapter
from edge_zo.cli import main as cli
from edge_zo.constants import Sparse

from .conftest import FACTS, write_jsonl

RUNTIME = ["--threads", "1", "--max-tokens", "64"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_q4):
    """DIR/model.gguf with DIR/sidecar.gguf beside it (values that move the loss), and tuned deltas elsewhere."""
    root = tmp_path_factory.mktemp("converted")
    model = root / "model.gguf"
    shutil.copyfile(tiny_q4.path, model)
    rng = np.random.default_rng(0)
    names = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.ffn_up.weight"]
    sidecar = {}
    for name in names:
        idx = np.unique(rng.integers(0, 64 * 64, 200))
        sidecar[name] = (idx, rng.normal(0, 0.5, len(idx)).astype(np.float32))
    SparseAdapter.from_weights("llama", sidecar, {Sparse.ROLE: "sidecar"}).save(root / "sidecar.gguf")
    deltas = {names[0]: (sidecar[names[0]][0][:20], np.full(20, 0.25, np.float32))}
    SparseAdapter.from_weights("llama", deltas, {Sparse.ROLE: "deltas"}).save(root.parent / "deltas.gguf")
    return {"model": model, "sidecar": root / "sidecar.gguf", "deltas": root.parent / "deltas.gguf",
            "data": write_jsonl(root.parent / "facts.jsonl", FACTS)}


def _eval(capsys, c, *adapters: str) -> tuple[float, str]:
    assert cli(["eval", str(c["model"]), str(c["data"]), "--json", *adapters, *RUNTIME]) == 0
    out = capsys.readouterr()
    return json.loads(out.out)["loss"], out.err


def test_eval_attaches_the_sidecar_beside_the_model(converted, capsys):
    c = converted
    found, said = _eval(capsys, c, "--adapter", str(c["deltas"]))
    assert f"{c['sidecar']} (found beside the model" in said and str(c["deltas"]) in said
    given, said = _eval(capsys, c, "--adapter", str(c["sidecar"]), "--adapter", str(c["deltas"]))
    assert found == pytest.approx(given, abs=1e-6) and "found beside" not in said   # not attached twice
    without, said = _eval(capsys, c, "--adapter", str(c["deltas"]), "--no-sidecar")
    assert abs(without - found) > 1e-3 and str(c["sidecar"]) not in said
    alone, said = _eval(capsys, c, "--no-sidecar")
    assert "adapters: none" in said and abs(alone - without) > 1e-4


def test_generate_names_the_adapters_it_attached(converted, capsys):
    c = converted
    assert cli(["generate", str(c["model"]), "-p", "My dog's name is", "-n", "2", *RUNTIME]) == 0
    assert f"edge-zo generate: adapters: {c['sidecar']} (found beside the model" in capsys.readouterr().err


def test_export_sums_the_sidecar_in_and_its_adapter_is_not_given_it_again(converted, tmp_path, capsys):
    c = converted
    out = tmp_path / "export"
    assert cli(["export", str(c["model"]), "--adapter", str(c["deltas"]), "-o", str(out), "--no-merge",
                "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapters"] == [str(c["sidecar"]), str(c["deltas"])]
    summed = SparseAdapter.load(out / "adapter.gguf")
    assert summed.n_params == SparseAdapter.load(c["sidecar"]).n_params   # the deltas sit on sidecar coordinates
    reference, _ = _eval(capsys, c, "--adapter", str(c["deltas"]))
    exported, said = _eval(capsys, c, "--adapter", str(out / "adapter.gguf"))
    assert "found beside" not in said and exported == pytest.approx(reference, abs=2e-3)   # F16 storage of sums
