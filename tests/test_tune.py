"""`edge-zo tune` on a tiny model: it learns, it is deterministic, it resumes,
and its trajectory replays to the saved deltas."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edge_zo import run_dir, spsa
from edge_zo.adapter import SparseAdapter
from edge_zo.cli import main as cli
from edge_zo.runtime import Runtime
from edge_zo.trainer import LoopConfig

from .conftest import write_jsonl

TOY = [{"prompt": f"Note {i}: my dog is called", "completion": " Rex"} for i in range(24)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_q4):
    """A toy task and a sidecar: the answer's embedding row plus 1% of every block matmul."""
    root = tmp_path_factory.mktemp("toy")
    data = write_jsonl(root / "toy.jsonl", TOY)
    rng = np.random.default_rng(0)
    with Runtime(tiny_q4.path) as rt:
        info = rt.info
        answer = rt.native.tokenize(" Rex", add_special=False)
    weights = {}
    for name in info.block_matmul_weights():
        n = info.tensors[name].n_elements
        idx = np.unique(rng.integers(0, n, n // 100))
        weights[name] = (idx, np.zeros(len(idx), np.float32))
    n_embd = info.tensors["token_embd.weight"].shape[1]
    emb = np.concatenate([t * n_embd + np.arange(n_embd) for t in answer])
    weights["token_embd.weight"] = (emb, np.zeros(len(emb), np.float32))
    sidecar = root / "sidecar.gguf"
    SparseAdapter.from_weights(info.architecture, weights).save(sidecar)
    return {"model": tiny_q4.path, "data": data, "sidecar": sidecar}


def _tune(toy, out, *extra):
    argv = ["tune", str(toy["model"]), str(toy["data"]), "--sidecar", str(toy["sidecar"]), "-o", str(out),
            "--quiet", "--optimizer", "sgd", "--lr", "1e-2", "--eval-every", "10", *extra]
    return cli(argv)


def _theta(out):
    with np.load(out / run_dir.CHECKPOINT) as z:
        return z["theta"].copy()


def test_learns_toy_task_and_writes_run_folder(toy, tmp_path):
    out = tmp_path / "run"
    assert _tune(toy, out, "--steps", "40") == 0
    rows = run_dir.read_metrics(out)
    valid = [r["valid_loss"] for r in rows if "valid_loss" in r]
    assert valid[0] > 9.0 and valid[-1] < valid[0] - 5.0, valid
    for name in ("deltas.gguf", "run.json", "metrics.jsonl", "loss.png", "trajectory.json", "checkpoint.npz"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["seed"] == 0 and len(run["model_sha256"]) == 64
    train = [r for r in rows if "projected_grad" in r]
    assert {"step", "loss", "projected_grad", "eps", "lr", "tokens_per_s", "peak_rss_mib"} <= set(train[0])
    # The tuned deltas, used as an adapter, carry what was learned.
    assert cli(["eval", str(toy["model"]), str(toy["data"]), "--adapter", str(toy["sidecar"]),
                "--adapter", str(out / "deltas.gguf")]) == 0


def test_same_seed_same_deltas_and_trajectory_replays(toy, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert _tune(toy, a, "--steps", "12", "--optimizer", "adam", "--lr", "1e-3") == 0
    assert _tune(toy, b, "--steps", "12", "--optimizer", "adam", "--lr", "1e-3") == 0
    assert _tune(toy, c, "--steps", "12", "--optimizer", "adam", "--lr", "1e-3", "--seed", "1") == 0
    assert np.array_equal(_theta(a), _theta(b))
    assert not np.array_equal(_theta(a), _theta(c))
    traj = json.loads((a / "trajectory.json").read_text())
    cfg = LoopConfig(steps=12, lr=1e-3, optimizer=spsa.Optimizer.ADAM)
    replayed = spsa.replay(np.zeros(len(_theta(a)), np.float32), traj["scalars"], seed=traj["seed"],
                           optimizer=spsa.Optimizer.ADAM, lr_at=cfg.lr_at)
    assert np.array_equal(replayed, _theta(a))
    # deltas.gguf holds the best validated θ: the replay of the steps up to it.
    best = spsa.replay(np.zeros(len(_theta(a)), np.float32), traj["scalars"][: traj["best_step"]],
                       seed=traj["seed"], optimizer=spsa.Optimizer.ADAM, lr_at=cfg.lr_at)
    saved = SparseAdapter.load(a / "deltas.gguf").values
    assert np.array_equal(saved, best.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("optimizer,lr", [("momentum", 3e-3), ("sign", 5e-2), ("adam", 5e-2)])
def test_every_optimizer_makes_progress(toy, tmp_path, optimizer, lr):
    out = tmp_path / optimizer
    assert _tune(toy, out, "--steps", "20", "--optimizer", optimizer, "--lr", str(lr), "--eval-every", "20") == 0
    valid = [r["valid_loss"] for r in run_dir.read_metrics(out) if "valid_loss" in r]
    assert valid[-1] < valid[0] - 0.5, valid


def _spawn(toy, out, steps, *extra):
    cmd = [sys.executable, "-m", "edge_zo", "tune", str(toy["model"]), str(toy["data"]), "--sidecar",
           str(toy["sidecar"]), "-o", str(out), "--quiet", "--optimizer", "sgd", "--lr", "1e-2", "--steps", str(steps),
           "--save-every", "4", "--eval-every", "100", "--threads", "1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(out, step, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = run_dir.read_metrics(out) if (out / "metrics.jsonl").exists() else []
        if rows and rows[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("run too slow")


def test_one_decode_per_step_gives_the_same_deltas_and_resumes_exactly(toy, tmp_path):
    """--one-decode evaluates a step's θ±εz of both directions in one decode. On the quantized
    tiny model the layouts agree bit for bit, so the run equals the separate-decode run; a resume
    under it equals the uninterrupted run; and resuming with the other setting is refused."""
    one, separate, resumed = tmp_path / "one", tmp_path / "separate", tmp_path / "resumed"
    common = ("--steps", "10", "--directions", "2", "--eval-every", "5", "--save-every", "5")
    assert _tune(toy, one, *common, "--one-decode") == 0
    assert _tune(toy, separate, *common) == 0
    assert np.array_equal(_theta(one), _theta(separate))
    assert json.loads((one / "run.json").read_text())["backend"]["value_sets"] == "one decode"
    assert _tune(toy, resumed, "--steps", "5", *common[2:], "--one-decode") == 0
    assert _tune(toy, resumed, "--steps", "10", *common[2:], "--resume") != 0
    assert _tune(toy, resumed, *common, "--one-decode", "--resume") == 0
    assert np.array_equal(_theta(one), _theta(resumed))


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_killed_run_resumes_to_the_uninterrupted_result(toy, tmp_path, how):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert _spawn(toy, whole, 24).wait() == 0
    proc = _spawn(toy, broken, 24)
    _wait_for_step(broken, 9, proc)
    os.kill(proc.pid, how)
    rc = proc.wait()
    if how == signal.SIGINT:
        assert rc == 130 and "--resume" in proc.stderr.read()
    resumed = _spawn(toy, broken, 24, "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert np.array_equal(_theta(whole), _theta(broken))
    assert [r["step"] for r in run_dir.read_metrics(broken)] == [r["step"] for r in run_dir.read_metrics(whole)]


def test_bad_inputs(toy, tmp_path, capsys):
    model, data = str(toy["model"]), str(toy["data"])
    # (no sidecar at all is no longer an error: tune builds an activation mask, tests/test_activation_mask.py)
    assert _tune(toy, tmp_path / "y", "--lr", "fast") == 1
    assert "--lr must be a number or 'auto'" in capsys.readouterr().err
    assert _tune(toy, tmp_path / "y", "--eps", "tiny") == 1
    assert "--eps must be a number or 'auto'" in capsys.readouterr().err
    assert _tune(toy, tmp_path / "z", "--resume") == 1
    assert "no run to resume" in capsys.readouterr().err
    assert cli(["tune", model, data, "--sidecar", str(toy["sidecar"]), "-o", str(tmp_path / "z"), "--resume"]) == 1
    err = capsys.readouterr().err  # --eps and --lr auto: told before any probe
    assert "no run to resume" in err and "lr search" not in err and "--eps auto" not in err, err
    assert _tune(toy, tmp_path / "w", "--steps", "2") == 0
    assert _tune(toy, tmp_path / "w", "--steps", "2") == 1
    assert "already holds a run" in capsys.readouterr().err
    assert _tune(toy, tmp_path / "w", "--steps", "4", "--resume", "--eps", "0.5") == 1
    err = capsys.readouterr().err
    assert "cannot resume: eps" in err and "-> 0.5" in err, err   # names what differs
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rate: 1\n")
    assert _tune(toy, tmp_path / "v", "--config", str(cfg)) == 1
    assert "unknown settings ['learning_rate']" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}])
    assert cli(["tune", model, str(bad), "--sidecar", str(toy["sidecar"])]) == 1
    assert "bad.jsonl:1" in capsys.readouterr().err


def test_config_file_and_resume_extends_steps(toy, tmp_path):
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("steps: 6\nlr: 0.01\nseed: 3\neval_every: 3\n")
    out = tmp_path / "cfg"
    assert cli(["tune", str(toy["model"]), str(toy["data"]), "--sidecar", str(toy["sidecar"]), "-o", str(out),
                "--quiet", "--config", str(cfg)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["steps"] == 6 and run["settings"]["seed"] == 3 and run["settings"]["lr"] == 0.01
    assert cli(["tune", str(toy["model"]), str(toy["data"]), "--sidecar", str(toy["sidecar"]), "-o", str(out),
                "--quiet", "--config", str(cfg), "--steps", "9", "--resume"]) == 0
    assert run_dir.read_metrics(out)[-1]["step"] == 9


def test_warns_when_the_validation_loss_rises(toy, tmp_path, capsys):
    from edge_zo.commands.tune import rise_warning

    # A run that learns says nothing more ...
    assert _tune(toy, tmp_path / "run", "--steps", "10") == 0
    valid = [r for r in run_dir.read_metrics(tmp_path / "run") if "valid_loss" in r]
    assert valid[-1]["valid_loss"] < valid[0]["valid_loss"] and "warning" not in capsys.readouterr().err
    assert rise_warning(valid, 1e-2, 10) is None
    # ... one that ends above its start (as 1e-4 did on 3 of 5 Fisher runs of 300 steps) is told what to try.
    rose = [valid[-1], valid[0]]
    msg = rise_warning(rose, 1e-4, 300)
    assert msg.startswith("warning: the validation loss rose") and "try --lr 3.3e-05" in msg, msg
    assert rise_warning(valid[:1], 1e-4, 300) is None


def test_eps_auto_is_the_default_and_the_searches_are_kept_on_resume(toy, tmp_path, capsys):
    from edge_zo.commands.tune import LR_GRID

    out = tmp_path / "auto"
    base = ["tune", str(toy["model"]), str(toy["data"]), "--sidecar", str(toy["sidecar"]), "-o", str(out),
            "--quiet", "--eval-every", "4", "--optimizer", "sgd", "--lr", "auto"]
    assert cli([*base, "--steps", "6"]) == 0  # --lr auto: the search runs (6-step probes, as steps < 20)
    err = capsys.readouterr().err
    assert err.count("lr search: lr") == len(LR_GRID), err
    assert err.index("--eps auto: ε") < err.index("lr search"), err   # the lr probes run at the chosen ε
    run = json.loads((out / "run.json").read_text())
    eps = run["eps_search"]
    assert run["settings"]["eps"] == eps["eps"] > 0 and eps["forwards"] >= 96 and len(eps["pair"]) == 2
    search = run["lr_search"]
    losses = {float(k): v for k, v in search["losses"].items()}
    best = min(losses, key=losses.get)
    assert search["probe_steps"] == 6 and search["best"] == best > LR_GRID[0]  # so the back-off shows
    assert search["chosen"] == LR_GRID[max(0, LR_GRID.index(best) - 1)] == run["settings"]["lr"]
    # Resuming keeps the searched rate instead of searching again.
    assert cli([*base, "--steps", "8", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "lr search: lr" not in err and f"resuming at the run's lr {search['chosen']:g}" in err, err
    assert "--eps auto: ε" not in err and f"resuming at the run's eps {eps['eps']:g}" in err, err
    assert run_dir.read_metrics(out)[-1]["step"] == 8
    resumed = json.loads((out / "run.json").read_text())
    assert resumed["lr_search"] == search and resumed["eps_search"] == eps
