"""Which objective, optimizer and learning rate learn a task in the fewest steps? (docs/objective.md)

One model load per task, then each configuration tunes the sparse set from zero with the
product's own loop (edge_zo.trainer.train) and objective (edge_zo.objective), validating
every --eval-every steps; the best validated deltas are then scored on held-out test rows
that tuning never saw. Steps, not seconds, are the budget here: the same grid on a GPU and
on a CPU gives the same curves, so it runs where forwards are cheap.

    python -m edge_zo.corpora spam -o tasks/spam          # and author, era
    python -m bench.objective_grid --model-dir DIR --tasks-dir tasks --tasks spam author era \\
        --configs '[{"objective": "choices", "optimizer": "adam", "lr": 1e-3, "steps": 400}]' \\
        --out results.jsonl [--gpu-layers 99]
    python -m bench.objective_grid --report results.jsonl      # a markdown table

DIR holds model.gguf and sidecar.gguf (`edge-zo convert`); or name the two files with --model and
--sidecar (a stock GGUF and a keep-split mask, as `edge-zo tune MODEL DATA` tunes them). A
configuration takes the keys objective (choices|nll), optimizer, lr, eps, steps, batch and seed,
"head": true to tune, beside the mask, every output-matrix row of the choices' tokens (the
label words' rows: a linear read-out of the last hidden state, docs/objective.md), and
"relative": true to take lr and eps as fractions of each coordinate's weight matrix's RMS
(`matrix_rms`; it learned less on Gemma-3-270M, docs/objective.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from edge_zo import objective
from edge_zo.adapter import SparseAdapter
from edge_zo.constants import OUTPUT, TOKEN_EMBD, Sparse
from edge_zo.dataset import Tokenizer, load_jsonl
from edge_zo.errors import EdgeZoError
from edge_zo.gguf_io import TensorFile
from edge_zo.model_info import ModelInfo
from edge_zo.runtime import Runtime, RuntimeOptions
from edge_zo.spsa import Optimizer
from edge_zo.trainer import LoopConfig, LoopState, train

from ._common import log


def run_task(args, task: str, configs: list[dict], out) -> None:
    folder = Path(args.tasks_dir) / task
    opts = RuntimeOptions(batch_size=16, max_tokens=args.max_tokens, threads=args.threads, gpu_layers=args.gpu_layers)
    with Runtime(args.model, opts) as rt:
        tok = Tokenizer(rt.native, max_tokens=args.max_tokens)
        train_ex = tok.examples(load_jsonl(folder / "train.jsonl"))
        valid = tok.examples(load_jsonl(folder / "valid.jsonl"))[: args.n_valid]
        test = tok.examples(load_jsonl(folder / "test.jsonl"))[: args.n_test]
        sidecar = SparseAdapter.load(args.sidecar)
        if np.any(sidecar.values):
            rt.attach(sidecar)
        for cfg in configs:
            tuned = with_head(sidecar, args.model, train_ex) if cfg.get("head") else sidecar
            deltas = tuned.with_values(np.zeros(tuned.n_params, np.float32), {Sparse.ROLE: "deltas"})
            slot = rt.attach(deltas)
            live = deltas.values
            loss = objective.batch_loss(rt, objective.Objective(cfg.get("objective", "choices")))
            loop = LoopConfig(steps=cfg["steps"], batch_size=cfg.get("batch", 8), eps=cfg.get("eps", 5e-3),
                              lr=cfg["lr"], optimizer=Optimizer(cfg.get("optimizer", "adam")),
                              seed=cfg.get("seed", 0), eval_every=args.eval_every, save_every=10**9)
            state = LoopState.fresh(np.zeros(tuned.n_params, np.float32), loop)
            scale = matrix_rms(args.model, tuned) if cfg.get("relative") else None
            curve, t0 = [], time.perf_counter()

            def report(r):
                if "valid_loss" in r:
                    curve.append([r["step"], round(time.perf_counter() - t0, 2), round(r["valid_loss"], 4),
                                  round(r["valid_accuracy"], 4)])

            error = None
            try:
                state = train(loop, state, n_examples=len(train_ex), live=live,
                              loss=lambda idx: loss([train_ex[i] for i in idx]),
                              evaluate=lambda: objective.validation(rt, objective.Objective.CHOICES, valid),
                              report=report, checkpoint=lambda s: None, scale=scale)
            except (EdgeZoError, FloatingPointError) as exc:
                error = str(exc)
            live[:] = state.best
            tested = objective.validation(rt, objective.Objective.CHOICES, test)
            rt.detach(slot)
            row = {"task": task, "sidecar": str(args.sidecar), "config": cfg, "coordinates": tuned.n_params,
                   "curve": curve, "best_step": state.best_step,
                   "test_accuracy": tested["valid_accuracy"], "test_choice_ce": tested["valid_loss"],
                   "seconds": round(time.perf_counter() - t0, 2), "error": error}
            out.write(json.dumps(row) + "\n")
            out.flush()
            log("objective_grid", f"{task} {cfg}: test accuracy {row['test_accuracy']:.3f}")


def matrix_rms(model: Path, adapter: SparseAdapter) -> np.ndarray:
    """One float32 per coordinate of `adapter`: the RMS of the model's weight it belongs to, as
    stored. With it as spsa's `scale`, lr and eps become fractions of each matrix's typical
    weight: SmolLM2's block matmuls have a median RMS of 0.19, Gemma-3-270M's 0.04."""
    info = ModelInfo.open(model)
    out = np.empty(adapter.n_params, np.float32)
    with TensorFile(model, info.header) as tf:
        for i, name in enumerate(adapter.names):
            w = tf.tensors[name].dequantize()
            out[adapter.offsets[i]: adapter.offsets[i + 1]] = np.sqrt(np.mean(np.square(w, dtype=np.float64)))
    return out


def with_head(sidecar: SparseAdapter, model: Path, examples) -> SparseAdapter:
    """The sidecar's coordinates plus every output-matrix row of the choices' tokens."""
    info = ModelInfo.open(model)
    name = OUTPUT if OUTPUT in info.tensors else TOKEN_EMBD
    n_in = info.tensors[name].shape[-1]
    tokens = sorted({int(t) for e in examples for c in e.choices for t in c.tokens[c.targets.astype(bool)]})
    rows = (np.asarray(tokens, np.int64)[:, None] * n_in + np.arange(n_in)).ravel()
    weights = {n: (i, sidecar.weight_values(k)) for k, (n, i) in enumerate(zip(sidecar.names, sidecar.indices))}
    if name in weights:
        idx, val = weights[name]
        rows = np.setdiff1d(rows, idx)
        weights[name] = (np.concatenate([idx, rows]), np.concatenate([val, np.zeros(len(rows), np.float32)]))
    else:
        weights[name] = (rows, np.zeros(len(rows), np.float32))
    log("objective_grid", f"head: {len(tokens)} choice tokens, {len(rows)} coordinates of {name}")
    return SparseAdapter.from_weights(sidecar.architecture, weights, sidecar.metadata)


_PLAIN = ("objective", "optimizer", "lr", "steps", "seed")


def report(path: Path) -> str:
    """Test accuracy per configuration (seeds pooled: n says how many) and task."""
    cells = defaultdict(list)
    tasks = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        c = r["config"]
        other = ", ".join(([Path(r["sidecar"]).name] if "sidecar" in r else []) +
                          [f"{k} {c[k]}" for k in sorted(c) if k not in _PLAIN])
        key = (c.get("objective", "choices"), c.get("optimizer", "adam"), c["lr"], c["steps"], other)
        cells[key, r["task"]].append(r["test_accuracy"])
        tasks += [r["task"]] if r["task"] not in tasks else []
    lines = ["| objective | optimizer | lr | steps | other | " + " | ".join(tasks) + " | mean |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " | --- |"]
    for key in sorted({k for k, _ in cells}, key=str):
        accs = [cells.get((key, t)) for t in tasks]
        shown = [f"{np.mean(a):.3f}" + (f" (n={len(a)})" if len(a) > 1 else "") if a else "" for a in accs]
        means = [np.mean(a) for a in accs if a]
        mean = f"{np.mean(means):.3f}" if len(means) == len(tasks) else ""
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | {key[3]} | {key[4]} | " + " | ".join(shown)
                     + f" | {mean} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="folder with model.gguf and sidecar.gguf")
    ap.add_argument("--model", type=Path, help="the GGUF model (default: DIR/model.gguf)")
    ap.add_argument("--sidecar", type=Path, help="its sparse set (default: DIR/sidecar.gguf)")
    ap.add_argument("--tasks-dir", help="folder with one task folder (train/valid/test.jsonl) per task")
    ap.add_argument("--tasks", nargs="+", default=["spam", "author", "era"])
    ap.add_argument("--configs", help="JSON list of configurations")
    ap.add_argument("--out", type=Path, help="results JSONL (appended)")
    ap.add_argument("--report", type=Path, help="print the markdown table of a results file and exit")
    ap.add_argument("--n-valid", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gpu-layers", type=int, default=0)
    args = ap.parse_args(argv)
    if args.report:
        print(report(args.report))
        return 0
    if args.model_dir:
        args.model = args.model or Path(args.model_dir) / "model.gguf"
        args.sidecar = args.sidecar or Path(args.model_dir) / "sidecar.gguf"
    if not (args.model and args.sidecar and args.tasks_dir and args.configs and args.out):
        ap.error("--model-dir (or --model and --sidecar), --tasks-dir, --configs and --out are needed"
                 " (or --report FILE)")
    configs = json.loads(args.configs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as out:
        for task in args.tasks:
            run_task(args, task, configs, out)
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
