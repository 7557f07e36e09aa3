"""`--lr auto`: the learning rate, from short tuning runs before the real one.

Each rate of the optimizer's grid (GRIDS) runs a short SPSA run from θ = 0 (at the run's ε, on its batches);
the rate whose loss on a fixed probe batch ends lowest wins, diverged runs lose, and the
run tunes one grid step below it: a 20-step probe rewards rates that are only stable for
20 steps. Measured over 300 steps (docs/tune.md): SmolLM2's probe picked 1e-4 on 5 of 6
Fisher runs and 3 of those ended worse than they started, where 3e-5 learned on all 6.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from .errors import EdgeZoError
from .spsa import Optimizer
from .trainer import LoopConfig, LoopState, batch_indices, train

LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)       # SGD and momentum: θ moves by lr·g·z
# Adam and sign steps move each coordinate by about lr whatever the loss's scale: a grid in weight units.
STEP_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
GRIDS = {Optimizer.SGD: LR_GRID, Optimizer.MOMENTUM: LR_GRID, Optimizer.ADAM: STEP_GRID, Optimizer.SIGN: STEP_GRID}
LR_BACK_OFF = 1
PROBE_STEPS = 20
MIN_PROBE_STEPS = 5
# Under --time each search (ε, then lr) may take this share of the budget, and shrinks to fit it.
SEARCH_SHARE = 0.15


def search_lr(loop: LoopConfig, live: np.ndarray, n_examples: int, loss: Callable[[np.ndarray], float],
              say: Callable[[str], None], probe_steps: int = PROBE_STEPS) -> tuple[float, dict]:
    """(the chosen rate, a record for run.json); `live` is left at zero. `probe_steps` is
    shortened by a time-budgeted run (tune's --time) to what its share of the budget allows."""
    grid = GRIDS[loop.optimizer]
    probe_steps = max(1, min(probe_steps, loop.steps))
    probe = batch_indices(loop.seed, 10**6, n_examples, max(loop.batch_size, 16))
    results = {}
    for lr in grid:
        trial = dataclasses.replace(loop, lr=lr, steps=probe_steps, eval_every=10**9, save_every=10**9, patience=0)
        state = LoopState.fresh(np.zeros(len(live), np.float32), trial)
        try:
            train(trial, state, n_examples=n_examples, live=live, loss=loss, evaluate=lambda: {},
                  report=lambda r: None, checkpoint=lambda s: None)
            probed = loss(probe)
            results[lr] = probed if np.isfinite(probed) else float("inf")   # NaN would confuse min()
        except FloatingPointError:
            results[lr] = float("inf")
        say(f"lr search: lr {lr:g} -> probe loss {results[lr]:.4f}")
    live[:] = 0.0
    best = min(results, key=lambda k: results[k])
    if not np.isfinite(results[best]):
        raise EdgeZoError("--lr auto: every learning rate of the search diverged; pass a smaller --lr, or a "
                          "smaller --eps")
    chosen = grid[max(0, grid.index(best) - LR_BACK_OFF)]
    say(f"lr search: best probe at lr {best:g}; tuning at lr {chosen:g}, a grid step below it, "
        "since rates at the edge drift over longer runs")
    return chosen, {"probe_steps": probe_steps, "losses": {str(k): v for k, v in results.items()}, "best": best,
                    "chosen": chosen}


def probe_steps_within(seconds: float, seconds_per_step: float, grid: tuple[float, ...] = LR_GRID) -> int:
    """Probe steps per grid rate that fit `seconds` (at least MIN_PROBE_STEPS, at most PROBE_STEPS)."""
    fit = int(seconds / max(len(grid) * seconds_per_step, 1e-9))
    return max(MIN_PROBE_STEPS, min(PROBE_STEPS, fit))
