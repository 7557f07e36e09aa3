"""An SPSA step's losses in one llama_decode (perturbation groups) against one decode per value
set (the path before them), and the grouped decode against one plain forward of the same rows,
side by side in one run, on the CPU or on a GPU (--gpu-layers).

    python -m bench.step_groups                                    # SmolLM2-135M, 8 and 16 x 64 tokens, Q = 1 and 4
    python -m bench.step_groups --model m.gguf --gpu-layers 99 --random-tokens --rounds 9

For each batch shape (--shapes SEQSxTOKENS) and direction count Q (--directions), one context
sized for 2Q value sets of the batch runs three arms in alternating rounds, so machine noise falls
on them alike:
  separate  the 2Q value sets (θ±εz per direction) one decode each, written into the live buffer;
  grouped   the same 2Q sets in one call (Runtime.losses with ValueSets: one decode where they fit);
  plain     the 2Q copies of the batch in one decode with no adapter attached (llama.cpp alone).
Losses are taken at each sequence's last token, as the choices objective reads them. It prints,
per cell, the medians, `speedup` (separate / grouped: the steps/s ratio) and `over_plain`
(grouped / plain: what the sparse path and its groups cost over llama.cpp's own forward), and the
largest difference between the grouped and separate losses of a round. One JSON object.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from edge_zo._native import HAS_CUDA
from edge_zo.runtime import Runtime, RuntimeOptions, ValueSets

from ._common import emit, last_target_only, random_adapter, random_batch, smollm2, text_batch

EPS = 1e-2   # the time does not depend on it


def time_cell(model: str, args, seqs: int, tokens: int, q: int) -> dict:
    opts = RuntimeOptions(batch_size=seqs, max_tokens=tokens, threads=args.threads, gpu_layers=args.gpu_layers,
                          groups=2 * q, verbose=args.verbose)
    with Runtime(model, opts) as rt:
        batch = random_batch(rt.native.n_vocab, seqs, tokens) if args.random_tokens else text_batch(rt, seqs, tokens)
        batch = last_target_only(batch)
        adapter = random_adapter(rt.info, args.density)
        theta = adapter.values.copy()
        rng = np.random.default_rng(0)
        sets = []
        for _ in range(q):
            z = rng.standard_normal(len(theta)).astype(np.float32)
            sets += [theta + np.float32(EPS) * z, theta - np.float32(EPS) * z]
        live = adapter.values

        def separate():
            out = []
            for s in sets:
                live[:] = s
                out.append(rt.loss(batch).mean)
            live[:] = theta
            return out

        def grouped():
            return [r.mean for r in rt.losses(batch, ValueSets(live, sets))]

        def plain():
            rt.loss(batch * (2 * q))

        times = {"separate": [], "grouped": [], "plain": []}
        plain()                                  # warm-up: weights paged in, graphs built
        att = rt.attach(adapter)
        separate(), grouped()                    # warm-up: coordinates uploaded
        decodes = rt.native.decode_count
        grouped()
        decodes = rt.native.decode_count - decodes
        worst = 0.0
        for _ in range(args.rounds):
            t = time.perf_counter()
            a = separate()
            times["separate"].append(time.perf_counter() - t)
            t = time.perf_counter()
            b = grouped()
            times["grouped"].append(time.perf_counter() - t)
            worst = max(worst, float(np.max(np.abs(np.array(a) - np.array(b)))))
            rt.detach(att)
            t = time.perf_counter()
            plain()
            times["plain"].append(time.perf_counter() - t)
            att = rt.attach(adapter)
            rt.loss(batch[:1])                   # the first forward after attaching uploads the coordinates
        rt.detach(att)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seqs": seqs, "tokens": tokens, "directions": q, "value_sets": 2 * q, "grouped_decodes": decodes,
            **{f"{k}_median_s": v for k, v in med.items()},
            "speedup": med["separate"] / med["grouped"], "over_plain": med["grouped"] / med["plain"],
            "max_loss_difference": worst}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--shapes", nargs="+", default=["8x64", "16x64"], help="batches as SEQSxTOKENS")
    ap.add_argument("--directions", type=int, nargs="+", default=[1, 4], help="Q: 2Q value sets a step")
    ap.add_argument("--random-tokens", action="store_true",
                    help="random token ids instead of the calibration text (a machine without the corpora)")
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="pass llama.cpp's log through")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    model = str(args.model or smollm2())
    cells = []
    for shape in args.shapes:
        seqs, tokens = (int(v) for v in shape.lower().split("x"))
        for q in args.directions:
            cells.append(time_cell(model, args, seqs, tokens, q))
    return emit({"model": Path(model).name, "gpu_layers": args.gpu_layers, "cuda_kernels_built": HAS_CUDA,
                 "threads": args.threads or os.cpu_count(), "density": args.density, "rounds": args.rounds,
                 "text": not args.random_tokens, "cells": cells}, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
