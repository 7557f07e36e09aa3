"""edge-zo tune: personalize a model with sparse zeroth-order fine-tuning (SPSA).

Only forward passes run: each step perturbs the sensitive sparse values along
a seeded random direction z, measures the loss at θ+εz and θ−εz, and moves θ
along −(L+−L−)/(2ε)·z (ZO-Adam by default: per-weight steps of about lr). Rows
with choices are tuned on the cross-entropy over their choices. The dense
4-bit weights are never touched.

Examples:
  edge-zo tune                                   # the embedded demo (SmolLM2 + a real task)
  edge-zo tune model.gguf train.jsonl -o runs/me --time 10m
  edge-zo tune model.gguf train.jsonl --valid valid.jsonl --optimizer sgd --lr auto
  edge-zo tune model.gguf train.jsonl -o runs/me --resume   # continue a killed run
  edge-zo tune model.gguf train.jsonl --config tune.yaml    # settings from YAML; flags win
  torchrun --standalone --nproc-per-node 4 -m edge_zo tune model.gguf train.jsonl -o runs/me --directions 4
                                                 # 4 workers share each step's directions (docs/distributed.md)

The sparse coordinates come from the model's sidecar (DIR/sidecar.gguf beside
DIR/model.gguf, made by `edge-zo convert`), or --sidecar FILE; a model without one
(a stock GGUF) gets a mask that tune builds once and caches by the model's SHA-256
($EDGE_ZO_CACHE/masks): the Fisher mask where torch is installed, else a torch-free
activation mask computed by llama.cpp (docs/mask.md).
Outputs in -o DIR: deltas.gguf (the validated best; use with --adapter), run.json,
metrics.jsonl, loss.png, trajectory.json and checkpoint.npz.
Every option is also a key of the --config YAML file (docs/tune.example.yaml).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from .. import distributed, eps_probe, lr_search, objective, run_dir
from ..adapter import SparseAdapter
from ..constants import Sparse
from ..dataset import Tokenizer, load_jsonl
from ..distributed import Team, World
from ..errors import DivergedError, EdgeZoError, InvalidInputError, WorkerLostError
from ..lr_search import LR_GRID  # noqa: F401  (the grid `--lr auto` searches for sgd, named by the docs and tests)
from ..model_info import ModelInfo, file_sha256
from ..runtime import Runtime, RuntimeOptions, ValueSets, slow_cpu_type
from ..trainer import Interrupted, LoopConfig, LoopState, batch_indices, gather_local, train
from ..tune_settings import RESUMABLE, STEPS_UNDER_TIME, UNRECORDED, TuneSettings, add_arguments, load_config, resolve
from ._common import add_allow_other_base, find_sidecar


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-zo tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--config", help="YAML file of settings (keys as the long options with _ for -, e.g. "
                                     "batch_size: 16); flags win")
    p.add_argument("--resume", action="store_true", help="continue the run in -o DIR from its checkpoint")
    add_allow_other_base(p)
    return p


def settings_from(args: argparse.Namespace) -> TuneSettings:
    """Command line over --config over (for the demo) the demo's preset over the defaults."""
    config = load_config(args.config) if args.config else {}
    fill = None
    if all(getattr(args, k) is None and k not in config for k in ("model", "data")):
        fill = _demo(args.sidecar)
    return resolve(args, config, fill, config_name=args.config)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    world = World.from_env()
    s = settings_from(args)
    if s.model is None or s.data is None:
        raise InvalidInputError("give both MODEL and DATA (or neither, for the demo)")
    ours = {"argv": argv, "allow_other_base": args.allow_other_base}
    if world.size == 1:
        return _run(s, args.resume, world, None, **ours)
    if s.mask_from_data:
        raise InvalidInputError("--mask-from-data picks the coordinates on one process: run it alone once, then "
                                "tune under torchrun with --sidecar RUN/mask.gguf")
    if s.time is not None or s.patience:
        raise InvalidInputError("--time and --patience stop one process by its own clock and validation; under "
                                "torchrun, set --steps instead")
    team = Team.join(world, s.dist_timeout)
    try:
        return _run(s, args.resume, world, team, **ours)
    except BaseException as exc:  # so that the others name this worker's error, not just its silence
        team.tell_failure(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        team.close()


@dataclasses.dataclass
class _Job:
    """What one worker holds while it tunes."""

    s: TuneSettings
    world: World
    team: Team | None
    out: Path
    rt: Runtime
    train_ex: list
    valid_ex: list
    sidecar: SparseAdapter
    sidecar_path: Path
    deltas: SparseAdapter
    shard: np.ndarray                  # the training rows this worker draws batches from
    objective: objective.Objective
    searches: dict = dataclasses.field(default_factory=dict)   # what --eps/--lr auto found, for run.json
    argv: list = dataclasses.field(default_factory=list)       # the command line, for the resume hint
    valid_rows: list | None = None     # the training rows held out for validation (None: a --valid file)
    started: float = 0.0               # time.perf_counter() when the command started (metrics.jsonl elapsed_s)
    valid_choice_names: list = dataclasses.field(default_factory=list)   # each validation row's choices, if any
    forward_seconds: float | None = None   # one training batch's forward, timed when --time needs it
    reported_decodes: bool = False     # --verbose said how many decodes a step takes

    def say(self, msg: str) -> None:
        if self.world.is_main:
            print(f"edge-zo tune: {msg}", file=sys.stderr)

    def loss(self, idx: np.ndarray) -> float:
        """The objective on the batch of training rows `idx` (positions in the shard)."""
        return objective.batch_loss(self.rt, self.objective)([self.train_ex[self.shard[i]] for i in idx])

    def losses(self, idx: np.ndarray, sets: list[np.ndarray]) -> list[float]:
        """The objective on the batch `idx` under each value set of the deltas, evaluated together."""
        batch = [self.train_ex[self.shard[i]] for i in idx]
        before = self.rt.native.decode_count
        out = objective.batch_losses(self.rt, self.objective)(batch, ValueSets(self.deltas.values, sets))
        if self.s.verbose and not self.reported_decodes:
            self.reported_decodes = True
            self.say(f"a step's {len(sets)} value sets x {len(batch)} rows took "
                     f"{self.rt.native.decode_count - before} llama_decode call(s)")
        return out


def _run(s: TuneSettings, resume: bool, world: World, team: Team | None, *, argv: list[str] = (),
         allow_other_base: bool = False) -> int:
    """One worker of world.size (one process: world.size == 1, team None). Every
    worker loads the model and data; worker 0 alone writes the run folder, holding its lock."""
    t_start = time.perf_counter()
    deadline = None if s.time is None else t_start + s.time_seconds()
    ModelInfo.open(s.model)   # a missing or unreadable model is told before any advice about its sidecar
    train_ds = load_jsonl(s.data)
    valid_ds = load_jsonl(s.valid) if s.valid else None
    sidecar_path = find_sidecar(Path(s.model), s.sidecar, cached=False)
    if sidecar_path is None and not s.mask_from_data:
        sidecar_path = _automatic_mask(s, world)
    out = Path(s.output or Path("runs") / Path(s.data).stem)
    opts = RuntimeOptions(batch_size=s.batch_size, max_tokens=s.max_tokens, threads=s.threads,
                          gpu_layers=s.gpu_layers, kv_f32=s.kv_f32, verbose=s.verbose,
                          groups=s.step_groups(world.size))
    holding = run_dir.locked(out) if world.is_main else contextlib.nullcontext()
    with holding, Runtime(s.model, opts) as rt:
        tok = Tokenizer(rt.native, max_tokens=s.max_tokens, chat=s.chat)
        train_ex = tok.examples(train_ds)
        if valid_ds is None:
            tr, va = _split(len(train_ex), s)
            valid_ex, train_ex = [train_ex[i] for i in va], [train_ex[i] for i in tr]
        else:
            valid_ex = tok.examples(valid_ds)
        job = _attach(s, world, team, out, rt, train_ex, valid_ex, sidecar_path)
        job.argv, job.valid_rows = list(argv), None if valid_ds is not None else [int(i) for i in va]
        job.started = t_start
        valid_records = valid_ds.records if valid_ds is not None else [train_ds.records[i] for i in va]
        job.valid_choice_names = [r.fields.get("choices") for r in valid_records]
        if not allow_other_base:
            job.sidecar.check_base(rt.info.sha256(), s.model, str(job.sidecar_path))
        identity = _identity(job)
        s = _searched(job, resume, deadline)
        job.s = s
        state = _start_state(job, identity, resume)
        state = _train(job, state, resume, deadline)
        if state is None:
            return 130
        if not world.is_main:
            return 0
        plot = run_dir.plot_losses(out)
        shown = _answers_before_after(job, state, [r.fields.get("prompt", "") for r in valid_records])
    _summary(job, state, time.perf_counter() - t_start, plot)
    if shown:
        job.say("held-out rows, the model's answer before -> after tuning:\n" + shown)
    return 0


def _automatic_mask(s: TuneSettings, world: World) -> Path:
    """No sidecar given or beside the model: the model's automatic mask (edge_zo.activation_mask.ensure:
    Fisher where torch is installed, else the torch-free activation mask), built once per model file
    and density and cached by the file's SHA-256; the model is used as it is (a `--split keep`
    sidecar: zero values)."""
    from .. import activation_mask

    def say(msg: str) -> None:
        if world.is_main:
            print(f"edge-zo tune: {msg}", file=sys.stderr, flush=True)

    return activation_mask.ensure(Path(s.model), density=s.density, threads=s.threads, say=say)


def _attach(s, world, team, out, rt, train_ex, valid_ex, sidecar_path) -> _Job:
    """The sparse set (the sidecar, or a mask from the data) attached, and zero deltas on it."""
    if sidecar_path is not None:
        sidecar = SparseAdapter.load(sidecar_path)
        note = f"sidecar {sidecar_path}"
    else:
        from ..cli import fisher_sidecar

        sidecar = fisher_sidecar(Path(s.model), train_ex, density=s.density)
        sidecar_path = out / "mask.gguf"
        sidecar.save(sidecar_path)
        note = f"Fisher mask from the training data ({sidecar.n_params} coordinates) -> {sidecar_path}"
    if np.any(sidecar.values):
        rt.attach(sidecar, source=str(sidecar_path))
    deltas = sidecar.with_values(np.zeros(sidecar.n_params, np.float32),
                                 {Sparse.ROLE: "deltas", Sparse.BASE_MODEL_SHA256: rt.info.sha256()})
    rt.attach(deltas, source="deltas")
    obj = objective.resolve(s.objective, train_ex)
    job = _Job(s, world, team, out, rt, train_ex, valid_ex, sidecar, sidecar_path, deltas,
               _shard(len(train_ex), s.shard_data and world.size or 1, world.rank), obj)
    job.say(f"tuning {sidecar.n_params:,} coordinates in {len(sidecar.names)} matrices ({note}) on the "
            f"{obj.value} objective" + (f", {world.size} workers" if world.size > 1 else ""))
    slow = slow_cpu_type(rt.info) if s.gpu_layers == 0 else None
    if slow:
        job.say(f"note: this model's block matmuls are {slow}, whose llama.cpp CPU kernels are the slowest 4-bit ones: "
                f"a Q4_0 copy (edge-zo convert {s.model} -o DIR, then tune DIR/model.gguf) runs SmolLM2's forwards "
                "2.3-2.9x faster on 2 cores, for +10% perplexity (docs/convert.md)")
    if s.directions % world.size:
        job.say(f"note: --directions {s.directions} does not divide among {world.size} workers: some wait for the "
                f"others every step; --directions {world.size} or a multiple keeps all busy")
    return job


def _identity(job: _Job) -> dict:
    """What every worker must agree on, and what a resumed run must match."""
    identity = {"settings": job.s.result_settings(_shards(job)),
                "objective_resolved": job.objective.value, "model_sha256": job.rt.info.sha256(),
                "sidecar_sha256": file_sha256(job.sidecar_path), "data_sha256": file_sha256(job.s.data),
                "valid_sha256": file_sha256(job.s.valid) if job.s.valid else None, "valid_rows": job.valid_rows,
                "n_train": len(job.train_ex), "n_valid": len(job.valid_ex), "n_params": job.sidecar.n_params}
    if job.team is not None:
        job.team.all_same("model, sidecar, data or settings", identity,
                          hint="launch every worker with the same files and flags")
    return identity


def _shards(job: _Job) -> int:
    return job.world.size if job.s.shard_data else 1


def _searched(job: _Job, resume: bool, deadline: float | None) -> TuneSettings:
    """ε first (the lr probes run at it), then the learning rate; a resumed run keeps what its
    searches chose (searching again costs forwards, and could choose differently)."""
    s = job.s
    if "auto" not in (s.eps, s.lr) or not job.world.is_main:
        return s
    saved = _saved_run(job.out) if resume else None
    for name in ("eps", "lr"):
        if getattr(s, name) != "auto":
            continue
        if saved:
            s = dataclasses.replace(s, **{name: float(saved["settings"][name])})
            job.searches[name] = saved.get(f"{name}_search")
            job.say(f"--{name} auto: resuming at the run's {name} {getattr(s, name):g}")
        elif name == "eps":
            directions = eps_probe.DIRECTIONS
            if deadline is not None:  # the probe gets its share of the budget, measured by one forward's time
                share = lr_search.SEARCH_SHARE * s.time_seconds()
                forward = _forward_seconds(job, s)
                smallest = eps_probe.smallest_probe_seconds(forward)
                if smallest > share:
                    s = dataclasses.replace(s, eps=eps_probe.FALLBACK_EPS)
                    job.searches["eps"] = {"skipped": f"its smallest probe takes about {smallest:.0f} s, more than "
                                                      f"its {share:.0f} s share of --time {s.time}"}
                    job.say(f"--eps auto: tuning at ε {s.eps:g} without a probe: its smallest takes about "
                            f"{smallest:.0f} s, more than its {share:.0f} s share of --time {s.time} (give --eps, "
                            "or more time)")
                    continue
                directions = eps_probe.directions_within(share, forward)
                job.say(f"--eps auto: {directions} directions fit a {share:.0f} s share of --time {s.time}")
            s = dataclasses.replace(s, eps=_search_eps(job, s, directions))
        else:
            steps = lr_search.PROBE_STEPS
            if deadline is not None:  # the probes get their share of the budget, measured by one step's time
                share = lr_search.SEARCH_SHARE * s.time_seconds()
                steps = lr_search.probe_steps_within(share, 2 * s.directions * _forward_seconds(job, s),
                                                     lr_search.GRIDS[s.loop().optimizer])
                job.say(f"--lr auto: {steps} probe steps per rate fit a {share:.0f} s share of --time {s.time}")
            lr, job.searches["lr"] = lr_search.search_lr(s.loop(), job.deltas.values, len(job.shard), job.loss,
                                                         job.say, probe_steps=steps)
            s = dataclasses.replace(s, lr=lr)
    if deadline is not None and time.perf_counter() >= deadline:
        raise EdgeZoError(f"--time {s.time} was spent by the searches of --eps/--lr auto before any step; give "
                          "more time, or fixed --eps and --lr")
    return s


def _forward_seconds(job: _Job, s: TuneSettings) -> float:
    """Seconds of one forward of a training batch (timed once), to fit searches into --time."""
    if job.forward_seconds is None:
        t = time.perf_counter()
        job.loss(batch_indices(s.seed, 0, len(job.shard), s.batch_size))
        job.forward_seconds = time.perf_counter() - t
    return job.forward_seconds


def _search_eps(job: _Job, s: TuneSettings, directions: int = eps_probe.DIRECTIONS) -> float:
    """`--eps auto` (edge_zo.eps_probe) on the run's first batches, from θ = 0."""
    batches = [batch_indices(s.seed, k, len(job.shard), s.batch_size) for k in range(directions)]
    choice = eps_probe.choose_eps_live(job.deltas.values, lambda k: job.loss(batches[k]), s.seed, directions)
    job.say(f"--eps auto: ε {choice.eps:g}, between {choice.pair[0]:g} and {choice.pair[1]:g} whose loss "
            f"differences agree at {choice.agreement:.2f} ({choice.forwards} forwards)")
    note = eps_probe.warning(choice)
    if note:
        job.say("warning: " + note)
    job.searches["eps"] = choice.as_json()
    return choice.eps


def _start_state(job: _Job, identity: dict, resume: bool) -> LoopState:
    """Worker 0 prepares the run folder and the state to start from; under torchrun the others
    receive ε, lr and that state (so they need neither the run folder nor its disk)."""
    s, world, team = job.s, job.world, job.team
    run_info = {
        **identity, "settings": s.result_settings(_shards(job)), "model": str(s.model),
        "sidecar": str(job.sidecar_path), "data": str(s.data), "valid": str(s.valid) if s.valid else None,
        "eps_search": job.searches.get("eps"), "lr_search": job.searches.get("lr"),
        "edge_zo_version": _version(), "workers": world.size,
        "backend": {"kv_f32": s.kv_f32, "gpu_layers": s.gpu_layers,
                    "value_sets": "one decode" if s.grouped() else "separate"},   # all change the losses, so the deltas
    }
    resume = resume or (world.restarts > 0 and (job.out / run_dir.CHECKPOINT).exists())
    if world.restarts > 0:
        job.say(f"restart {world.restarts} by torchrun: " + (f"resuming from the checkpoint in {job.out}" if resume
                else f"no checkpoint in {job.out} yet, starting from step 0"))
    state, error = None, None
    if world.is_main:
        try:
            state = _start(job.out, run_info, s.loop(), resume)
        except EdgeZoError as exc:
            if team is None:
                raise
            error = exc
    if team is not None:  # once per (re)start
        mine = None if not world.is_main else {"error": str(error)} if error else {
            "eps": s.eps, "lr": s.lr, "step": state.step, "theta": state.theta, **state.opt.arrays()}
        got = team.broadcast(mine)
        if error is not None:
            raise error
        if "error" in got:
            raise EdgeZoError(f"worker 0 stopped the run: {got['error']}")
        if not world.is_main:
            job.s = dataclasses.replace(s, eps=got["eps"], lr=got["lr"])
            state = LoopState.fresh(got["theta"], job.s.loop())
            state.step = got["step"]
            for k, a in state.opt.arrays().items():
                a[:] = got[k]
    return state


def _train(job: _Job, state: LoopState, resume: bool, deadline: float | None) -> LoopState | None:
    """The SPSA loop with this command's reporting, checkpoints and progress bar; None when
    Ctrl-C stopped it (the checkpoint is saved)."""
    s, world, team, out = job.s, job.world, job.team, job.out
    lead = world.is_main
    loop = s.loop()
    n_tokens = np.mean([len(e.choices[0].tokens if job.objective is objective.Objective.CHOICES else e.tokens)
                        for e in job.train_ex])
    tokens_per_step = 2 * loop.directions * int(n_tokens * min(loop.batch_size, len(job.shard)))
    bar = None

    def evaluate():
        # Worker 0 validates; the others meet it at the next step's all-gather.
        return objective.validation(job.rt, job.objective, job.valid_ex) if lead else {}

    def report(rec):
        if not lead:
            return
        rec = dict(rec)
        if "step_seconds" in rec:
            rec["tokens_per_s"] = tokens_per_step / rec["step_seconds"]
        rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rec["elapsed_s"] = round(time.perf_counter() - job.started, 3)   # since this command started: searches count
        run_dir.append_metrics(out, rec)
        if "valid_loss" in rec:
            acc = f"  valid acc {rec['valid_accuracy']:.3f}" if "valid_accuracy" in rec else ""
            line = f"step {rec['step']:>5}  valid loss {rec['valid_loss']:.4f}{acc}"
            (bar.write(line) if bar is not None else print(line, file=sys.stderr))

    def checkpoint(st: LoopState, check: bool = True):
        if team is not None and check:  # 16 bytes per worker: do all of them hold the same deltas?
            team.all_same(f"deltas after step {st.step}", distributed.digest(st.theta),
                          hint="their numpy builds round differently; use the same environment everywhere")
        if lead:  # the trajectory before the checkpoint: a kill in between leaves a resumable pair
            run_dir.write_json(out / run_dir.TRAJECTORY, {
                "seed": loop.seed, "optimizer": loop.optimizer.value, "scalars": st.scalars,
                "best_step": st.best_step,
                "note": "theta_T = edge_zo.spsa.replay(zeros, scalars[:T], seed, optimizer, lr schedule of "
                        "run.json); deltas.gguf holds theta at best_step"})
            job.deltas.with_values(st.best).save(out / run_dir.DELTAS)
            run_dir.save_checkpoint(out, st)

    if not s.quiet and lead:
        from tqdm import tqdm

        # Under --time alone the budget ends the run: no step total (and no ETA counting to a million steps).
        bar = tqdm(total=None if loop.steps >= STEPS_UNDER_TIME else loop.steps, initial=state.step, unit="step",
                   dynamic_ncols=True, file=sys.stderr,
                   desc="tune" if deadline is None else f"tune, --time {s.time}")

    def progress(step, info):
        if bar is not None:
            bar.update(1)
            left = {} if deadline is None else {"left": f"{max(deadline - time.perf_counter(), 0):.0f}s"}
            bar.set_postfix(loss=f"{info['loss']:.4f}", g=f"{info['projected_grad']:+.3g}", **left)

    gather = gather_local if team is None else (lambda local, stop: team.gather(local, stop, loop.directions))
    again = "rerun the same command with --resume" + (" (under torchrun, or alone)" if team else "")
    try:
        return train(loop, state, n_examples=len(job.shard), live=job.deltas.values, loss=job.loss,
                     evaluate=evaluate, report=report, checkpoint=checkpoint, progress=progress,
                     rank=world.rank, workers=world.size, gather=gather, deadline=deadline,
                     losses=job.losses if s.grouped() else None)
    except Interrupted as exc:
        if bar is not None:
            bar.close()
        job.say(f"{exc}; checkpoint saved. Continue with: {_resume_command(job.argv)}"
                + (" (under the same torchrun command, or alone)" if team else ""))
        return None
    except DivergedError as exc:   # the state is back at the last finite step: keep that one
        if lead:
            checkpoint(state, check=False)
        advice = ("check the model, sidecar and data with `edge-zo eval`" if exc.before_training else
                  f"start again in another -o with a smaller --lr than {loop.lr:g}"
                  + (f", or close this run where it is with --resume --steps {state.step}" if state.step else ""))
        raise DivergedError(f"{exc}. {out} keeps step {state.step}, the last finite one ({run_dir.CHECKPOINT}, "
                            f"{run_dir.DELTAS}): {advice}", exc.step, exc.before_training) from None
    except WorkerLostError as exc:  # the steps so far are complete on every survivor: keep them
        if lead:
            checkpoint(state, check=False)
            raise WorkerLostError(f"{exc}; worker 0 saved step {state.step} in {out}: {again}") from None
        raise WorkerLostError(f"{exc}; step {state.step + 1} did not finish and worker 0 keeps the checkpoint "
                              f"in {out}: {again}") from None
    finally:
        if bar is not None:
            bar.close()


def _answers_before_after(job: _Job, state: LoopState, prompts: list[str], rows: int = 4) -> str:
    """A few validation rows with choices, each with the answer the model picks with zero deltas
    and with the best ones: what tuning changed, in words."""
    picked = [i for i, e in enumerate(job.valid_ex) if e.choices][:rows]
    if not picked:
        return ""
    examples = [job.valid_ex[i] for i in picked]
    live = job.deltas.values
    live[:] = 0.0
    before = job.rt.choice_scores(examples)
    live[:] = state.best
    after = job.rt.choice_scores(examples)
    lines = []
    for i, e, b, a in zip(picked, examples, before, after):
        record_choices = job.valid_choice_names[i] if job.valid_choice_names else None
        name = (lambda k: repr(record_choices[k].strip())) if record_choices else (lambda k: f"choice {k}")
        text = " ".join(prompts[i].split())
        text = text if len(text) <= 70 else text[:67] + "..."
        mark = "right" if int(np.argmax(a)) == e.answer else "wrong"
        lines.append(f"  {text!r}: {name(int(np.argmax(b)))} -> {name(int(np.argmax(a)))} "
                     f"(expected {name(e.answer)}, {mark})")
    return "\n".join(lines)


def _summary(job: _Job, state: LoopState, seconds: float, plot) -> None:
    s, out = job.s, job.out
    valid = [r for r in run_dir.read_metrics(out) if "valid_loss" in r]
    best = next((r for r in valid if r["step"] == state.best_step), valid[-1])
    summary = f"valid loss {valid[0]['valid_loss']:.4f} -> {best['valid_loss']:.4f}"
    if "valid_accuracy" in best:
        summary += f", accuracy {valid[0]['valid_accuracy']:.3f} -> {best['valid_accuracy']:.3f}"
    ended = ""
    if state.step < s.steps:
        patience_ran_out = s.patience and state.step - state.best_step >= s.patience * s.eval_every
        ended = f" (stopped at step {state.step}: " + (
            f"no better validation in {s.patience} checks" if patience_ran_out else f"--time {s.time} spent") + ")"
    job.say(f"{summary} at step {state.best_step}, in {seconds:.0f} s{ended}. Deltas: {out / run_dir.DELTAS}"
            + (f", plot: {plot}" if plot else ""))
    warning = rise_warning(valid, s.lr, s.steps)
    if warning:
        job.say(warning)
    if job.team is not None:
        job.say(f"{job.world.size} workers, {s.directions} directions per step: each worker sent "
                f"{distributed.step_sent_bytes(s.directions, job.world.size)} bytes per step; worker 0 sent "
                f"{job.team.sent['steps']:,} bytes in steps and {job.team.sent['setup']:,} at start-up and "
                "checkpoints")
    adapters = f"--adapter {job.sidecar_path} " if np.any(job.sidecar.values) else ""
    job.say(f"try it: edge-zo generate {s.model} {adapters}--adapter {out / run_dir.DELTAS} -p \"...\"")


def rise_warning(valid: list[dict], lr: float, steps: int) -> str | None:
    """A warning when the run ends with a higher validation loss than it started with: over a few
    hundred steps a rate that looked best early can diverge (docs/tune.md)."""
    if len(valid) < 2 or valid[-1]["valid_loss"] <= valid[0]["valid_loss"]:
        return None
    return (f"warning: the validation loss rose ({valid[0]['valid_loss']:.4f} -> {valid[-1]['valid_loss']:.4f}): "
            f"the learning rate {lr:g} is likely too large for {steps} steps; try --lr {lr / 3:.2g} "
            f"(see docs/tune.md)")


def _demo(sidecar: str | None) -> dict:
    """The embedded demo's inputs and preset (flags given win). Local workers under
    torchrun take turns, so only the first builds the cache."""
    import fcntl

    from .. import corpora, demo

    lock = corpora.cache_root().parent / "demo.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        model, data, valid, sidecar = demo.prepare(sidecar)
    if World.from_env().is_main:
        print(f"edge-zo tune: demo: {model} on {data}", file=sys.stderr)
    return {"model": model, "data": data, "valid": valid, "sidecar": sidecar, **demo.DEMO_SETTINGS}


def _split(n: int, s: TuneSettings) -> tuple[np.ndarray, np.ndarray]:
    """Held-out validation rows, fixed by the seed."""
    if n < 4:
        return np.arange(n), np.arange(n)  # too few to hold any out: validate on the training rows
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([s.seed, 0xDA7A])))
    perm = rng.permutation(n)
    k = max(1, min(s.valid_max, int(round(n * s.valid_fraction))))
    return np.sort(perm[k:]), np.sort(perm[:k])


def _shard(n: int, shards: int, rank: int) -> np.ndarray:
    """The training rows a worker draws its batches from: all of them, or with
    --shard-data every shards-th one from its rank on (disjoint, fixed)."""
    if shards == 1:
        return np.arange(n)
    if n < shards:
        raise InvalidInputError(f"--shard-data: {n} training rows cannot give each of {shards} workers a shard")
    return np.arange(rank, n, shards)


def _start(out: Path, run_info: dict, loop: LoopConfig, resume: bool) -> LoopState:
    """Worker 0: the state to start from, and the run folder ready for it."""
    if resume:
        return _resume(out, run_info, loop)
    if (out / run_dir.CHECKPOINT).exists():
        raise InvalidInputError(f"{out} already holds a run: pass --resume to continue it, or choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    (out / run_dir.METRICS).unlink(missing_ok=True)
    run_dir.write_json(out / run_dir.RUN_JSON, run_info)
    return LoopState.fresh(np.zeros(run_info["n_params"], np.float32), loop)


def _resume(out: Path, run_info: dict, loop: LoopConfig) -> LoopState:
    saved = _saved_run(out)
    diffs = _differences(saved, run_info)
    if diffs:
        raise InvalidInputError(f"{out}: cannot resume: " + "; ".join(diffs) + f". Resume with the run's own inputs "
                                f"and settings ({out / run_dir.RUN_JSON} lists them), or start a new run in another -o")
    state = run_dir.load_checkpoint(out, loop.optimizer, loop.beta1, loop.beta2)
    if len(state.theta) != run_info["n_params"]:
        raise InvalidInputError(f"{out / run_dir.CHECKPOINT}: damaged, cannot resume from it ({len(state.theta)} "
                                f"values for {run_info['n_params']} coordinates); start again in another -o")
    run_dir.truncate_metrics(out, state.step)
    run_dir.write_json(out / run_dir.RUN_JSON, run_info)
    return state


# What a resumed run must share with the run it continues, besides the settings, and how to name it.
_SAME_INPUTS = {"model_sha256": "the model", "sidecar_sha256": "the sidecar", "data_sha256": "the training data",
                "valid_sha256": "the valid file", "valid_rows": "the held-out validation rows",
                "n_train": "training rows", "n_valid": "validation rows", "n_params": "tuned coordinates",
                "objective_resolved": "the objective", "backend": "the backend"}


def _differences(saved: dict, now: dict) -> list[str]:
    """Every setting and input of `now` that would make the resumed steps differ from the saved run's."""
    diffs = []
    a, b = saved["settings"], now["settings"]
    for k in sorted(set(a) | set(b)):
        if a.get(k, UNRECORDED.get(k)) == b.get(k):
            continue
        if k == "steps" and b.get("schedule", "constant") != "constant":
            diffs.append(f"steps {a.get(k)!r} -> {b.get(k)!r} (the {b['schedule']} schedule spans the whole run)")
        elif k not in RESUMABLE:
            diffs.append(f"{k} {a.get(k)!r} -> {b.get(k)!r}")
    for key, what in _SAME_INPUTS.items():
        x, y = saved.get(key), now.get(key)
        if x == y:
            continue
        if key not in saved:
            diffs.append(f"{what}: not recorded by the edge-zo that started this run")
        elif key == "valid_sha256" and None in (x, y):
            held_out = "none (rows held out of the training data)"
            diffs.append(f"the valid file: {saved.get('valid') or held_out} -> {now.get('valid') or held_out}")
        elif key.endswith("sha256"):
            diffs.append(f"{what} changed (sha256 {str(x)[:12]}... -> {str(y)[:12]}...)")
        elif key == "backend":
            diffs += [f"{k} {x.get(k, UNRECORDED.get(k))!r} -> {y.get(k)!r}" for k in sorted(y)
                      if x.get(k, UNRECORDED.get(k)) != y.get(k)]
        elif key == "valid_rows":
            if None not in (x, y):   # else the valid file's line says it
                diffs.append(f"{what} differ")
        else:
            diffs.append(f"{what} {x!r} -> {y!r}")
    return diffs


def _saved_run(out: Path) -> dict:
    """run.json of the run being resumed, read before any search (so a missing run is told at once).
    Its settings always hold numbers: the searches' picks are saved, never 'auto'."""
    return run_dir.read_run_json(out)


def _resume_command(argv: list[str]) -> str:
    """The command that continues this run: the user's own flags, with --resume, quoted for a shell."""
    return shlex.join(["edge-zo", "tune", *(a for a in argv if a != "--resume"), "--resume"])


def _version() -> str:
    from .. import __version__

    return __version__
