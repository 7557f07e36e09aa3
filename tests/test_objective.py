"""The choices objective: choice scores from one forward of the prompt equal the scores of
whole choice sequences, the cross-entropy is the softmax over those scores, and tuning on it
teaches a tiny model to pick the right choice."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_zo import objective, run_dir
from edge_zo.cli import main as cli
from edge_zo.dataset import Tokenizer, load_jsonl
from edge_zo.errors import InvalidInputError
from edge_zo.runtime import Runtime, RuntimeOptions, choice_correct, choice_cross_entropy, shared_prompt

from .conftest import write_jsonl, zero_sidecar

OPTS = RuntimeOptions(batch_size=8, max_tokens=64, kv_f32=True)
ROWS = [{"prompt": f"Row {i}: is the sky {c}? Answer:", "completion": a, "choices": [" yes", " no"]}
        for i, (c, a) in enumerate([("blue", " yes"), ("green", " no"), ("grey", " no"), ("clear", " yes")])]
MULTI = [{"prompt": "Who wrote Moby-Dick? Answer:", "completion": " Herman Melville",
          "choices": [" Herman Melville", " William Shakespeare", " a U.S. President"]}]


def _examples(rt, path):
    return Tokenizer(rt.native, max_tokens=64).examples(load_jsonl(path))


def _sequence_scores(rt, examples):
    """Every choice as its own sequence: the reference the one-forward path must equal."""
    out = []
    for e in examples:
        r = rt.loss(e.choices)
        out.append(-r.nll / r.count)
    return out


@pytest.mark.parametrize("rows", [ROWS, MULTI + ROWS], ids=["single-token", "mixed"])
def test_choice_scores_equal_whole_sequence_scores(tiny, tmp_path, rows):
    with Runtime(tiny.path, OPTS) as rt:
        ex = _examples(rt, write_jsonl(tmp_path / "d.jsonl", rows))
        fast = rt.choice_scores(ex)
        slow = _sequence_scores(rt, ex)
    for f, s in zip(fast, slow):
        np.testing.assert_allclose(f, s, rtol=1e-5, atol=1e-5)
    assert len(fast[0]) == len(rows[0]["choices"])


def test_a_long_prompt_is_cut_alike_for_every_choice(tiny, tmp_path):
    """A prompt longer than the context loses the same tokens before each choice, whatever the
    choice's length: the choices are compared after one prompt, which is decoded once for all."""
    long = " ".join(f"word{i}" for i in range(200)) + " Who wrote it? Answer:"
    rows = [{"prompt": long, "completion": " Herman Melville",
             "choices": [" Herman Melville", " Shakespeare", " a U.S. President"]}]
    with Runtime(tiny.path, OPTS) as rt:
        [e] = _examples(rt, write_jsonl(tmp_path / "long.jsonl", rows))
        n = shared_prompt(e)
        assert n is not None and max(len(c.tokens) for c in e.choices) == OPTS.max_tokens
        assert all(np.array_equal(c.tokens[:n], e.choices[0].tokens[:n]) for c in e.choices)
        assert np.array_equal(e.tokens, e.choices[0].tokens) and e.answer == 0
        np.testing.assert_allclose(rt.choice_scores([e])[0], _sequence_scores(rt, [e])[0], rtol=1e-5, atol=1e-5)


def test_multi_token_choices_on_smollm2_score_as_whole_sequences(smollm2, tmp_path):
    """The real model: choices of one to four tokens after a shared prompt, scored with the prompt
    decoded once, equal the choices scored as whole sequences (up to the F16 KV cache's rounding
    of a batch laid out differently)."""
    rows = [{"prompt": f"Passage {i}: 'Call me Ishmael.' Who wrote it? Answer:", "completion": " Herman Melville",
             "choices": [" Herman Melville", " William Shakespeare", " a U.S. President"]} for i in range(5)]
    with Runtime(smollm2, RuntimeOptions(batch_size=4, max_tokens=64, threads=2)) as rt:
        ex = _examples(rt, write_jsonl(tmp_path / "m.jsonl", rows))
        assert max(c.n_targets for c in ex[0].choices) > 1      # not the single-token path
        fast = rt.choice_scores(ex)
        slow = _sequence_scores(rt, ex)
    for f, s in zip(fast, slow):
        np.testing.assert_allclose(f, s, rtol=1e-3, atol=1e-3)


def test_cross_entropy_is_the_softmax_over_choices():
    class E:
        def __init__(self, answer):
            self.answer = answer

    scores = [np.array([-1.0, -2.0]), np.array([-0.5, -0.4, -3.0])]
    ex = [E(0), E(2)]
    ce = choice_cross_entropy(scores, ex)
    for s, e, c in zip(scores, ex, ce):
        p = np.exp(s) / np.exp(s).sum()
        assert c == pytest.approx(-np.log(p[e.answer]))
    assert choice_correct(scores, ex).tolist() == [True, False]


def test_auto_picks_choices_only_when_every_row_has_them(tiny, tmp_path):
    with Runtime(tiny.path, OPTS) as rt:
        with_choices = _examples(rt, write_jsonl(tmp_path / "c.jsonl", ROWS))
        plain = _examples(rt, write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": " b"}]))
    assert objective.resolve("auto", with_choices) is objective.Objective.CHOICES
    assert objective.resolve("auto", plain) is objective.Objective.NLL
    assert objective.resolve("nll", with_choices) is objective.Objective.NLL
    with pytest.raises(InvalidInputError, match="--objective choices needs 'choices'"):
        objective.resolve("choices", plain)


def test_tune_on_choices_learns_to_tell_them_apart(tiny_q4, tmp_path):
    """A toy task whose answer depends on the prompt: the choices objective must raise
    validation accuracy, and the run records which objective it used."""
    rows = [{"prompt": f"Item {i}. Colour {'red' if i % 2 else 'blue'}. Warm? Answer:",
             "completion": " yes" if i % 2 else " no", "choices": [" yes", " no"]} for i in range(32)]
    data = write_jsonl(tmp_path / "warm.jsonl", rows)
    sidecar = zero_sidecar(tiny_q4.path, tmp_path / "sidecar.gguf", share=50)
    out = tmp_path / "run"
    assert cli(["tune", str(tiny_q4.path), str(data), "--sidecar", str(sidecar), "-o", str(out), "--quiet",
                "--steps", "60", "--lr", "3e-2", "--eps", "1e-2", "--eval-every", "20", "--optimizer", "adam",
                "--valid-fraction", "0.25"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["objective"] == "auto" and run["objective_resolved"] == "choices"
    valid = [r for r in run_dir.read_metrics(out) if "valid_loss" in r]
    assert valid[0]["valid_loss"] == pytest.approx(np.log(2), abs=0.3)   # CE over two choices, not a vocab NLL
    best = min(valid, key=lambda r: r["valid_loss"])
    assert best["valid_loss"] < valid[0]["valid_loss"] - 0.1, valid
    assert best["valid_accuracy"] >= valid[0]["valid_accuracy"], valid
