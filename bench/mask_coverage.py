"""How much of a real task's gradient a 0.1% mask covers: fisher vs activation vs random vs magnitude.

    python -m bench.mask_coverage                         # SmolLM2-135M, spam task, 8192 calibration tokens
    python -m bench.mask_coverage --task shakespeare --densities 0.0001 0.001 0.01 --json out.json

ZO-SPSA only ever moves the masked coordinates, so the share of the task
gradient's squared norm inside the mask bounds how much of the descent
direction it can follow (Guo et al. 2024 report ~50% for a 0.1% Fisher mask on
commonsense tasks). The masks are scored and selected by `edge-zo convert`'s own
code (converters.fisher): fisher from the public-domain calibration corpus (not the
task), magnitude from |w|, random from a seeded generator; all over every block matmul. activation is
the torch-free W^2 * E[x^2] of edge_zo.activation_mask with E[x^2] from llama.cpp on the same calibration
tokens as fisher; activation-auto is the mask `edge-zo tune` builds by itself (its own, smaller
calibration settings, docs/mask.md). The gradient
is that of the mean completion loss over `--task-examples` training rows of a
different, real task from edge_zo.corpora. Two references frame the numbers:
`task-fisher` (the Fisher of the task's own rows, what tune --mask-from-data
uses) and `oracle` (the top coordinates of the task gradient itself, the most
any mask of that size can cover). `fisher halves overlap` is the share of
coordinates two Fisher masks from disjoint halves of the calibration text agree
on: how settled the mask is at this calibration size.

The same numbers also say what scaling SPSA's directions could gain (issue 16: directions
scaled by the stored Fisher, HiZOO's diagonal curvature). For directions z ~ N(0, diag(s)) on
the mask, one ZO-SGD step at its best rate lowers the loss by about (Σ s·g²) / (Σ s·h) times a
constant, where g is the task gradient and h the diagonal of the loss's curvature, here the
task's own empirical Fisher (task-fisher). `direction scaling` prints that figure for s =
F^a (F the calibration Fisher; a = 1 is Fisher-scaled directions, a = -1 HiZOO's inverse
curvature) and for two oracles that know the task (s = h, s = g²), relative to s = 1 (today's
z ~ N(0, I)); above 1 would mean fewer steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from converters import calib
from converters.fisher import (Scope, coverage, fisher_scores, magnitude_scores, random_scores, select,
                               sequence_loss, target_parameters)
from converters.torch_model import load_gguf
from edge_zo import activation_mask, corpora
from edge_zo.dataset import Tokenizer, load_jsonl
from edge_zo.gguf_io import TensorFile
from edge_zo.model_info import ModelInfo
from edge_zo.runtime import Runtime, RuntimeOptions

from ._common import smollm2, write_json


def task_examples(native, task: str, n: int, seed: int):
    rows = corpora.TASKS[task](seed=seed)["train"][:n]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return Tokenizer(native, max_tokens=256).examples(load_jsonl(path))


def task_gradient(model, names, targets, examples, layout) -> dict[str, np.ndarray]:
    """g^2 of the mean task loss, per weight in GGUF layout."""
    import torch

    params = target_parameters(model, names, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    for ex in examples:
        (sequence_loss(model, ex) / len(examples)).backward()
    out = {n: layout.to_gguf(n, (p.grad * p.grad).numpy()) for n, p in params.items()}
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    return out


SCALINGS = {"F^-1 (HiZOO-like)": lambda f, h, g2: 1 / f, "F^-0.5": lambda f, h, g2: f ** -0.5,
            "F^0 (today)": lambda f, h, g2: np.ones_like(f), "F^0.5": lambda f, h, g2: f ** 0.5,
            "F^1": lambda f, h, g2: f, "task Fisher (oracle)": lambda f, h, g2: h,
            "task gradient^2 (oracle)": lambda f, h, g2: g2}


def direction_scaling(fisher: dict, task_fisher: dict, g2: dict, mask: dict) -> dict[str, float]:
    """{scaling: its ZO-SGD progress per step relative to isotropic directions}, on `mask`'s coordinates."""
    def gather(d):
        return np.concatenate([d[n].reshape(-1)[idx] for n, idx in mask.items()]).astype(np.float64)

    f, h, g = gather(fisher), gather(task_fisher), gather(g2)
    f = np.maximum(f, f[f > 0].min() if np.any(f > 0) else 1.0)   # a zero score would make F^-1 infinite
    base = g.sum() / h.sum()
    return {name: round(float((s * g).sum() / (s * h).sum() / base), 3)
            for name, s in ((name, fn(f, h, g)) for name, fn in SCALINGS.items())}


def overlap(a: dict, b: dict) -> float:
    same = sum(len(np.intersect1d(a[n], b[n], assume_unique=True)) for n in a)
    return same / max(sum(len(v) for v in a.values()), 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--task", default="spam", choices=sorted(corpora.TASKS))
    ap.add_argument("--task-examples", type=int, default=64)
    ap.add_argument("--densities", type=float, nargs="+", default=[0.001])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model_path = args.model or smollm2()
    info = ModelInfo.open(model_path)
    targets = info.block_matmul_weights()
    t0 = time.perf_counter()
    with Runtime(model_path, RuntimeOptions(batch_size=1, max_tokens=args.seq_len)) as rt:
        corpus = calib.load(rt.native, None, args.calib_tokens, 0, args.seq_len)
        task = task_examples(rt.native, args.task, args.task_examples, args.seed)
        print(f"activation statistics over the same {corpus.train_tokens} calibration tokens...", file=sys.stderr)
        e_x2 = activation_mask.activation_stats(rt, [e.tokens for e in corpus.train], targets)
    print("the automatic mask of edge-zo tune (edge_zo.activation_mask defaults)...", file=sys.stderr)
    auto, auto_report = activation_mask.build_sidecar(model_path, log=lambda msg: None)
    auto_mask = dict(zip(auto.names, auto.indices))
    model, names, layout = load_gguf(model_path)
    half = len(corpus.train) // 2
    print(f"Fisher over {corpus.train_tokens} calibration tokens ({len(corpus.train)} sequences)...", file=sys.stderr)
    halves = (fisher_scores(model, names, layout, targets, corpus.train[:half], progress=False),
              fisher_scores(model, names, layout, targets, corpus.train[half:], progress=False))
    fisher = {n: (halves[0][n] * half + halves[1][n] * (len(corpus.train) - half)) / len(corpus.train) for n in targets}
    print(f"task gradient over {len(task)} {args.task} rows...", file=sys.stderr)
    g2 = task_gradient(model, names, targets, task, layout)
    with TensorFile(model_path, info.header) as tf:
        activation = {n: np.square(tf.tensors[n].dequantize()) * e_x2[n].astype(np.float32) for n in targets}
        scores = {"fisher": fisher, "activation": activation, "magnitude": magnitude_scores(tf.tensors, targets),
                  "random": random_scores({n: tf.tensors[n].shape for n in targets}, args.seed),
                  "task-fisher": fisher_scores(model, names, layout, targets, task, progress=False), "oracle": g2}
    scaling = direction_scaling(fisher, scores["task-fisher"], g2,
                                select(fisher, activation_mask.DEFAULT.density, Scope.GLOBAL))
    rows = []
    for density in args.densities:
        for scope in (Scope.GLOBAL, Scope.PER_MATRIX):
            row = {"density": density, "scope": scope.value}
            for method, s in scores.items():
                row[method] = round(coverage(g2, select(s, density, scope)), 4)
            if density == activation_mask.DEFAULT.density and scope is Scope.GLOBAL:
                row["activation-auto"] = round(coverage(g2, auto_mask), 4)
            row["activation/fisher overlap"] = round(overlap(select(scores["fisher"], density, scope),
                                                             select(scores["activation"], density, scope)), 4)
            row["fisher halves overlap"] = round(overlap(select(halves[0], density, scope),
                                                         select(halves[1], density, scope)), 4)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    result = {"model": Path(model_path).name, "task": args.task, "task_examples": len(task),
              "task_target_tokens": sum(e.n_targets for e in task), "calibration": corpus.source,
              "calibration_tokens": corpus.train_tokens, "activation_auto": auto_report,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows, "direction_scaling": scaling}
    cols = ["density", "scope", "fisher", "activation", "activation-auto", "magnitude", "random", "task-fisher",
            "oracle", "fisher halves overlap", "activation/fisher overlap"]
    print(f"\n{Path(model_path).name}, task gradient: {args.task} ({len(task)} rows), "
          f"Fisher: {corpus.train_tokens} calibration tokens\n")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.1%}" if isinstance(r.get(c), float) and c != "density" else str(r.get(c, "-"))
                                for c in cols) + " |")
    print("\ndirection scaling on the Fisher mask (ZO-SGD progress per step against z ~ N(0, I)):\n")
    print("| directions z ~ N(0, diag(s)), s = | progress per step |\n| --- | --- |")
    for name, ratio in scaling.items():
        print(f"| {name} | {ratio:.3f}x |")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
