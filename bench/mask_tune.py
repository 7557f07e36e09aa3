"""Fisher mask vs a random mask of the same size, tuned the same way on a real task.

    python bench/mask_tune.py                              # SmolLM2-135M, spam task, 100 steps, seed 0
    python bench/mask_tune.py --steps 200 --seeds 0 1 2 --out docs/tune-mask.json

Runs the product's own commands, as a user would:
  1. the Fisher split is the demo's (`edge-zo convert` of SmolLM2 on calibration text, 0.1%);
     the random split is `edge-zo convert --mask random` with the same density and scope;
  2. `edge-zo tune MODEL train.jsonl --valid valid.jsonl --sidecar SIDECAR` with the same settings;
  3. `edge-zo eval` on the held-out test split, untuned (model + sidecar) and tuned (+ deltas).
The task is the demo's spam/ham split (train 256, valid 32, test 96, seed 0): the test rows
are seen by neither tuning nor the choice of defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_zo import corpora, demo  # noqa: E402


def edge_zo(*args: str) -> str:
    cmd = [sys.executable, "-m", "edge_zo", *args]
    print("$ edge-zo " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"edge-zo {args[0]} failed with exit code {done.returncode}")
    return done.stdout


def evaluate(model: str, data: Path, adapters: list[str], max_tokens: int) -> dict:
    flags = [f for a in adapters for f in ("--adapter", a)]
    return json.loads(edge_zo("eval", model, str(data), *flags, "--max-tokens", str(max_tokens), "--json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-tokens", type=int, default=demo.DEMO_SETTINGS["max_tokens"])
    ap.add_argument("--masks", nargs="+", default=["fisher", "random"], choices=["fisher", "random", "magnitude"])
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `edge-zo tune` flags, e.g. --lr 3e-4")
    ap.add_argument("--out", default=None, help="write the results as JSON here too")
    args = ap.parse_args()

    fisher_model, train, valid, _ = demo.prepare()
    task = Path(train).parent
    test = task / "test.jsonl"
    work = corpora.cache_root().parent / "bench" / "mask_tune"
    splits = {"fisher": Path(fisher_model).parent}
    for mask in args.masks:
        if mask != "fisher":
            splits[mask] = work / f"smollm2-{mask}"
            if not (splits[mask] / "sidecar.gguf").is_file():
                edge_zo("convert", str(demo.smollm2_gguf()), "-o", str(splits[mask]), "--mask", mask,
                        "--calib-tokens", str(demo.CALIB_TOKENS))

    rows = []
    for mask in args.masks:
        model, sidecar = str(splits[mask] / "model.gguf"), str(splits[mask] / "sidecar.gguf")
        before = evaluate(model, test, [sidecar], args.max_tokens)
        for seed in args.seeds:
            run = work / f"run-{mask}-s{seed}-{args.steps}"
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
                "run": str(run),
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
    result = {"model": "SmolLM2-135M-Instruct Q4_1", "task": str(task), "test_examples": before["examples"],
              "cpu_threads": os.cpu_count(), "extra_flags": args.extra, "rows": rows, "summary": summary}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
