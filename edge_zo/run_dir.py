"""A tuning run's folder: settings, metrics, checkpoint, trajectory, plot.

Every file is written atomically (temporary file in the same folder, then
rename), so a run killed at any moment leaves either the old or the new file.
The one exception, metrics.jsonl, is appended a line at a time; a line torn by a
kill is dropped on resume. One process at a time writes a folder: `locked` holds
an flock on run.lock while a run lives.
"""
from __future__ import annotations

import fcntl
import json
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from . import atomic
from .atomic import atomic_path
from .errors import InvalidInputError, RunLockedError
from .spsa import Optimizer, OptimizerState
from .trainer import LoopState

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.npz"
TRAJECTORY = "trajectory.json"
DELTAS = "deltas.gguf"
PLOT = "loss.png"
LOCK = "run.lock"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename tmp over path."""
    with atomic_path(path) as tmp:
        write(tmp)


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n"))


def save_checkpoint(out: Path, state: LoopState) -> None:
    arrays = {"theta": state.theta, "step": np.array(state.step),
              "best_step": np.array(state.best_step), "best_loss": np.array(state.best_loss)}
    if state.best_theta is not None:
        arrays["best_theta"] = state.best_theta
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
    try:
        with np.load(path) as z:
            theta = z["theta"].astype(np.float32)
            step = int(z["step"])
            opt = OptimizerState.create(optimizer, len(theta), beta1, beta2)
            if opt.m is not None:
                opt.m[:] = z["opt_m"]
            if opt.v is not None:
                opt.v[:] = z["opt_v"]
            best = {"best_step": int(z["best_step"]), "best_loss": float(z["best_loss"]),
                    "best_theta": z["best_theta"].astype(np.float32) if "best_theta" in z else None} \
                if "best_step" in z else {}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise _damaged(path, exc) from None
    if theta.ndim != 1 or step < 0 or not np.all(np.isfinite(theta)):
        raise _damaged(path, f"step {step}, {theta.shape} values, finite: {bool(np.all(np.isfinite(theta)))}")
    traj_path = out / TRAJECTORY
    try:
        scalars = json.loads(traj_path.read_text(encoding="utf-8"))["scalars"][:step]
        if not all(isinstance(gs, list) and all(isinstance(g, float) for g in gs) for gs in scalars):
            raise ValueError("'scalars' must hold one list of numbers per step")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(traj_path, exc) from None
    if len(scalars) != step:
        raise InvalidInputError(f"{out}: the trajectory has {len(scalars)} steps but the checkpoint {step}")
    return LoopState(step, theta, opt, scalars, **best)


def _damaged(path: Path, why) -> InvalidInputError:
    return InvalidInputError(f"{path}: damaged, cannot resume from it ({why}); start the run again in another -o "
                             f"folder, or restore the file from a backup")


def append_metrics(out: Path, record: dict) -> None:
    """One line in one write() to a file opened O_APPEND: a kill tears at most this line."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(out / METRICS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if atomic.armed(METRICS, "appending"):   # fault injection (edge_zo.atomic): a torn line, then death
            os.write(fd, data[: int(len(data) * atomic.cut_share())])
            atomic.die()
        os.write(fd, data)
        atomic.fault_point(METRICS, "appended")
    finally:
        os.close(fd)


def _metric_rows(path: Path) -> list[dict]:
    """The whole records of metrics.jsonl; a line torn by a kill (not JSON, or not a record) is skipped."""
    rows = []
    for line in path.read_bytes().split(b"\n"):
        try:
            row = json.loads(line)
        except ValueError:   # JSONDecodeError and UnicodeDecodeError both
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def truncate_metrics(out: Path, after_step: int) -> None:
    """On resume, drop the lines a killed run wrote past its last checkpoint, and any torn line."""
    path = out / METRICS
    if not path.exists():
        return
    keep = [row for row in _metric_rows(path) if row["step"] <= after_step]
    atomic_write(path, lambda p: p.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep)))


def read_metrics(out: Path) -> list[dict]:
    path = out / METRICS
    return _metric_rows(path) if path.exists() else []


def read_run_json(out: Path) -> dict:
    """run.json of a run being resumed, with one clear message when it is missing or damaged."""
    path = out / RUN_JSON
    if not path.is_file():
        raise InvalidInputError(f"{out}: no run to resume (no {RUN_JSON})")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or not isinstance(saved.get("settings"), dict):
            raise ValueError("expected an object with 'settings'")
    except (OSError, ValueError) as exc:
        raise _damaged(path, exc) from None
    return saved


@contextmanager
def locked(out: Path) -> Iterator[Path]:
    """Hold run folder `out` (created if missing) for this process: an flock on out/run.lock,
    which names the holder's pid. Released, and the lock file removed, on exit; the kernel
    releases it if the process dies. Stale temporary files of killed runs are removed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"-o {out}: is not a folder; pass a folder for the run (it is created if missing)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"-o {out}: cannot create the run folder ({exc.strerror or exc}); "
                                "pass another folder") from None
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InvalidInputError(f"-o {out}: cannot write in the run folder ({exc.strerror or exc}); "
                                    "pass another folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{out} is in use: another edge-zo tune (process {holder}) is writing it; wait "
                                 "for it to end, or pass another -o") from None
        try:   # the holder before us may have removed the file between our open and our lock
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        for stale in out.glob(".*.tmp"):   # a killed run's unfinished atomic writes
            stale.unlink(missing_ok=True)
        yield out
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            try:
                out.rmdir()   # only if nothing was written
            except OSError:
                pass


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
