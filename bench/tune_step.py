"""Cost of one tune step against two plain llama.cpp forward passes over the
same batch, measured side by side in one run.

    python bench/tune_step.py                          # SmolLM2-135M, 16 x 64 tokens, 0.1%
    python bench/tune_step.py --model m.gguf --rounds 9

The step is the real one from edge_zo.trainer: direction from (seed, step),
two perturbed forwards through the sparse path, the update, the restore. The
plain arm is two forwards with no adapter attached. Rounds alternate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sparse_overhead import default_model, random_adapter, text_batch  # noqa: E402

from edge_zo import spsa  # noqa: E402
from edge_zo.runtime import Runtime, RuntimeOptions  # noqa: E402
from edge_zo.spsa import Optimizer, OptimizerState  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--optimizer", default="sgd", choices=[o.value for o in Optimizer])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gpu-layers", type=int, default=0)
    args = ap.parse_args()
    model = args.model or default_model()

    with Runtime(model, RuntimeOptions(batch_size=args.seqs, max_tokens=args.tokens, threads=args.threads,
                                       gpu_layers=args.gpu_layers)) as rt:
        batch = text_batch(rt, args.seqs, args.tokens)
        adapter = random_adapter(rt, args.density, seed=0)
        theta = adapter.values.copy()
        state = OptimizerState.create(Optimizer(args.optimizer), len(theta))
        rt.loss(batch)
        plain, step_t, other = [], [], []
        for step in range(args.rounds):
            t = time.perf_counter()
            rt.loss(batch)
            rt.loss(batch)
            plain.append(time.perf_counter() - t)
            att = rt.attach(adapter)
            t = time.perf_counter()
            z = spsa.direction(0, step, len(theta))
            est = spsa.estimate(adapter.values, theta, z, 1e-2, lambda: rt.loss(batch).mean)
            spsa.take_step(theta, state, [est.g], seed=0, step=step, lr=1e-4)
            adapter.values[:] = theta
            step_t.append(time.perf_counter() - t)
            rt.detach(att)
            # Everything but the forwards: direction, perturb, restore, update.
            scratch, th = adapter.values.copy(), theta.copy()
            st = OptimizerState.create(Optimizer(args.optimizer), len(th))
            t = time.perf_counter()
            z = spsa.direction(0, step, len(th))
            e = spsa.estimate(scratch, th, z, 1e-2, lambda: 0.0)
            spsa.take_step(th, st, [e.g + est.g], seed=0, step=step, lr=1e-4)
            other.append(time.perf_counter() - t)
    result = {
        "model": Path(model).name, "seqs": args.seqs, "tokens": args.tokens, "sparse_params": int(len(theta)),
        "optimizer": args.optimizer, "two_plain_forwards_median_s": statistics.median(plain),
        "tune_step_median_s": statistics.median(step_t),
        "ratio": statistics.median(step_t) / statistics.median(plain),
        "optimizer_share": statistics.median(other) / statistics.median(step_t),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
