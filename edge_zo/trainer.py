"""The SPSA training loop, written out top to bottom.

It knows nothing of llama.cpp: the caller hands in `loss(batch_indices)` (mean
loss per target token with the live values as they are now), `evaluate()` (a
dict of validation metrics) and the `live` buffer the engine reads. That keeps
the loop testable with a numpy objective and the engine swappable.

One worker of W evaluates directions rank, rank + W, ... of each step and hands
them to `gather`, which returns all of them in direction order (one process:
`gather_local`; several: edge_zo.distributed.Team.gather). Every worker then
applies the same update, so θ never has to travel.
"""
from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import spsa
from .constants import VALUE_MAX
from .errors import DivergedError
from .spsa import Optimizer, OptimizerState, Schedule


@dataclass(frozen=True)
class LoopConfig:
    steps: int = 200
    batch_size: int = 8
    # For library callers; `edge-zo tune` measures ε per model and backend (--eps auto, edge_zo.eps_probe).
    # 3e-3 meets r >= 0.9 on both test models on the CPU, not SmolLM2's Q4_1 on CUDA (docs/fidelity.md).
    eps: float = 3e-3
    lr: float = 1e-4
    optimizer: Optimizer = Optimizer.SGD
    schedule: Schedule = Schedule.CONSTANT
    warmup: int = 0
    directions: int = 1
    seed: int = 0
    eval_every: int = 25
    save_every: int = 25
    patience: int = 0        # stop after this many validations without a new best valid_loss; 0: never
    beta1: float = 0.9
    beta2: float = 0.999

    def lr_at(self, step: int) -> float:
        return spsa.learning_rate(self.lr, self.schedule, step, self.steps, self.warmup)


@dataclass
class LoopState:
    """Everything a checkpoint must hold to continue bit-exactly."""

    step: int
    theta: np.ndarray
    opt: OptimizerState
    scalars: list[list[float]] = field(default_factory=list)   # projected gradient(s) per step
    # The validated state with the lowest valid_loss so far: what deltas.gguf holds.
    best_step: int = 0
    best_loss: float = float("inf")
    best_theta: np.ndarray | None = None

    def note_validation(self, valid_loss: float) -> bool:
        """Keep θ if this validation is the best so far; True when it is."""
        if not valid_loss < self.best_loss:   # NaN never wins
            return False
        self.best_step, self.best_loss, self.best_theta = self.step, float(valid_loss), self.theta.copy()
        return True

    @property
    def best(self) -> np.ndarray:
        return self.theta if self.best_theta is None else self.best_theta

    @classmethod
    def fresh(cls, theta0: np.ndarray, cfg: LoopConfig) -> "LoopState":
        return cls(0, np.array(theta0, np.float32), OptimizerState.create(cfg.optimizer, len(theta0), cfg.beta1, cfg.beta2))


def batch_indices(seed: int, step: int, n_examples: int, batch_size: int) -> np.ndarray:
    """The examples of a step: consecutive slices of a per-epoch shuffle derived
    from (seed, epoch), so any step's batch is known without replaying earlier ones."""
    b = min(batch_size, n_examples)
    per_epoch = max(n_examples // b, 1)
    epoch, slot = divmod(step, per_epoch)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5A5A, epoch])))
    return rng.permutation(n_examples)[slot * b: (slot + 1) * b]


class Interrupted(Exception):
    """Raised from the loop after Ctrl-C once the state has been checkpointed."""


Gather = Callable[[dict[int, spsa.Estimate], bool], tuple[list[spsa.Estimate], bool]]


def gather_local(local: dict[int, spsa.Estimate], stop: bool) -> tuple[list[spsa.Estimate], bool]:
    """One process evaluates every direction: nothing to collect."""
    return [local[d] for d in sorted(local)], stop


def train(cfg: LoopConfig, state: LoopState, *, n_examples: int, live: np.ndarray,
          loss: Callable[[np.ndarray], float], evaluate: Callable[[], dict],
          report: Callable[[dict], None], checkpoint: Callable[[LoopState], None],
          progress: Callable[[int, dict], None] = lambda step, info: None,
          rank: int = 0, workers: int = 1, gather: Gather = gather_local,
          deadline: float | None = None,
          losses: Callable[[np.ndarray, list[np.ndarray]], list[float]] | None = None,
          scale: np.ndarray | None = None) -> LoopState:
    """Run from state.step to cfg.steps. Validation at the start, every
    cfg.eval_every steps and at the end; checkpoints every cfg.save_every steps,
    at the end, and on Ctrl-C (then Interrupted is raised). With several workers,
    a Ctrl-C on any of them stops all of them after the same step.

    The run ends early, validated and checkpointed, when the next step and a
    validation would pass `deadline` (a time.perf_counter() value), or after
    cfg.patience validations without a new best valid_loss.

    With `losses(batch_indices, value_sets)`, a step's value sets (θ+εz and θ−εz of each of the
    worker's directions) are evaluated together in one call instead of by writing each into `live`.

    With `scale` (edge_zo.weight_scale), perturbations and steps are taken relative to each
    coordinate's weight matrix: θ ± ε·scale⊙z, and lr in the same units (spsa.apply_update).

    A step whose training loss, projected gradient, new θ (beyond ±VALUE_MAX, the F16
    range of the deltas file, counts) or validation metrics are not finite raises
    DivergedError before it is reported or checkpointed, with `state` put back to the
    last finite step: the caller may checkpoint it, and a resume from there is exact."""
    stop = {"now": False}

    def on_sigint(signum, frame):  # finish the current step, save, then stop
        if stop["now"]:
            raise KeyboardInterrupt
        stop["now"] = True

    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    try:
        live[:] = state.theta
        eval_seconds = 0.0

        def validate(info: dict) -> None:
            nonlocal eval_seconds
            t = time.perf_counter()
            metrics = evaluate()
            eval_seconds = time.perf_counter() - t
            bad = _not_finite(metrics)
            if bad:
                raise DivergedError(f"the validation {bad}", state.step)
            info.update(metrics)
            if "valid_loss" in info:
                state.note_validation(info["valid_loss"])

        if state.step == 0:
            info = {"step": 0}
            try:
                validate(info)
            except DivergedError as exc:
                raise DivergedError(f"{exc} before any step: the model with its attached adapters gives "
                                    "non-finite losses on the validation data", 0, before_training=True) from None
            report(info)
        while state.step < cfg.steps:
            step = state.step
            t0 = time.perf_counter()
            idx = batch_indices(cfg.seed, step, n_examples, cfg.batch_size)
            mine = range(rank, cfg.directions, workers)
            if losses is not None:
                zs = {d: spsa.perturbation(cfg.seed, step, len(state.theta), d, scale) for d in mine}
                local = spsa.estimate_together(state.theta, zs, cfg.eps, lambda sets: losses(idx, sets))
            else:
                local = {d: spsa.estimate(live, state.theta, spsa.perturbation(cfg.seed, step, len(state.theta), d,
                                                                               scale),
                                          cfg.eps, lambda: loss(idx)) for d in mine}
            t_gather = time.perf_counter()
            estimates, stopping = gather(local, stop["now"])
            t_gather = time.perf_counter() - t_gather
            gs = [e.g for e in estimates]
            lr = cfg.lr_at(step)
            mean_loss = float(np.mean([e.loss for e in estimates]))
            if not (np.isfinite(mean_loss) and np.all(np.isfinite(gs))):
                raise DivergedError(f"training diverged at step {step + 1}: the training loss at θ ± ε·z "
                                    f"is {mean_loss:g}", step)
            before = (state.theta.copy(), {k: a.copy() for k, a in state.opt.arrays().items()})
            spsa.take_step(state.theta, state.opt, gs, seed=cfg.seed, step=step, lr=lr, scale=scale)
            beyond = np.flatnonzero(~(np.abs(state.theta) <= VALUE_MAX))   # NaN compares false: caught too
            if len(beyond):
                i = int(beyond[0])
                value = float(state.theta[i])
                _restore(state, live, before)
                raise DivergedError(f"training diverged at step {step + 1}: the update took coordinate {i} "
                                    f"to {value:g}, beyond the ±{VALUE_MAX:g} a deltas file holds", step)
            live[:] = state.theta
            state.scalars.append(gs)
            state.step += 1
            dt = time.perf_counter() - t0
            info = {"step": state.step, "loss": mean_loss,
                    "projected_grad": float(np.mean(gs)), "eps": cfg.eps, "lr": lr, "step_seconds": dt}
            if workers > 1:
                info["gather_seconds"] = t_gather   # the all-gather, waiting for the slowest worker included
            progress(state.step, info)
            ending = state.step == cfg.steps or (
                deadline is not None and time.perf_counter() + dt + eval_seconds >= deadline)
            if ending or state.step % cfg.eval_every == 0:
                try:
                    validate(info)
                except DivergedError as exc:
                    state.scalars.pop()
                    state.step -= 1
                    _restore(state, live, before)
                    raise DivergedError(f"training diverged at step {step + 1}: {exc}", step) from None
                if cfg.patience and "valid_loss" in info and \
                        state.step - state.best_step >= cfg.patience * cfg.eval_every:
                    ending = True
            report(info)
            if state.step % cfg.save_every == 0 or ending or stopping:
                checkpoint(state)
            if ending:
                break
            if stopping:
                raise Interrupted(f"stopped at step {state.step}")
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return state


def _not_finite(metrics: dict) -> str | None:
    """'loss is nan' for the first metric that is not a finite number, else None."""
    for key, value in metrics.items():
        if isinstance(value, (float, np.floating)) and not np.isfinite(value):
            return f"{key.removeprefix('valid_')} is {value:g}"
    return None


def _restore(state: LoopState, live: np.ndarray, before: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
    """Put θ and the optimizer's moments back to where the step started."""
    theta, moments = before
    state.theta[:] = theta
    for k, a in state.opt.arrays().items():
        a[:] = moments[k]
    live[:] = state.theta
