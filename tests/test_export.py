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
from edge_zo.dataset import Example
from edge_zo.errors import IncompatibleAdapterError, InvalidInputError, ModelFileError
from edge_zo.gguf_io import Tensor, TensorFile, read_header
from edge_zo.lora_export import WeightSVD, choose_ranks, factors, weighted_svd
from edge_zo.merge import merge_into_gguf, merge_tensor, plan_merge, sum_adapters
from edge_zo.merge_types import TensorChoice, TypeOption, choose_types, kept_share
from edge_zo.model_info import ModelInfo, TensorInfo
from edge_zo.runtime import Runtime, RuntimeOptions

from .conftest import FACTS, write_jsonl, zero_sidecar

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
    idx, val = np.array([3, 40, 70, 300]), np.array([0.1, -0.2, 0.0, 0.3], np.float32)  # 70 is a zero delta
    merged, s = merge_tensor(raw, type_name, type_name, idx, val)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    expect = gguf.dequantize(raw, qtype).reshape(-1).copy()  # F32 "dequantizes" to a view
    np.add.at(expect, idx, val)
    changed_blocks = np.unique(idx[val != 0] // block)
    before, after = raw.reshape(-1, size), merged.reshape(-1, size)
    untouched = np.setdiff1d(np.arange(len(before)), changed_blocks)
    assert np.array_equal(before[untouched], after[untouched])
    # An edited block is what the quantizer makes of base + deltas, block by block: these deltas
    # are 10-70 steps, past every block's range, so no block keeps its grid (test_quant_grid).
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
                   str(tmp_path / "deltas.gguf"), "-o", str(out), "--data", str(data), "--no-lora",
                   *RUNTIME_ARGS]) == 0

    r = _report(out)
    v = r["evaluation"]["variants"]
    assert abs(v["adapter_path"]["loss"] - v["original"]["loss"]) > 0.05, "the deltas barely move the loss"
    assert v["merged"]["loss"] == pytest.approx(v["adapter_path"]["loss"], rel=1e-4)
    assert r["evaluation"]["verdicts"]["merged"]["ok"]
    assert r["merge"]["converted"] == [] and r["adapter"]["f16_max_abs_rounding"] == 0.0  # 1/64 multiples: exact
    assert r["merge"]["deltas_kept"] == pytest.approx(1.0, abs=1e-6)

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
    r = _report(out)
    v = r["evaluation"]["variants"]
    assert abs(v["adapter_path"]["loss"] - v["original"]["loss"]) > 0.05
    assert v["merged"]["loss"] == pytest.approx(v["adapter_path"]["loss"], rel=1e-4)
    assert "token_embd.weight" in r["lora"]["skipped"] and "lora" not in v   # a LoRA cannot hold it
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
    assert export([str(tiny_q4.path), "--adapter", str(tmp_path / "a.gguf"), "-o", str(out), "--max-size", "1.0",
                   "--data", str(write_jsonl(tmp_path / "f.jsonl", FACTS)), *RUNTIME_ARGS]) == 0
    r = _report(out)
    v = r["evaluation"]["variants"]
    effect = v["adapter_path"]["loss"] - v["original"]["loss"]
    assert abs(effect) > 0.05
    assert np.sign(v["merged"]["loss"] - v["original"]["loss"]) == np.sign(effect)
    assert 0.5 < r["evaluation"]["verdicts"]["merged"]["improvement_kept"] < 1.5
    # Each edited 4-bit block moved as a whole: the report says by how much.
    by_name = {t["name"]: t for t in r["merge"]["tensors"]}
    assert sorted(by_name) == sorted(names)
    for t in by_name.values():
        assert t["source_type"] == t["output_type"] == "Q4_0"   # --max-size 1.0: no room for Q8_0
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

def test_no_merge_no_lora_writes_only_the_adapter_and_says_evaluation_was_skipped(tiny_q4, tmp_path, capsys):
    SparseAdapter.from_weights("llama", {"blk.0.attn_k.weight": ([2, 3], [0.5, 0.25])}).save(tmp_path / "a.gguf")
    out = tmp_path / "new" / "dir"
    assert export([str(tiny_q4.path), "--adapter", str(tmp_path / "a.gguf"), "-o", str(out), "--no-merge",
                   "--no-lora"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf", "export.json"]
    r = _report(out)
    assert "merge" not in r and r["lora"] == {"skipped": "--no-lora"}
    assert "no --data given" in r["evaluation"]["skipped"]
    assert "held-out  skipped" in capsys.readouterr().out


def test_bad_settings_are_refused_before_any_work(tiny_q4, tmp_path):
    SparseAdapter.from_weights("llama", {"blk.0.attn_k.weight": ([2], [0.5])}).save(tmp_path / "a.gguf")
    for flag, value, why in [("--max-size", "0.9", "at least 1.0"), ("--lora-keep", "0", "share in"),
                             ("--lora-max-size", "2", "share in"), ("--calib-tokens", "-1", "0 or more")]:
        with pytest.raises(InvalidInputError, match=why):
            export(_args(tiny_q4.path, tmp_path, flag, value))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ModelFileError, match="nope.gguf"):
        export(_args(tiny_q4.path, tmp_path, "--lora-base", str(tmp_path / "nope.gguf")))


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

PROMPTS = ["The capital of France is", "One, two, three, four,", "My dog's name is"]
GREEDY_TOKENS = 8
MARGIN = 0.5   # nats between the adapter path's first and second choice: below, a tie any rounding flips


def _greedy_with_margins(rt: Runtime, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The adapter path's greedy continuation of `prompt` and, at each step, how far its choice
    leads the runner-up (log-probabilities over the whole vocabulary from edge-zo's runtime)."""
    vocab = np.arange(rt.native.n_vocab, dtype=np.int32)
    ids, text, margins = list(prompt), [], []
    for _ in range(GREEDY_TOKENS):
        logp = rt.native.next_logprobs(np.array(ids, np.int32), np.array([0, len(ids)], np.int32), [vocab])[0]
        top = np.sort(logp)[-2:]
        text.append(int(np.argmax(logp)))
        margins.append(float(top[1] - top[0]))
        ids.append(text[-1])
    return np.array(text), np.array(margins)


class _Stock:
    """SmolLM2 run by stock llama-cpp-python alone, optionally with a LoRA: no edge-zo code."""

    def __init__(self, model: Path, lora: Path | None = None):
        import llama_cpp

        kw = {"lora_path": str(lora)} if lora else {}
        # F32 KV cache, no flash attention, as the runtime's kv_f32: the engines then agree to ~1e-5.
        self.llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, n_batch=256, logits_all=True, n_threads=1,
                                   type_k=0, type_v=0, flash_attn=False, verbose=False, **kw)

    def tokens(self, text: str, first: bool) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=first, special=True)

    def nll(self, rows: list[dict]) -> tuple[float, int]:
        total, count = 0.0, 0
        for r in rows:
            p, c = self.tokens(r["prompt"], True), self.tokens(r["completion"], False)
            self.llm.reset()
            self.llm.eval(p + c)
            logits = np.array(self.llm.scores[len(p) - 1: len(p) + len(c) - 1], np.float64)
            logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
            total += float(np.sum(logz - logits[np.arange(len(c)), c]))
            count += len(c)
        return total, count

    def next_choices(self, prompt: list[int], text: list[int]) -> np.ndarray:
        """The greedy next token at each step of `text` after `prompt` (teacher-forced)."""
        self.llm.reset()
        self.llm.eval(prompt + text)
        return np.argmax(self.llm.scores[len(prompt) - 1: len(prompt) + len(text) - 1], axis=1)

    def close(self):
        self.llm.close()


def _tuned_like_deltas(model: Path, rng) -> dict:
    """Deltas shaped like a tuned Fisher mask's: in the input columns of largest activation (where
    the Fisher mask puts its coordinates and where a delta moves the loss), half of the rows, for
    many block weights; values of about a 4-bit step, so that 4 bits lose much of them."""
    from edge_zo.activation_mask import activation_stats, calibration_sequences, stats_runtime

    info = ModelInfo.open(model)
    names = [f"blk.{i}.{k}.weight" for i in range(0, 30, 3) for k in ("attn_v", "attn_output", "ffn_up", "ffn_down")]
    with stats_runtime(model, 128, threads=1) as rt:
        seqs, _, _ = calibration_sequences(rt.native, 256, 128)
        e_x2 = activation_stats(rt, seqs, names)
    edits = {}
    for name in names:
        n_out, n_in = info.tensors[name].shape
        cols = np.argsort(e_x2[name])[-4:]
        rows = rng.choice(n_out, n_out // 2, replace=False)
        idx = np.unique((rows[:, None] * n_in + cols[None, :]).ravel())
        edits[name] = (idx, (rng.standard_normal(len(idx)) * 0.02).astype(np.float32))
    return edits


@pytest.mark.slow
def test_smollm2_merged_and_lora_reproduce_the_adapter_path_in_stock_llama_cpp(smollm2, tmp_path):
    info = ModelInfo.open(smollm2)
    edits = _tuned_like_deltas(smollm2, np.random.default_rng(7))
    SparseAdapter.from_weights(info.architecture, edits, {Sparse.ROLE: "deltas"}).save(tmp_path / "deltas.gguf")
    rows = FACTS + [{"prompt": p, "completion": c} for p, c in [
        ("The capital of France is", " Paris, a city on the Seine."),
        ("Water boils at", " one hundred degrees Celsius at sea level.")]]
    out = tmp_path / "out"
    assert export([str(smollm2), "--adapter", str(tmp_path / "deltas.gguf"), "--no-sidecar", "-o", str(out),
                   "--data", str(write_jsonl(tmp_path / "f.jsonl", rows)), "--batch-size", "8",
                   "--max-tokens", "128", "--threads", "1", "--kv-f32"]) == 0
    r = _report(out)
    assert r["merge"]["bytes_out"] <= 1.15 * r["merge"]["bytes_in"]
    assert r["lora"]["bytes"] <= 0.05 * r["model_bytes"] and r["lora"]["base"] == str(smollm2)
    merged = ModelInfo.open(out / "model-merged.gguf")  # same metadata (tokenizer, chat template)
    assert merged.header.get("tokenizer.chat_template") == info.header.get("tokenizer.chat_template")
    assert merged.header.get("tokenizer.ggml.tokens") == info.header.get("tokenizer.ggml.tokens")

    # The adapter path (edge-zo's runtime with the sparse deltas) on the same tokens as stock llama.cpp.
    stock = _Stock(smollm2)
    try:
        prompts = [stock.tokens(p, True) for p in PROMPTS]
        examples = []
        for row in rows:
            p, c = stock.tokens(row["prompt"], True), stock.tokens(row["completion"], False)
            examples.append(Example(np.array(p + c, np.int32), np.array([0] * len(p) + [1] * len(c), np.uint8)))
        original = stock.nll(rows)
    finally:
        stock.close()
    with Runtime(smollm2, RuntimeOptions(batch_size=8, max_tokens=128, threads=1, kv_f32=True)) as rt:
        assert rt.loss(examples).mean == pytest.approx(original[0] / original[1], abs=1e-3)   # same engine, same tokens
        rt.attach(SparseAdapter.load(tmp_path / "deltas.gguf"))
        tuned = rt.loss(examples)
        greedy = [_greedy_with_margins(rt, stock_prompt) for stock_prompt in prompts]
    original_loss, tuned_loss = original[0] / original[1], tuned.mean
    assert abs(tuned_loss - original_loss) > 0.05, "the deltas barely move the loss; the test would prove nothing"
    clear = sum(int(np.sum(m >= MARGIN)) for _, m in greedy)
    assert clear >= len(PROMPTS) * GREEDY_TOKENS // 2, "too few clear choices to compare texts on"

    for what, model, lora in [("merged", out / "model-merged.gguf", None), ("lora", smollm2, out / "lora.gguf")]:
        llm = _Stock(model, lora)
        try:
            nll, count = llm.nll(rows)
            chosen = [llm.next_choices(p, list(text)) for p, (text, _) in zip(prompts, greedy)]
        finally:
            llm.close()
        loss = nll / count
        if what == "merged":
            assert abs(loss - tuned_loss) <= 0.02 * tuned_loss, (what, loss, tuned_loss, original_loss)
        else:
            kept = (original_loss - loss) / (original_loss - tuned_loss)
            assert kept >= 0.9, (what, loss, tuned_loss, original_loss)
        # Same greedy text: at every step where the adapter path's choice is not a near-tie of its
        # own, the export chooses the same token.
        for (text, margin), got in zip(greedy, chosen):
            np.testing.assert_array_equal(got[margin >= MARGIN], text[margin >= MARGIN], err_msg=what)
    # The report says the same in its verdicts.
    assert r["evaluation"]["verdicts"]["merged"]["ok"] and r["evaluation"]["verdicts"]["lora"]["ok"]


# ---- the type of each edited weight ----

def _choice(name, effect2, own_error2, q8_error2, own_bytes=100, q8_bytes=170):
    return TensorChoice(name, "Q4_0", effect2, (TypeOption("Q4_0", own_bytes, own_error2, 0.0),
                                                TypeOption("Q8_0", q8_bytes, q8_error2, 1.0)))


def test_choose_types_spends_the_budget_where_four_bits_lose_most():
    choices = {"lost": _choice("lost", 1.0, 0.9, 0.01), "kept": _choice("kept", 1.0, 0.02, 0.01),
               "big": _choice("big", 1.0, 0.95, 0.01, own_bytes=1000, q8_bytes=1700)}
    assert choose_types(choices, 0) == dict.fromkeys(choices, "Q4_0")
    assert choose_types(choices, 70) == {"lost": "Q8_0", "kept": "Q4_0", "big": "Q4_0"}
    # 700 more bytes: "big" loses the most, but per byte "lost" and then "kept" come first.
    assert choose_types(choices, 700) == {"lost": "Q8_0", "kept": "Q8_0", "big": "Q4_0"}
    assert choose_types(choices, 10_000) == dict.fromkeys(choices, "Q8_0")
    assert kept_share(choices, dict.fromkeys(choices, "Q4_0")) == pytest.approx(1 - np.sqrt(1.87 / 3))


def test_the_size_budget_buys_q8_0_for_deltas_that_four_bits_lose(tiny_q4, tmp_path):
    """Deltas of a fifth of a Q4_0 step vanish in 4 bits; the default --max-size keeps them."""
    rng = np.random.default_rng(8)
    names = ["blk.0.attn_v.weight", "blk.1.ffn_down.weight"]
    edits = {n: _column_deltas(rng, tiny_q4.weights[n].shape, 16, 2e-3) for n in names}
    SparseAdapter.from_weights("llama", edits).save(tmp_path / "a.gguf")
    base = [str(tiny_q4.path), "--adapter", str(tmp_path / "a.gguf"), "--no-lora", "--json", *RUNTIME_ARGS]
    assert export([*base, "-o", str(tmp_path / "own"), "--max-size", "1.0"]) == 0
    assert export([*base, "-o", str(tmp_path / "auto")]) == 0
    own, auto = _report(tmp_path / "own")["merge"], _report(tmp_path / "auto")["merge"]
    assert own["types"] == {"Q4_0": 2} and own["deltas_kept"] < 0.3
    assert auto["types"] == {"Q8_0": 2} and auto["deltas_kept"] > 0.9
    assert auto["bytes_out"] <= 1.15 * auto["bytes_in"]
    assert auto["deltas_kept_own_type"] == pytest.approx(own["deltas_kept"])


# ---- the LoRA ----

def _stock_logits(model: Path, tokens, lora: Path | None = None) -> np.ndarray:
    """Logits at every position from stock llama-cpp-python alone (no edge-zo code in the loop)."""
    import llama_cpp

    kw = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=128, n_batch=128, logits_all=True, n_threads=1,
                          type_k=0, type_v=0, flash_attn=False, verbose=False, **kw)   # F32 KV cache
    try:
        llm.eval([int(t) for t in tokens])
        return np.array(llm.scores[: len(tokens)])
    finally:
        llm.close()


def _column_deltas(rng, shape, n_cols: int, scale: float):
    """A delta in a few input columns, as the Fisher mask places them (rank <= n_cols)."""
    cols = rng.choice(shape[1], n_cols, replace=False)
    rows = rng.choice(shape[0], shape[0] // 4, replace=False)
    idx = (rows[:, None] * shape[1] + cols[None, :]).ravel()
    return np.unique(idx), (rng.standard_normal(len(np.unique(idx))) * scale).astype(np.float32)


def test_weighted_svd_is_exact_at_full_rank_and_optimal_in_the_weighted_norm():
    rng = np.random.default_rng(9)
    shape = (48, 64)
    idx, val = _column_deltas(rng, shape, 5, 1.0)
    e_x2 = rng.uniform(0.1, 10.0, shape[1])
    d = np.zeros(shape)
    d.flat[idx] = val
    w = weighted_svd("w", shape, idx, val, e_x2)
    assert len(w.sigma) == 5
    a, b = factors(w, 5)
    np.testing.assert_allclose(b @ a, d, atol=1e-5)
    a2, b2 = factors(w, 2)   # the best rank 2 in the weighted norm: Eckart-Young on D*diag(s)
    err = np.linalg.norm((b2 @ a2 - d) * np.sqrt(e_x2))
    assert err == pytest.approx(np.sqrt(np.sum(w.sigma[2:] ** 2)), rel=1e-4)


def test_choose_ranks_keeps_a_share_of_each_weight_within_the_budget():
    one = lambda sig, n: WeightSVD("w", (n, n), np.arange(n), np.arange(n), np.eye(n)[:, :len(sig)],  # noqa: E731
                                   np.array(sig, float), np.eye(n)[:len(sig)])
    # Shares: small 0.9 / 0.1; large 0.5 / 0.5 (a large weight counts no more than a small one).
    svds = {"small": one([3.0, 1.0], 4), "large": one([30.0, 30.0], 40)}
    assert choose_ranks(svds, keep=0.5, max_bytes=10**6) == {"small": 1, "large": 1}
    assert choose_ranks(svds, keep=0.95, max_bytes=10**6) == {"small": 2, "large": 2}
    # 16 bytes a rank for small, 160 for large: over budget, the least share per byte goes first.
    assert choose_ranks(svds, keep=0.95, max_bytes=16 * 2 + 160) == {"small": 2, "large": 1}
    assert choose_ranks(svds, keep=0.95, max_bytes=16) == {"small": 1, "large": 0}


def test_lora_in_stock_llama_cpp_acts_like_the_edited_weights(tiny_untied, tmp_path):
    """The layout check: stock llama.cpp applies lora.gguf exactly as the deltas edit the weights
    (a transposed or flipped A/B would fail to load or give other logits)."""
    rng = np.random.default_rng(10)
    names = ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.1.ffn_down.weight", "blk.1.ffn_up.weight",
             "output.weight"]
    edits = {n: _column_deltas(rng, tiny_untied.weights[n].shape, 3, 0.5) for n in names}
    deltas = SparseAdapter.from_weights("llama", edits, {Sparse.ROLE: "deltas"})
    deltas.save(tmp_path / "deltas.gguf")
    out = tmp_path / "out"
    assert export([str(tiny_untied.path), "--adapter", str(tmp_path / "deltas.gguf"), "-o", str(out), "--no-merge",
                   "--lora-max-size", "0.5", "--lora-keep", "1",
                   "--data", str(write_jsonl(tmp_path / "f.jsonl", FACTS)),
                   *RUNTIME_ARGS]) == 0
    r = _report(out)
    assert r["lora"]["captured"] == pytest.approx(1.0) and r["lora"]["base"] == str(tiny_untied.path)
    assert {n: r["lora"]["per_weight"][n]["rank"] for n in names} == dict.fromkeys(names, 3)
    header = read_header(out / "lora.gguf")
    assert (header.get("general.type"), header.get("adapter.type"), header.get("general.architecture")) == \
        ("adapter", "lora", "llama")
    lora = _tensors(out / "lora.gguf")
    n_out, n_in = tiny_untied.weights["blk.1.ffn_down.weight"].shape
    assert lora["blk.1.ffn_down.weight.lora_a"].shape == (3, n_in)
    assert lora["blk.1.ffn_down.weight.lora_b"].shape == (n_out, 3)

    tokens = _used_tokens(tiny_untied.path)[:40]
    edited = tiny_untied.edited(tmp_path / "edited.gguf", edits)
    want = _stock_logits(edited, tokens)
    got = _stock_logits(tiny_untied.path, tokens, lora=out / "lora.gguf")
    plain = _stock_logits(tiny_untied.path, tokens)
    # F16 factors round the delta a little; the change the deltas make must be reproduced.
    assert np.abs(got - want).max() < 0.02 * np.abs(want - plain).max()
    v = r["evaluation"]["variants"]
    assert v["lora"]["loss"] == pytest.approx(v["adapter_path"]["loss"], rel=2e-3)
    assert r["evaluation"]["verdicts"]["lora"]["ok"]


def test_lora_rank_budget_and_base_are_reported(tiny_q4, tmp_path):
    """A zero sidecar (split keep): the LoRA's base is the model itself; a tight size cap lowers
    the ranks and the captured share, and the verdict says when too little is kept."""
    side = zero_sidecar(tiny_q4.path, tmp_path / "side.gguf", metadata={Sparse.ROLE: "sidecar"})
    rng = np.random.default_rng(11)
    names = ["blk.0.attn_output.weight", "blk.1.ffn_gate.weight"]
    SparseAdapter.from_weights("llama", {n: _column_deltas(rng, tiny_q4.weights[n].shape, 8, 0.3) for n in names},
                               {Sparse.ROLE: "deltas"}).save(tmp_path / "deltas.gguf")
    base = [str(tiny_q4.path), "--adapter", str(side), "--adapter", str(tmp_path / "deltas.gguf"), "--no-merge",
            "--lora-keep", "1", "--json", *RUNTIME_ARGS]
    assert export([*base, "-o", str(tmp_path / "full"), "--lora-max-size", "0.5"]) == 0
    assert export([*base, "-o", str(tmp_path / "cut"), "--lora-max-size", "0.0005"]) == 0
    full, cut = _report(tmp_path / "full")["lora"], _report(tmp_path / "cut")["lora"]
    assert full["base"] == str(tiny_q4.path) and not (tmp_path / "full" / "model-original.gguf").exists()
    assert full["captured"] == pytest.approx(1.0) and full["rank_total"] == 16
    assert cut["bytes"] < full["bytes"] and cut["captured"] < 0.9 and 0 < cut["rank_total"] < 16
    assert cut["bytes"] <= 0.0005 * _report(tmp_path / "cut")["model_bytes"] + 4096   # + the header


# ---- one pass per variant ----

def test_one_pass_gives_the_loss_and_accuracy_of_two(tiny_q4, tmp_path):
    from edge_zo.dataset import Tokenizer, load_jsonl
    from edge_zo.export_eval import evaluate

    rows = [{"prompt": f"Is {w} a colour? Answer:", "completion": a, "choices": [" yes", " no"]}
            for w, a in [("red", " yes"), ("table", " no"), ("blue", " yes"), ("seven", " no")]]
    rows.append({"prompt": "Pick a long word:", "completion": " lighthouse keeper",
                 "choices": [" lighthouse keeper", " cat"]})
    data = load_jsonl(write_jsonl(tmp_path / "c.jsonl", rows))
    with Runtime(tiny_q4.path, RuntimeOptions(batch_size=4, max_tokens=64, threads=1)) as rt:
        examples = Tokenizer(rt.native, max_tokens=64).examples(data)
        got = evaluate(rt, examples, data.has_choices)
        assert got["loss"] == pytest.approx(rt.loss(examples).mean, rel=1e-5)
        assert got["accuracy"] == rt.accuracy(examples)
        # the loss tune's choices objective minimizes, from the same pass
        from edge_zo.objective import Objective, validation

        assert got["choice_loss"] == pytest.approx(validation(rt, Objective.CHOICES, examples)["valid_loss"],
                                                   rel=1e-6)


def test_verdicts_judge_the_loss_over_the_choices_where_rows_have_them():
    from edge_zo.commands.export import _verdicts

    # Tuned on the choices: their loss fell 1.0 -> 0.5 while the NLL over the vocabulary rose.
    row = lambda nll, ce, acc: {"loss": nll, "choice_loss": ce, "accuracy": acc}   # noqa: E731
    v = {"original": row(4.0, 1.0, 0.5), "adapter_path": row(9.0, 0.5, 0.7), "merged": row(9.5, 0.505, 0.705),
         "lora_base": row(4.1, 1.02, 0.5), "lora": row(8.0, 0.56, 0.66)}
    out = _verdicts(v)
    assert out["merged"]["loss"] == "choice_loss" and out["merged"]["loss_gap"] == pytest.approx(0.01)
    assert out["merged"]["ok"]
    assert out["lora"]["improvement_kept"] == pytest.approx((1.02 - 0.56) / 0.5) and out["lora"]["ok"]
    for r in v.values():   # rows without choices: the NLL
        del r["choice_loss"], r["accuracy"]
    out = _verdicts(v)
    assert out["merged"]["loss"] == out["lora"]["loss"] == "loss" and not out["merged"]["ok"]   # +5.6%
