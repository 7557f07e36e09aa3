"""The runtime end to end on a real pretrained model: SmolLM2-135M-Instruct (Q4_1)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_zo.adapter import SparseAdapter
from edge_zo.cli import main as cli
from edge_zo.dataset import Tokenizer, load_jsonl
from edge_zo.runtime import Runtime, RuntimeOptions

from .conftest import FACTS, write_jsonl

pytestmark = pytest.mark.slow
OPTS = RuntimeOptions(batch_size=8, max_tokens=128)


def _random_adapter(rt: Runtime, scale: float, seed: int = 0) -> SparseAdapter:
    rng = np.random.default_rng(seed)
    weights = {}
    for name in rt.info.block_matmul_weights():
        n = rt.info.tensors[name].n_elements
        idx = np.unique(rng.integers(0, n, n // 1000))
        weights[name] = (idx, (rng.standard_normal(len(idx)) * scale).astype(np.float32))
    return SparseAdapter.from_weights(rt.info.architecture, weights)


def test_eval_cli_json(smollm2, facts_jsonl, capsys):
    assert cli(["eval", str(smollm2), str(facts_jsonl), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == len(FACTS)
    assert 1.0 < report["loss"] < 8.0  # a real model: far below ln(49152) = 10.8
    assert report["tokens"] > 40


def test_adapter_file_round_trip_and_batching(smollm2, tmp_path):
    with Runtime(smollm2, OPTS) as rt:
        ex = Tokenizer(rt.native, max_tokens=128).examples(load_jsonl(write_jsonl(tmp_path / "f.jsonl", FACTS)))
        base = rt.loss(ex)
        adapter = _random_adapter(rt, scale=0.05)
        assert adapter.n_params > 100_000  # 0.1% of every block matmul
        adapter.save(tmp_path / "deltas.gguf")
        loaded = SparseAdapter.load(tmp_path / "deltas.gguf")
        # FP16 on disk: compare against the same values rounded to FP16.
        np.testing.assert_array_equal(loaded.values, adapter.values.astype(np.float16).astype(np.float32))
        att = rt.attach(loaded)
        tuned = rt.loss(ex)
        one_by_one = np.array([rt.loss([e]).nll[0] for e in ex])
        rt.detach(att)
        zero = rt.attach(loaded.with_values(np.zeros_like(loaded.values)))
        assert np.array_equal(rt.loss(ex).nll, base.nll)
        rt.detach(zero)
    assert abs(tuned.mean - base.mean) > 0.01
    assert np.array_equal(tuned.nll, one_by_one)


def test_chat_rows_score_only_assistant_turns(smollm2, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "What is my dog's name?"},
                          {"role": "assistant", "content": "Your dog is called Rex."}]}]
    with Runtime(smollm2, OPTS) as rt:
        ex = Tokenizer(rt.native, max_tokens=128).examples(load_jsonl(write_jsonl(tmp_path / "c.jsonl", rows)))[0]
        scored = rt.native.detokenize(ex.tokens[ex.targets == 1])
        unscored = rt.native.detokenize(ex.tokens[ex.targets == 0])
    assert "Your dog is called Rex." in scored
    assert "What is my dog's name?" in unscored and "Rex" not in unscored


def test_generate_with_and_without_adapter(smollm2, tmp_path, capsys):
    assert cli(["generate", str(smollm2), "-p", "The capital of France is", "-n", "8"]) == 0
    plain = capsys.readouterr().out
    assert "Paris" in plain
    with Runtime(smollm2, OPTS) as rt:
        _random_adapter(rt, scale=0.5).save(tmp_path / "noisy.gguf")
    assert cli(["generate", str(smollm2), "-p", "The capital of France is", "-n", "8",
                "--adapter", str(tmp_path / "noisy.gguf")]) == 0
    assert capsys.readouterr().out != plain


def test_tune_learns_personal_facts_with_default_settings(smollm2, tmp_path, capsys):
    """The product's main job on a real model: the facts are news to SmolLM2, and a short
    run with the default ε, optimizer and learning rate must teach it some of them."""
    from edge_zo import run_dir

    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    out = tmp_path / "run"
    assert cli(["tune", str(smollm2), str(data), "--valid", str(data), "--mask-from-data", "-o", str(out),
                "--steps", "40", "--batch-size", "6", "--max-tokens", "32", "--eval-every", "40",
                "--quiet"]) == 0
    valid = [r["valid_loss"] for r in run_dir.read_metrics(out) if "valid_loss" in r]
    assert valid[-1] < valid[0] - 0.1, valid  # measured: 3.862 -> 3.669 (ε 3e-3), 3.661 (ε 1e-2)
    # --eps auto (the default) measured this model's window: clear of the noise, short of the bend.
    probe = json.loads((out / "run.json").read_text())["eps_search"]
    assert 1e-3 <= probe["eps"] <= 2e-2 and probe["agreement"] >= 0.7, probe   # measured: 1.56e-2, 0.87
    # The deltas file alone (beside the zero-valued mask) carries it into eval.
    capsys.readouterr()
    assert cli(["eval", str(smollm2), str(data), "--adapter", str(out / "deltas.gguf"), "--json",
                "--max-tokens", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] < valid[0] - 0.1


def test_quantize_to_a_k_quant(smollm2, facts_jsonl, tmp_path):
    """llama.cpp's quantizer writes the K-quants gguf-py cannot; on SmolLM2 most matmuls fall back to
    Q5_0, because a K-quant row must be a multiple of 256 values and n_embd is 576."""
    from edge_zo import _native
    from edge_zo.model_info import ModelInfo

    out = tmp_path / "q4_k_m.gguf"
    _native.quantize(smollm2, out, "Q4_K_M")
    info = ModelInfo.open(out)
    types = {info.tensors[n].type_name for n in info.block_matmul_weights()}
    assert "Q4_K" in types and "Q5_0" in types, types
    losses = []
    for path in (smollm2, out):
        with Runtime(str(path), OPTS) as rt:
            losses.append(rt.loss(Tokenizer(rt.native, max_tokens=128).examples(load_jsonl(facts_jsonl))).mean)
    assert abs(losses[1] - losses[0]) < 0.3, losses  # re-quantized Q4_1 -> Q4_K_M: close, not equal
