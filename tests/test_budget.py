"""Time-budgeted and early-stopped runs: `--time` ends a run, validated and saved, before its
budget; `patience` stops one that no longer improves; deltas.gguf keeps the best validation."""
from __future__ import annotations

import json
import time

import numpy as np

from edge_zo import run_dir, spsa
from edge_zo.cli import main as cli
from edge_zo.trainer import LoopConfig, LoopState, train

from .test_tune import _tune, toy  # noqa: F401


def test_time_budget_ends_the_run_validated_and_saved(toy, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "timed"
    t0 = time.perf_counter()
    assert _tune(toy, out, "--steps", "100000", "--time", "6s", "--eps", "1e-2") == 0
    took = time.perf_counter() - t0
    rows = run_dir.read_metrics(out)
    last = rows[-1]
    assert 0 < last["step"] < 100000 and "valid_loss" in last, last   # the final step was validated
    err = capsys.readouterr().err
    assert f"stopped at step {last['step']}: --time 6s spent" in err, err
    assert took < 6 + 20, took   # model load and write-out come on top of the budget; no step runs past it
    assert (out / "deltas.gguf").is_file() and (out / "checkpoint.npz").is_file()


def test_patience_stops_a_run_that_gets_worse_and_keeps_the_best():
    """The loop on a numpy objective: a rate too large for the quadratic makes every validation
    after the first few worse; the loop stops `patience` checks after the best and keeps it."""
    target = np.linspace(-1, 1, 64).astype(np.float32)
    live = np.zeros(64, np.float32)
    quad = lambda: float(np.sum((live - target) ** 2))   # noqa: E731
    cfg = LoopConfig(steps=500, batch_size=1, eps=1e-3, lr=0.4, eval_every=2, save_every=10**9, patience=3)
    state = LoopState.fresh(np.zeros(64, np.float32), cfg)
    seen = []
    state = train(cfg, state, n_examples=4, live=live, loss=lambda idx: quad(), evaluate=lambda: {"valid_loss": quad()},
                  report=lambda r: seen.append(r), checkpoint=lambda s: None)
    valid = [(r["step"], r["valid_loss"]) for r in seen if "valid_loss" in r]
    best_step, best_loss = min(valid, key=lambda v: v[1])
    assert state.step < 500 and state.step == best_step + 3 * 2, valid
    assert state.best_step == best_step and state.best_loss == best_loss
    replayed = spsa.replay(np.zeros(64, np.float32), state.scalars[:best_step], seed=0,
                           optimizer=spsa.Optimizer.SGD, lr_at=cfg.lr_at)
    assert np.array_equal(state.best, replayed)


def test_budget_spent_by_the_searches_is_an_error(toy, tmp_path, capsys):  # noqa: F811
    # 1 ms: no machine runs the ε probe's dozens of forwards in it (1 s was enough on a fast one)
    assert cli(["tune", str(toy["model"]), str(toy["data"]), "--sidecar", str(toy["sidecar"]), "-o",
                str(tmp_path / "r"), "--quiet", "--time", "0.001s"]) == 1
    assert "was spent by the searches" in capsys.readouterr().err


def test_an_eps_probe_too_slow_for_its_share_is_skipped(toy, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Where even the smallest ε probe would take more than its share of --time (a slow file, long
    rows, a few minutes), the run tunes at the fallback ε instead of spending its minutes probing,
    says so, and records why in run.json."""
    from edge_zo import eps_probe

    monkeypatch.setattr(eps_probe, "MIN_DIRECTIONS", 10**6)   # as if each forward took hours
    out = tmp_path / "skipped"
    assert _tune(toy, out, "--eps", "auto", "--time", "4s") == 0
    err = capsys.readouterr().err
    assert f"--eps auto: tuning at ε {eps_probe.FALLBACK_EPS:g} without a probe" in err, err
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["eps"] == eps_probe.FALLBACK_EPS and "share of --time 4s" in run["eps_search"]["skipped"]
    assert run_dir.read_metrics(out)[-1]["step"] > 0                  # the budget went to steps


def test_lr_probes_shrink_to_their_share_of_the_budget():
    from edge_zo.lr_search import LR_GRID, MIN_PROBE_STEPS, PROBE_STEPS, probe_steps_within

    assert probe_steps_within(3600, 0.1) == PROBE_STEPS                   # plenty of time: the full probes
    assert probe_steps_within(len(LR_GRID) * 8 * 2.0, 2.0) == 8           # 8 steps per rate fit exactly
    assert probe_steps_within(1.0, 5.0) == MIN_PROBE_STEPS                # never fewer than the floor


def test_time_without_steps_lets_the_budget_end_the_run_and_shrinks_the_eps_probe():
    import argparse

    from edge_zo.eps_probe import DIRECTIONS, MIN_DIRECTIONS, directions_within
    from edge_zo.tune_settings import STEPS_UNDER_TIME, TuneSettings, resolve

    assert resolve(argparse.Namespace(time="10m")).steps == STEPS_UNDER_TIME
    assert resolve(argparse.Namespace(time="10m", steps=50)).steps == 50
    assert resolve(argparse.Namespace()).steps == TuneSettings().steps
    assert directions_within(3600, 0.1) == DIRECTIONS
    assert directions_within(8 * 2 * 5 * 1.0, 1.0) == 8
    assert directions_within(1.0, 10.0) == MIN_DIRECTIONS
