"""edge-zo tune: personalize a model with sparse zeroth-order fine-tuning (SPSA).

Only forward passes run: each step perturbs the sensitive sparse values along
a seeded random direction z, measures the loss at θ+εz and θ−εz, and moves θ
by −lr·(L+−L−)/(2ε)·z. The dense 4-bit weights are never touched.

Examples:
  edge-zo tune                                   # the embedded demo (SmolLM2 + a real task)
  edge-zo tune model.gguf train.jsonl -o runs/me --steps 300
  edge-zo tune model.gguf train.jsonl --valid valid.jsonl --optimizer adam --lr 1e-4
  edge-zo tune model.gguf train.jsonl -o runs/me --resume   # continue a killed run
  edge-zo tune model.gguf train.jsonl --config tune.yaml    # settings from YAML; flags win
  torchrun --standalone --nproc-per-node 4 -m edge_zo tune model.gguf train.jsonl -o runs/me --directions 4
                                                 # 4 workers share each step's directions (docs/distributed.md)

The sparse coordinates come from the model's sidecar (DIR/sidecar.gguf beside
DIR/model.gguf, made by `edge-zo convert`), or --sidecar FILE.
Outputs in -o DIR: deltas.gguf (use with --adapter), run.json, metrics.jsonl,
loss.png, trajectory.json and checkpoint.npz.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from .. import distributed, eps_probe, run_dir
from ..adapter import SparseAdapter
from ..constants import Sparse
from ..dataset import Tokenizer, load_jsonl
from ..distributed import Team, World
from ..errors import EdgeZoError, InvalidInputError, WorkerLostError
from ..model_info import file_sha256
from ..runtime import Runtime
from ..spsa import Optimizer, Schedule
from ..trainer import Interrupted, LoopConfig, LoopState, gather_local, train
from ._common import add_runtime_options, find_sidecar

LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
# `--lr auto` keeps the rate one grid step below the probe's best: a 20-step probe rewards rates that
# are only stable for 20 steps. Measured over 300 steps (docs/compare.md): SmolLM2's probe picked 1e-4 on
# 5 of 6 Fisher runs and 3 of those ended worse than they started, where 3e-5 learned on all 6; Gemma's
# picked 1e-5, the grid's floor, on all 9, and 1e-4 (the old default) took its loss from 9-11 to 14-23 nats.
LR_BACK_OFF = 1


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """Everything that determines the tuned deltas (saved in run.json)."""

    loop: LoopConfig
    max_tokens: int = 256
    chat: bool = False
    valid_fraction: float = 0.1
    valid_max: int = 64
    data_shards: int = 1     # --shard-data under torchrun: worker r draws batches from every W-th row from r


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-zo tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="GGUF model (default: the demo, SmolLM2-135M-Instruct)")
    p.add_argument("data", nargs="?", help="training JSONL: prompt/completion, messages or text rows")
    p.add_argument("-o", "--output", help="run folder (default: runs/<data name>)")
    p.add_argument("--config", help="YAML file of settings (keys as the long options, e.g. lr: 1e-4); flags win")
    p.add_argument("--sidecar", help="sparse sidecar naming the tunable coordinates (default: beside the model)")
    p.add_argument("--mask-from-data", action="store_true",
                   help="no sidecar: pick the top-density Fisher coordinates on the training data (needs torch)")
    p.add_argument("--density", type=float, default=None, help="share of block weights to tune with --mask-from-data (default 0.001)")
    p.add_argument("--valid", help="validation JSONL (default: a held-out split of the training data, fixed by --seed)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=None, help="SPSA steps (default 200)")
    g.add_argument("--batch-size", type=int, default=None, help="examples per step (default 8)")
    g.add_argument("--lr", default=None, help="learning rate, or 'auto' (the default): 20-step probes of 1e-5 ... 1e-3 from the start, "
                        "then one grid step below the best (docs/tune.md); a number skips the search")
    g.add_argument("--eps", default=None,
                   help="perturbation size ε, or 'auto' (the default): about 100 forwards on the first batches find "
                        "where this model, backend and data give loss differences that scale with ε, between the "
                        "rounding noise and the loss's bend (docs/fidelity.md); a number skips the probe")
    g.add_argument("--optimizer", choices=[o.value for o in Optimizer], default=None, help="default sgd (MeZO's ZO-SGD)")
    g.add_argument("--schedule", choices=[s.value for s in Schedule], default=None, help="learning-rate schedule (default constant)")
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default 0)")
    g.add_argument("--directions", type=int, default=None, help="random directions averaged per step (default 1)")
    g.add_argument("--seed", type=int, default=None, help="seed of directions, batches and the validation split (default 0)")
    g.add_argument("--eval-every", type=int, default=None, help="validate every N steps (default 25)")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (default 25)")
    p.add_argument("--chat", action="store_true", default=None, help="wrap prompt/completion rows in the chat template")
    p.add_argument("--resume", action="store_true", help="continue the run in -o DIR from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    d = p.add_argument_group("several workers (launch with torchrun; see docs/distributed.md)")
    d.add_argument("--shard-data", action="store_true", default=None,
                   help="worker r draws its batches from its own shard (every W-th training row from r) instead of "
                        "every worker using the same batch; the deltas then depend on the number of workers")
    d.add_argument("--dist-timeout", type=float, default=None,
                   help=f"seconds a worker waits for the others (start-up, each step, worker 0's validation) before "
                        f"the run stops with a resumable checkpoint (default {distributed.DEFAULT_TIMEOUT_S:g})")
    add_runtime_options(p, batch_size=False)
    return p


def _resolve(args, workers: int = 1) -> TuneSettings:
    """Command line over YAML over defaults."""
    cfg = {}
    if args.config:
        import yaml

        try:
            cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInputError(f"{args.config}: cannot read the config ({exc})") from exc
        known = {f.name for f in dataclasses.fields(LoopConfig)} | {"max_tokens", "chat", "batch_size", "shard_data",
                                                                    "dist_timeout"}
        unknown = sorted(set(cfg) - known - {"model", "data", "valid", "output", "sidecar"})
        if unknown:
            raise InvalidInputError(f"{args.config}: unknown settings {unknown}; see `edge-zo tune --help`")
        for key in ("model", "data", "valid", "output", "sidecar"):
            if getattr(args, key) is None and key in cfg:
                setattr(args, key, cfg[key])

    def pick(name, default):
        v = getattr(args, name, None)
        return v if v is not None else cfg.get(name, default)

    d = LoopConfig()

    def number_or_auto(name):
        v = pick(name, "auto")
        try:
            return v if v == "auto" else float(v)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"--{name} must be a number or 'auto', got {v!r}") from exc

    lr, eps = number_or_auto("lr"), number_or_auto("eps")
    loop = LoopConfig(
        steps=int(pick("steps", d.steps)), batch_size=int(pick("batch_size", d.batch_size)),
        eps=eps, lr=lr, optimizer=Optimizer(pick("optimizer", d.optimizer.value)),
        schedule=Schedule(pick("schedule", d.schedule.value)), warmup=int(pick("warmup", d.warmup)),
        directions=int(pick("directions", d.directions)), seed=int(pick("seed", d.seed)),
        eval_every=int(pick("eval_every", d.eval_every)), save_every=int(pick("save_every", d.save_every)),
    )
    for name in ("steps", "batch_size", "directions", "eval_every", "save_every"):
        if getattr(loop, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")
    if any(v != "auto" and v <= 0 for v in (loop.eps, loop.lr)):
        raise InvalidInputError("--eps and --lr must be positive")
    args.dist_timeout = float(pick("dist_timeout", distributed.DEFAULT_TIMEOUT_S))
    if args.dist_timeout <= 0:
        raise InvalidInputError("--dist-timeout must be positive")
    return TuneSettings(loop, max_tokens=int(pick("max_tokens", 256)), chat=bool(pick("chat", False)),
                        data_shards=workers if pick("shard_data", False) else 1)


def _settings_json(s: TuneSettings) -> dict:
    loop = {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(s.loop).items()}
    shards = {"data_shards": s.data_shards} if s.data_shards > 1 else {}  # absent: runs of any size agree
    return {**loop, "max_tokens": s.max_tokens, "chat": s.chat,
            "valid_fraction": s.valid_fraction, "valid_max": s.valid_max, **shards}


def _split(n: int, s: TuneSettings) -> tuple[np.ndarray, np.ndarray]:
    """Held-out validation rows, fixed by the seed."""
    if n < 4:
        return np.arange(n), np.arange(n)  # too few to hold any out: validate on the training rows
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([s.loop.seed, 0xDA7A])))
    perm = rng.permutation(n)
    k = max(1, min(s.valid_max, int(round(n * s.valid_fraction))))
    return np.sort(perm[k:]), np.sort(perm[:k])


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    world = World.from_env()
    if args.model is None and args.data is None and not args.config:
        _demo(args)
    settings = _resolve(args, world.size)
    if args.model is None or args.data is None:
        raise InvalidInputError("give both MODEL and DATA (or neither, for the demo)")
    if world.size == 1:
        return _run(args, settings, world, None)
    if args.mask_from_data:
        raise InvalidInputError("--mask-from-data picks the coordinates on one process: run it alone once, then "
                                "tune under torchrun with --sidecar RUN/mask.gguf")
    team = Team.join(world, args.dist_timeout)
    try:
        return _run(args, settings, world, team)
    except BaseException as exc:  # so that the others name this worker's error, not just its silence
        team.tell_failure(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        team.close()


def _run(args, settings: TuneSettings, world: World, team: Team | None) -> int:
    """One worker of world.size (one process: world.size == 1, team None). Every
    worker loads the model and data; worker 0 alone writes the run folder."""
    lead = world.is_main

    def say(msg):
        if lead:
            print(f"edge-zo tune: {msg}", file=sys.stderr)

    model = Path(args.model)
    out = Path(args.output or Path("runs") / Path(args.data).stem)

    train_ds = load_jsonl(args.data)
    valid_ds = load_jsonl(args.valid) if args.valid else None
    sidecar_path = find_sidecar(model, args.sidecar)
    if sidecar_path is None and not args.mask_from_data:
        raise InvalidInputError(
            f"no sidecar beside {model}: make one with `edge-zo convert {model} -o DIR` and tune DIR/model.gguf, "
            "pass --sidecar FILE, or let tune pick coordinates from the training data with --mask-from-data")

    from ._common import runtime_options

    opts = runtime_options(args, batch_size=settings.loop.batch_size, max_tokens=settings.max_tokens)
    with Runtime(model, opts) as rt:
        tok = Tokenizer(rt.native, max_tokens=settings.max_tokens, chat=settings.chat)
        examples = tok.examples(train_ds)
        if valid_ds is None:
            tr, va = _split(len(examples), settings)
            valid_ex, examples = [examples[i] for i in va], [examples[i] for i in tr]
        else:
            valid_ex = tok.examples(valid_ds)

        if sidecar_path is not None:
            sidecar = SparseAdapter.load(sidecar_path)
            mask_note = f"sidecar {sidecar_path}"
        else:
            from ..cli import fisher_sidecar

            sidecar = fisher_sidecar(model, examples, density=args.density or 1e-3)
            sidecar_path = out / "mask.gguf"
            sidecar.save(sidecar_path)
            mask_note = f"Fisher mask from the training data ({sidecar.n_params} coordinates) -> {sidecar_path}"
        say(f"tuning {sidecar.n_params:,} coordinates in {len(sidecar.names)} matrices ({mask_note})"
            + (f" on {world.size} workers" if world.size > 1 else ""))
        if settings.loop.directions % world.size:
            say(f"note: --directions {settings.loop.directions} does not divide among {world.size} workers: "
                f"some wait for the others every step; --directions {world.size} or a multiple keeps all busy")
        if np.any(sidecar.values):
            rt.attach(sidecar, source=str(sidecar_path))
        deltas = sidecar.with_values(np.zeros(sidecar.n_params, np.float32),
                                     {Sparse.ROLE: "deltas", Sparse.BASE_MODEL_SHA256: rt.info.sha256()})
        rt.attach(deltas, source="deltas")
        live = deltas.values

        shard = _shard(len(examples), settings.data_shards, world.rank)

        def loss(idx):
            return rt.loss([examples[shard[i]] for i in idx]).mean

        has_choices = bool(valid_ex and valid_ex[0].choices)

        def evaluate():
            if not lead:  # worker 0 validates; the others meet it at the next step's all-gather
                return {}
            m = {"valid_loss": rt.loss(valid_ex).mean}
            if has_choices:
                m["valid_accuracy"] = rt.accuracy(valid_ex)
            return m

        loop = settings.loop
        identity = {
            "settings": _settings_json(settings), "model_sha256": rt.info.sha256(),
            "sidecar_sha256": file_sha256(sidecar_path), "data_sha256": file_sha256(args.data),
            "n_train": len(examples), "n_valid": len(valid_ex), "n_params": sidecar.n_params,
        }
        if team is not None:
            team.all_same("model, sidecar, data or settings", identity,
                          hint="launch every worker with the same files and flags")
        resume = args.resume or (world.restarts > 0 and (out / run_dir.CHECKPOINT).exists())
        # ε first: the lr probes run at it. The others get both with the start state. A resumed run
        # keeps what its searches chose (searching again costs forwards, and could choose differently).
        searches = {}
        if "auto" in (loop.eps, loop.lr) and lead:
            saved = _saved_run(out) if resume else None
            for name, search in (("eps", lambda lp: _search_eps(lp, live, len(shard), loss, say)),
                                 ("lr", lambda lp: _search_lr(lp, live, len(shard), loss))):
                if getattr(loop, name) != "auto":
                    continue
                if saved:
                    loop = dataclasses.replace(loop, **{name: float(saved["settings"][name])})
                    searches[name] = saved.get(f"{name}_search")
                    say(f"--{name} auto: resuming at the run's {name} {getattr(loop, name):g}")
                else:
                    loop, searches[name] = search(loop)
            settings = dataclasses.replace(settings, loop=loop)

        run_info = {
            **identity, "settings": _settings_json(settings), "model": str(model), "sidecar": str(sidecar_path),
            "data": str(args.data), "valid": str(args.valid) if args.valid else None,
            "eps_search": searches.get("eps"), "lr_search": searches.get("lr"),
            "edge_zo_version": _version(), "workers": world.size,
        }
        if world.restarts > 0:
            say(f"restart {world.restarts} by torchrun: " + (f"resuming from the checkpoint in {out}" if resume else
                f"no checkpoint in {out} yet, starting from step 0"))
        state, error = None, None
        if lead:
            try:
                state = _start(out, run_info, loop, resume)
            except EdgeZoError as exc:
                if team is None:
                    raise
                error = exc
        if team is not None:  # once per (re)start, so the other workers need neither the run folder nor its disk
            mine = None if not lead else {"error": str(error)} if error else {
                "eps": loop.eps, "lr": loop.lr, "step": state.step, "theta": state.theta, **state.opt.arrays()}
            got = team.broadcast(mine)
            if error is not None:
                raise error
            if "error" in got:
                raise EdgeZoError(f"worker 0 stopped the run: {got['error']}")
            if not lead:
                loop = dataclasses.replace(loop, eps=got["eps"], lr=got["lr"])
                state = LoopState.fresh(got["theta"], loop)
                state.step = got["step"]
                for k, a in state.opt.arrays().items():
                    a[:] = got[k]

        tokens_per_step = 2 * loop.directions * int(np.mean([len(e.tokens) for e in examples]) * min(loop.batch_size, len(shard)))

        def report(rec):
            if not lead:
                return
            rec = dict(rec)
            if "step_seconds" in rec:
                rec["tokens_per_s"] = tokens_per_step / rec["step_seconds"]
            rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
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
                    "note": "theta_T = edge_zo.spsa.replay(zeros, scalars, seed, optimizer, lr schedule of run.json)"})
                deltas.with_values(st.theta).save(out / run_dir.DELTAS)
                run_dir.save_checkpoint(out, st)

        bar = None
        if not args.quiet and lead:
            from tqdm import tqdm

            bar = tqdm(total=loop.steps, initial=state.step, unit="step", dynamic_ncols=True, file=sys.stderr)

        def progress(step, info):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{info['loss']:.4f}", g=f"{info['projected_grad']:+.3g}")

        gather = gather_local if team is None else (lambda local, stop: team.gather(local, stop, loop.directions))
        again = "rerun the same command with --resume" + (" (under torchrun, or alone)" if team else "")
        t0 = time.perf_counter()
        try:
            state = train(loop, state, n_examples=len(shard), live=live, loss=loss, evaluate=evaluate,
                          report=report, checkpoint=checkpoint, progress=progress,
                          rank=world.rank, workers=world.size, gather=gather)
        except Interrupted as exc:
            if bar is not None:
                bar.close()
            say(f"{exc}; checkpoint saved. Continue with: edge-zo tune {model} {args.data} -o {out} --resume"
                + (" (under the same torchrun command, or alone)" if team else ""))
            return 130
        except WorkerLostError as exc:  # the steps so far are complete on every survivor: keep them
            if lead:
                checkpoint(state, check=False)
                raise WorkerLostError(f"{exc}; worker 0 saved step {state.step} in {out}: {again}") from None
            raise WorkerLostError(f"{exc}; step {state.step + 1} did not finish and worker 0 keeps the checkpoint "
                                  f"in {out}: {again}") from None
        finally:
            if bar is not None:
                bar.close()
        if not lead:
            return 0
        plot = run_dir.plot_losses(out)

    rows = run_dir.read_metrics(out)
    valid = [r for r in rows if "valid_loss" in r]
    summary = f"valid loss {valid[0]['valid_loss']:.4f} -> {valid[-1]['valid_loss']:.4f}"
    if "valid_accuracy" in valid[-1]:
        summary += f", accuracy {valid[0]['valid_accuracy']:.3f} -> {valid[-1]['valid_accuracy']:.3f}"
    say(f"{summary} in {time.perf_counter() - t0:.0f} s. Deltas: {out / run_dir.DELTAS}"
        + (f", plot: {plot}" if plot else ""))
    warning = rise_warning(valid, loop.lr, loop.steps)
    if warning:
        say(warning)
    if team is not None:
        say(f"{world.size} workers, {loop.directions} directions per step: each worker sent "
            f"{distributed.step_sent_bytes(loop.directions, world.size)} bytes per step; worker 0 sent "
            f"{team.sent['steps']:,} bytes in steps and {team.sent['setup']:,} at start-up and checkpoints")
    adapters = f"--adapter {sidecar_path} " if np.any(sidecar.values) else ""
    say(f"try it: edge-zo generate {model} {adapters}--adapter {out / run_dir.DELTAS} -p \"...\"")
    return 0


def rise_warning(valid: list[dict], lr: float, steps: int) -> str | None:
    """A warning when the run ends with a higher validation loss than it started with: over a few
    hundred steps a rate that looked best early can diverge (docs/tune.md)."""
    if len(valid) < 2 or valid[-1]["valid_loss"] <= valid[0]["valid_loss"]:
        return None
    return (f"warning: the validation loss rose ({valid[0]['valid_loss']:.4f} -> {valid[-1]['valid_loss']:.4f}): "
            f"the learning rate {lr:g} is likely too large for {steps} steps; try --lr {lr / 3:.2g} "
            f"(see docs/tune.md)")


def _demo(args) -> None:
    """Fill in the embedded demo's model, data and settings (flags given win). Local
    workers under torchrun take turns, so only the first builds the cache."""
    import fcntl

    from .. import corpora, demo

    lock = corpora.cache_root().parent / "demo.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        args.model, args.data, args.valid, args.sidecar = demo.prepare(args.sidecar)
    for key, value in demo.DEMO_SETTINGS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if World.from_env().is_main:
        print(f"edge-zo tune: demo: {args.model} on {args.data}", file=sys.stderr)


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
    path = out / run_dir.RUN_JSON
    if not path.is_file():
        raise InvalidInputError(f"{out}: no run to resume (no {run_dir.RUN_JSON})")
    saved = json.loads(path.read_text())
    diffs = [k for k in ("settings", "model_sha256", "sidecar_sha256", "data_sha256")
             if saved.get(k) != run_info.get(k) and not (k == "settings" and _same_but_steps(saved[k], run_info[k]))]
    if diffs:
        raise InvalidInputError(f"{out}: cannot resume: {', '.join(diffs)} differ from the saved run; "
                                "resume with the same model, data and settings")
    state = run_dir.load_checkpoint(out, loop.optimizer, loop.beta1, loop.beta2)
    run_dir.truncate_metrics(out, state.step)
    run_dir.write_json(path, run_info)
    return state


def _same_but_steps(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "steps"} == {k: v for k, v in b.items() if k != "steps"}


def _search_lr(loop: LoopConfig, live: np.ndarray, n_examples: int, loss) -> tuple[LoopConfig, dict]:
    """Run a short SPSA run per learning rate from θ=0 and keep the one whose
    loss on a fixed probe batch ends lowest (diverged runs lose)."""
    from ..trainer import batch_indices

    probe_steps = min(20, loop.steps)
    probe = batch_indices(loop.seed, 10**6, n_examples, max(loop.batch_size, 16))
    results = {}
    for lr in LR_GRID:
        trial = dataclasses.replace(loop, lr=lr, steps=probe_steps, eval_every=10**9, save_every=10**9)
        state = LoopState.fresh(np.zeros(len(live), np.float32), trial)
        try:
            train(trial, state, n_examples=n_examples, live=live, loss=loss, evaluate=lambda: {},
                  report=lambda r: None, checkpoint=lambda s: None)
            results[lr] = loss(probe)
        except FloatingPointError:
            results[lr] = float("inf")
        print(f"edge-zo tune: lr search: lr {lr:g} -> probe loss {results[lr]:.4f}", file=sys.stderr)
    live[:] = 0.0
    best = min(results, key=lambda k: results[k])
    if not np.isfinite(results[best]):
        raise EdgeZoError("--lr auto: every learning rate of the search diverged; raise --eps or pass a smaller --lr")
    chosen = LR_GRID[max(0, LR_GRID.index(best) - LR_BACK_OFF)]
    print(f"edge-zo tune: lr search: best probe at lr {best:g}; tuning at lr {chosen:g}, a grid step below it, "
          "since rates at the edge drift over longer runs", file=sys.stderr)
    return dataclasses.replace(loop, lr=chosen), {
        "probe_steps": probe_steps, "losses": {str(k): v for k, v in results.items()}, "best": best, "chosen": chosen}


def _saved_run(out: Path) -> dict:
    """run.json of the run being resumed, read before any search (so a missing run is told at once).
    Its settings always hold numbers: the searches' picks are saved, never 'auto'."""
    path = out / run_dir.RUN_JSON
    if not path.is_file():
        raise InvalidInputError(f"{out}: no run to resume (no {run_dir.RUN_JSON})")
    return json.loads(path.read_text())


def _search_eps(loop: LoopConfig, live: np.ndarray, n_examples: int, loss, say) -> tuple[LoopConfig, dict]:
    """`--eps auto` (edge_zo.eps_probe) on the run's first batches, from θ = 0."""
    from ..trainer import batch_indices

    batches = [batch_indices(loop.seed, k, n_examples, loop.batch_size) for k in range(eps_probe.DIRECTIONS)]
    choice = eps_probe.choose_eps_live(live, lambda k: loss(batches[k]), loop.seed)
    say(f"--eps auto: ε {choice.eps:g}, between {choice.pair[0]:g} and {choice.pair[1]:g} whose loss differences "
        f"agree at {choice.agreement:.2f} ({choice.forwards} forwards)")
    note = eps_probe.warning(choice)
    if note:
        say("warning: " + note)
    return dataclasses.replace(loop, eps=choice.eps), choice.as_json()


def _version() -> str:
    from .. import __version__

    return __version__
