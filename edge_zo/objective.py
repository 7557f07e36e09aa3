"""What a tuning step minimizes: the loss the SPSA estimate sees.

- `nll`: mean negative log-likelihood per target token of the completion, against the whole
  vocabulary. Right for free text (facts, a style), where the completion is what to learn.
- `choices`: for rows with `choices`, the cross-entropy over the row's choices (scored as
  `accuracy` scores them). A zeroth-order step carries a few bits; under `nll` most of them go
  into raising every label word against the other tokens of the vocabulary (the model learns to
  answer with a label, not which one), under `choices` all of them go into telling the choices
  apart. MeZO's prompt-based fine-tuning, where ZO matches first-order tuning, uses this loss.
  Single-token choices cost one forward of the prompt alone (runtime.choice_scores).
- `auto` (the default): `choices` when every training row has choices, else `nll`.
"""
from __future__ import annotations

import enum
from collections.abc import Callable

import numpy as np

from .dataset import Example
from .errors import InvalidInputError
from .runtime import Runtime, ValueSets, choice_cross_entropy, choice_correct


class Objective(enum.Enum):
    NLL = "nll"
    CHOICES = "choices"


AUTO = "auto"


def resolve(name: str, examples: list[Example]) -> Objective:
    """The objective `name` ('auto', 'nll' or 'choices') means for these training rows."""
    has_choices = bool(examples) and all(e.choices for e in examples)
    if name == AUTO:
        return Objective.CHOICES if has_choices else Objective.NLL
    objective = Objective(name)
    if objective is Objective.CHOICES and not has_choices:
        raise InvalidInputError("--objective choices needs 'choices' on every training row "
                                "(README.md, section 'Data format'); use --objective nll")
    return objective


def batch_loss(rt: Runtime, objective: Objective) -> Callable[[list[Example]], float]:
    """loss(examples): the mean of the objective over the examples, as the live deltas stand."""
    if objective is Objective.CHOICES:
        return lambda examples: float(np.mean(choice_cross_entropy(rt.choice_scores(examples), examples)))
    return lambda examples: rt.loss(examples).mean


def batch_losses(rt: Runtime, objective: Objective) -> Callable[[list[Example], ValueSets], list[float]]:
    """losses(examples, value_sets): batch_loss under each value set, evaluated together
    (Runtime.losses / choice_scores_under: one decode where they fit)."""
    if objective is Objective.CHOICES:
        return lambda examples, sets: [float(np.mean(choice_cross_entropy(scores, examples)))
                                       for scores in rt.choice_scores_under(examples, sets)]
    return lambda examples, sets: [r.mean for r in rt.losses(examples, sets)]


def validation(rt: Runtime, objective: Objective, examples: list[Example]) -> dict:
    """valid_loss (the objective), valid_nll under `choices`, and valid_accuracy where every row
    has choices; each example is evaluated once per metric kind."""
    has_choices = bool(examples) and all(e.choices for e in examples)
    out = {}
    if has_choices:
        scores = rt.choice_scores(examples)
        out["valid_accuracy"] = float(np.mean(choice_correct(scores, examples)))
        if objective is Objective.CHOICES:
            out["valid_loss"] = float(np.mean(choice_cross_entropy(scores, examples)))
    if "valid_loss" not in out:
        out["valid_loss"] = rt.loss(examples).mean
    return out
