"""Perturbation groups: several value sets of the sparse deltas evaluated in one llama_decode,
each on its own copy of the batch, must give the losses of evaluating them one by one."""
from __future__ import annotations

import numpy as np
import pytest

from edge_zo.adapter import SparseAdapter
from edge_zo.dataset import Example, Tokenizer, load_jsonl
from edge_zo.errors import InvalidInputError
from edge_zo.model_info import ModelInfo
from edge_zo.runtime import Runtime, RuntimeOptions, ValueSets

from .conftest import FACTS, write_jsonl

CHOICE_ROWS = [
    {"prompt": f"Is {w} a fruit? Answer:", "completion": f" {a}", "choices": [" yes", " no"]}
    for w, a in [("an apple", "yes"), ("a brick", "no"), ("a pear", "yes"), ("a chair", "no"), ("a plum", "yes")]
]


def _examples(rt: Runtime, tmp_path, rows=FACTS, name="facts.jsonl") -> list[Example]:
    return Tokenizer(rt.native, max_tokens=64).examples(load_jsonl(write_jsonl(tmp_path / name, rows)))


def _adapter(model, scale: float = 0.5, seed: int = 0) -> SparseAdapter:
    """Random entries on every block matmul and on the (tied) token embedding, which the graph
    reads by lookup and by the output matmul: all three sparse kernels take part."""
    info = ModelInfo.open(model)
    rng = np.random.default_rng(seed)
    weights = {}
    for name in info.block_matmul_weights() + ["token_embd.weight"]:
        size = info.tensors[name].n_elements
        idx = np.unique(rng.integers(0, size, max(size // 50, 8)))
        weights[name] = (idx, np.zeros(len(idx), np.float32))
    a = SparseAdapter.from_weights(info.architecture, weights)
    a.values[:] = rng.normal(0, scale, len(a.values)).astype(np.float32)
    return a


def _sets(a: SparseAdapter, k: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(a.values + rng.normal(0, 0.5, len(a.values))).astype(np.float32) for _ in range(k)]


def _one_by_one(live: np.ndarray, sets: list[np.ndarray], evaluate):
    kept = live.copy()
    out = []
    for s in sets:
        live[:] = s
        out.append(evaluate())
    live[:] = kept
    return out


@pytest.mark.parametrize("opts", [
    RuntimeOptions(batch_size=6, max_tokens=64, groups=3),                         # one decode, KV per sequence
    RuntimeOptions(batch_size=2, max_tokens=64, groups=2, ubatch=16),              # several decodes and micro-batches
    RuntimeOptions(batch_size=6, max_tokens=64, groups=3, kv_unified=True, ubatch=32),  # one KV stream
], ids=["one-decode", "split", "unified"])
def test_grouped_losses_equal_one_by_one(tiny_q4, tmp_path, opts):
    with Runtime(tiny_q4.path, opts) as rt:
        ex = _examples(rt, tmp_path)
        a = _adapter(tiny_q4.path)
        rt.attach(a)
        sets = _sets(a, 3)
        before = rt.native.decode_count
        together = rt.losses(ex, ValueSets(a.values, sets))
        decodes = rt.native.decode_count - before
        alone = _one_by_one(a.values, sets, lambda: rt.loss(ex))
        base = rt.loss(ex)
    if opts.groups == 3 and opts.batch_size == 6:
        assert decodes == 1, "three value sets of six rows fit one decode"
    for t, s in zip(together, alone):
        np.testing.assert_allclose(t.nll, s.nll, rtol=1e-9, atol=1e-9)
        assert np.array_equal(t.count, s.count)
    spread = max(abs(s.nll.sum() - base.nll.sum()) for s in alone)
    assert spread > 0.1, "the value sets barely differ; the test would prove nothing"


def test_grouped_choice_scores_equal_one_by_one(tiny_q4, tmp_path):
    with Runtime(tiny_q4.path, RuntimeOptions(batch_size=5, max_tokens=64, groups=2)) as rt:
        ex = _examples(rt, tmp_path, CHOICE_ROWS, "choices.jsonl")
        mixed = ex + _examples(rt, tmp_path, FACTS[:2], "facts.jsonl")   # no choices: refused below
        a = _adapter(tiny_q4.path)
        rt.attach(a)
        sets = _sets(a, 2)
        together = rt.choice_scores_under(ex, ValueSets(a.values, sets))
        alone = _one_by_one(a.values, sets, lambda: rt.choice_scores(ex))
        with pytest.raises(InvalidInputError, match="choices"):
            rt.choice_scores_under(mixed, ValueSets(a.values, sets))
    for t, s in zip(together, alone):
        for x, y in zip(t, s):
            np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-9)
    assert not np.allclose(np.concatenate(alone[0]), np.concatenate(alone[1]))


def test_the_number_of_value_sets_may_change_between_calls(tiny_q4, tmp_path):
    """One runtime, one set, then four (more than it was sized for: several decodes), then two."""
    with Runtime(tiny_q4.path, RuntimeOptions(batch_size=6, max_tokens=64, groups=2)) as rt:
        ex = _examples(rt, tmp_path)
        a = _adapter(tiny_q4.path)
        rt.attach(a)
        sets = _sets(a, 4)
        alone = _one_by_one(a.values, sets, lambda: rt.loss(ex))
        for k in (1, 4, 2):
            together = rt.losses(ex, ValueSets(a.values, sets[:k]))
            for t, s in zip(together, alone[:k]):
                np.testing.assert_allclose(t.nll, s.nll, rtol=1e-9, atol=1e-9)


def test_slots_outside_the_live_buffer_keep_their_values(tiny_q4, tmp_path):
    """A fixed adapter underneath (the sidecar's base values) applies in every group."""
    with Runtime(tiny_q4.path, RuntimeOptions(batch_size=6, max_tokens=64, groups=2)) as rt:
        ex = _examples(rt, tmp_path)
        under, live = _adapter(tiny_q4.path, seed=3), _adapter(tiny_q4.path, seed=4)
        rt.attach(under)
        rt.attach(live)
        sets = _sets(live, 2)
        together = rt.losses(ex, ValueSets(live.values, sets))
        alone = _one_by_one(live.values, sets, lambda: rt.loss(ex))
    for t, s in zip(together, alone):
        np.testing.assert_allclose(t.nll, s.nll, rtol=1e-9, atol=1e-9)


def test_group_input_is_checked(tiny_q4, tmp_path):
    with Runtime(tiny_q4.path, RuntimeOptions(batch_size=4, max_tokens=64, groups=2)) as rt:
        ex = _examples(rt, tmp_path)
        a = _adapter(tiny_q4.path)
        rt.attach(a)
        tokens = np.concatenate([e.tokens for e in ex[:2]])
        targets = np.concatenate([e.targets for e in ex[:2]])
        start = np.cumsum([0] + [len(e.tokens) for e in ex[:2]]).astype(np.int32)
        with pytest.raises(InvalidInputError, match="no value sets"):
            rt.native.loss(tokens, targets, start, [0, 0])
        with rt.native.groups(a.values, _sets(a, 2)):
            with pytest.raises(InvalidInputError, match="in order"):
                rt.native.loss(tokens, targets, start, [1, 0])
            with pytest.raises(InvalidInputError, match="not one of the 2 value sets"):
                rt.native.loss(tokens, targets, start, [0, 2])
        with pytest.raises(InvalidInputError, match="float32"):
            with rt.native.groups(a.values, [a.values.astype(np.float64)]):
                pass
        with pytest.raises(InvalidInputError, match="groups must be at least 1"):
            Runtime(tiny_q4.path, RuntimeOptions(groups=0))


def test_grouped_losses_on_smollm2_within_the_kv_cache_noise(smollm2, tmp_path):
    """On a real model with an F16 KV cache the two layouts round differently (SmolLM2's 8-bit
    activation rounding amplifies it, docs/runtime.md): the grouped ±ε difference must agree with
    the one-by-one difference far better than the difference is large."""
    rows = [{"prompt": f"Message: {t}\nIs this spam? Answer:", "completion": f" {a}", "choices": [" spam", " ham"]}
            for t, a in [("WIN a FREE cruise now, click here", "spam"), ("Lunch at noon tomorrow?", "ham"),
                         ("Cheap meds, no prescription needed", "spam"), ("The meeting notes are attached.", "ham"),
                         ("You are our lucky winner! Claim your prize", "spam"), ("Can you review my patch?", "ham")]]
    with Runtime(smollm2, RuntimeOptions(batch_size=6, max_tokens=64, groups=2, threads=2)) as rt:
        ex = _examples(rt, tmp_path, rows, "spam.jsonl")
        info = rt.info
        rng = np.random.default_rng(0)
        weights = {}
        for name in info.block_matmul_weights():
            size = info.tensors[name].n_elements
            weights[name] = (np.unique(rng.integers(0, size, size // 1000)), None)
        a = SparseAdapter.from_weights(info.architecture, {k: (i, np.zeros(len(i), np.float32))
                                                           for k, (i, _) in weights.items()})
        rt.attach(a)
        z = rng.standard_normal(len(a.values)).astype(np.float32)
        sets = [a.values + 1e-2 * z, a.values - 1e-2 * z]
        together = [r.mean for r in rt.losses(ex, ValueSets(a.values, sets))]
        alone = _one_by_one(a.values, sets, lambda: rt.loss(ex).mean)
    diff_alone, diff_together = alone[0] - alone[1], together[0] - together[1]
    assert abs(diff_alone) > 1e-3
    assert abs(diff_together - diff_alone) < 0.1 * abs(diff_alone), (together, alone)
