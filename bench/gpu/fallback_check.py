"""The generic fallback (host copies of device tensors) on real device buffers.

Metal and Vulkan take this path; no such machine is at hand, so this runs a build
*without* the CUDA kernels (EDGE_ZO_CUDA=0) against a CUDA llama.cpp, where CUDA
buffers take the same path: deltas through ggml_backend_tensor_get/set must act
like edited weights, and the one-time note must be in the log.

    EDGE_ZO_TOKENIZER=tok.gguf python -m bench.gpu.fallback_check     # run_device.sh's `fallback` stage
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from converters.synthetic import LlamaShape, random_weights, vocab_size, write_llama
from edge_zo._native import HAS_CUDA
from edge_zo.adapter import SparseAdapter
from edge_zo.dataset import Example
from edge_zo.runtime import Runtime, RuntimeOptions


def main() -> int:
    if HAS_CUDA:
        print("fallback check: this build has the CUDA kernels; build with EDGE_ZO_CUDA=0 to check the fallback")
        return 2
    tok = Path(os.environ["EDGE_ZO_TOKENIZER"])
    shape = LlamaShape(tied=False)
    weights = random_weights(shape, vocab_size(tok), seed=2)
    rng = np.random.default_rng(5)
    names = ["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.1.attn_v.weight"]
    edits = {}
    for n in names:
        n_out, n_in = weights[n].shape
        idx = np.unique(rng.integers(0, n_out, 24).astype(np.int64) * n_in + rng.integers(0, n_in, 24))
        edits[n] = (idx, rng.choice([-4.0, 4.0], len(idx)).astype(np.float32))
    opts = RuntimeOptions(batch_size=4, max_tokens=64, kv_f32=True, gpu_layers=99)
    with tempfile.TemporaryDirectory() as d:
        base_path = write_llama(Path(d) / "base.gguf", shape, weights, tok)
        edited_w = {k: v.copy() for k, v in weights.items()}
        for n, (idx, val) in edits.items():
            np.add.at(edited_w[n].reshape(-1), idx, val)
        edited_path = write_llama(Path(d) / "edited.gguf", shape, edited_w, tok)
        ex = []
        for _ in range(4):
            tg = np.ones(48, np.uint8)
            tg[0] = 0
            ex.append(Example(rng.integers(0, vocab_size(tok), 48).astype(np.int32), tg))
        with Runtime(base_path, opts) as rt:
            base = float(rt.loss(ex).nll.sum())
            rt.attach(SparseAdapter.from_weights("llama", edits))
            via = float(rt.loss(ex).nll.sum())
            counts = rt.native.path_counts
        with Runtime(edited_path, opts) as rt:
            edited = float(rt.loss(ex).nll.sum())
    effect = abs(edited - base)
    ok = counts["fallback"] > 0 and counts["cuda"] == 0 and effect > 1e-2 and abs(via - edited) <= 0.02 * effect
    print(f"fallback check: effect {effect:.4f}, adapter - edited {via - edited:+.2e}, counts {counts}: "
          f"{'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
