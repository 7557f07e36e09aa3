"""What a shared KV cache changes in the losses: batched against one-by-one, per cache mode.

    python -m bench.gpu.unified_check --model m.gguf [--gpu-layers 99]

With a cache per sequence (kv_unified off) llama.cpp gives every sequence its own cells; with
one shared cache (the runtime's choice on a GPU below 256 tokens per sequence) a sequence's
attention also runs over the other sequences' cells, masked out, and its own cells sit at
another offset than when it is alone. This measures, for 16 random sequences of 16 to 64
tokens (every token after the first a target) with a random 0.1% adapter attached, the summed
NLL per sequence evaluated as one batch and one sequence at a time, in both modes, and the
difference between the two modes' batched losses. One JSON object is printed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_zo.dataset import Example
from edge_zo.runtime import Runtime, RuntimeOptions

from .._common import random_adapter, write_json


def examples(n_vocab: int, n: int, lo: int, hi: int, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(lo, hi + 1))
        tg = np.ones(k, np.uint8)
        tg[0] = 0
        out.append(Example(rng.integers(0, n_vocab, k).astype(np.int32), tg))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu-layers", type=int, default=99)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    result = {"model": Path(args.model).name, "gpu_layers": args.gpu_layers, "seqs": args.seqs, "tokens": args.tokens}
    together = {}
    for unified in (False, True):
        opts = RuntimeOptions(batch_size=args.seqs, max_tokens=args.tokens, gpu_layers=args.gpu_layers,
                              kv_unified=unified)
        with Runtime(args.model, opts) as rt:
            ex = examples(rt.native.n_vocab, args.seqs, args.tokens // 4, args.tokens)
            rt.attach(random_adapter(rt.info, 0.001))
            both = rt.loss(ex).nll
            alone = np.array([rt.loss([e]).nll[0] for e in ex])
            again = rt.loss(ex).nll
        key = "unified" if unified else "per_sequence"
        rel = np.abs(both - alone) / np.abs(alone)
        result[key] = {"ubatch": rt.context_params.n_ubatch,
                       "batched_equals_alone": int(np.sum(both == alone)),
                       "max_rel_diff_batched_vs_alone": float(rel.max()),
                       "median_rel_diff_batched_vs_alone": float(np.median(rel)),
                       "batched_repeatable": bool(np.array_equal(both, again)),
                       "nll_sum_batched": float(both.sum()), "nll_sum_alone": float(alone.sum())}
        together[key] = both
    result["max_rel_diff_unified_vs_per_sequence_batched"] = float(
        (np.abs(together["unified"] - together["per_sequence"]) / np.abs(together["per_sequence"])).max())
    if args.out:
        write_json(Path(args.out), result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
