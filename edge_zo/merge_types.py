"""Which type each edited weight gets in the merged GGUF: the cheapest that keeps the tuned result.

A tuned delta is often smaller than half a 4-bit step, and then re-quantizing its block into the
model's own 4-bit type rounds it away; a finer type keeps it (Q5_0 at 1 bit per weight more for
the whole tensor, Q8_0 at 4). So every edited weight is tried in each candidate type and its error measured against
what the adapter path computes (dense + sidecar + deltas), at the adapter's coordinates, in the units that
matter for the output: each column weighted by the RMS of its input activation, sqrt(E[x_j^2])
(the statistic llama.cpp's imatrix gathers; `edge_zo.activation_mask.activation_stats`). The tuned
deltas sit in the high-activation columns the Fisher mask picks, where a rounded-away delta costs
most. The change re-quantizing makes to the other values (collateral) is measured too but does
not steer the choice: it is quantization noise of the kind the type always adds, uncorrelated
with the loss's gradient, while the deltas were tuned along it, so norm for norm a lost delta
costs far more loss (Q8_0's noise over a whole weight can exceed the deltas' norm and still
cost next to nothing); the held-out loss is the judge of both.

`choose_types` then spends a byte budget greedily: the upgrade that removes the most squared
error per added byte first, until the budget is spent or what is left is a negligible share of
the deltas' effect. The upgrades of a weight are the finer types that hold its grid exactly
(`edge_zo.quant_grid`: Q4_0 -> Q5_0 at half the step, 1 bit more per weight, or Q8_0 at a
sixteenth, 4 bits more; Q4_1 -> Q5_1), and Q8_0 for every type. A Q5 type that does not hold the
source grid is no candidate: converting a Q4_1 weight to Q5_0 moves every value by up to half a
Q4 step (measured on SmolLM2: mean |error| 0.0066, against 0.0008 for Q8_0, on weights of mean
|w| 0.15), which costs more than the deltas are worth.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .adapter import SparseAdapter
from .gguf_io import Tensor
from .merge import FALLBACK_TYPE, REQUANTIZABLE, merge_tensor
from .quant_grid import max_shift

UPGRADE_TYPES = ("Q5_0", "Q5_1", "Q8_0")   # what an edited weight may become when its own type loses them
NEGLIGIBLE = 1e-4              # stop upgrading once the squared error left is this share of the effect's


@dataclass(frozen=True)
class TypeOption:
    type_name: str
    nbytes: int
    error2: float       # ||(W_merged - W_adapter_path) * s||^2 at the adapter's coordinates, activation-weighted
    collateral2: float  # the same at every other coordinate: what re-quantizing moved besides


@dataclass(frozen=True)
class TensorChoice:
    """The measured options of one edited weight, cheapest first."""

    name: str
    source_type: str
    effect2: float                  # ||(W_tuned - W_original) * s||^2: the deltas' own weight
    options: tuple[TypeOption, ...]

    def option(self, type_name: str) -> TypeOption:
        return next(o for o in self.options if o.type_name == type_name)


def column_scale(e_x2: np.ndarray | None, n_in: int) -> np.ndarray:
    """sqrt(E[x^2]) per input column, floored so a column llama.cpp never saw active still counts a
    little; all ones without statistics (plain weight-space error)."""
    if e_x2 is None:
        return np.ones(n_in, np.float64)
    s = np.sqrt(np.maximum(np.asarray(e_x2, np.float64), 0.0))
    floor = 1e-3 * float(s.mean()) if s.size and s.mean() > 0 else 1.0
    return np.maximum(s, floor)


def _dense(t: Tensor, type_name: str, raw: np.ndarray) -> np.ndarray:
    import gguf

    q = gguf.GGMLQuantizationType[type_name]
    return np.asarray(gguf.quants.dequantize(np.ascontiguousarray(raw).view(np.uint8), q),
                      np.float32).reshape(t.shape)


def _coords(adapter: SparseAdapter | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    if adapter is None or name not in adapter.names:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    i = adapter.names.index(name)
    return adapter.indices[i], adapter.weight_values(i)


def upgrade_types(source_type: str) -> tuple[str, ...]:
    """The types an edited weight of `source_type` may become: those of UPGRADE_TYPES that hold
    its grid exactly, and Q8_0 for any type."""
    return tuple(u for u in UPGRADE_TYPES if u == FALLBACK_TYPE or (max_shift(source_type, u) or 0) > 0)


def measure_tensor(t: Tensor, personalized: SparseAdapter, original: SparseAdapter | None,
                   e_x2: np.ndarray | None, candidates: tuple[str, ...] | None = None) -> TensorChoice:
    """Merge weight `t` with `personalized` (sidecar + deltas) in its own type and in each
    candidate type, and measure each result against base + personalized in float32. The effect
    is measured against base + `original` (the sidecar alone: the model before tuning)."""
    import gguf

    idx, val = _coords(personalized, t.name)
    base = t.dequantize().astype(np.float32).reshape(-1)
    target = base.copy()
    np.add.at(target, idx, val)
    before = base.copy()
    o_idx, o_val = _coords(original, t.name)
    np.add.at(before, o_idx, o_val)
    s = column_scale(e_x2, t.shape[-1])
    n_in = t.shape[-1]

    def weighted2(diff: np.ndarray) -> float:
        return float(np.sum((diff.reshape(-1, n_in).astype(np.float64) * s) ** 2))

    at = np.union1d(idx, o_idx)
    cols = at % n_in

    def weighted2_at(diff: np.ndarray) -> float:
        return float(np.sum((diff[at].astype(np.float64) * s[cols]) ** 2))

    own = t.type_name if t.type_name in REQUANTIZABLE else None
    candidates = upgrade_types(t.type_name) if candidates is None else candidates
    types = ([own] if own else []) + [c for c in candidates if c != own]
    if not own and FALLBACK_TYPE not in types:
        types.append(FALLBACK_TYPE)
    options = []
    for type_name in types:
        raw, _ = merge_tensor(t.raw, t.type_name, type_name, idx, val, name=t.name)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
        diff = _dense(t, type_name, raw).reshape(-1) - target
        at_coords = weighted2_at(diff)
        options.append(TypeOption(type_name, t.n_elements // block * size, at_coords, weighted2(diff) - at_coords))
    # The first option is the plain merge's (own type, or Q8_0 for a type gguf-py cannot write);
    # a candidate is an upgrade only if it is larger: Q8_0 is no upgrade for an F16 weight.
    options = [options[0]] + sorted((o for o in options[1:] if o.nbytes > options[0].nbytes), key=lambda o: o.nbytes)
    return TensorChoice(t.name, t.type_name, weighted2_at(target - before), tuple(options))


def choose_types(choices: Mapping[str, TensorChoice], extra_bytes: int) -> dict[str, str]:
    """{weight: type}, starting from each weight's cheapest option and taking, while `extra_bytes`
    allows, the upgrade that removes the most squared error per added byte.

    The cheapest option is the weight's own type (or Q8_0 for a type that cannot be
    re-quantized), so a budget of 0 reproduces the plain merge."""
    chosen = {name: c.options[0] for name, c in choices.items()}
    total_effect = sum(c.effect2 for c in choices.values())
    left = extra_bytes
    while True:
        residual = sum(o.error2 for o in chosen.values())
        if residual <= NEGLIGIBLE * total_effect:
            break
        best, best_gain = None, 0.0
        for name, c in choices.items():
            cur = chosen[name]
            for o in c.options:
                added = o.nbytes - cur.nbytes
                if added <= 0 or added > left or o.error2 >= cur.error2:
                    continue
                gain = (cur.error2 - o.error2) / added
                if gain > best_gain:
                    best, best_gain = (name, o), gain
        if best is None:
            break
        name, o = best
        left -= o.nbytes - chosen[name].nbytes
        chosen[name] = o
    return {name: o.type_name for name, o in chosen.items()}


def kept_share(choices: Mapping[str, TensorChoice], types: Mapping[str, str]) -> float:
    """1 - (activation-weighted error left at the adapter's coordinates) / (the deltas' effect), over
    all edited weights: 1.0
    when the merged weights equal the adapter path's, 0.0 when the error is as large as the
    deltas themselves (as when every delta rounds away)."""
    effect = sum(c.effect2 for c in choices.values())
    if effect == 0:
        return 1.0
    error = sum(c.option(types[n]).error2 for n, c in choices.items())
    return float(1.0 - np.sqrt(error / effect))


def collateral_share(choices: Mapping[str, TensorChoice], types: Mapping[str, str]) -> float:
    """Activation-weighted norm of what re-quantizing moved away from the adapter's coordinates,
    relative to the deltas' effect (reported, not optimized: see the module's docstring)."""
    effect = sum(c.effect2 for c in choices.values())
    moved = sum(c.option(types[n]).collateral2 for n, c in choices.items())
    return float(np.sqrt(moved / effect)) if effect else 0.0
