"""`--eps auto`: the perturbation size ε, measured on the model's own losses before tuning.

SPSA sees only L(θ+εz) − L(θ−εz). On llama.cpp the ε for which that difference follows
2ε·z·∇L lies in a window (docs/fidelity.md, measured against torch autograd):
- below it, a noise floor: quantized matmuls round activations to 8 bits, so any change of the
  weights, however small, moves the loss by a roughly fixed amount (a δ of 1e-6 moves it as
  much as one of 1e-3 does);
- above it, the loss stops being linear over ±εz.
The window moves with the model (Gemma-3-270M's: 1e-3 to 3e-3; SmolLM2-135M's: 3e-3 to 1e-2),
with the backend (SmolLM2's Q4_1 matmuls are twice as noisy on CUDA as on the CPU) and little
with the task; no single ε fits (ε = 3e-3 gave r = 0.89 for SmolLM2 on CUDA, 1e-2 gave 0.31 for
Gemma). But it can be found from losses alone: inside the window the differences at ε and at 3ε
are the same signal scaled by 3, so they correlate across directions; below it the one at ε is
noise, above it the one at 3ε has bent, and the correlation drops either way.

So the probe takes differences on a ×3 ladder of ε over the same directions (its own, one per
batch of the run's first batches, not the run's directions), finds the neighbouring pair that
agrees best (the lowest of near-ties), and returns the geometric mean of the pair. Two rungs can
also agree where both are past the bend, if the loss is a smooth curve there (on the models measured it was not: rungs
past it agreed at 0.3–0.45); the differences then grow much faster than ε, so a pair counts only
if its rms grows about as ε does (×1.7 to ×5.2 for ×3). Where the best pair is at an end of the
ladder, or no pair grows linearly, the ladder grows a rung that way (within EPS_MIN … EPS_MAX).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import spsa
from .errors import DivergedError

LADDER = (1e-3, 3e-3, 9e-3, 2.7e-2)
STEP = 3.0
EPS_MIN, EPS_MAX = 1e-4, 0.1
MAX_RUNGS = 6
LINEAR_GROWTH = (STEP ** 0.5, STEP ** 1.5)   # rms ratio of a pair of rungs in the linear regime
# Pairs within TIE of the best agreement count as equal, and the lowest of them wins: past the bend
# the estimate is biased (its slope falls), where noise only scatters it. With 12 directions a
# correlation is known to a few hundredths; SmolLM2 on CUDA had 0.82 at (3e-3, 9e-3) and at
# (9e-3, 2.7e-2), where 64 directions against autograd gave r 0.96 near the first, 0.66 at 2.7e-2.
TIE = 0.03
DIRECTIONS = 12
MIN_DIRECTIONS = 6           # a time-budgeted run's probe (tune --time) uses no fewer
TYPICAL_RUNGS = 5            # the ladder's 4 rungs, and often one more
# Where even the smallest probe does not fit its share of a --time budget (a slow file, long rows,
# a few minutes), the run tunes at this ε rather than spend most of its minutes probing: the middle
# of what the probe chose on the models and backends measured (1.7e-3 … 5.2e-3, docs/fidelity.md).
FALLBACK_EPS = 3e-3
POOR_AGREEMENT = 0.7         # below: the estimates will be noisy whatever ε is (r ≲ 0.85)
# The probe's directions come from their own stream (index), so a run's directions stay those of
# a fixed-ε run with the same seed.
PROBE_STREAM = 0x0E95


@dataclass(frozen=True)
class EpsChoice:
    eps: float
    agreement: float                  # correlation of the differences at the chosen pair's two ε
    pair: tuple[float, float]
    rms_diff: dict[str, float]        # ε -> rms over directions of L(θ+εz) − L(θ−εz), nats
    correlations: dict[str, float]    # "ε1/ε2" -> correlation of the two rungs' differences
    directions: int
    forwards: int

    def as_json(self) -> dict:
        return {"eps": self.eps, "agreement": round(self.agreement, 4), "pair": list(self.pair),
                "rms_diff": self.rms_diff, "correlations": self.correlations, "directions": self.directions,
                "forwards": self.forwards}


def choose_eps(loss_at: Callable[[int, np.ndarray], float], n_params: int, seed: int,
               directions: int = DIRECTIONS) -> EpsChoice:
    """ε for a run. `loss_at(k, offset)` is the loss of the run's k-th batch with the sparse values
    at θ + offset; k runs over 0 … directions − 1, one direction per batch."""
    if n_params <= 0 or directions < 3:
        raise ValueError("choose_eps needs at least one parameter and three directions")
    zs = [spsa.direction(seed, k, n_params, PROBE_STREAM) for k in range(directions)]
    diffs: dict[float, np.ndarray] = {}

    def measure(eps: float) -> None:
        e = np.float32(eps)
        d = np.array([loss_at(k, e * z) - loss_at(k, -e * z) for k, z in enumerate(zs)])
        if not np.all(np.isfinite(d)):
            raise DivergedError(f"--eps auto: a loss at ±{eps:.3g}·z was not finite: the model with its sidecar "
                                "gives non-finite losses on this data (see `edge-zo eval MODEL DATA --adapter "
                                "SIDECAR`)", 0, before_training=True)
        diffs[eps] = d

    def corr(a: float, b: float) -> float:
        x, y = diffs[a], diffs[b]
        if np.std(x) == 0 or np.std(y) == 0:
            return 0.0
        return float(np.corrcoef(x, y)[0, 1])

    def growth(a: float, b: float) -> float:
        lo = np.sqrt(np.mean(diffs[a] ** 2))
        return float(np.sqrt(np.mean(diffs[b] ** 2)) / lo) if lo > 0 else math.inf

    for eps in LADDER:
        measure(eps)
    while True:
        rungs = sorted(diffs)
        pairs = list(zip(rungs, rungs[1:]))
        linear = [p for p in pairs if LINEAR_GROWTH[0] <= growth(*p) <= LINEAR_GROWTH[1]]
        top = max(corr(*p) for p in linear or pairs)
        best = min(p for p in linear or pairs if corr(*p) >= top - TIE)
        if linear:   # look past the best pair when it is at an end of the ladder
            way = -1 if best == pairs[0] else 1 if best == pairs[-1] else 0
        else:        # all noise (growing slower than ε): go up; all past the bend (faster): go down
            way = -1 if np.median([growth(*p) for p in pairs]) > LINEAR_GROWTH[1] else 1
        if len(diffs) >= MAX_RUNGS:
            break
        if way < 0 and rungs[0] / STEP >= EPS_MIN:
            measure(rungs[0] / STEP)
        elif way > 0 and rungs[-1] * STEP <= EPS_MAX:
            measure(rungs[-1] * STEP)
        else:
            break
    eps = float(f"{math.sqrt(best[0] * best[1]):.3g}")
    rms = {f"{e:.3g}": float(np.sqrt(np.mean(d ** 2))) for e, d in sorted(diffs.items())}
    correlations = {f"{a:.3g}/{b:.3g}": round(corr(a, b), 4) for a, b in pairs}
    return EpsChoice(eps, corr(*best), best, rms, correlations, directions, 2 * directions * len(diffs))


def choose_eps_live(live: np.ndarray, batch_loss: Callable[[int], float], seed: int,
                    directions: int = DIRECTIONS) -> EpsChoice:
    """choose_eps through the buffer the native runtime reads: each offset is written into `live`
    around the values θ it holds, and θ is back in it afterwards. `batch_loss(k)` is the loss of the
    run's k-th batch with `live` as it is."""
    theta = live.copy()

    def loss_at(k: int, offset: np.ndarray) -> float:
        np.add(theta, offset, out=live)
        return batch_loss(k)

    try:
        return choose_eps(loss_at, len(live), seed, directions)
    finally:
        live[:] = theta


def _direction_seconds(forward_seconds: float) -> float:
    """Seconds of one direction's ± forwards over a typical ladder."""
    return 2 * TYPICAL_RUNGS * forward_seconds


def smallest_probe_seconds(forward_seconds: float) -> float:
    """Seconds of the smallest probe a --time budget allows: MIN_DIRECTIONS directions."""
    return MIN_DIRECTIONS * _direction_seconds(forward_seconds)


def directions_within(seconds: float, forward_seconds: float) -> int:
    """Directions whose ± forwards over a typical ladder fit `seconds` (MIN_DIRECTIONS … DIRECTIONS)."""
    fit = int(seconds / max(_direction_seconds(forward_seconds), 1e-9))
    return max(MIN_DIRECTIONS, min(DIRECTIONS, fit))


def warning(choice: EpsChoice) -> str | None:
    """What to tell the user when the probe says the estimates will be poor at any ε."""
    if not any(choice.rms_diff.values()):
        tried = [float(e) for e in choice.rms_diff]
        return (f"--eps auto: the loss did not move with the tuned coordinates at any ε from {min(tried):g} "
                f"to {max(tried):g}; check that the data's targets reach the masked weights")
    if choice.agreement < POOR_AGREEMENT:
        return (f"--eps auto: the loss differences agree poorly at every ε tried (best correlation "
                f"{choice.agreement:.2f}, at ε {choice.pair[0]:g} and {choice.pair[1]:g}): expect noisy gradient "
                "estimates. A larger --batch-size averages the rounding noise down; so does a finer dense type (Q8_0)")
    return None
