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

from .. import run_dir
from ..adapter import SparseAdapter
from ..constants import Sparse
from ..dataset import Tokenizer, load_jsonl
from ..errors import InvalidInputError
from ..model_info import file_sha256
from ..runtime import Runtime, RuntimeOptions
from ..spsa import Optimizer, Schedule
from ..trainer import Interrupted, LoopConfig, LoopState, train
from ._common import add_runtime_options

LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """Everything that determines the tuned deltas (saved in run.json)."""

    loop: LoopConfig
    max_tokens: int = 256
    chat: bool = False
    valid_fraction: float = 0.1
    valid_max: int = 64


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
    g.add_argument("--lr", default=None, help="learning rate, or 'auto' to search a grid on a short run (default 1e-4)")
    g.add_argument("--eps", type=float, default=None, help="perturbation size ε (default 1e-2: see docs/fidelity.md)")
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
    add_runtime_options(p, batch_size=False)
    return p


def _resolve(args) -> TuneSettings:
    """Command line over YAML over defaults."""
    cfg = {}
    if args.config:
        import yaml

        try:
            cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInputError(f"{args.config}: cannot read the config ({exc})") from exc
        known = {f.name for f in dataclasses.fields(LoopConfig)} | {"max_tokens", "chat", "batch_size"}
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
    lr = pick("lr", d.lr)
    try:
        lr = lr if lr == "auto" else float(lr)
    except ValueError as exc:
        raise InvalidInputError(f"--lr must be a number or 'auto', got {lr!r}") from exc
    loop = LoopConfig(
        steps=int(pick("steps", d.steps)), batch_size=int(pick("batch_size", d.batch_size)),
        eps=float(pick("eps", d.eps)), lr=lr, optimizer=Optimizer(pick("optimizer", d.optimizer.value)),
        schedule=Schedule(pick("schedule", d.schedule.value)), warmup=int(pick("warmup", d.warmup)),
        directions=int(pick("directions", d.directions)), seed=int(pick("seed", d.seed)),
        eval_every=int(pick("eval_every", d.eval_every)), save_every=int(pick("save_every", d.save_every)),
    )
    for name in ("steps", "batch_size", "directions", "eval_every", "save_every"):
        if getattr(loop, name) < 1:
            raise InvalidInputError(f"--{name.replace('_', '-')} must be at least 1")
    if loop.eps <= 0 or (loop.lr != "auto" and loop.lr <= 0):
        raise InvalidInputError("--eps and --lr must be positive")
    return TuneSettings(loop, max_tokens=int(pick("max_tokens", 256)), chat=bool(pick("chat", False)))


def find_sidecar(model: Path, explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    for cand in (model.parent / "sidecar.gguf", model.with_suffix(".sidecar.gguf")):
        if cand.is_file():
            return cand
    return None


def _settings_json(s: TuneSettings) -> dict:
    loop = {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(s.loop).items()}
    return {**loop, "max_tokens": s.max_tokens, "chat": s.chat,
            "valid_fraction": s.valid_fraction, "valid_max": s.valid_max}


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
    if args.model is None and args.data is None and not args.config:
        from .. import demo

        args.model, args.data, args.valid, args.sidecar = demo.prepare(args.sidecar)
        for key, value in demo.DEMO_SETTINGS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        print(f"edge-zo tune: demo: {args.model} on {args.data}", file=sys.stderr)
    settings = _resolve(args)
    if args.model is None or args.data is None:
        raise InvalidInputError("give both MODEL and DATA (or neither, for the demo)")
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
            from ..mask_from_data import fisher_sidecar

            sidecar = fisher_sidecar(model, examples, density=args.density or 1e-3)
            sidecar_path = out / "mask.gguf"
            sidecar.save(sidecar_path)
            mask_note = f"Fisher mask from the training data ({sidecar.n_params} coordinates) -> {sidecar_path}"
        print(f"edge-zo tune: tuning {sidecar.n_params:,} coordinates in {len(sidecar.names)} matrices "
              f"({mask_note})", file=sys.stderr)
        if np.any(sidecar.values):
            rt.attach(sidecar, source=str(sidecar_path))
        deltas = sidecar.with_values(np.zeros(sidecar.n_params, np.float32),
                                     {Sparse.ROLE: "deltas", Sparse.BASE_MODEL_SHA256: rt.info.sha256()})
        rt.attach(deltas, source="deltas")
        live = deltas.values

        def loss(idx):
            return rt.loss([examples[i] for i in idx]).mean

        has_choices = bool(valid_ex and valid_ex[0].choices)

        def evaluate():
            m = {"valid_loss": rt.loss(valid_ex).mean}
            if has_choices:
                m["valid_accuracy"] = rt.accuracy(valid_ex)
            return m

        loop = settings.loop
        lr_search = None
        if loop.lr == "auto":
            loop, lr_search = _search_lr(loop, live, len(examples), loss)
            settings = dataclasses.replace(settings, loop=loop)

        run_info = {
            "settings": _settings_json(settings), "model": str(model), "model_sha256": rt.info.sha256(),
            "sidecar": str(sidecar_path), "sidecar_sha256": file_sha256(sidecar_path),
            "data": str(args.data), "data_sha256": file_sha256(args.data),
            "valid": str(args.valid) if args.valid else None, "n_train": len(examples), "n_valid": len(valid_ex),
            "n_params": sidecar.n_params, "lr_search": lr_search, "edge_zo_version": _version(),
        }
        if args.resume:
            state = _resume(out, run_info, loop)
        else:
            if (out / run_dir.CHECKPOINT).exists():
                raise InvalidInputError(f"{out} already holds a run: pass --resume to continue it, or choose another -o")
            out.mkdir(parents=True, exist_ok=True)
            (out / run_dir.METRICS).unlink(missing_ok=True)
            run_dir.write_json(out / run_dir.RUN_JSON, run_info)
            state = LoopState.fresh(np.zeros(sidecar.n_params, np.float32), loop)

        tokens_per_step = 2 * loop.directions * int(np.mean([len(e.tokens) for e in examples]) * min(loop.batch_size, len(examples)))

        def report(rec):
            rec = dict(rec)
            if "step_seconds" in rec:
                rec["tokens_per_s"] = tokens_per_step / rec["step_seconds"]
            rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            run_dir.append_metrics(out, rec)
            if "valid_loss" in rec:
                acc = f"  valid acc {rec['valid_accuracy']:.3f}" if "valid_accuracy" in rec else ""
                line = f"step {rec['step']:>5}  valid loss {rec['valid_loss']:.4f}{acc}"
                (bar.write(line) if bar is not None else print(line, file=sys.stderr))

        def checkpoint(st: LoopState):
            run_dir.save_checkpoint(out, st)
            run_dir.write_json(out / run_dir.TRAJECTORY, {
                "seed": loop.seed, "optimizer": loop.optimizer.value, "scalars": st.scalars,
                "note": "theta_T = edge_zo.spsa.replay(zeros, scalars, seed, optimizer, lr schedule of run.json)"})
            deltas.with_values(st.theta).save(out / run_dir.DELTAS)

        bar = None
        if not args.quiet:
            from tqdm import tqdm

            bar = tqdm(total=loop.steps, initial=state.step, unit="step", dynamic_ncols=True, file=sys.stderr)

        def progress(step, info):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{info['loss']:.4f}", g=f"{info['projected_grad']:+.3g}")

        t0 = time.perf_counter()
        try:
            state = train(loop, state, n_examples=len(examples), live=live, loss=loss, evaluate=evaluate,
                          report=report, checkpoint=checkpoint, progress=progress)
        except Interrupted as exc:
            if bar is not None:
                bar.close()
            print(f"edge-zo tune: {exc}; checkpoint saved. Continue with: edge-zo tune {model} {args.data} "
                  f"-o {out} --resume", file=sys.stderr)
            return 130
        finally:
            if bar is not None:
                bar.close()
        plot = run_dir.plot_losses(out)

    rows = run_dir.read_metrics(out)
    valid = [r for r in rows if "valid_loss" in r]
    summary = f"valid loss {valid[0]['valid_loss']:.4f} -> {valid[-1]['valid_loss']:.4f}"
    if "valid_accuracy" in valid[-1]:
        summary += f", accuracy {valid[0]['valid_accuracy']:.3f} -> {valid[-1]['valid_accuracy']:.3f}"
    print(f"edge-zo tune: {summary} in {time.perf_counter() - t0:.0f} s. Deltas: {out / run_dir.DELTAS}"
          + (f", plot: {plot}" if plot else ""), file=sys.stderr)
    adapters = f"--adapter {sidecar_path} " if np.any(sidecar.values) else ""
    print(f"edge-zo tune: try it: edge-zo generate {model} {adapters}--adapter {out / run_dir.DELTAS} -p \"...\"",
          file=sys.stderr)
    return 0


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
    return dataclasses.replace(loop, lr=best), {"probe_steps": probe_steps, "losses": {str(k): v for k, v in results.items()}, "chosen": best}


def _version() -> str:
    from .. import __version__

    return __version__
