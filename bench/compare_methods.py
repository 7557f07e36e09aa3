"""Does 0.1% sensitive ZO match or beat the alternatives? (issue 5, part 2; docs/compare.md)

On SmolLM2-135M and Gemma-3-270M, three real tasks (spam and author: classification with
`choices`, accuracy; shakespeare: held-out loss on plays never trained on), the same step
budget and three seeds, each arm's test metric:

  zero-shot      the model as installed (native, and torch on the same dequantized numbers)
  icl            in-context demonstrations before each test row (torch)
  mezo-full      ZO-SGD over ALL parameters, MeZO-style (torch, float32; bench.torch_arms)
  zo-random      ZO over a random 0.1%        (native: `edge-zo tune` on the Q4 GGUF)
  zo-magnitude   ZO over the largest-|w| 0.1% (native)
  zo-fisher      ZO over the Fisher 0.1%      (native: the product's default mask)
  adam           first-order Adam over all parameters (torch): the upper reference

Every ZO and Adam arm picks its learning rate from 20-step probes over a grid (lowest loss on a fixed
training probe batch); the native arms run `edge-zo tune --lr auto` itself, which since 2026-11-22 then
backs off one grid step (docs/tune.md). The zo-MASK rows of docs/compare.md ran before that change
(commit c33d524); zo-MASK-lrX fixes the rate to X and reproduces either rule's runs seed for seed.
The three 0.1% masks come from `edge-zo convert --mask fisher|random|magnitude --split keep`, so
every arm starts from the installed model's numbers (the sidecar holds deltas, 0 at the start).
The report's tasks are built with seed 2026; the tests and the demo use seed 0.

    python -m bench.compare_methods prepare -o bench/out/compare      # tasks + sidecars (+ converts)
    python -m bench.compare_methods run --bundle bench/out/compare --models-dir DIR --jobs 1 --threads 16
    python -m bench.compare_methods report bench/out/compare/results.jsonl --out docs

`run` is resumable (cells already in results.jsonl are skipped) and stops launching cells
near --deadline, so a time-limited machine can finish it over several calls.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_zo import atomic

from ._common import ROOT, cache_dir, gemma, smollm2, write_json
from ._common import edge_zo as run_edge_zo
from .gpu import carry

REPORT_SEED = 2026
TASK_SIZES = {"spam": (480, 60, 200), "author": (480, 60, 198), "shakespeare": (480, 60, 200)}
MASKS = ("fisher", "random", "magnitude")
TORCH_METHODS = ("zero-shot", "icl", "mezo-full", "adam")
METHOD_ORDER = ("zero-shot", "zero-shot-native", "icl", "mezo-full", "zo-random", "zo-magnitude", "zo-fisher", "adam")


def log(msg: str) -> None:
    print(f"compare: {msg}", file=sys.stderr, flush=True)


def sources(names: list[str], extra: list[str]) -> dict[str, Path]:
    """The installed models by name (smollm2: SmolLM2-135M-Instruct Q4_1, gemma: Gemma-3-270M Q4_K_M)
    and any NAME=PATH given."""
    out = {name: {"smollm2": smollm2, "gemma": gemma}[name]() for name in names if name in ("smollm2", "gemma")}
    for item in extra:
        name, _, path = item.partition("=")
        out[name] = Path(path)
    return out


# ---- prepare (a machine with the registries) ----

def prepare(args) -> None:
    from edge_zo import corpora

    out = args.output
    sizes = TASK_SIZES if args.task_sizes is None else {t: tuple(args.task_sizes) for t in TASK_SIZES}
    for task, (n_train, n_valid, n_test) in sizes.items():
        corpora.write_task(task, out / "tasks" / task, seed=REPORT_SEED, n_train=n_train, n_valid=n_valid, n_test=n_test)
    work = args.work or cache_dir("compare")
    (out / "sidecars").mkdir(parents=True, exist_ok=True)
    models = sources(args.models, args.source)
    for name, src in models.items():
        for mask in args.masks:
            conv = work / f"{name}-{mask}"
            if not (conv / "sidecar.gguf").is_file():
                log(f"converting {name} with the {mask} mask")
                run_edge_zo("convert", str(src), "-o", str(conv), "--mask", mask, "--split", "keep", "--no-progress",
                            *args.convert_args)
            shutil.copyfile(conv / "sidecar.gguf", out / "sidecars" / f"{name}-{mask}.gguf")
            shutil.copyfile(conv / "convert.json", out / "sidecars" / f"{name}-{mask}.convert.json")
    write_json(out / "manifest.json", carry.manifest(models))
    if args.chunks:
        log(f"{carry.split(models, args.chunks, args.chunk_mib)} pieces of the models in {args.chunks}")
    log(f"bundle in {out}")


# ---- run (the machine that tunes) ----

class Results:
    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.lines = [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.is_file() else []

    def has(self, tag: str, task: str, method: str, seed: int) -> bool:
        return any((r["tag"], r["task"], r["method"], r["seed"]) == (tag, task, method, seed) for r in self.lines)

    def add(self, line: dict) -> None:
        with self.lock:
            self.lines.append(line)
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")
        log(json.dumps(line))


def edge_zo(args: list[str], timeout: float) -> str:
    return run_edge_zo(*args, timeout=timeout)


def run(args) -> None:
    deadline = time.time() + (args.deadline or 1e9)

    def left() -> float | None:   # seconds a cell may still take (None: no deadline)
        return deadline - time.time() if args.deadline else None
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    results = Results(args.out or args.bundle / "results.jsonl")
    gpu = ["--gpu-layers", str(args.gpu_layers)] if args.gpu_layers else []
    common = ["--max-tokens", str(args.max_tokens), "--threads", str(args.threads), *gpu]

    def native_zero_shot(tag, task):
        folder = args.bundle / "tasks" / task
        model = str(args.models_dir / manifest["models"][tag]["file"])
        sidecar = str(args.bundle / "sidecars" / f"{tag}-fisher.gguf")
        res = {}
        for split in ("test", "valid"):
            r = json.loads(edge_zo(["eval", model, str(folder / f"{split}.jsonl"), "--adapter", sidecar, "--json", *common],
                                   left()))
            res[f"{split}_loss"] = r["loss"]
            if split == "test" and "accuracy" in r:
                res["test_accuracy"] = r["accuracy"]
        results.add({"tag": tag, "task": task, "method": "zero-shot-native", "seed": -1, **res})

    def native_tune(tag, task, method, seed):
        mask, _, lr = method[len("zo-"):].partition("-lr")   # zo-fisher: --lr auto; zo-fisher-lr3e-05: fixed
        folder = args.bundle / "tasks" / task
        model = str(args.models_dir / manifest["models"][tag]["file"])
        sidecar = str(args.bundle / "sidecars" / f"{tag}-{mask}.gguf")
        out = args.work / f"{tag}-{task}-{method}-s{seed}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        edge_zo(["tune", model, str(folder / "train.jsonl"), "--valid", str(folder / "valid.jsonl"), "--sidecar", sidecar,
                 "-o", str(out), "--quiet", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                 "--seed", str(seed), "--lr", lr or "auto", "--eps", args.eps, "--eval-every", str(args.steps), "--save-every", str(args.steps),
                 *common], left())
        wall = time.time() - t
        r = json.loads(edge_zo(["eval", model, str(folder / "test.jsonl"), "--adapter", sidecar,
                                "--adapter", str(out / "deltas.gguf"), "--json", *common], left()))
        info = json.loads((out / "run.json").read_text())
        metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
        train = [m["loss"] for m in metrics if "loss" in m]
        res = {"test_loss": r["loss"], "valid_loss": [m["valid_loss"] for m in metrics if "valid_loss" in m][-1],
               "eps": info["settings"]["eps"], "lr": info["settings"]["lr"], "lr_search": (info["lr_search"] or {}).get("losses"), "steps": args.steps,
               "batch_size": args.batch_size, "train_loss_first": statistics.fmean(train[:10]),
               "train_loss_last": statistics.fmean(train[-10:]), "wall_s": round(wall, 1), "n_params": info["n_params"]}
        if "accuracy" in r:
            res["test_accuracy"] = r["accuracy"]
        results.add({"tag": tag, "task": task, "method": method, "seed": seed, **res})

    def torch_cell(tag, task, method, seeds):
        model = str(args.models_dir / manifest["models"][tag]["file"])
        subprocess.run([sys.executable, "-m", "bench.torch_arms", model, str(args.bundle / "tasks" / task),
                        "--methods", method, "--seeds", *map(str, seeds), "--steps", str(args.steps),
                        "--batch-size", str(args.batch_size), "--max-tokens", str(args.max_tokens),
                        "--out", str(results.path), "--tag", tag], check=True, timeout=left(), cwd=ROOT)

    cells = []
    ready = [t for t in args.models if (args.models_dir / manifest["models"][t]["file"]).is_file()]
    if ready != args.models:
        log(f"not here yet, skipped: {sorted(set(args.models) - set(ready))}")
    for tag in ready:
        for task in args.tasks:
            if "zero-shot-native" in args.methods and not results.has(tag, task, "zero-shot-native", -1):
                cells.append((native_zero_shot, (tag, task)))
            for method in TORCH_METHODS:
                if method not in args.methods:
                    continue
                seeds = [-1] if method == "zero-shot" else args.seeds
                todo = [s for s in seeds if not results.has(tag, task, method, s)]
                if todo:
                    cells.append((torch_cell, (tag, task, method, todo)))
            for method in args.methods:
                for seed in args.seeds:
                    if method.startswith("zo-") and not results.has(tag, task, method, seed):
                        cells.append((native_tune, (tag, task, method, seed)))
    log(f"{len(cells)} cells to run, {args.jobs} at a time")
    args.work.mkdir(parents=True, exist_ok=True)
    failed = []

    def guarded(fn, a):
        if time.time() > deadline - args.margin:
            return
        try:
            fn(*a)
        except Exception as exc:  # a failed or timed-out cell is reported and left for the next call
            failed.append(f"{fn.__name__}{a}: {exc}")
            log(f"FAILED {fn.__name__}{a}: {str(exc)[-1500:]}")

    with ThreadPoolExecutor(args.jobs) as pool:
        for fn, a in cells:
            pool.submit(guarded, fn, a)
    left = sum(1 for fn, a in cells if fn is native_tune and not results.has(*a))
    log(f"done: {len(failed)} failed, {left} native cells still to run")


# ---- report ----

def report(args) -> None:
    lines = []
    for p in args.results:
        lines += [json.loads(s) for s in Path(p).read_text().splitlines() if s.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in lines:
        groups.setdefault((r["tag"], r["task"], r["method"]), []).append(r)
    table = {}
    for (tag, task, method), rs in groups.items():
        key = "test_accuracy" if "test_accuracy" in rs[0] else "test_loss"
        vals = [r[key] for r in rs]
        table.setdefault(tag, {}).setdefault(task, {})[method] = {
            "metric": key, "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals,
            "lr": [r.get("lr") for r in rs], "wall_s": [r.get("wall_s") for r in rs]}
    for tag, tasks in table.items():
        print(f"\n{tag}")
        print("| method | " + " | ".join(f"{t} ({'acc' if next(iter(m.values()))['metric'] == 'test_accuracy' else 'loss'})"
                                          for t, m in tasks.items()) + " |")
        print("| --- |" + " --- |" * len(tasks))
        extra = sorted({m for t in tasks.values() for m in t} - set(METHOD_ORDER))
        for method in [*METHOD_ORDER, *extra]:
            cells = []
            for task, m in tasks.items():
                c = m.get(method)
                cells.append("" if c is None else f"{c['mean']:.3f} ± {c['std']:.3f} (n={c['n']})")
            if any(cells):
                print(f"| {method} | " + " | ".join(cells) + " |")
        print(f"\n{tag}: test loss (mean NLL per target token; the accuracy tasks' correct answers)")
        print("| method | " + " | ".join(tasks) + " |")
        print("| --- |" + " --- |" * len(tasks))
        for method in [*METHOD_ORDER, *extra]:
            cells = []
            for task in tasks:
                rs = groups.get((tag, task, method), [])
                v = [r["test_loss"] for r in rs]
                cells.append(f"{statistics.fmean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}" if v else "")
            if any(cells):
                print(f"| {method} | " + " | ".join(cells) + " |")
    if args.out:
        write_json(args.out / "compare.json", {"sources": [str(p) for p in args.results], "table": table})
        with atomic.atomic_path(args.out / "compare.png") as tmp:
            plot(table, tmp)


def plot(table: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = list(table)
    tasks = list(next(iter(table.values())))
    fig, axes = plt.subplots(len(tags), len(tasks), figsize=(4.2 * len(tasks), 3.4 * len(tags)), squeeze=False)
    for i, tag in enumerate(tags):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            ms = [m for m in METHOD_ORDER if m in table[tag].get(task, {})]
            ms += sorted(set(table[tag].get(task, {})) - set(ms))
            cs = [table[tag][task][m] for m in ms]
            colors = ["#999999" if not m.startswith("zo-") else "#d62728" if m == "zo-fisher" else "#ff9896" for m in ms]
            ax.bar(range(len(ms)), [c["mean"] for c in cs], yerr=[c["std"] for c in cs], color=colors, capsize=3)
            ax.set_xticks(range(len(ms)), ms, rotation=60, ha="right", fontsize=8)
            metric = cs[0]["metric"] if cs else ""
            ax.set_title(f"{tag} / {task}: {'test accuracy' if metric == 'test_accuracy' else 'test loss (lower is better)'}",
                         fontsize=9)
            if metric == "test_loss":
                lo = min(c["mean"] for c in cs)
                ax.set_ylim(lo * 0.9, max(c["mean"] for c in cs) * 1.05)
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tasks, sidecars and the model manifest into one folder")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--chunks", type=Path, default=None,
                   help="also cut the models into pieces here, for the device machine (bench.gpu.carry)")
    p.add_argument("--chunk-mib", type=int, default=58)
    p.add_argument("--models", nargs="*", default=["smollm2", "gemma"], choices=["smollm2", "gemma"],
                   help="installed models to include")
    p.add_argument("--source", action="append", default=[], metavar="NAME=PATH", help="another GGUF model to include")
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    p.add_argument("--task-sizes", type=int, nargs=3, default=None, metavar=("TRAIN", "VALID", "TEST"),
                   help="rows of every task (default: the report's)")
    p.add_argument("--convert-args", nargs=argparse.REMAINDER, default=[], help="more `edge-zo convert` flags")
    p.add_argument("--work", type=Path, default=None, help="the converts (default: the cache)")
    p.set_defaults(fn=prepare)
    p = sub.add_parser("run", help="run the arms (resumable)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--models-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None, help="results JSONL (default BUNDLE/results.jsonl)")
    p.add_argument("--work", type=Path, default=Path("/tmp/edge-zo-compare"))
    p.add_argument("--models", nargs="+", default=["smollm2", "gemma"])
    p.add_argument("--tasks", nargs="+", default=list(TASK_SIZES))
    p.add_argument("--methods", nargs="+", default=list(METHOD_ORDER[:4]) + [f"zo-{m}" for m in MASKS] + ["adam"],
                   help="zo-MASK tunes with --lr auto; zo-MASK-lrX with the fixed learning rate X")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eps", default="3e-3",
                   help="the native arms' ε (default 3e-3, what every cell of docs/compare.md ran at; 'auto': tune's default)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--gpu-layers", type=int, default=99)
    p.add_argument("--threads", type=int, default=2,
                   help="the native arms' CPU threads: on the text task they score every row's logits on the host")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells at once; on one GPU more than 1 made each run 7-25x slower (docs/compare.md)")
    p.add_argument("--deadline", type=float, default=None, help="seconds from now to stop launching cells")
    p.add_argument("--margin", type=float, default=60, help="no cell starts with less than this left")
    p.set_defaults(fn=run)
    p = sub.add_parser("report", help="mean ± std per (model, task, method): markdown, JSON and PNG")
    p.add_argument("results", nargs="+")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(fn=report)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
