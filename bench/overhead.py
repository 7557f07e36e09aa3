"""What the sparse path costs: llama.cpp's forward with a 0.1% adapter on every block matmul
against the plain forward, and a tune step against two plain forwards, side by side in one run,
on the CPU or on a GPU (--gpu-layers).

    python -m bench.overhead                                         # SmolLM2-135M, 16 x 64 tokens of text
    python -m bench.overhead --model m.gguf --gpu-layers 99 --random-tokens --rounds 15 --steps 10

Three arms share one context and one batch, in alternating rounds so that machine noise
falls on them alike:
  plain   no adapter: the eval callback declines every node, llama.cpp runs its graph unsplit;
  split   a slot with no entries on every block matmul: the scheduler stops and synchronizes at
          each of them but nothing is added (the cost of the callback alone);
  sparse  a random `--density` adapter on every block matmul (values N(0, 1e-3)).
Each arm is timed twice a round: as tuning uses it (every token after the first a target, so
the loss call also scores every row of logits on the host) and, `*_fwd`, with only each
sequence's last token a target (the forward nearly alone). Then `--steps` real SPSA steps
(edge_zo.spsa, as `edge-zo tune` takes them) against two plain forwards of the same batch, and
the share of a step spent outside the forwards (direction, perturbation, restore, update).
Where nvidia-smi answers, GPU memory is sampled every 50 ms (the device's memory in use, CUDA
context included): the peak of the plain arm's warm-up (llama.cpp alone) and of the whole run.
One JSON object is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from edge_zo import spsa
from edge_zo._native import HAS_CUDA
from edge_zo.runtime import Runtime, RuntimeOptions
from edge_zo.spsa import Optimizer, OptimizerState

from ._common import last_target_only, random_adapter, random_batch, smollm2, text_batch, write_json

EPS, LR = 1e-2, 1e-4   # the step's time does not depend on them


class GpuMemory:
    """Peak of nvidia-smi's memory.used (MiB) while the sampler runs; nothing where there is no nvidia-smi."""

    def __init__(self, period: float = 0.05):
        self.period, self.peak, self.samples = period, 0, 0
        self.baseline = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> int | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return max(int(v) for v in out.split())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None

    def _run(self):
        while not self._stop.is_set():
            v = self.read()
            if v is not None:
                self.peak, self.samples = max(self.peak, v), self.samples + 1
            self._stop.wait(self.period)

    def __enter__(self):
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def time_arms(rt: Runtime, batch, batch_fwd, adapter, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """{arm: [(loss-call seconds, forward-only seconds) per round]}."""
    empty = {name: np.zeros(0, np.float32) for name in rt.info.block_matmul_weights()}

    def timed() -> tuple[float, float]:
        t = time.perf_counter()
        rt.loss(batch)
        t1 = time.perf_counter()
        rt.loss(batch_fwd)
        return t1 - t, time.perf_counter() - t1

    def split() -> tuple[float, float]:
        slots = [rt.native.add_sparse(n, rt.info.tensors[n].shape, np.zeros(0, np.int64), v) for n, v in empty.items()]
        try:
            return timed()
        finally:
            for s in slots:
                rt.native.remove_sparse(s)

    def sparse() -> tuple[float, float]:
        att = rt.attach(adapter)
        try:
            rt.loss(batch_fwd)  # the first forward after attaching uploads the coordinates: not timed
            return timed()
        finally:
            rt.detach(att)

    arms = {"plain": timed, "split": split, "sparse": sparse}
    for arm in arms.values():   # warm up: weights paged in, graphs (and CUDA graphs) built
        arm()
    times = {name: [] for name in arms}
    for _ in range(rounds):
        for name, arm in arms.items():
            times[name].append(arm())
    return times


def time_steps(rt: Runtime, batch, adapter, steps: int, optimizer: Optimizer) -> dict[str, list[float]]:
    """Per step: the tune step, two plain forwards of its batch, and everything of the step but the forwards."""
    theta = adapter.values.copy()
    state = OptimizerState.create(optimizer, len(theta))
    out = {"step": [], "two_plain": [], "other": []}
    for step in range(steps):
        t = time.perf_counter()
        rt.loss(batch)
        rt.loss(batch)
        out["two_plain"].append(time.perf_counter() - t)
        att = rt.attach(adapter)
        rt.loss(batch[:1])  # the first forward after attaching uploads the coordinates: not timed
        t = time.perf_counter()
        z = spsa.direction(0, step, len(theta))
        est = spsa.estimate(adapter.values, theta, z, EPS, lambda: rt.loss(batch).mean)
        spsa.take_step(theta, state, [est.g], seed=0, step=step, lr=LR)
        adapter.values[:] = theta
        out["step"].append(time.perf_counter() - t)
        rt.detach(att)
        scratch, th = adapter.values.copy(), theta.copy()   # the same step with a loss that costs nothing
        st = OptimizerState.create(optimizer, len(th))
        t = time.perf_counter()
        z = spsa.direction(0, step, len(th))
        e = spsa.estimate(scratch, th, z, EPS, lambda: 0.0)
        spsa.take_step(th, st, [e.g + est.g], seed=0, step=step, lr=LR)
        out["other"].append(time.perf_counter() - t)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--random-tokens", action="store_true",
                    help="random token ids instead of the calibration text (a machine without the corpora)")
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=7, help="tune steps timed (0: none)")
    ap.add_argument("--optimizer", default="sgd", choices=[o.value for o in Optimizer])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ubatch", type=int, default=0,
                    help="tokens per graph (default: the runtime's own choice); each graph stops at every block matmul")
    ap.add_argument("--kv-unified", choices=["auto", "0", "1"], default="auto",
                    help="one KV cache for the batch (1) or one per sequence (0); auto: the runtime's own choice")
    ap.add_argument("--verbose", action="store_true", help="pass llama.cpp's log through (buffer sizes)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    model = str(args.model or smollm2())

    opts = RuntimeOptions(batch_size=args.seqs, max_tokens=args.tokens, threads=args.threads,
                          gpu_layers=args.gpu_layers, verbose=args.verbose, ubatch=args.ubatch,
                          kv_unified=None if args.kv_unified == "auto" else args.kv_unified == "1")
    with GpuMemory() as mem:
        t_load = time.perf_counter()
        with Runtime(model, opts) as rt:
            t_load = time.perf_counter() - t_load
            if args.random_tokens:
                batch = random_batch(rt.native.n_vocab, args.seqs, args.tokens)
            else:
                batch = text_batch(rt, args.seqs, args.tokens)
            batch_fwd = last_target_only(batch)
            adapter = random_adapter(rt.info, args.density)
            rt.loss(batch)
            plain_peak = mem.peak
            times = time_arms(rt, batch, batch_fwd, adapter, args.rounds)
            counts_after_timing = rt.native.path_counts
            steps = time_steps(rt, batch, adapter, args.steps, Optimizer(args.optimizer)) if args.steps else {}
            counts = rt.native.path_counts
            ctx = rt.context_params

    def med(arm, i=0):
        return statistics.median(x[i] for x in times[arm])

    step_s = statistics.median(steps["step"]) if steps else None
    result = {
        "model": Path(model).name, "gpu_layers": args.gpu_layers, "cuda_kernels_built": HAS_CUDA,
        "threads": args.threads or os.cpu_count(), "ubatch": ctx.n_ubatch, "kv_unified": ctx.kv_unified,
        "seqs": args.seqs, "tokens": args.tokens, "text": not args.random_tokens, "density": args.density,
        "sparse_params": adapter.n_params, "matrices": len(adapter.names), "rounds": args.rounds, "load_s": t_load,
        "plain_median_s": med("plain"), "split_median_s": med("split"), "sparse_median_s": med("sparse"),
        "ratio": med("sparse") / med("plain"), "ratio_split_only": med("split") / med("plain"),
        "ratio_of_minima": min(x[0] for x in times["sparse"]) / min(x[0] for x in times["plain"]),
        "plain_fwd_median_s": med("plain", 1), "split_fwd_median_s": med("split", 1),
        "sparse_fwd_median_s": med("sparse", 1),
        "ratio_fwd": med("sparse", 1) / med("plain", 1), "ratio_fwd_split_only": med("split", 1) / med("plain", 1),
        "plain_tokens_per_s": args.seqs * args.tokens / med("plain", 1),
        "optimizer": args.optimizer, "tune_step_median_s": step_s, "steps_per_s": 1 / step_s if steps else None,
        "two_plain_forwards_median_s": statistics.median(steps["two_plain"]) if steps else None,
        "step_over_two_plain_forwards": step_s / statistics.median(steps["two_plain"]) if steps else None,
        "step_share_outside_forwards": statistics.median(steps["other"]) / step_s if steps else None,
        "path_counts_after_timing": counts_after_timing, "path_counts": counts,
        "gpu_mem_baseline_mib": mem.baseline, "gpu_mem_plain_peak_mib": plain_peak or None,
        "gpu_mem_peak_mib": mem.peak or None, "gpu_mem_samples": mem.samples,
    }
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
