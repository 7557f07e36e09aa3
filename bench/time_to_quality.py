"""Test accuracy against wall-clock time (issue 16, part 1): same machine, same data, same tokens,
each arm in its own process under the same time budget, searches and loading included.

  zero-shot     `edge-zo eval MODEL TEST --json`: the installed model (model.gguf + its sidecar)
  icl           in-context demonstrations before every row (torch; bench.torch_arms, 2 per choice)
  edge-zo       `edge-zo tune MODEL TRAIN --valid VALID -o RUN --time BUDGET --threads T --quiet --seed S`,
                every other setting at its default; tested with `edge-zo eval ... --adapter RUN/deltas.gguf`
  edge-zo-nll   the same with `--objective nll` (the objective before `choices`)
  mezo-sparse   MeZO's ZO-SGD on the sidecar's own coordinates (torch float32; edge-zo's directions and
                batches, ε 1e-3, the grid `edge-zo tune --optimizer sgd --lr auto` searches)
  mezo-full     MeZO's ZO-SGD on every parameter (torch float32, ε 1e-3; the best state it keeps is a
                second copy of the weights)
  lora-adam     first-order LoRA (rank 8, alpha 16, q k v o gate up down) with Adam (torch float32)

The torch arms load MODEL as edge-zo sees it: model.gguf dequantized to float32 plus the sidecar's
values at its coordinates (bench.torch_arms.load_with_sidecar), tokenize with the product's
Tokenizer at tune's --max-tokens, draw tune's batches, and minimize tune's objective (`choices` on
rows with choices, else `nll`; `--objective nll` selectable). Each picks its rate by 20-step probes
per grid value from the start (lowest objective on a fixed 16-row probe batch; bench.torch_arms
BUDGET_GRIDS), then trains until the budget is spent, validating at step 0, every 25 steps (tune's
--eval-every) and at the end, and is tested on its state of lowest validation loss, as tune's
deltas.gguf is. Time runs from the start of each arm's work (after the interpreter's imports; model
and data loading, searches and validations count). Peak memory: each process's maximum resident set
from wait4(2) (a child's figure is at least its launcher's, which each line records).

    python -m bench.time_to_quality run --model-dir DIR --out bench/out/ttq \\
        --tasks spam author era --budgets 5m 10m --seeds 0 1 2 --threads 2
    python -m bench.time_to_quality report bench/out/ttq/results.jsonl --out docs

DIR holds model.gguf and sidecar.gguf (`edge-zo convert MODEL -o DIR`). `run` writes one JSON line
per (task, arm, seed, budget) to OUT/results.jsonl and skips cells already there (zero-shot has one
line per task, icl one per seed: neither trains). An arm with other flags: `--define
NAME=KIND FLAG...`, e.g. `--define "lora-adam-nll=lora-adam --objective nll"`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("zero-shot", "icl", "edge-zo", "mezo-sparse", "mezo-full", "lora-adam")
TORCH_TRAINED = ("mezo-sparse", "mezo-full", "lora-adam")
ARMS = {   # name: (kind, extra flags of its command)
    "zero-shot": ("zero-shot", ()),
    "icl": ("icl", ()),
    "edge-zo": ("edge-zo", ()),
    "edge-zo-nll": ("edge-zo", ("--objective", "nll")),
    "mezo-sparse": ("mezo-sparse", ()),
    "mezo-full": ("mezo-full", ()),
    "lora-adam": ("lora-adam", ()),
}
DEFAULT_ARMS = ("zero-shot", "icl", "edge-zo", "mezo-sparse", "mezo-full", "lora-adam")
TASK_SEED = 2026                   # as bench.compare_methods: no report row is in a test's data (seed 0)
TASK_SIZES = (480, 60, 200)        # train, valid, test rows


def log(msg: str) -> None:
    print(f"time_to_quality {time.strftime('%H:%M:%S')}: {msg}", file=sys.stderr, flush=True)


def self_peak_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- run: the launcher (it imports little: its own peak is a floor under every child's figure) ----

@dataclass(frozen=True)
class Arm:
    name: str
    kind: str
    flags: tuple[str, ...]


class CellError(RuntimeError):
    pass


def measured(cmd: list[str], log_path: Path, timeout: float) -> tuple[str, float, float]:
    """Run `cmd` from the repository root, its standard error into `log_path`: (its standard output,
    wall seconds, its peak resident MiB from wait4's rusage)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out_path = log_path.with_suffix(".out")
    t = time.perf_counter()
    with open(out_path, "w") as out, open(log_path, "w") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, text=True)
        timer = threading.Timer(timeout, p.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if p.returncode:
        why = "killed at the time limit" if wall >= timeout else f"exit status {p.returncode}"
        said = [s for s in log_path.read_text().splitlines() if s.strip()]
        raise CellError(f"{said[-1][:500] if said else why} ({why}; log {log_path}; command {shlex.join(cmd)})")
    return out_path.read_text(), wall, usage.ru_maxrss / 1024


class Runner:
    """What every cell shares: the model, the task folders, the settings that make cells comparable."""

    def __init__(self, args, arms: dict[str, Arm]):
        self.args, self.arms = args, arms
        self.out: Path = args.out
        self.model = args.model_dir / "model.gguf"
        self.sidecar = args.model_dir / "sidecar.gguf"
        self.results = self.out / "results.jsonl"
        self.lines = [json.loads(s) for s in self.results.read_text().splitlines() if s.strip()] \
            if self.results.is_file() else []

    def task_dir(self, task: str) -> Path:
        return self.out / "tasks" / task

    def done(self, task: str, arm: str, seed: int, budget: float | None) -> bool:
        return any((r["task"], r["arm"], r["seed"], r["budget_s"]) == (task, arm, seed, budget) and "error" not in r
                   for r in self.lines)

    def add(self, line: dict) -> None:
        self.lines.append(line)
        with open(self.results, "a") as f:
            f.write(json.dumps(line) + "\n")
        short = {k: v for k, v in line.items() if k not in ("curve", "lr_search")}
        log(json.dumps(short))

    def edge_zo(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "edge_zo", *args]

    def logs(self, task: str, arm: str, seed: int, budget: float | None) -> Path:
        return self.out / "logs" / f"{task}-{arm}-s{seed}-b{budget or 0:g}"

    def timeout(self, budget: float | None) -> float:
        return 3 * (budget or 0) + self.args.cell_timeout

    # ---- the cells ----

    def zero_shot(self, task: str, arm: Arm, seed: int, budget: None) -> dict:
        folder, logs = self.task_dir(task), self.logs(task, arm.name, seed, budget)
        common = ["--json", "--threads", str(self.args.threads), "--max-tokens", str(self.args.max_tokens), *arm.flags]
        res, wall, peak = {}, 0.0, 0.0
        for split in ("valid", "test"):
            stdout, w, p = measured(self.edge_zo("eval", str(self.model), str(folder / f"{split}.jsonl"), *common),
                                    logs.with_name(logs.name + f".eval-{split}.log"), self.timeout(None))
            r = json.loads(stdout)
            res[f"{split}_loss"] = res[f"{split}_nll"] = r["loss"]
            if "accuracy" in r:
                res[f"{split}_accuracy"] = r["accuracy"]
            wall, peak = wall + w, max(peak, p)
        point = {"step": 0, "elapsed_s": 0.0, **{k: v for k, v in res.items() if k.startswith("valid_")}}
        return {**{k: v for k, v in res.items() if k.startswith("test_")}, "curve": [point], "wall_s": round(wall, 1),
                "peak_rss_mib": round(peak, 1)}

    def edge_zo_tune(self, task: str, arm: Arm, seed: int, budget: float) -> dict:
        folder, logs = self.task_dir(task), self.logs(task, arm.name, seed, budget)
        run = self.out / "runs" / task / arm.name / f"s{seed}-b{budget:g}"
        shutil.rmtree(run, ignore_errors=True)   # a cell that did not finish starts over
        run.parent.mkdir(parents=True, exist_ok=True)
        tune = self.edge_zo("tune", str(self.model), str(folder / "train.jsonl"), "--valid", str(folder / "valid.jsonl"),
                            "-o", str(run), "--time", f"{budget:g}s", "--threads", str(self.args.threads), "--quiet",
                            "--seed", str(seed), *arm.flags)
        _, wall, peak = measured(tune, logs.with_name(logs.name + ".tune.log"), self.timeout(budget))
        metrics = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]
        valid = [m for m in metrics if "valid_loss" in m]
        if not valid or "elapsed_s" not in valid[0]:
            raise CellError(f"{run}/metrics.jsonl: no validation rows with elapsed_s (edge-zo tune writes the "
                            "seconds since it started on each row)")
        keys = ("step", "elapsed_s", "valid_loss", "valid_accuracy", "valid_nll")
        curve = [{k: m[k] for k in keys if k in m} for m in valid]
        info = json.loads((run / "run.json").read_text())
        stdout, ewall, epeak = measured(
            self.edge_zo("eval", str(self.model), str(folder / "test.jsonl"), "--adapter", str(run / "deltas.gguf"),
                         "--json", "--threads", str(self.args.threads), "--max-tokens", str(self.args.max_tokens)),
            logs.with_name(logs.name + ".eval.log"), self.timeout(None))
        r = json.loads(stdout)
        res = {"test_loss": r["loss"], "curve": curve, "steps": max(m.get("step", 0) for m in metrics),
               "best_step": min(curve, key=lambda v: v["valid_loss"])["step"], "lr": info.get("settings", {}).get("lr"),
               "eps": info.get("settings", {}).get("eps"), "lr_search": info.get("lr_search"),
               "n_params": info.get("n_params"), "wall_s": round(wall, 1), "eval_wall_s": round(ewall, 1),
               "peak_rss_mib": round(peak, 1), "eval_peak_rss_mib": round(epeak, 1)}
        if "accuracy" in r:
            res["test_accuracy"] = r["accuracy"]
        return res

    def torch_arm(self, task: str, arm: Arm, seed: int, budget: float | None) -> dict:
        logs = self.logs(task, arm.name, seed, budget)
        result = logs.with_name(logs.name + ".result.json")
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.time_to_quality", "arm", arm.kind, "--model-dir", str(self.args.model_dir),
               "--task", str(self.task_dir(task)), "--seed", str(seed), "--threads", str(self.args.threads),
               "--max-tokens", str(self.args.max_tokens), "--device", self.args.device, "--out", str(result),
               *(["--budget", f"{budget:g}"] if budget is not None else []), *arm.flags]
        _, wall, peak = measured(cmd, logs.with_name(logs.name + ".log"), self.timeout(budget))
        res = json.loads(result.read_text())
        return {**res, "wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1)}

    def cell(self, task: str, arm: Arm, seed: int, budget: float | None) -> None:
        fn = {"zero-shot": self.zero_shot, "edge-zo": self.edge_zo_tune}.get(arm.kind, self.torch_arm)
        line = {"task": task, "arm": arm.name, "kind": arm.kind, "flags": list(arm.flags), "seed": seed,
                "budget_s": budget, "threads": self.args.threads, "model": self.args.model_dir.name,
                "host": platform.node()}
        log(f"{task} {arm.name} seed {seed} budget {budget}")
        try:
            line.update(fn(task, arm, seed, budget))
        except (CellError, OSError, ValueError, KeyError) as exc:
            line["error"] = str(exc)
        line["launcher_peak_rss_mib"] = round(self_peak_mib(), 1)
        self.add(line)


def prepare_tasks(runner: Runner, tasks: list[str], seed: int, sizes: tuple[int, int, int]) -> None:
    """OUT/tasks/TASK/{train,valid,test}.jsonl, built once with edge_zo.corpora.write_task in a
    child process (the corpora would otherwise raise the launcher's own peak memory)."""
    for task in tasks:
        folder = runner.task_dir(task)
        if all((folder / f"{s}.jsonl").is_file() for s in ("train", "valid", "test")):
            continue
        n_train, n_valid, n_test = sizes
        code = ("import sys; from edge_zo.corpora import write_task; "
                f"write_task({task!r}, sys.argv[1], seed={seed}, n_train={n_train}, n_valid={n_valid}, n_test={n_test})")
        measured([sys.executable, "-c", code, str(folder)], runner.out / "logs" / f"task-{task}.log", 1800)


def check_config(runner: Runner, args) -> None:
    """OUT/config.json: what every cell of OUT must share; a run with other values needs another --out."""
    config = {"model_dir": str(args.model_dir.resolve()), "model_bytes": runner.model.stat().st_size,
              "sidecar_bytes": runner.sidecar.stat().st_size, "task_seed": args.task_seed,
              "task_sizes": list(args.task_sizes), "threads": args.threads, "max_tokens": args.max_tokens,
              "device": args.device}
    path = runner.out / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{path} was written with other settings {diff} (old, new): its results would not "
                             "compare with these; pass another --out")
    else:
        path.write_text(json.dumps(config, indent=1) + "\n")


def parse_arms(names: list[str], defines: list[str]) -> dict[str, Arm]:
    known = {name: Arm(name, kind, flags) for name, (kind, flags) in ARMS.items()}
    for d in defines:
        name, _, spec = d.partition("=")
        kind, *flags = shlex.split(spec)
        if not name or kind not in KINDS:
            raise SystemExit(f"--define {d!r}: expected NAME=KIND FLAG..., KIND one of {', '.join(KINDS)}")
        known[name] = Arm(name, kind, tuple(flags))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}: known {sorted(known)}; define one with --define NAME=KIND FLAG...")
    return {n: known[n] for n in names}


def run(args) -> None:
    from edge_zo.tune_settings import parse_duration

    budgets = [parse_duration(b) for b in args.budgets]
    if not (args.model_dir / "model.gguf").is_file() or not (args.model_dir / "sidecar.gguf").is_file():
        raise SystemExit(f"{args.model_dir}: expected model.gguf and sidecar.gguf (made by `edge-zo convert MODEL -o DIR`)")
    arms = parse_arms(args.arms, args.define)
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, arms)
    check_config(runner, args)
    for line in runner.lines:   # the same name with other flags would mix two arms in one row
        arm = arms.get(line["arm"])
        if arm is not None and (line["kind"], tuple(line["flags"])) != (arm.kind, arm.flags):
            raise SystemExit(f"{runner.results}: arm {arm.name} ran as {line['kind']} {line['flags']}, now "
                             f"{arm.kind} {list(arm.flags)}: give the new one another name")
    prepare_tasks(runner, args.tasks, args.task_seed, tuple(args.task_sizes))
    cells = []
    for task in args.tasks:   # the untrained arms first: they are each task's floor
        for arm in arms.values():
            if arm.kind == "zero-shot":
                cells.append((task, arm, -1, None))
            elif arm.kind == "icl":
                cells += [(task, arm, seed, None) for seed in args.seeds]
    cells += [(task, arm, seed, budget) for budget in budgets for task in args.tasks for seed in args.seeds
              for arm in arms.values() if arm.kind not in ("zero-shot", "icl")]
    todo = [c for c in cells if not runner.done(c[0], c[1].name, c[2], c[3])]
    log(f"{len(todo)} of {len(cells)} cells to run")
    for c in todo:
        runner.cell(*c)
    failed = [r for r in runner.lines if "error" in r and not runner.done(r["task"], r["arm"], r["seed"], r["budget_s"])]
    log(f"done; {len(failed)} failed cells (errors in {runner.results}; the next run retries them)")


# ---- arm: one torch arm in its own process ----

def arm(args) -> None:
    import torch
    import transformers.modeling_utils  # noqa: F401  imported before the clock starts, as tune's modules are
    from transformers import AutoModelForCausalLM  # noqa: F401  (its first use costs seconds of imports)

    from edge_zo import objective as objectives
    from edge_zo.commands._common import find_sidecar
    from edge_zo.lr_search import PROBE_STEPS
    from edge_zo.tune_settings import TuneSettings

    from . import torch_arms as ta
    from ._common import peak_rss_mib

    t0 = time.perf_counter()
    defaults = TuneSettings()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False   # float32 means float32: ε-sized differences matter
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    clock = lambda: time.perf_counter() - t0   # noqa: E731
    model_path = args.model_dir / "model.gguf"
    task = ta.Task(str(model_path), args.task, args.max_tokens)
    model, coords, sidecar = ta.load_with_sidecar(str(model_path), find_sidecar(model_path, None), device)
    train, valid, test = task.ex["train"], task.ex["valid"], task.ex["test"]
    objective = objectives.resolve(args.objective, train)
    ta.log(f"{args.kind}: model and task loaded in {clock():.1f} s; objective {objective.value}")
    out = {"objective": objective.value}
    if args.kind == "icl":
        prefix = task.icl_prefix(args.seed)
        v = ta.scored(model, ta.prefixed_examples(task, prefix, valid), device, objective, "valid")
        out["curve"] = [{"step": 0, "elapsed_s": round(clock(), 3), **v}]
        test = ta.prefixed_examples(task, prefix, test)
        out["prefix_tokens"] = len(prefix)
    else:
        if args.budget is None:
            raise SystemExit(f"{args.kind} trains: give --budget SECONDS")
        if args.kind == "mezo-sparse":
            if coords is None:
                raise SystemExit(f"mezo-sparse needs the sidecar beside {model_path}")
            method = ta.MezoSparse(model, coords, device, objective, args.seed, args.eps or ta.MEZO_EPS)
        elif args.kind == "mezo-full":
            method = ta.MezoFull(model, device, objective, args.seed, args.eps or ta.MEZO_EPS)
        else:
            method = ta.LoraAdam(model, device, objective, args.seed, rank=args.rank or ta.LORA_RANK,
                                 alpha=args.alpha or ta.LORA_ALPHA)
        grid = tuple(args.lr) if args.lr else ta.budget_grid(args.kind)
        out.update(ta.train_until(method, train, valid, device, objective, seed=args.seed,
                                  batch=args.batch_size or defaults.batch_size, grid=grid,
                                  probe_steps=args.probe_steps or PROBE_STEPS,
                                  eval_every=args.eval_every or defaults.eval_every,
                                  deadline=t0 + args.budget, clock=clock))
        out.update(n_params=method.n_params, grid=list(grid), eps=getattr(method, "eps", None))
    out["train_s"] = round(clock(), 1)
    res = ta.scored(model, test, device, objective, "test", nll=True)
    out.update(test_loss=res["test_nll"], **({"test_accuracy": res["test_accuracy"]} if "test_accuracy" in res else {}))
    out["self_peak_rss_mib"] = round(peak_rss_mib(), 1)
    args.out.write_text(json.dumps(out) + "\n")


# ---- report ----

ARM_ORDER = ("zero-shot", "icl", "edge-zo", "edge-zo-nll", "mezo-sparse", "mezo-full", "lora-adam")


def kept_curve(curve: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(elapsed seconds, `key` of the state an arm would hand back if stopped then: its lowest
    validation loss so far), one point per validation."""
    xs, ys, best = [], [], float("inf")
    kept = None
    for v in sorted(curve, key=lambda v: v["elapsed_s"]):
        if kept is None or v["valid_loss"] < best:
            best, kept = v["valid_loss"], v.get(key)
        xs.append(v["elapsed_s"])
        ys.append(kept)
    return xs, ys


def duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g} s"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(args) -> None:
    lines = [json.loads(s) for p in args.results for s in Path(p).read_text().splitlines() if s.strip()]
    failed = [r for r in lines if "error" in r]
    ok = [r for r in lines if "error" not in r]
    failed = [r for r in failed if not any((o["task"], o["arm"], o["seed"], o["budget_s"]) ==
                                           (r["task"], r["arm"], r["seed"], r["budget_s"]) for o in ok)]
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = list(dict.fromkeys(r["task"] for r in ok))
    md = ["# Time to quality", "",
          f"Made by `python -m bench.time_to_quality report {' '.join(str(p) for p in args.results)} --out {args.out}` "
          "from the cells of `python -m bench.time_to_quality run` (see its --help for what each arm is). "
          "Mean ± std over seeds (n); zero-shot and icl do not train, so one figure serves every budget. "
          "Peak memory: the largest resident set of the arm's processes on that task, MiB.", ""]
    hosts = sorted({(r["host"], r["threads"], r["model"]) for r in ok})
    md += [f"Host {h}, {t} threads, model folder `{m}`." for h, t, m in hosts] + [""]
    for task in tasks:
        rows = [r for r in ok if r["task"] == task]
        metric = "accuracy" if any("test_accuracy" in r for r in rows) else "loss"
        arms = [a for a in ARM_ORDER if any(r["arm"] == a for r in rows)]
        arms += sorted({r["arm"] for r in rows} - set(arms))
        budgets = sorted({r["budget_s"] for r in rows if r["budget_s"] is not None})
        tables = [(f"test_{metric}", f"test {metric}")]
        if metric == "accuracy":
            tables.append(("test_loss", "test loss (mean NLL per token of the correct answers)"))
        for key, title in tables:
            md += [f"## {task}: {title}", "",
                   "| arm | " + " | ".join(duration(b) for b in budgets) + " | steps at the largest budget | peak MiB |",
                   "| --- |" + " --- |" * (len(budgets) + 2)]
            for a in arms:
                cells = []
                for b in budgets:
                    vals = [r[key] for r in rows if r["arm"] == a and r["budget_s"] in (b, None) and key in r]
                    cells.append(f"{mean_std(vals)[0]:.3f} ± {mean_std(vals)[1]:.3f} ({len(vals)})" if vals else "")
                steps = [r["steps"] for r in rows if r["arm"] == a and r["budget_s"] == (budgets[-1] if budgets else None)
                         and r.get("steps") is not None]
                peak = max(r["peak_rss_mib"] for r in rows if r["arm"] == a)
                md.append(f"| {a} | " + " | ".join(cells) + f" | {statistics.median(steps) if steps else ''} | {peak:.0f} |")
            md.append("")
        png = args.out / f"time-to-quality-{task}.png"
        plot(rows, arms, budgets, metric, task, png)
        md += [f"![{task}]({png.name})", ""]
    if failed:
        md += ["## Cells that failed", ""]
        md += [f"- {r['task']} {r['arm']} seed {r['seed']} budget {r['budget_s']}: {r['error'].splitlines()[0][:300]}"
               for r in failed] + [""]
    (args.out / "time-to-quality.md").write_text("\n".join(md))
    print("\n".join(md))


def plot(rows: list[dict], arms: list[str], budgets: list[float], metric: str, task: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    key = f"valid_{metric}"
    t_max = max([v["elapsed_s"] for r in rows for v in r["curve"]] + budgets + [1.0])
    grid = np.linspace(0, t_max, 400)
    for i, a in enumerate(arms):
        mine = [r for r in rows if r["arm"] == a]
        if all(r["budget_s"] is None for r in mine):   # untrained: flat lines
            valid = [r["curve"][0][key] for r in mine if key in r["curve"][0]]
            test = [r[f"test_{metric}"] for r in mine if f"test_{metric}" in r]
            for ax, vals in ((left, valid), (right, test)):
                if vals:
                    ax.axhline(statistics.fmean(vals), color=colors[a], ls="--", lw=1.2, label=a)
            continue
        longest = max(r["budget_s"] for r in mine)
        ys = []
        for r in (r for r in mine if r["budget_s"] == longest):
            xs, kept = kept_curve(r["curve"], key)
            at = np.searchsorted(np.asarray(xs), grid, side="right") - 1    # the last validation at or before t
            ys.append(np.where(at >= 0, np.asarray([np.nan if k is None else k for k in kept], float)[np.maximum(at, 0)],
                               np.nan))
        ys = np.asarray(ys)
        n = np.sum(~np.isnan(ys), axis=0)
        some = n > 0
        mean = np.where(some, np.nansum(ys, axis=0) / np.maximum(n, 1), np.nan)
        std = np.sqrt(np.where(some, np.nansum((ys - mean) ** 2, axis=0) / np.maximum(n, 1), np.nan))
        left.plot(grid, mean, color=colors[a], label=f"{a} ({len(ys)} seeds, {duration(longest)})")
        left.fill_between(grid, mean - std, mean + std, color=colors[a], alpha=0.15, lw=0)
        pts = [(b, [r[f"test_{metric}"] for r in mine if r["budget_s"] == b and f"test_{metric}" in r]) for b in budgets]
        dodge = 1 + 0.01 * (i - len(arms) / 2)   # arms with equal figures stay visible side by side
        pts = [(b / 60 * dodge, *mean_std(v)) for b, v in pts if v]
        if pts:
            x, m, s = zip(*pts)
            right.errorbar(x, m, yerr=s, color=colors[a], marker="o", capsize=3, label=a)
    better = "higher is better" if metric == "accuracy" else "lower is better"
    left.set(xlabel="seconds since the arm started (loading and searches included)",
             ylabel=f"validation {metric}", title=f"{task}: validation {metric} of the state kept so far ({better})")
    right.set(xlabel="budget (minutes)", ylabel=f"test {metric}", title=f"{task}: test {metric} at each budget")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run the cells not yet in OUT/results.jsonl")
    p.add_argument("--model-dir", type=Path, required=True, help="folder with model.gguf and sidecar.gguf")
    p.add_argument("--out", type=Path, required=True, help="results.jsonl, config.json, tasks/, runs/, logs/")
    p.add_argument("--tasks", nargs="+", default=["spam", "author", "era"],
                   help="edge_zo.corpora tasks (shakespeare: held-out loss instead of accuracy)")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help=f"from {sorted(ARMS)} and --define")
    p.add_argument("--define", action="append", default=[], metavar="NAME=KIND FLAG...",
                   help=f"another arm: KIND one of {', '.join(KINDS)}, FLAGs added to its command")
    p.add_argument("--budgets", nargs="+", default=["5m", "10m"], help="wall-clock budgets: 90s, 5m, 1h or seconds")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every arm")
    p.add_argument("--task-seed", type=int, default=TASK_SEED)
    p.add_argument("--task-sizes", type=int, nargs=3, default=list(TASK_SIZES), metavar=("TRAIN", "VALID", "TEST"))
    p.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per row for every arm (default: edge-zo tune's --max-tokens default)")
    p.add_argument("--device", default="cpu", help="the torch arms' device")
    p.add_argument("--cell-timeout", type=float, default=900,
                   help="seconds a cell's process may run beyond 3x its budget before it is killed")
    p.set_defaults(fn=run)
    p = sub.add_parser("arm", help="(run starts this) one torch arm in this process, its result as JSON")
    p.add_argument("kind", choices=["icl", *TORCH_TRAINED])
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--task", type=Path, required=True, help="folder with train/valid/test.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=None, help="seconds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--objective", default="auto", choices=["auto", "nll", "choices"])
    p.add_argument("--lr", type=float, nargs="+", default=None, help="the learning rates to search (one: no search)")
    p.add_argument("--eps", type=float, default=None, help="the ZO arms' ε (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--probe-steps", type=int, default=None)
    p.add_argument("--rank", type=int, default=None, help="lora-adam's rank (default 8)")
    p.add_argument("--alpha", type=float, default=None, help="lora-adam's alpha (default 16)")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=arm)
    p = sub.add_parser("report", help="a PNG per task and time-to-quality.md into --out")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(fn=report)
    args = ap.parse_args(argv)
    if getattr(args, "max_tokens", 0) is None:
        from edge_zo.tune_settings import TuneSettings

        args.max_tokens = TuneSettings().max_tokens
    args.fn(args)


if __name__ == "__main__":
    main()
