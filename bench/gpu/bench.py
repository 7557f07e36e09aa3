"""Sparse-path overhead on a GPU: forward time with a 0.1% adapter on every block
matmul over plain llama.cpp forward time, plus tune steps/s and peak GPU memory.

    python bench/gpu/bench.py --model m.gguf --gpu-layers 99 --seqs 16 --tokens 64 --rounds 15

Three arms share one context and one batch of random tokens, in alternating rounds:
  plain   no adapter: the eval callback declines every node, llama.cpp runs its graph unsplit;
  split   a slot with no entries on every block matmul: the scheduler stops and synchronizes
          at each of them but nothing is added (the cost of the callback alone);
  sparse  a random `--density` adapter on every block matmul (values N(0, 1e-3)).
Each arm is timed twice per round: as tuning uses it (every token after the first
is a target: the loss call also copies 16 x 63 rows of logits to the host and
scores them, the same work in every arm), and with only each sequence's last
token a target (`*_fwd`: the forward pass alone, nearly). Then `--steps` real
SPSA steps (edge_zo.spsa, as edge-zo tune takes them) give steps/s.
GPU memory is sampled with nvidia-smi every 50 ms (the device's memory in use,
CUDA context included): the peak of the plain arm's warm-up (llama.cpp alone)
and of the whole run. One JSON object is printed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edge_zo import spsa  # noqa: E402
from edge_zo._native import HAS_CUDA  # noqa: E402
from edge_zo.adapter import SparseAdapter  # noqa: E402
from edge_zo.dataset import Example  # noqa: E402
from edge_zo.runtime import Runtime, RuntimeOptions  # noqa: E402
from edge_zo.spsa import Optimizer, OptimizerState  # noqa: E402


class GpuMemory:
    """Peak of nvidia-smi's memory.used (MiB) over the lifetime of the sampler."""

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


def random_batch(n_vocab: int, n_seqs: int, n_tokens: int, seed: int = 0, last_only: bool = False) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_seqs):
        tg = np.zeros(n_tokens, np.uint8)
        tg[-1 if last_only else 1:] = 1
        out.append(Example(rng.integers(0, n_vocab, n_tokens).astype(np.int32), tg))
    return out


def random_adapter(rt: Runtime, density: float, seed: int = 0, scale: float = 1e-3) -> SparseAdapter:
    rng = np.random.default_rng(seed)
    weights = {}
    for name in rt.info.block_matmul_weights():
        n = rt.info.tensors[name].n_elements
        idx = rng.choice(n, max(1, int(n * density)), replace=False)
        weights[name] = (idx, (rng.standard_normal(len(idx)) * scale).astype(np.float32))
    return SparseAdapter.from_weights(rt.info.architecture, weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu-layers", type=int, default=99)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="SPSA steps timed for steps/s (0: none)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ubatch", type=int, default=0,
                    help="tokens per graph (default: the runtime's own choice); each graph stops at every block matmul")
    ap.add_argument("--kv-unified", choices=["auto", "0", "1"], default="auto",
                    help="one KV cache for the batch (1) or one per sequence (0); auto: the runtime's own choice")
    ap.add_argument("--verbose", action="store_true", help="pass llama.cpp's log through (buffer sizes)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    opts = RuntimeOptions(batch_size=args.seqs, max_tokens=args.tokens, threads=args.threads,
                          gpu_layers=args.gpu_layers, verbose=args.verbose, ubatch=args.ubatch,
                          kv_unified=None if args.kv_unified == "auto" else args.kv_unified == "1")
    with GpuMemory() as mem:
        t_load = time.perf_counter()
        rt = Runtime(args.model, opts)
        t_load = time.perf_counter() - t_load
        with rt:
            batch = random_batch(rt.native.n_vocab, args.seqs, args.tokens)
            batch_fwd = random_batch(rt.native.n_vocab, args.seqs, args.tokens, last_only=True)
            adapter = random_adapter(rt, args.density)
            empty = {name: np.zeros(0, np.float32) for name in rt.info.block_matmul_weights()}

            def timed() -> tuple[float, float]:
                t = time.perf_counter()
                rt.loss(batch)
                t1 = time.perf_counter()
                rt.loss(batch_fwd)
                return t1 - t, time.perf_counter() - t1

            def with_empty_slots() -> tuple[float, float]:
                slots = [rt.native.add_sparse(n, rt.info.tensors[n].shape, np.zeros(0, np.int64), v)
                         for n, v in empty.items()]
                try:
                    return timed()
                finally:
                    for s in slots:
                        rt.native.remove_sparse(s)

            def with_adapter() -> tuple[float, float]:
                att = rt.attach(adapter)
                try:
                    rt.loss(batch_fwd)  # the first forward after attaching uploads the coordinates: not timed
                    return timed()
                finally:
                    rt.detach(att)

            for _ in range(2):  # warm up: weights paged in, graphs and CUDA graphs built
                timed()
            plain_peak = mem.peak
            for _ in range(2):
                with_empty_slots(), with_adapter()
            plain, split, sparse = [], [], []
            for _ in range(args.rounds):
                plain.append(timed())
                split.append(with_empty_slots())
                sparse.append(with_adapter())
            counts_before = rt.native.path_counts

            steps = []
            if args.steps:
                att = rt.attach(adapter)
                theta = adapter.values.copy()
                state = OptimizerState.create(Optimizer.SGD, len(theta))
                rt.loss(batch)
                for step in range(args.steps):
                    t = time.perf_counter()
                    z = spsa.direction(0, step, len(theta))
                    est = spsa.estimate(adapter.values, theta, z, 1e-2, lambda: rt.loss(batch).mean)
                    spsa.take_step(theta, state, [est.g], seed=0, step=step, lr=1e-4)
                    adapter.values[:] = theta
                    steps.append(time.perf_counter() - t)
                rt.detach(att)
            counts = rt.native.path_counts
    def med(xs, i=0):
        return statistics.median(x[i] if isinstance(x, tuple) else x for x in xs)

    result = {
        "model": Path(args.model).name, "gpu_layers": args.gpu_layers, "cuda_kernels_built": HAS_CUDA,
        "ubatch": rt.context_params.n_ubatch, "kv_unified": rt.context_params.kv_unified,
        "seqs": args.seqs, "tokens": args.tokens, "density": args.density,
        "sparse_params": adapter.n_params, "matrices": len(adapter.names), "rounds": args.rounds,
        "load_s": t_load,
        "plain_median_s": med(plain), "split_median_s": med(split), "sparse_median_s": med(sparse),
        "ratio": med(sparse) / med(plain), "ratio_split_only": med(split) / med(plain),
        "ratio_of_minima": min(x[0] for x in sparse) / min(x[0] for x in plain),
        "plain_fwd_median_s": med(plain, 1), "split_fwd_median_s": med(split, 1),
        "sparse_fwd_median_s": med(sparse, 1),
        "ratio_fwd": med(sparse, 1) / med(plain, 1), "ratio_fwd_split_only": med(split, 1) / med(plain, 1),
        "plain_tokens_per_s": args.seqs * args.tokens / med(plain, 1),
        "tune_step_median_s": med(steps) if steps else None,
        "steps_per_s": 1 / med(steps) if steps else None,
        "path_counts_after_timing": counts_before, "path_counts": counts,
        "gpu_mem_baseline_mib": mem.baseline, "gpu_mem_plain_peak_mib": plain_peak or None,
        "gpu_mem_peak_mib": mem.peak or None,
        "gpu_mem_peak_over_baseline_gib": (mem.peak - mem.baseline) / 1024 if mem.peak else None,
        "gpu_mem_samples": mem.samples,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
