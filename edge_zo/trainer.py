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
          rank: int = 0, workers: int = 1, gather: Gather = gather_local) -> LoopState:
    """Run from state.step to cfg.steps. Validation at the start, every
    cfg.eval_every steps and at the end; checkpoints every cfg.save_every steps,
    at the end, and on Ctrl-C (then Interrupted is raised). With several workers,
    a Ctrl-C on any of them stops all of them after the same step."""
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
        if state.step == 0:
            report({"step": 0, **evaluate()})
        while state.step < cfg.steps:
            step = state.step
            t0 = time.perf_counter()
            idx = batch_indices(cfg.seed, step, n_examples, cfg.batch_size)
            local = {}
            for d in range(rank, cfg.directions, workers):
                z = spsa.direction(cfg.seed, step, len(state.theta), d)
                local[d] = spsa.estimate(live, state.theta, z, cfg.eps, lambda: loss(idx))
            t_gather = time.perf_counter()
            estimates, stopping = gather(local, stop["now"])
            t_gather = time.perf_counter() - t_gather
            gs = [e.g for e in estimates]
            lr = cfg.lr_at(step)
            spsa.take_step(state.theta, state.opt, gs, seed=cfg.seed, step=step, lr=lr)
            live[:] = state.theta
            state.scalars.append(gs)
            state.step += 1
            dt = time.perf_counter() - t0
            info = {"step": state.step, "loss": float(np.mean([e.loss for e in estimates])),
                    "projected_grad": float(np.mean(gs)), "eps": cfg.eps, "lr": lr, "step_seconds": dt}
            if workers > 1:
                info["gather_seconds"] = t_gather   # the all-gather, waiting for the slowest worker included
            if not np.isfinite(info["loss"]) or not np.all(np.isfinite(state.theta)):
                checkpoint(state)
                raise FloatingPointError(f"training diverged at step {state.step} (loss {info['loss']}); "
                                         "lower --lr or raise --eps")
            progress(state.step, info)
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                info.update(evaluate())
            report(info)
            if state.step % cfg.save_every == 0 or state.step == cfg.steps or stopping:
                checkpoint(state)
            if stopping and state.step < cfg.steps:
                raise Interrupted(f"stopped at step {state.step}")
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    return state
