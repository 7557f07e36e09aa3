"""`edge-zo tune` as W workers on torch.distributed (gloo), launched for real:
torchrun, or one process per rank with the environment torchrun would set.

W workers with Q = W directions end bit-identical to one process with Q = W; a
worker killed or hung stops the others with a message that names it, and the
run resumes (alone, under torchrun, or by torchrun's own restart) to the
uninterrupted result."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_zo import distributed, run_dir
from edge_zo.cli import main as cli
from edge_zo.commands.tune import _shard
from edge_zo.errors import InvalidInputError

from .test_tune import toy  # noqa: F401  (the fixture: a tiny Q4_0 llama, a toy task and a sidecar)

pytest.importorskip("torch.distributed")

REPO = Path(__file__).resolve().parents[1]
STEPS = 40


def _args(toy, out, *extra):
    return [str(toy["model"]), str(toy["data"]), "--sidecar", str(toy["sidecar"]), "-o", str(out), "--quiet",
            "--optimizer", "sgd", "--lr", "1e-2", "--steps", str(STEPS), "--save-every", "8", "--eval-every", "20", "--threads", "1", *extra]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _torchrun(toy, out, w, *extra, restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(w),
           "--max-restarts", str(restarts), "-m", "edge_zo", "tune", *_args(toy, out, "--directions", str(w), *extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _workers(toy, out, w, *extra):
    """One process per rank, as torchrun would start them, so that a test can kill a given rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "edge_zo", "tune", *_args(toy, out, "--directions", str(w), *extra)]
    return [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=_env(RANK=str(r), WORLD_SIZE=str(w), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for r in range(w)]


def _wait_for_step(out, step, procs, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        rows = run_dir.read_metrics(out) if (out / run_dir.METRICS).exists() else []
        if rows and rows[-1]["step"] >= step:
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail("a worker ended early:\n" + "\n".join(p.stdout.read() for p in procs if p.poll() is not None))
        time.sleep(0.02)
    pytest.fail("run too slow")


def _theta(out):
    with np.load(out / run_dir.CHECKPOINT) as z:
        return z["theta"].copy()


def _curve(out):
    keys = ("step", "loss", "projected_grad", "valid_loss")
    return [{k: r[k] for k in keys if k in r} for r in run_dir.read_metrics(out)]


@pytest.fixture(scope="module")
def alone(toy, tmp_path_factory):  # noqa: F811
    """One process with Q = 2 and Q = 3 directions: what the workers must reproduce."""
    runs = {}
    for q in (2, 3):
        out = tmp_path_factory.mktemp("alone") / f"q{q}"
        assert cli(["tune", *_args(toy, out, "--directions", str(q))]) == 0
        runs[q] = out
    return runs


def test_single_process_does_not_import_torch(toy, tmp_path):  # noqa: F811
    code = ("import sys; from edge_zo.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "tune", *_args(toy, tmp_path / "r"), "--steps", "2"],
                          cwd=REPO, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("w", [2, 3])
def test_workers_match_one_process_bit_for_bit(toy, alone, tmp_path, w):  # noqa: F811
    out = tmp_path / "team"
    proc = _torchrun(toy, out, w)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert np.array_equal(_theta(out), _theta(alone[w]))
    assert json.loads((out / "trajectory.json").read_text())["scalars"] == \
        json.loads((alone[w] / "trajectory.json").read_text())["scalars"]
    assert _curve(out) == _curve(alone[w])
    assert json.loads((out / "run.json").read_text())["workers"] == w
    sent = distributed.step_sent_bytes(w, w)
    assert f"each worker sent {sent} bytes per step" in log and sent == (w - 1) * 32
    assert "gather_seconds" in run_dir.read_metrics(out)[-1]


def test_killed_worker_stops_the_others_and_resume_alone_finishes(toy, alone, tmp_path):  # noqa: F811
    out = tmp_path / "killed"
    procs = _workers(toy, out, 3)
    _wait_for_step(out, 10, procs)
    t0 = time.time()
    procs[1].kill()
    logs = [p.communicate(timeout=60)[0] for p in procs]
    assert time.time() - t0 < 30
    for r in (0, 2):
        assert procs[r].returncode == 1, logs[r]
        assert "worker(s) 1 of 3 stopped answering" in logs[r] and "--resume" in logs[r], logs[r]
    saved = int(np.load(out / run_dir.CHECKPOINT)["step"])
    assert f"worker 0 saved step {saved}" in logs[0] and saved >= 10  # the failure's own checkpoint, not step 8
    assert cli(["tune", *_args(toy, out, "--directions", "3", "--resume")]) == 0
    assert np.array_equal(_theta(out), _theta(alone[3]))
    assert _curve(out) == _curve(alone[3])


def test_hung_worker_times_out_and_torchrun_resumes(toy, alone, tmp_path):  # noqa: F811
    out = tmp_path / "hung"
    procs = _workers(toy, out, 2, "--dist-timeout", "3")
    _wait_for_step(out, 10, procs)
    os.kill(procs[1].pid, signal.SIGSTOP)
    t0 = time.time()
    try:
        log = procs[0].communicate(timeout=60)[0]
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert time.time() - t0 < 3 + distributed.LOST_GRACE_S + 10
    assert procs[0].returncode == 1
    assert "worker(s) 1 of 2 did not answer within 3 s" in log and "rerun the same command with --resume" in log, log
    proc = _torchrun(toy, out, 2, "--resume")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert np.array_equal(_theta(out), _theta(alone[2]))
    assert _curve(out) == _curve(alone[2])


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _rank_of(pid):
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def test_torchrun_restart_resumes_to_the_same_result(toy, alone, tmp_path):  # noqa: F811
    out = tmp_path / "elastic"
    proc = _torchrun(toy, out, 2, restarts=1)
    _wait_for_step(out, 10, [proc])
    victim = next(p for p in _children(proc.pid) if _rank_of(p) == 1)
    os.kill(victim, signal.SIGKILL)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "restart 1 by torchrun: resuming" in log
    assert np.array_equal(_theta(out), _theta(alone[2]))
    assert _curve(out) == _curve(alone[2])


def test_shard_data(toy, alone, tmp_path):  # noqa: F811
    out = tmp_path / "shards"
    proc = _torchrun(toy, out, 2, "--shard-data")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log   # the workers' deltas agreed at every checkpoint
    assert json.loads((out / "run.json").read_text())["settings"]["data_shards"] == 2
    assert not np.array_equal(_theta(out), _theta(alone[2]))  # other batches: not the one-process run
    # Sharded deltas depend on the number of workers: one process cannot continue them.
    assert cli(["tune", *_args(toy, out, "--directions", "2", "--shard-data", "--resume", "--steps", "44")]) == 1
    rows = [_shard(10, 3, r) for r in range(3)]
    assert sorted(np.concatenate(rows).tolist()) == list(range(10)) and rows[1].tolist() == [1, 4, 7]
    assert _shard(10, 1, 2).tolist() == list(range(10))


def test_world_from_env():
    assert distributed.World.from_env({}) == distributed.World(0, 1, 0)
    w = distributed.World.from_env({"RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                                    "TORCHELASTIC_RESTART_COUNT": "1"})
    assert (w.rank, w.size, w.restarts, list(w.directions(10))) == (2, 4, 1, [2, 6])
    with pytest.raises(InvalidInputError, match="launch with torchrun"):
        distributed.World.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(InvalidInputError, match="0 <= RANK < WORLD_SIZE"):
        distributed.World.from_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert distributed.step_sent_bytes(1, 1) == 0 and distributed.step_sent_bytes(8, 4) == 3 * 8 * (3 * 2 + 1)
