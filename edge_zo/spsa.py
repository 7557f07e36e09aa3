"""SPSA / zeroth-order optimizers over a flat float32 vector of sparse values.

A step draws a direction z from (seed, step) alone, so directions are never
stored: the run's seed and one scalar per step (the projected gradient
g = (L(θ+εz) − L(θ−εz)) / 2ε) replay the whole trajectory exactly.

Optimizers see only (θ, g, z, lr) and keep their state in arrays of θ's size
(the sparse set, not the model), so ZO-Adam on 0.1% of a 7B model costs two
more vectors of 7M floats.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def direction(seed: int, step: int, n: int, index: int = 0) -> np.ndarray:
    """z ~ N(0, I) for (seed, step, index), independent of anything run before."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step, index])))
    return rng.standard_normal(n, dtype=np.float32)


class Optimizer(enum.Enum):
    SGD = "sgd"              # MeZO's ZO-SGD: θ -= lr·g·z
    MOMENTUM = "momentum"    # ZO-SGD with heavy-ball momentum on g·z
    ADAM = "adam"            # ZO-Adam: Adam moments of g·z, kept on the sparse set
    SIGN = "sign"            # ZO-SignSGD: θ -= lr·sign(g·z)


class Schedule(enum.Enum):
    CONSTANT = "constant"
    LINEAR = "linear"        # to 0 at the last step
    COSINE = "cosine"        # to 0 at the last step


def learning_rate(lr: float, schedule: Schedule, step: int, total: int, warmup: int = 0) -> float:
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if schedule is Schedule.LINEAR:
        return lr * (1.0 - frac)
    if schedule is Schedule.COSINE:
        return lr * 0.5 * (1.0 + np.cos(np.pi * frac))
    return lr


@dataclass
class OptimizerState:
    kind: Optimizer
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8

    @classmethod
    def create(cls, kind: Optimizer, n: int, beta1: float = 0.9, beta2: float = 0.999) -> "OptimizerState":
        m = np.zeros(n, np.float32) if kind in (Optimizer.MOMENTUM, Optimizer.ADAM) else None
        v = np.zeros(n, np.float32) if kind is Optimizer.ADAM else None
        return cls(kind, m, v, beta1, beta2)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: a for k, a in (("m", self.m), ("v", self.v)) if a is not None}


def apply_update(theta: np.ndarray, state: OptimizerState, g: float, z: np.ndarray, lr: float, step: int,
                 scale: np.ndarray | None = None) -> None:
    """θ ← θ − lr · scale ⊙ update(g·z), in place; float32 throughout so replays are bit-exact.

    `scale` (one positive float per coordinate, or None for 1) runs the optimizer in the units
    u = θ / scale: the perturbation was ε·scale⊙z, and the step taken in u is mapped back to θ."""
    g = np.float32(g)
    lr = np.float32(lr)
    kind = state.kind
    if kind is Optimizer.SGD:
        step_u = (lr * g) * z
    elif kind is Optimizer.SIGN:
        step_u = lr * np.sign(g * z)
    elif kind is Optimizer.MOMENTUM:
        state.m *= np.float32(state.beta1)
        state.m += g * z
        step_u = lr * state.m
    else:  # ADAM
        b1, b2 = np.float32(state.beta1), np.float32(state.beta2)
        gz = g * z
        state.m *= b1
        state.m += (1 - b1) * gz
        state.v *= b2
        state.v += (1 - b2) * gz * gz
        t = step + 1
        m_hat = state.m / np.float32(1 - state.beta1 ** t)
        v_hat = state.v / np.float32(1 - state.beta2 ** t)
        step_u = lr * m_hat / (np.sqrt(v_hat) + np.float32(state.adam_eps))
    if scale is not None:
        step_u *= scale
    theta -= step_u


@dataclass(frozen=True)
class Estimate:
    g: float          # projected gradient (L+ − L−) / 2ε
    loss_plus: float
    loss_minus: float

    @property
    def loss(self) -> float:
        """The two-sided estimate's loss at θ, to first order."""
        return 0.5 * (self.loss_plus + self.loss_minus)


def estimate(live: np.ndarray, theta: np.ndarray, z: np.ndarray, eps: float,
             loss: Callable[[], float]) -> Estimate:
    """Two-sided SPSA: evaluate at θ+εz and θ−εz by writing into `live`, the
    buffer the native runtime reads, then leave θ there."""
    e = np.float32(eps)
    np.multiply(z, e, out=live)
    live += theta
    lp = loss()
    np.multiply(z, -e, out=live)
    live += theta
    lm = loss()
    live[:] = theta
    return Estimate((lp - lm) / (2.0 * eps), lp, lm)


def estimate_together(theta: np.ndarray, zs: dict[int, np.ndarray], eps: float,
                      losses: Callable[[list[np.ndarray]], list[float]]) -> dict[int, Estimate]:
    """Two-sided SPSA for several directions at once: `losses` evaluates the value sets
    θ+εz, θ−εz of every direction together (one llama_decode where they fit) and returns their
    losses in that order. The sets are the values `estimate` writes, bit for bit."""
    e = np.float32(eps)
    sets = []
    for z in zs.values():
        sets += [np.multiply(z, e) + theta, np.multiply(z, -e) + theta]
    out = losses(sets)
    return {d: Estimate((out[2 * k] - out[2 * k + 1]) / (2.0 * eps), out[2 * k], out[2 * k + 1])
            for k, d in enumerate(zs)}


def replay(theta0: np.ndarray, scalars: list[list[float]] | list[float], *, seed: int, optimizer: Optimizer,
           lr_at: Callable[[int], float], beta1: float = 0.9, beta2: float = 0.999,
           scale: np.ndarray | None = None) -> np.ndarray:
    """Rebuild θ from the seed and the per-step projected gradients alone."""
    theta = np.array(theta0, np.float32)
    state = OptimizerState.create(optimizer, len(theta), beta1, beta2)
    for step, gs in enumerate(scalars):
        take_step(theta, state, gs if isinstance(gs, list) else [gs], seed=seed, step=step, lr=lr_at(step),
                  scale=scale)
    return theta


def perturbation(seed: int, step: int, n: int, index: int = 0, scale: np.ndarray | None = None) -> np.ndarray:
    """The vector a step moves θ along to evaluate L(θ ± ε·…): the direction, times `scale` if any."""
    z = direction(seed, step, n, index)
    if scale is not None:
        z *= scale
    return z


def take_step(theta: np.ndarray, state: OptimizerState, gs: list[float], *, seed: int, step: int, lr: float,
              scale: np.ndarray | None = None) -> None:
    """Apply the averaged update of one step's directions (one g per direction)."""
    if len(gs) == 1:
        apply_update(theta, state, gs[0], direction(seed, step, len(theta)), lr, step, scale)
        return
    # Average g·z over the directions, then one optimizer update with g = 1.
    acc = np.zeros(len(theta), np.float32)
    for i, g in enumerate(gs):
        acc += np.float32(g) * direction(seed, step, len(theta), i)
    acc /= np.float32(len(gs))
    apply_update(theta, state, 1.0, acc, lr, step, scale)
