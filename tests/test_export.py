"""edge-zo export: adapters summed into one file, and merged into a GGUF that
llama.cpp runs with no adapter. On an F32 model the merged file must act exactly
like base + adapters; on 4-bit models re-quantizing the edited blocks costs a
little, which the export measures and reports."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_zo.adapter import SparseAdapter
from edge_zo.commands.export import main as export
from edge_zo.constants import Sparse
from edge_zo.errors import IncompatibleAdapterError, InvalidInputError, ModelFileError
from edge_zo.gguf_io import Tensor, TensorFile
from edge_zo.merge import merge_into_gguf, merge_tensor, plan_merge, sum_adapters
from edge_zo.model_info import ModelInfo, TensorInfo
from edge_zo.runtime import Runtime, RuntimeOptions

from .conftest import FACTS, write_jsonl

# One thread: llama.cpp's spinning thread pool crawls when other jobs share the two cores.
RUNTIME_ARGS = ["--kv-f32", "--batch-size", "8", "--max-tokens", "64", "--threads", "1"]
Q = gguf.GGMLQuantizationType


def _tensors(path: Path) -> dict[str, Tensor]:
    return TensorFile(path).tensors   # memory-mapped views; the map closes when they are dropped


def _values(t: Tensor) -> np.ndarray:
    return t.dequantize().reshape(-1)


def _random_weights(rng, shapes: dict[str, tuple], n: int, scale: float, rows=None) -> dict:
    out = {}
    for name, shape in shapes.items():
        r = rng.choice(rows, n) if rows is not None and name in ("token_embd.weight", "output.weight") \
            else rng.integers(0, shape[0], n)
        idx = np.unique(r.astype(np.int64) * shape[1] + rng.integers(0, shape[1], n))
        # Multiples of 1/64 are exact in F16, so sums of them are exact too.
        out[name] = (idx, np.round(rng.standard_normal(len(idx)) * scale * 64).astype(np.float32) / 64)
    return out


def _used_tokens(model: Path) -> np.ndarray:
    from edge_zo.dataset import Tokenizer, load_jsonl

    with Runtime(model, RuntimeOptions(batch_size=1, max_tokens=64)) as rt:
        data = load_jsonl(write_jsonl(model.parent / "facts_for_rows.jsonl", FACTS))
        return np.unique(np.concatenate([e.tokens for e in Tokenizer(rt.native, max_tokens=64).examples(data)]))


def _report(out: Path) -> dict:
    return json.loads((out / "export.json").read_text())


# ---- summing ----

def test_sum_is_union_with_values_added_where_coordinates_coincide():
    a = SparseAdapter.from_weights("llama", {"w1": ([1, 5, 9], [1.0, 2.0, 3.0]), "w2": ([0], [0.5])},
                                   {Sparse.ROLE: "sidecar", Sparse.SPLIT: "zero"})
    b = SparseAdapter.from_weights("llama", {"w1": ([5, 7], [10.0, 20.0]), "w3": ([4], [-1.0])},
                                   {Sparse.ROLE: "deltas", "adapter.sparse.spsa.steps": 100})
    s = sum_adapters([a, b])
    got = {n: (s.indices[i].tolist(), s.weight_values(i).tolist()) for i, n in enumerate(s.names)}
    assert got == {"w1": ([1, 5, 7, 9], [1.0, 12.0, 20.0, 3.0]), "w2": ([0], [0.5]), "w3": ([4], [-1.0])}
    assert s.metadata == {Sparse.ROLE: "personalized", Sparse.SPLIT: "zero", "adapter.sparse.spsa.steps": 100}
    assert a.metadata[Sparse.ROLE] == "sidecar"  # inputs untouched


def test_sum_refuses_adapters_of_different_models():
    w = {"w": ([1], [1.0])}
    with pytest.raises(IncompatibleAdapterError, match="different architectures.*'gemma3'"):
        sum_adapters([SparseAdapter.from_weights("llama", w), SparseAdapter.from_weights("gemma3", w)])
    a = SparseAdapter.from_weights("llama", w, {Sparse.BASE_MODEL_SHA256: "a" * 64})
    b = SparseAdapter.from_weights("llama", w, {Sparse.BASE_MODEL_SHA256: "b" * 64})
    with pytest.raises(IncompatibleAdapterError, match="different base models"):
        sum_adapters([a, b], ["side.gguf", "deltas.gguf"])


# ---- one tensor ----

@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_1", "Q8_0", "F16", "BF16", "F32"])
def test_only_edited_blocks_are_requantized(type_name):
    rng = np.random.default_rng(1)
    qtype = Q[type_name]
    base = rng.standard_normal((8, 64)).astype(np.float32) * 0.02
    raw = np.ascontiguousarray(gguf.quantize(base, qtype)).view(np.uint8)
    idx, val = np.array([3, 40, 70, 300]), np.array([0.1, -0.2, 0.0, 0.05], np.float32)  # 70 is a zero delta
    merged, s = merge_tensor(raw, type_name, type_name, idx, val)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    expect = gguf.dequantize(raw, qtype).reshape(-1).copy()  # F32 "dequantizes" to a view
    np.add.at(expect, idx, val)
    changed_blocks = np.unique(idx[val != 0] // block)
    before, after = raw.reshape(-1, size), merged.reshape(-1, size)
    untouched = np.setdiff1d(np.arange(len(before)), changed_blocks)
    assert np.array_equal(before[untouched], after[untouched])
    # An edited block is what the quantizer makes of base + deltas, block by block.
    want = np.ascontiguousarray(gguf.quantize(expect.reshape(-1, block)[changed_blocks], qtype)).view(np.uint8)
    assert np.array_equal(after[changed_blocks], want.reshape(len(changed_blocks), size))
    assert (s.entries, s.blocks_changed, s.blocks) == (3, len(changed_blocks), len(before))
    change = gguf.dequantize(merged, qtype).reshape(-1) - gguf.dequantize(raw, qtype).reshape(-1)
    assert s.miss_norm == pytest.approx(np.linalg.norm(change[idx] - val), rel=1e-4, abs=1e-7)
    change[idx] = 0
    assert s.collateral_norm == pytest.approx(np.linalg.norm(change), rel=1e-4, abs=1e-7)
    assert s.delta_norm == pytest.approx(np.linalg.norm(val), rel=1e-6)
    if type_name == "F32":
        assert s.miss_norm == s.collateral_norm == 0.0
    zero, z = merge_tensor(raw, type_name, type_name, idx, np.zeros(4, np.float32))
    assert np.array_equal(zero, raw.reshape(-1)) and z.blocks_changed == 0


def _q4_k_bytes(rng, n_blocks: int) -> np.ndarray:
    """Random but sane Q4_K super-blocks (d, dmin, 12 scale bytes, 128 nibble bytes)."""
    raw = rng.integers(0, 256, (n_blocks, 144), dtype=np.uint8)
    raw[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    raw[:, 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    return raw


def test_k_quant_weight_becomes_q8_0():
    rng = np.random.default_rng(2)
    raw = _q4_k_bytes(rng, 4)                       # 4 x 256 values
    idx, val = np.array([0, 511, 1000]), np.array([0.3, -0.1, 0.02], np.float32)
    merged, s = merge_tensor(raw, "Q4_K", "Q8_0", idx, val)
    expect = gguf.dequantize(raw, Q.Q4_K).reshape(-1)
    np.add.at(expect, idx, val)
    assert merged.size == 1024 // 32 * 34
    got = gguf.dequantize(merged, Q.Q8_0).reshape(-1)
    np.testing.assert_allclose(got, expect, atol=np.abs(expect).max() / 127)
    assert (s.source_type, s.output_type, s.blocks_changed) == ("Q4_K", "Q8_0", 4)


# ---- whole files ----

def test_f32_merge_acts_exactly_like_the_adapters(tiny_untied, tmp_path):
    """Two stacked adapters (sidecar-like and deltas) on every kind of matmul of an F32 model."""
    rng = np.random.default_rng(3)
    names = ["blk.0.attn_q.weight", "blk.1.attn_v.weight", "blk.0.ffn_down.weight", "output.weight"]
    shapes = {n: tiny_untied.weights[n].shape for n in names}
    rows = _used_tokens(tiny_untied.path)
    side = _random_weights(rng, shapes, 40, 1.0, rows)
    deltas = _random_weights(rng, shapes, 40, 1.0, rows)
    deltas["blk.0.attn_q.weight"] = (np.concatenate([side["blk.0.attn_q.weight"][0][:5], [7]]),
                                     np.full(6, 0.5, np.float32))  # coincides with the sidecar at 5 coordinates
    SparseAdapter.from_weights("llama", side, {Sparse.ROLE: "sidecar"}).save(tmp_path / "side.gguf")
    SparseAdapter.from_weights("llama", deltas, {Sparse.ROLE: "deltas"}).save(tmp_path / "deltas.gguf")
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    assert export([str(tiny_untied.path), "--adapter", str(tmp_path / "side.gguf"), "--adapter",
                   str(tmp_path / "deltas.gguf"), "-o", str(out), "--data", str(data), *RUNTIME_ARGS]) == 0

    r = _report(out)
    loss = r["loss"]
    assert abs(loss["adapters"] - loss["base"]) > 0.05, "the adapters barely move the loss"
    assert loss["merged"] == pytest.approx(loss["adapters"], rel=1e-4)
    assert loss["adapter_file"] == pytest.approx(loss["adapters"], rel=1e-6)  # sums of 1/64 multiples: exact in F16
    assert r["merge"]["converted"] == [] and r["adapter"]["f16_max_abs_rounding"] == 0.0

    personalized = SparseAdapter.load(out / "adapter.gguf")
    assert personalized.metadata[Sparse.ROLE] == "personalized"
    assert personalized.n_params == sum(len(np.union1d(side[n][0], deltas[n][0])) for n in names)
    expect = {k: v.reshape(-1).copy() for k, v in tiny_untied.weights.items()}
    for w in (side, deltas):
        for n, (idx, val) in w.items():
            np.add.at(expect[n], idx, val)
    merged = _tensors(out / "model-merged.gguf")
    for name, t in merged.items():
        assert t.type == Q.F32
        np.testing.assert_allclose(_values(t), expect[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert ModelInfo.open(out / "model-merged.gguf").header.fields.keys() == \
        ModelInfo.open(tiny_untied.path).header.fields.keys()


def test_tied_embedding_edits_are_merged_into_token_embd(tiny, tmp_path):
    rng = np.random.default_rng(4)
    name = "token_embd.weight"
    edits = _random_weights(rng, {name: tiny.weights[name].shape}, 60, 1.0, _used_tokens(tiny.path))
    SparseAdapter.from_weights("llama", edits).save(tmp_path / "a.gguf")
    out = tmp_path / "out"
    assert export([str(tiny.path), "--adapter", str(tmp_path / "a.gguf"), "-o", str(out),
                   "--data", str(write_jsonl(tmp_path / "f.jsonl", FACTS)), *RUNTIME_ARGS]) == 0
    loss = _report(out)["loss"]
    assert abs(loss["adapters"] - loss["base"]) > 0.05
    assert loss["merged"] == pytest.approx(loss["adapters"], rel=1e-4)
    merged, source = _tensors(out / "model-merged.gguf"), _tensors(tiny.path)
    assert "output.weight" not in merged
    expect = tiny.weights[name].reshape(-1).copy()
    np.add.at(expect, *edits[name])
    np.testing.assert_array_equal(_values(merged[name]), expect)
    for n, t in merged.items():
        if n != name:
            assert np.array_equal(t.raw, source[n].raw), n


def test_q4_merge_moves_the_loss_like_the_adapter(tiny_q4, tmp_path):
    rng = np.random.default_rng(5)
    names = ["blk.0.attn_q.weight", "blk.1.ffn_up.weight", "blk.1.attn_output.weight", "token_embd.weight"]
    edits = _random_weights(rng, {n: tiny_q4.weights[n].shape for n in names}, 60, 0.5, _used_tokens(tiny_q4.path))
    SparseAdapter.from_weights("llama", edits).save(tmp_path / "a.gguf")
    out = tmp_path / "out"
    assert export([str(tiny_q4.path), "--adapter", str(tmp_path / "a.gguf"), "-o", str(out),
                   "--data", str(write_jsonl(tmp_path / "f.jsonl", FACTS)), *RUNTIME_ARGS]) == 0
    r = _report(out)
    loss = r["loss"]
    effect = loss["adapters"] - loss["base"]
    assert abs(effect) > 0.05
    assert np.sign(loss["merged"] - loss["base"]) == np.sign(effect)
    assert 0.5 < loss["effect_kept"] < 1.5
    assert loss["merge_gap"] == pytest.approx(loss["merged"] - loss["adapters"])
    # Each edited 4-bit block moved as a whole: the report says by how much.
    by_name = {t["name"]: t for t in r["merge"]["tensors"]}
    assert sorted(by_name) == sorted(names)
    for t in by_name.values():
        assert t["source_type"] == t["output_type"] == "Q4_0"
        assert 0 < t["miss_norm"] < 0.5 * t["delta_norm"] and t["collateral_norm"] > 0
        assert t["blocks_changed"] <= t["entries"]
    merged, source = _tensors(out / "model-merged.gguf"), _tensors(tiny_q4.path)
    for n, t in source.items():
        assert merged[n].type == t.type
        if n not in edits:
            assert np.array_equal(merged[n].raw, t.raw), n
    # Small deltas (about a fifth of a Q4_0 step here) round away in 4 bits and survive in Q8_0.
    small = SparseAdapter.from_weights("llama", {n: (i, v / 500) for n, (i, v) in edits.items()})
    q4 = merge_into_gguf(tiny_q4.path, small, tmp_path / "q4.gguf", progress=False)
    q8 = merge_into_gguf(tiny_q4.path, small, tmp_path / "q8.gguf", edited_type="Q8_0", progress=False)
    assert q4.missed > 0.8 and q8.missed < 0.3 and sorted(q8.converted) == sorted(names)
    q8_types = {n: t.type.name for n, t in _tensors(tmp_path / "q8.gguf").items() if n in edits}
    assert q8_types == dict.fromkeys(names, "Q8_0")


def _kquant_model(path: Path, alignment: int = 64) -> Path:
    """A small GGUF (not runnable: it only needs to look like a model) with one Q4_K weight."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(alignment)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_tensor("blk.0.ffn_down.weight", _q4_k_bytes(np.random.default_rng(6), 8).reshape(4, 2 * 144),
                 raw_dtype=Q.Q4_K)
    w.add_tensor("blk.0.ffn_norm.weight", np.arange(5, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_k_quant_model_merges_with_that_weight_as_q8_0(tmp_path):
    src = _kquant_model(tmp_path / "k.gguf")
    adapter = SparseAdapter.from_weights("llama", {"blk.0.ffn_down.weight": ([5, 600], [0.25, -0.5])})
    report = merge_into_gguf(src, adapter, tmp_path / "merged.gguf", progress=False)
    assert report.converted == ["blk.0.ffn_down.weight"]
    before, after = _tensors(src), _tensors(tmp_path / "merged.gguf")
    assert after["blk.0.ffn_down.weight"].type == Q.Q8_0
    assert after["blk.0.ffn_down.weight"].shape == (4, 512)
    expect = _values(before["blk.0.ffn_down.weight"])
    expect[[5, 600]] += [0.25, -0.5]
    np.testing.assert_allclose(_values(after["blk.0.ffn_down.weight"]), expect, atol=np.abs(expect).max() / 127)
    assert np.array_equal(after["blk.0.ffn_norm.weight"].dequantize(), np.arange(5, dtype=np.float32))
    info = ModelInfo.open(tmp_path / "merged.gguf")
    assert info.header.get("general.alignment") == 64 and info.header.get("tokenizer.chat_template") == "{{ messages }}"


def test_plan_refuses_types_gguf_py_cannot_read():
    model = ModelInfo(Path("m.gguf"), "llama", None, {
        "a.weight": TensorInfo("a.weight", (4, 256), "Q6_K"),
        "b.weight": TensorInfo("b.weight", (4, 256), "type99"),
        "c.weight": TensorInfo("c.weight", (4, 256), "Q4_0")})
    adapter = SparseAdapter.from_weights("llama", {n: ([1], [1.0]) for n in ("a.weight", "b.weight", "c.weight")})
    with pytest.raises(InvalidInputError, match="b.weight: type type99 cannot be dequantized"):
        plan_merge(model, adapter)
    plan = plan_merge(model, SparseAdapter.from_weights("llama", {n: ([1], [1.0]) for n in ("a.weight", "c.weight")}))
    assert [(p.output_type, p.converted) for p in plan.values()] == [("Q8_0", True), ("Q4_0", False)]


# ---- the command's other paths and its errors ----

def test_no_merge_writes_only_the_adapter_and_says_loss_was_skipped(tiny_q4, tmp_path, capsys):
    SparseAdapter.from_weights("llama", {"blk.0.attn_k.weight": ([2, 3], [0.5, 0.25])}).save(tmp_path / "a.gguf")
    out = tmp_path / "new" / "dir"
    assert export([str(tiny_q4.path), "--adapter", str(tmp_path / "a.gguf"), "-o", str(out), "--no-merge"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf", "export.json"]
    r = _report(out)
    assert "merge" not in r and "no --data given" in r["loss"]["skipped"]
    assert "loss     skipped" in capsys.readouterr().out


def _args(model, tmp_path, *extra):
    return [str(model), "--adapter", str(tmp_path / "a.gguf"), "-o", str(tmp_path / "out"), *extra]


def test_errors_are_clear_and_nothing_is_written(tiny_q4, tmp_path):
    good = SparseAdapter.from_weights("llama", {"blk.0.attn_k.weight": ([2], [0.5])})
    with pytest.raises(ModelFileError, match="a.gguf: no such adapter file"):
        export(_args(tiny_q4.path, tmp_path))
    good.save(tmp_path / "a.gguf")
    with pytest.raises(ModelFileError, match="nope.gguf: no such model file"):
        export(_args(tmp_path / "nope.gguf", tmp_path))
    with pytest.raises(InvalidInputError, match="missing.jsonl: no such data file"):
        export(_args(tiny_q4.path, tmp_path, "--data", str(tmp_path / "missing.jsonl")))
    SparseAdapter.from_weights("llama", {"blk.9.attn_k.weight": ([2], [0.5]),
                                         "blk.0.attn_k.weight": ([10**9], [0.5])}).save(tmp_path / "a.gguf")
    with pytest.raises(IncompatibleAdapterError, match=r"(?s)a.gguf does not fit.*out of range.*blk.9.*no such weight"):
        export(_args(tiny_q4.path, tmp_path))
    SparseAdapter.from_weights("gemma3", {"blk.0.attn_k.weight": ([2], [0.5])}).save(tmp_path / "a.gguf")
    with pytest.raises(IncompatibleAdapterError, match="architecture 'gemma3'"):
        export(_args(tiny_q4.path, tmp_path))
    assert not (tmp_path / "out").exists()
    good.save(tmp_path / "a.gguf")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(InvalidInputError, match="cannot write the export there"):
        export([str(tiny_q4.path), "--adapter", str(tmp_path / "a.gguf"), "-o", str(tmp_path / "file" / "out")])
    with pytest.raises(SystemExit):   # argparse: --adapter is required
        export([str(tiny_q4.path), "-o", str(tmp_path / "out")])


def test_refuses_to_overwrite_the_model(tiny_q4, tmp_path):
    model = tmp_path / "model-merged.gguf"
    model.write_bytes(tiny_q4.path.read_bytes())
    SparseAdapter.from_weights("llama", {"blk.0.attn_k.weight": ([2], [0.5])}).save(tmp_path / "a.gguf")
    with pytest.raises(InvalidInputError, match="is the input model"):
        export([str(model), "--adapter", str(tmp_path / "a.gguf"), "-o", str(tmp_path)])


# ---- a real model ----

@pytest.mark.slow
def test_smollm2_merged_model_runs_in_llama_cpp_and_keeps_the_adapters_effect(smollm2, tmp_path):
    rng = np.random.default_rng(7)
    info = ModelInfo.open(smollm2)
    names = [f"blk.{i}.{k}.weight" for i, k in [(0, "attn_q"), (2, "ffn_down"), (5, "attn_v"), (8, "ffn_gate"),
                                                 (12, "attn_k"), (16, "ffn_up"), (20, "attn_output"),
                                                 (25, "ffn_down"), (29, "attn_v")]] + ["token_embd.weight"]
    edits = {}
    for name in names:  # 0.1% of each weight
        n = info.tensors[name].n_elements
        idx = np.unique(rng.integers(0, n, n // 1000))
        edits[name] = (idx, (rng.standard_normal(len(idx)) * 0.2).astype(np.float32))
    SparseAdapter.from_weights(info.architecture, edits).save(tmp_path / "a.gguf")
    out = tmp_path / "out"
    assert export([str(smollm2), "--adapter", str(tmp_path / "a.gguf"), "-o", str(out), "--data",
                   str(write_jsonl(tmp_path / "f.jsonl", FACTS)), "--batch-size", "8", "--max-tokens", "128",
                   "--threads", "1"]) == 0
    r = _report(out)
    loss, merge = r["loss"], r["merge"]
    assert abs(loss["adapters"] - loss["base"]) > 0.1
    assert 0.8 < loss["effect_kept"] < 1.2   # re-quantizing the edited 4-bit blocks costs a little
    assert merge["converted"] == [] and merge["bytes_out"] == merge["bytes_in"]
    merged = ModelInfo.open(out / "model-merged.gguf")  # same types, same metadata (tokenizer, chat template)
    assert {n: t.type_name for n, t in merged.tensors.items()} == {n: t.type_name for n, t in info.tensors.items()}
    assert merged.header.get("tokenizer.chat_template") == info.header.get("tokenizer.chat_template")
    assert merged.header.get("tokenizer.ggml.tokens") == info.header.get("tokenizer.ggml.tokens")
    with Runtime(out / "model-merged.gguf", RuntimeOptions(batch_size=1, max_tokens=64, threads=1)) as rt:
        assert "".join(rt.generate("The capital of France is", max_tokens=4))
