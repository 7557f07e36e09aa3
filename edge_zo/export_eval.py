"""Held-out loss and accuracy of one model variant, in one pass over the rows.

`edge-zo eval` runs the rows for the loss, then again for the accuracy. For rows with choices
whose completion is one of the choices (the usual case), the completion's sequence is the
answer's, so its summed NLL is the answer's per-token score times its target count: scoring the
choices gives both numbers, and single-token choices (ham/spam) cost one forward of the prompt.
Rows without choices, or whose completion is not tokenized as its answer, fall back to a loss
pass. A scorer is anything with `loss` and `choice_scores` (`edge_zo.runtime.Runtime`,
`edge_zo.stock_llama.StockLlama`).
"""
from __future__ import annotations

import time

import numpy as np

from .dataset import Example
from .runtime import choice_correct, choice_cross_entropy, single_token_choices


def _answer_is_completion(e: Example) -> bool:
    if not e.choices:
        return False
    a = e.choices[e.answer]
    return np.array_equal(a.tokens, e.tokens) and np.array_equal(a.targets, e.targets)


def needs_all_logits(examples: list[Example], with_choices: bool) -> bool:
    """Whether `evaluate` needs logits beyond each prompt's last position."""
    return not (with_choices and all(single_token_choices(e) and _answer_is_completion(e) for e in examples))


def evaluate(scorer, examples: list[Example], with_choices: bool) -> dict:
    """{"loss": mean NLL per target token, "seconds"}, and with choices "accuracy" and "choice_loss"
    (the mean cross-entropy over each row's choices: what `tune --objective choices` minimizes)."""
    t0 = time.perf_counter()
    nll = np.zeros(len(examples))
    count = np.array([e.n_targets for e in examples], np.int64)
    out: dict = {}
    rest = list(range(len(examples)))
    if with_choices:
        scores = scorer.choice_scores(examples)
        out["accuracy"] = float(np.mean(choice_correct(scores, examples)))
        out["choice_loss"] = float(np.mean(choice_cross_entropy(scores, examples)))
        rest = []
        for i, (s, e) in enumerate(zip(scores, examples)):
            if _answer_is_completion(e):
                nll[i] = -float(s[e.answer]) * e.choices[e.answer].n_targets
            else:
                rest.append(i)
    if rest:
        r = scorer.loss([examples[i] for i in rest])
        nll[rest] = r.nll
    out["loss"] = float(nll.sum() / max(int(count.sum()), 1))
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out
