"""A tuning run's folder: settings, metrics, checkpoint, trajectory, plot.

Every file is written atomically (temporary file in the same folder, then
rename), so a run killed at any moment leaves either the old or the new file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import InvalidInputError
from .spsa import Optimizer, OptimizerState
from .trainer import LoopState

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.npz"
TRAJECTORY = "trajectory.json"
DELTAS = "deltas.gguf"
PLOT = "loss.png"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp over path."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n"))


def save_checkpoint(out: Path, state: LoopState) -> None:
    arrays = {"theta": state.theta, "step": np.array(state.step)}
    arrays |= {f"opt_{k}": a for k, a in state.opt.arrays().items()}
    # np.savez appends .npz to names without it; write to an explicit handle instead.
    def write(p: Path):
        with open(p, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(out / CHECKPOINT, write)


def load_checkpoint(out: Path, optimizer: Optimizer, beta1: float, beta2: float) -> LoopState:
    path = out / CHECKPOINT
    if not path.is_file():
        raise InvalidInputError(f"{path}: no checkpoint to resume from; start the run without --resume")
    with np.load(path) as z:
        theta = z["theta"].astype(np.float32)
        step = int(z["step"])
        opt = OptimizerState.create(optimizer, len(theta), beta1, beta2)
        if opt.m is not None:
            opt.m[:] = z["opt_m"]
        if opt.v is not None:
            opt.v[:] = z["opt_v"]
    traj = json.loads((out / TRAJECTORY).read_text())
    scalars = traj["scalars"][:step]
    if len(scalars) != step:
        raise InvalidInputError(f"{out}: the trajectory has {len(scalars)} steps but the checkpoint {step}")
    return LoopState(step, theta, opt, scalars)


def append_metrics(out: Path, record: dict) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def truncate_metrics(out: Path, after_step: int) -> None:
    """On resume, drop the lines a killed run wrote past its last checkpoint."""
    path = out / METRICS
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in keep)))


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_losses(out: Path) -> Path | None:
    """Training and validation loss against step, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(out)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    valid = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.6, label="train (SPSA batch)")
    if valid:
        ax.plot(*zip(*valid), "o-", lw=1.8, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"edge-zo tune: {out.name}")
    fig.tight_layout()
    atomic_write(out / PLOT, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out / PLOT
