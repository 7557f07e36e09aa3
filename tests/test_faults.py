"""Faults (issue 17, "Nothing lost, ever"): divergence, damaged and foreign inputs, two
runs on one folder, kill -9 at every write point, and fuzzed readers. Every case ends in
success or in one clear message; never a traceback, never a silently wrong result."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_zo import run_dir
from edge_zo.adapter import SparseAdapter
from edge_zo.cli import main as cli
from edge_zo.constants import VALUE_MAX, Sparse
from edge_zo.errors import DivergedError, InvalidInputError, ModelFileError
from edge_zo.model_info import file_sha256
from edge_zo.spsa import Optimizer
from edge_zo.trainer import LoopConfig, LoopState, train

from .conftest import TinyLlama, write_jsonl, zero_sidecar

ROOT = Path(__file__).resolve().parent.parent
TOY = [{"prompt": f"Note {i}: my dog is called", "completion": " Rex"} for i in range(16)]
CHOICES = [{**row, "choices": [" Rex", " Max"]} for row in TOY[:6]]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_q4):
    """A toy task, its validation file and a sidecar (1% of every block matmul) recording its base model."""
    root = tmp_path_factory.mktemp("faults")
    sidecar = zero_sidecar(tiny_q4.path, root / "sidecar.gguf", metadata={
        Sparse.ROLE: "sidecar", Sparse.BASE_MODEL_SHA256: file_sha256(tiny_q4.path)})
    return {"model": tiny_q4.path, "data": write_jsonl(root / "toy.jsonl", TOY),
            "valid": write_jsonl(root / "valid.jsonl", CHOICES), "sidecar": sidecar, "root": root}


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Same shapes as tiny_q4, other weights."""
    return TinyLlama(tmp_path_factory.mktemp("other"), tied=True, matmul_type="Q4_0", seed=1).path


def _argv(toy, out, *extra):
    return ["tune", str(toy["model"]), str(toy["data"]), "--sidecar", str(toy["sidecar"]), "-o", str(out),
            "--quiet", "--optimizer", "sgd", "--lr", "1e-2", "--eps", "1e-2", "--eval-every", "2", "--threads", "1", *extra]


def _cli(capsys, argv) -> tuple[int, str]:
    rc = cli(argv)
    out = capsys.readouterr()
    assert "Traceback" not in out.err, out.err
    return rc, out.err


def _theta(out: Path) -> np.ndarray:
    with np.load(out / run_dir.CHECKPOINT) as z:
        return z["theta"].copy()


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in run_dir.read_metrics(out)]


# ---- 1, 2: divergence -------------------------------------------------------------------------------------

def test_loop_restores_the_last_finite_step_on_any_non_finite_value():
    """A numpy objective turns NaN in step 4's training loss, or in the validation after it:
    either way the state handed back is step 3's, exactly, and nothing after it was reported."""
    target = np.linspace(-1, 1, 50).astype(np.float32)
    live = np.zeros(50, np.float32)
    cfg = LoopConfig(steps=8, batch_size=2, eps=1e-2, lr=1e-2, optimizer=Optimizer.ADAM, eval_every=4, save_every=100)
    calls = {"n": 0}

    def value(poison_after):
        calls["n"] += 1
        return float("nan") if calls["n"] > poison_after else float(np.sum((live - target) ** 2))

    def run(steps, train_after=10**9, valid_after=10**9):
        calls["n"] = 0
        live[:] = 0
        state = LoopState.fresh(np.zeros(50, np.float32), cfg)
        reported = []
        try:
            train(dataclasses.replace(cfg, steps=steps), state, n_examples=4, live=live,
                  loss=lambda idx: value(train_after), evaluate=lambda: {"valid_loss": value(valid_after)},
                  report=reported.append, checkpoint=lambda s: None)
        except DivergedError as exc:
            return state, reported, exc
        return state, reported, None

    reference, _, _ = run(3)
    # Calls: validation 1; steps 1-3: 2-7; step 4: 8, 9, then its validation 10.
    for kw, what in (({"train_after": 8}, "training loss"), ({"valid_after": 9}, "validation loss is nan")):
        state, reported, exc = run(8, **kw)
        assert exc is not None and what in str(exc) and "step 4" in str(exc), exc
        assert exc.step == state.step == 3 and reported[-1]["step"] == 3
        assert np.array_equal(state.theta, reference.theta) and np.array_equal(live, state.theta)
        assert np.array_equal(state.opt.m, reference.opt.m) and np.array_equal(state.opt.v, reference.opt.v)
        assert state.scalars == reference.scalars
    state, reported, exc = run(8, valid_after=0)
    assert exc.step == 0 and "before any step" in str(exc) and not reported
    # A step that takes θ beyond what a deltas file holds is refused the same way.
    big = LoopConfig(steps=4, batch_size=2, eps=1e-2, lr=3e4, optimizer=Optimizer.SIGN, eval_every=100)
    state = LoopState.fresh(np.zeros(50, np.float32), big)
    with pytest.raises(DivergedError, match=f"beyond the ±{VALUE_MAX:g}") as err:
        train(big, state, n_examples=4, live=live, loss=lambda idx: float(np.sum((live - target) ** 2)),
              evaluate=lambda: {}, report=lambda r: None, checkpoint=lambda s: None)
    assert err.value.step == state.step == 2 and np.abs(state.theta).max() == 6e4


@pytest.mark.parametrize("extra,mid_run", [
    (("--steps", "6", "--lr", "1e9", "--eps", "5e-3", "--batch-size", "4"), False),   # the command
    (("--steps", "8", "--optimizer", "sign", "--lr", "300"), True),   # the validation turns NaN at step 3
])
def test_divergence_keeps_the_last_finite_checkpoint_and_resume_works(toy, tmp_path, capsys, extra, mid_run):
    out = tmp_path / "run"
    argv = _argv(toy, out, "--save-every", "1", "--eval-every", "1", *extra)
    rc, err = _cli(capsys, argv)
    assert rc == 1 and "diverged at step" in err and "try it" not in err, err
    kept = int(re.search(r"keeps step (\d+)", err).group(1))
    assert (kept > 0) == mid_run, err
    theta = _theta(out)
    assert np.all(np.abs(theta) <= VALUE_MAX)
    with np.load(out / run_dir.CHECKPOINT) as z:   # deltas.gguf holds the best validated step's values
        best = z["best_theta"] if "best_theta" in z else theta
    assert np.array_equal(SparseAdapter.load(out / "deltas.gguf").values, best.astype(np.float16).astype(np.float32))
    assert _steps(out)[-1] == kept and len(json.loads((out / "trajectory.json").read_text())["scalars"]) >= kept
    # --resume repeats the step that diverged, stops the same way and keeps the same checkpoint.
    rc, again = _cli(capsys, [*argv, "--resume"])
    assert rc == 1 and f"diverged at step {kept + 1}" in again and np.array_equal(_theta(out), theta), again
    if kept:  # the finite part of the run can be closed where it is
        rc, done = _cli(capsys, [*argv, "--resume", "--steps", str(kept)])
        assert rc == 0 and np.array_equal(_theta(out), theta), done


def test_nan_validation_after_one_step_is_divergence_not_advice(toy, tmp_path, capsys):
    out = tmp_path / "one"
    rc, err = _cli(capsys, _argv(toy, out, "--steps", "1", "--lr", "1e9"))
    assert rc == 1 and "diverged at step 1" in err and "keeps step 0" in err
    assert "try it" not in err and "--lr 3.3e+08" not in err
    assert not np.any(SparseAdapter.load(out / "deltas.gguf").values)   # step 0: all zero, all finite


# ---- 3: non-finite adapter values ----------------------------------------------------------------------------

def _raw_adapter(path: Path, values: np.ndarray, name="blk.0.attn_q.weight") -> Path:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "sparse")
    w.add_uint32("adapter.sparse.format_version", 1)
    w.add_tensor(name + ".sparse_idx", np.arange(0, 3 * len(values), 3, dtype=np.int32))
    w.add_tensor(name + ".sparse_val", values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("bad,dtype", [(np.nan, np.float16), (np.inf, np.float16), (-np.inf, np.float32)])
def test_non_finite_adapter_values_are_refused_everywhere(toy, tmp_path, capsys, bad, dtype):
    values = np.array([0.5, 0.25, bad, 1.0], dtype)
    path = _raw_adapter(tmp_path / "nan.gguf", values)
    with pytest.raises(ModelFileError, match=r"nan.gguf: tensor blk.0.attn_q.weight.sparse_val: value 2 is"):
        SparseAdapter.load(path)
    model, data = str(toy["model"]), str(toy["data"])
    for argv in (["eval", model, data, "--adapter", str(path)],
                 ["generate", model, "-p", "hi", "-n", "2", "--adapter", str(path)],
                 ["export", model, "--adapter", str(path), "-o", str(tmp_path / "exp")]):
        rc, err = _cli(capsys, argv)
        assert rc == 1 and "value 2 is" in err and "not finite" in err, (argv[0], err)
    assert not (tmp_path / "exp" / "model-merged.gguf").exists()
    # Nor can such values be written.
    with pytest.raises(InvalidInputError, match="value 2 is"):
        SparseAdapter.from_weights("llama", {"blk.0.attn_q.weight": (np.arange(4), values.astype(np.float32))}
                                   ).save(tmp_path / "never.gguf")


def test_eval_refuses_a_non_finite_loss_instead_of_printing_it(toy, tmp_path, capsys):
    """Finite values, but so large that the forward overflows: no 'loss nan accuracy 0.5' with exit 0."""
    side = SparseAdapter.load(toy["sidecar"])
    side.with_values(np.full(side.n_params, VALUE_MAX, np.float32)).save(tmp_path / "huge.gguf")
    rc, err = _cli(capsys, ["eval", str(toy["model"]), str(toy["valid"]), "--adapter", str(tmp_path / "huge.gguf")])
    assert rc == 1 and "non-finite log-likelihoods" in err and "accuracy" not in err, err


# ---- 4: one run per folder ---------------------------------------------------------------------------------

def _spawn(toy, out, *extra, env=None):
    cmd = [sys.executable, "-m", "edge_zo", *_argv(toy, out, "--save-every", "1", *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _wait_for_step(out: Path, step: int, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (out / run_dir.METRICS).exists() and _steps(out) and _steps(out)[-1] >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    pytest.fail("run too slow")


def test_a_second_run_on_a_busy_folder_names_the_holder(toy, tmp_path, capsys):
    out = tmp_path / "busy"
    with run_dir.locked(out):
        rc, err = _cli(capsys, _argv(toy, out, "--steps", "2"))
        assert rc == 1 and f"process {os.getpid()}" in err and "in use" in err, err
    assert not out.exists()   # nothing was written: the folder the lock made is gone again
    first = _spawn(toy, out, "--steps", "400")
    _wait_for_step(out, 1, first)
    rc, err = _cli(capsys, _argv(toy, out, "--steps", "400", "--resume"))
    assert rc == 1 and f"process {first.pid}" in err, err
    first.kill()   # kill -9: the kernel drops the lock with the process
    first.wait()
    rc, err = _cli(capsys, _argv(toy, out, "--steps", str(_steps(out)[-1] + 1), "--resume"))
    assert rc == 0 and not (out / run_dir.LOCK).exists(), err


# ---- 5, 7: resume compares everything and the Ctrl-C hint works ----------------------------------------------

def test_resume_names_every_difference_and_changes_nothing(toy, tmp_path, capsys):
    out = tmp_path / "cmp"
    base = _argv(toy, out, "--steps", "2", "--valid", str(toy["valid"]), "--schedule", "linear")
    assert _cli(capsys, base)[0] == 0
    saved = (out / "run.json").read_bytes(), _theta(out)
    changed = write_jsonl(tmp_path / "toy.jsonl", TOY[:-1] + [{"prompt": "Note: my cat is", "completion": " Tom"}])
    cases = [
        ([a for a in base if a not in ("--valid", str(toy["valid"]))], "valid file"),
        ([*base, "--eps", "2e-2"], "eps 0.01 -> 0.02"),
        ([*base, "--steps", "4"], "steps 2 -> 4"),   # a linear schedule depends on the length
        ([*base, "--kv-f32"], "kv_f32 False -> True"),
        ([a if a != str(toy["data"]) else str(changed) for a in base], "training data"),
    ]
    for argv, named in cases:
        rc, err = _cli(capsys, [*argv, "--resume"])
        assert rc == 1 and "cannot resume" in err and named in err, (named, err)
        assert (out / "run.json").read_bytes() == saved[0] and np.array_equal(_theta(out), saved[1])


def test_ctrl_c_hint_is_a_command_that_works(toy, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "with space"
    extra = ("--steps", "12", "--optimizer", "adam", "--lr", "3e-3", "--seed", "5", "--batch-size", "4")
    assert _spawn(toy, whole, *extra).wait() == 0
    proc = _spawn(toy, broken, *extra)
    _wait_for_step(broken, 4, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130
    hint = re.search(r"Continue with: (.*)", proc.stderr.read()).group(1)
    argv = shlex.split(hint)
    assert argv[:2] == ["edge-zo", "tune"] and "--resume" in argv and "adam" in argv and str(broken) in argv
    resumed = subprocess.run([sys.executable, "-m", "edge_zo", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert np.array_equal(_theta(whole), _theta(broken))


# ---- 6: adapters belong to their base model ---------------------------------------------------------------

def test_adapter_on_another_base_is_refused_unless_allowed(toy, other_model, tmp_path, capsys):
    side = SparseAdapter.load(toy["sidecar"])
    side.with_values(np.full(side.n_params, 1e-3, np.float32)).save(tmp_path / "deltas.gguf")
    model, data = str(other_model), str(toy["data"])
    for argv in (["eval", model, data, "--adapter", str(tmp_path / "deltas.gguf")],
                 ["generate", model, "-p", "hi", "-n", "2", "--adapter", str(tmp_path / "deltas.gguf")],
                 ["export", model, "--adapter", str(tmp_path / "deltas.gguf"), "-o", str(tmp_path / "e"), "--no-merge"],
                 ["tune", model, data, "--sidecar", str(toy["sidecar"]), "-o", str(tmp_path / "t"), "--quiet",
                  "--steps", "1", "--lr", "1e-3", "--eps", "1e-2"]):
        rc, err = _cli(capsys, argv)
        assert rc == 1 and "made for another base model" in err and "--allow-other-base" in err, (argv[0], err)
        rc, err = _cli(capsys, [*argv, "--allow-other-base"])
        assert rc == 0, (argv[0], err)


# ---- 8, 9: every bad input gets one message -----------------------------------------------------------------

def _bytes(tmp_path, name, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


ROW = json.dumps({"prompt": "x", "completion": " y"}).encode()


@pytest.mark.parametrize("content,why", [
    (ROW + b"\n" + b'{"prompt": "a\xff", "completion": " b"}\n', ":2: not UTF-8 (byte 0xff at column 14)"),
    ('{"text": "hello"}\n'.encode("utf-16"), "the file is UTF-16"),
    ('{"text": "hello"}\n'.encode("utf-16-le"), ":1: holds a NUL byte"),
    (ROW + b"\n" + b'{"prompt": "a\\ud800", "completion": " b"}\n', ":2: 'prompt' holds a lone surrogate"),
    (b'{"prompt": "a", "completion": " b", "choices": [" b", " b"]}\n', ":1: 'choices' lists ' b' twice"),
    (b'{"prompt": "a", "completion": " b", "choices": [" b", " c"]}\n' + ROW + b"\n", ":2: no 'choices', but line 1"),
    (b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", ":1: not valid JSON here: nested too deeply"),
])
def test_bad_data_names_file_line_and_fix(tmp_path, content, why, capsys, toy):
    path = _bytes(tmp_path, "d.jsonl", content)
    rc, err = _cli(capsys, ["eval", str(toy["model"]), path])
    assert rc == 1 and "d.jsonl" in err and why in err, err


def test_utf8_bom_is_accepted(tmp_path, capsys, toy):
    path = _bytes(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + ROW + b"\n")
    assert _cli(capsys, ["eval", str(toy["model"]), path])[0] == 0


def test_tune_bad_inputs_leave_nothing_behind(toy, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    some = write_jsonl(tmp_path / "some.jsonl", [CHOICES[0], TOY[1]])
    yaml_steps, yaml_opt = tmp_path / "s.yaml", tmp_path / "o.yaml"
    yaml_steps.write_text("steps: abc\n")
    yaml_opt.write_text("optimizer: rmsprop\n")
    cases = [
        (["-o", str(tmp_path / "afile")], "is not a folder"),
        (["-o", "/dev/null"], "is not a folder"),
        (["-o", str(tmp_path / "afile" / "run")], "cannot create the run folder"),
        (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--eps", "inf"], "--eps"), (["--eps", "-1"], "--eps"),
        (["--valid", str(some)], "some.jsonl:2: no 'choices'"),
        (["--config", str(yaml_steps)], "steps"), (["--config", str(yaml_opt)], "rmsprop"),
    ]
    for extra, why in cases:
        out = tmp_path / "never"
        argv = _argv(toy, out, *([] if "--config" in extra else ["--steps", "1"]), *extra)
        if "--config" in extra:   # the file's settings must not be overridden by _argv's flags
            i = argv.index("--optimizer")
            del argv[i: i + 2]
        rc, err = _cli(capsys, argv)
        assert rc == 1 and why in err, (extra, err)
        assert not out.exists(), extra
    rc, err = _cli(capsys, ["tune", "/nonexistent.gguf", str(toy["data"]), "-o", str(tmp_path / "n")])
    assert rc == 1 and "no such model file" in err and "edge-zo convert" not in err, err


@pytest.mark.skipif(os.geteuid() != 0 or subprocess.run(["which", "chattr"], capture_output=True).returncode,
                    reason="an immutable folder needs root and chattr")
def test_immutable_run_folder(toy, tmp_path, capsys):
    out = tmp_path / "frozen"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("this file system has no immutable flag")
    try:
        rc, err = _cli(capsys, _argv(toy, out, "--steps", "1"))
        assert rc == 1 and "cannot write in the run folder" in err, err
    finally:
        subprocess.run(["chattr", "-i", str(out)])


def test_damaged_run_files_on_resume(toy, tmp_path, capsys):
    out = tmp_path / "dmg"
    argv = _argv(toy, out, "--steps", "3")
    assert _cli(capsys, argv)[0] == 0
    good = {name: (out / name).read_bytes() for name in ("checkpoint.npz", "trajectory.json", "run.json")}
    resume = [*argv, "--steps", "4", "--resume"]
    for name, data in (("checkpoint.npz", good["checkpoint.npz"][:200]), ("trajectory.json", b'{"scalars": [[0.1], '),
                       ("run.json", b"{"), ("checkpoint.npz", b"")):
        (out / name).write_bytes(data)
        rc, err = _cli(capsys, resume)
        assert rc == 1 and f"{name}: damaged" in err, (name, err)
        (out / name).write_bytes(good[name])
    # A torn last line of metrics.jsonl (a kill mid-append) is dropped; the run goes on.
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "lo')
    rc, err = _cli(capsys, resume)
    assert rc == 0 and _steps(out) == [0, 1, 2, 3, 4], (err, _steps(out))


def test_small_messages(toy, tmp_path, capsys):
    model, data = str(toy["model"]), str(toy["data"])
    for argv, why in (
        (["eval", str(tmp_path), data], "is a folder"),
        (["eval", model, str(tmp_path)], "is a folder"),
        (["eval", model, data, "--adapter", str(tmp_path)], "is a folder"),
        (["eval", model, data, "--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["eval", model, data, "--batch-size", "-2"], "--batch-size must be at least 1"),
        (["generate", model, "-p", "hi", "-n", "-5"], "--max-new-tokens must be at least 1"),
        (["generate", model, "-p", "hi", "--temp", "-1"], "--temp"),
        (["generate", model, "-p", "hi", "--top-p", "2"], "--top-p must lie in (0, 1]"),
    ):
        rc, err = _cli(capsys, argv)
        assert rc == 1 and why in err, (argv, err)


# ---- kill -9 at every write point, then --resume: bit-identical ------------------------------------------------

RUN_FILES = ("run.json", "metrics.jsonl", "trajectory.json", "deltas.gguf", "checkpoint.npz", "loss.png")


def _finish(toy, out, steps, env=None) -> subprocess.CompletedProcess:
    """What a user does after a crash: --resume where a checkpoint exists, else start again."""
    resume = ("--resume",) if (out / run_dir.CHECKPOINT).exists() else ()
    proc = _spawn(toy, out, "--steps", str(steps), *resume, env=env)
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _same_run(a: Path, b: Path) -> None:
    assert np.array_equal(_theta(a), _theta(b))
    assert (a / "deltas.gguf").read_bytes() == (b / "deltas.gguf").read_bytes()
    assert json.loads((a / "trajectory.json").read_text()) == json.loads((b / "trajectory.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("step_seconds", "tokens_per_s", "peak_rss_mib", "elapsed_s")}
                          for r in rows]  # noqa: E731
    assert strip(run_dir.read_metrics(a)) == strip(run_dir.read_metrics(b))
    assert sorted(p.name for p in b.iterdir()) == sorted(RUN_FILES)   # no temporary file, no lock left


def test_kill_9_inside_every_write_then_resume_is_bit_identical(toy, tmp_path):
    """One chain of processes, each killed at its first or second write of one kind (the temporary
    file cut at a random length, complete but not renamed, or renamed; a metrics line torn at a random
    length, or appended), each resumed by the next. Every kill is checked to have left what it should."""
    steps = 40
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert _finish(toy, whole, steps).returncode == 0
    rng = np.random.default_rng(17)
    phases = {name: ("partial", "written", "renamed") for name in RUN_FILES}
    phases["metrics.jsonl"] += ("appending", "appended")   # rewritten whole on resume, appended while running
    first = "checkpoint.npz:renamed"   # so that every later process resumes (and rewrites metrics.jsonl)
    every_step = [f"{n}:{p}" for n in RUN_FILES if n != "loss.png" for p in phases[n] if f"{n}:{p}" != first]
    at_the_end = [f"loss.png:{p}" for p in phases["loss.png"]]   # the plot is drawn once a run is complete
    points = [first, *rng.permutation(every_step), *rng.permutation(at_the_end)]
    for point in points:
        name, phase = point.split(":")
        n = 1 if name in ("run.json", "loss.png") or phase in ("partial", "written", "renamed") and \
            name == "metrics.jsonl" else int(rng.integers(1, 3))
        env = {"EDGE_ZO_KILL_AT": f"{point}@{n}", "EDGE_ZO_KILL_CUT": f"{rng.uniform(0.05, 0.95):.3f}"}
        resumed = (broken / run_dir.CHECKPOINT).exists()
        done = _finish(toy, broken, steps, env)
        assert done.returncode == -signal.SIGKILL, (point, done.returncode, done.stderr)
        if phase in ("partial", "written"):
            assert list(broken.glob(f".{name}.*.tmp")), point   # an unfinished temporary file was left
        if phase == "appending":
            assert not (broken / name).read_bytes().endswith(b"\n"), point   # a torn last line was left
        if name == "metrics.jsonl" and phase in ("partial", "written", "renamed"):
            assert resumed, point   # metrics.jsonl is rewritten whole only by a resume
    done = _finish(toy, broken, steps)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    _same_run(whole, broken)


def test_kill_9_at_random_times_then_resume_is_bit_identical(toy, tmp_path):
    """kill -9 from outside at random moments of a run that checkpoints every step."""
    steps = 120
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert _finish(toy, whole, steps).returncode == 0
    rng = np.random.default_rng(24)
    reached = []
    for _ in range(5):
        resume = ("--resume",) if (broken / run_dir.CHECKPOINT).exists() else ()
        proc = _spawn(toy, broken, "--steps", str(steps), *resume)
        _wait_for_step(broken, (reached or [0])[-1] + 1, proc)   # stepping again
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.communicate()
        reached.append(_steps(broken)[-1])
    assert 0 < reached[-1] < steps, reached   # the kills landed mid-run
    done = _finish(toy, broken, steps)
    assert done.returncode == 0, done.stderr
    _same_run(whole, broken)


# ---- fuzzed readers -------------------------------------------------------------------------------------------

def _fuzz(kind: str, good: Path, model: Path, seed: int, n: int) -> dict[str, int]:
    proc = subprocess.run([sys.executable, "-m", "tests.fuzz_readers", kind, str(good), str(model), str(seed), str(n)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"the {kind} reader crashed the interpreter after: {lines[-1:]}\n{proc.stderr[-3000:]}"
    bugs = [line for line in lines if line.startswith("BUG")]
    assert not bugs, f"{bugs[:10]}\n{proc.stderr[-3000:]}"
    counts = {k: sum(line.startswith(k + " ") for line in lines) for k in ("ok", "error")}
    assert counts["ok"] + counts["error"] == n
    return counts


def test_fuzzed_adapters_load_or_fail_cleanly(toy, tmp_path):
    rng = np.random.default_rng(3)
    small = {name: (np.sort(rng.choice(4096, 6, replace=False)), rng.normal(0, 0.01, 6).astype(np.float32))
             for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight")}
    good = tmp_path / "good.gguf"
    SparseAdapter.from_weights("llama", small, {Sparse.ROLE: "deltas",
                                                Sparse.BASE_MODEL_SHA256: file_sha256(toy["model"])}).save(good)
    counts = _fuzz("adapter", good, toy["model"], seed=1, n=3000)
    assert counts["ok"] > 50 and counts["error"] > 500, counts   # both outcomes were exercised


def test_fuzzed_jsonl_loads_or_fails_cleanly(toy, tmp_path):
    files = [
        write_jsonl(tmp_path / "choices.jsonl", [CHOICES[0], {"prompt": "Ünïcødé ☃", "completion": " 😀 ok",
                                                              "choices": [" 😀 ok", " no"]}]),
        write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}] * 2),
        write_jsonl(tmp_path / "text.jsonl", [{"text": "plain text row"}, {"text": "ça va\tbien"}]),
    ]
    total = {"ok": 0, "error": 0}
    for seed, path in enumerate(files):
        for k, v in _fuzz("jsonl", path, toy["model"], seed=seed, n=1000).items():
            total[k] += v
    assert total["ok"] > 300 and total["error"] > 700, total   # both outcomes were exercised
