"""Fisher mask vs a random mask of the same size, tuned the same way on a real task.

    python -m bench.mask_tune                              # SmolLM2-135M, spam task, 100 steps, seed 0
    python -m bench.mask_tune --steps 200 --seeds 0 1 2 --out docs/tune-mask.json

Runs the product's own commands, as a user would:
  1. `edge-zo convert --mask fisher|activation|random` of the source (0.1%, global; the Fisher one on
     the demo's 4,096 calibration tokens, so it is the demo's split);
  2. `edge-zo tune MODEL train.jsonl --valid valid.jsonl --sidecar SIDECAR` with the same settings;
  3. `edge-zo eval` on the held-out test split, untuned (model + sidecar) and tuned (+ deltas).
The task is the demo's spam/ham split (train 256, valid 32, test 96, seed 0): the test rows
are seen by neither tuning nor the choice of defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from edge_zo import corpora, demo

from ._common import cache_dir, log, smollm2, write_json
from ._common import edge_zo as run_edge_zo


def edge_zo(*args: str) -> str:
    log("mask_tune", "$ edge-zo " + " ".join(args))
    return run_edge_zo(*args)


def evaluate(model: str, data: Path, adapters: list[str], max_tokens: int) -> dict:
    flags = [f for a in adapters for f in ("--adapter", a)]
    return json.loads(edge_zo("eval", model, str(data), *flags, "--max-tokens", str(max_tokens), "--json"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-tokens", type=int, default=demo.DEMO_SETTINGS["max_tokens"])
    ap.add_argument("--masks", nargs="+", default=["fisher", "random"],
                    choices=["fisher", "activation", "random", "magnitude"])
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `edge-zo tune` flags, e.g. --lr 3e-4")
    ap.add_argument("--source", type=Path, default=None, help="GGUF model to convert (default: SmolLM2-135M Q4_1)")
    ap.add_argument("--calib-tokens", type=int, default=demo.CALIB_TOKENS, help="of the Fisher mask")
    ap.add_argument("--work", type=Path, default=None, help="converted models and runs (default: the cache)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here too")
    args = ap.parse_args(argv)

    source = args.source or smollm2()
    work = args.work or cache_dir("mask_tune")
    task = work / "spam"
    if not (task / "test.jsonl").is_file():   # the demo's task: train 256, valid 32, test 96, seed 0
        corpora.write_task("spam", task, seed=0, **demo.TASK_SIZES)
    train, valid, test = (str(task / f"{split}.jsonl") for split in ("train", "valid", "test"))
    splits = {}
    for mask in args.masks:
        splits[mask] = work / f"{source.stem}-{mask}"
        if not (splits[mask] / "sidecar.gguf").is_file():
            edge_zo("convert", str(source), "-o", str(splits[mask]), "--mask", mask,
                    "--calib-tokens", str(args.calib_tokens), "--no-progress")

    rows = []
    for mask in args.masks:
        model, sidecar = str(splits[mask] / "model.gguf"), str(splits[mask] / "sidecar.gguf")
        before = evaluate(model, test, [sidecar], args.max_tokens)
        for seed in args.seeds:
            run = work / f"run-{source.stem}-{mask}-s{seed}-{args.steps}"
            shutil.rmtree(run, ignore_errors=True)
            t0 = time.perf_counter()
            edge_zo("tune", model, train, "--valid", valid, "--sidecar", sidecar, "-o", str(run), "--quiet",
                    "--steps", str(args.steps), "--seed", str(seed), "--max-tokens", str(args.max_tokens),
                    "--eval-every", str(args.steps), *args.extra)
            wall = time.perf_counter() - t0
            metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            valid_rows = [m for m in metrics if "valid_loss" in m]
            after = evaluate(model, test, [sidecar, str(run / "deltas.gguf")], args.max_tokens)
            rows.append({
                "mask": mask, "seed": seed, "steps": args.steps,
                "test_loss_before": round(before["loss"], 4), "test_acc_before": before.get("accuracy"),
                "test_loss_after": round(after["loss"], 4), "test_acc_after": after.get("accuracy"),
                "valid_loss_before": valid_rows[0]["valid_loss"], "valid_loss_after": valid_rows[-1]["valid_loss"],
                "valid_acc_before": valid_rows[0].get("valid_accuracy"), "valid_acc_after": valid_rows[-1].get("valid_accuracy"),
                "tune_wall_s": round(wall, 1),
                "peak_rss_mib": round(max(m.get("peak_rss_mib", 0) for m in metrics), 1),
                "run": run.name,
            })
            print(json.dumps(rows[-1]), flush=True)

    summary = {}
    for mask in args.masks:
        rs = [r for r in rows if r["mask"] == mask]
        loss = [r["test_loss_after"] for r in rs]
        acc = [r["test_acc_after"] for r in rs if r["test_acc_after"] is not None]
        summary[mask] = {
            "test_loss_before": rs[0]["test_loss_before"], "test_acc_before": rs[0]["test_acc_before"],
            "test_loss_after_mean": round(statistics.mean(loss), 4),
            "test_loss_after_std": round(statistics.stdev(loss), 4) if len(loss) > 1 else 0.0,
            "test_acc_after_mean": round(statistics.mean(acc), 4) if acc else None,
        }
    result = {"model": source.name, "task": "spam, the demo's split (seed 0)", "test_examples": before["examples"],
              "cpu_threads": os.cpu_count(), "extra_flags": args.extra, "rows": rows, "summary": summary}
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
