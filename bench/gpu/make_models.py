"""Random-weight Q4_0 llamas of real shapes, written in seconds, for the GPU runs.

    python -m bench.gpu.make_models smollm2 out.gguf --tokenizer smollm2-vocab.gguf
    python -m bench.gpu.make_models llama2-7b out.gguf --tokenizer ggml-vocab-llama-spm.gguf

No real model fits the device machine's carry limit, and quantizing 6.7B random
floats in numpy takes minutes, so the Q4_0 blocks are drawn directly: a fixed
scale d and uniform random nibbles q, i.e. weights (q - 8)·d with standard
deviation 0.02, the same as converters/synthetic.py's N(0, 0.02). Tensors are
streamed to the file one at a time (the 7B shape is 3.8 GB). The tokenizer
(and so the vocabulary size) comes from any GGUF's tokenizer.* fields; see
bench/gpu/prepare_carry.sh for the two tokenizer-only files we carry.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np

from converters.synthetic import LlamaShape, llama_writer, vocab_size
from edge_zo.atomic import atomic_path

SHAPES = {
    "smollm2": LlamaShape(n_embd=576, n_layer=30, n_head=9, n_head_kv=3, n_ff=1536, n_ctx=8192, tied=True),
    "llama2-7b": LlamaShape.llama2_7b(),
    "tiny": LlamaShape(),
}
Q4_0 = gguf.GGMLQuantizationType.Q4_0
BLOCK, BLOCK_BYTES = 32, 18          # Q4_0: 32 weights in an f16 scale + 16 bytes of nibbles
SCALE = np.float16(0.02 / np.sqrt((16 * 16 - 1) / 12))   # std of (q - 8) for uniform q in 0..15


def tensor_plan(shape: LlamaShape, n_vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) in file order; 2-D tensors are Q4_0, 1-D ones F32."""
    hd = shape.n_embd // shape.n_head
    kv = shape.n_head_kv * hd
    plan = [("token_embd.weight", (n_vocab, shape.n_embd)), ("output_norm.weight", (shape.n_embd,))]
    if not shape.tied:
        plan.append(("output.weight", (n_vocab, shape.n_embd)))
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (shape.n_embd,)), (b + "attn_q.weight", (shape.n_embd, shape.n_embd)),
                 (b + "attn_k.weight", (kv, shape.n_embd)), (b + "attn_v.weight", (kv, shape.n_embd)),
                 (b + "attn_output.weight", (shape.n_embd, shape.n_embd)), (b + "ffn_norm.weight", (shape.n_embd,)),
                 (b + "ffn_gate.weight", (shape.n_ff, shape.n_embd)), (b + "ffn_up.weight", (shape.n_ff, shape.n_embd)),
                 (b + "ffn_down.weight", (shape.n_embd, shape.n_ff))]
    return plan


def random_q4_0(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """Q4_0 bytes of shape (n_out, n_in / 32 * 18)."""
    blocks = np.empty((n_out * n_in // BLOCK, BLOCK_BYTES), np.uint8)
    blocks[:, :2] = np.frombuffer(SCALE.tobytes(), np.uint8)
    blocks[:, 2:] = np.frombuffer(rng.bytes(blocks.shape[0] * 16), np.uint8).reshape(-1, 16)
    return blocks.reshape(n_out, -1)


def write(path: str | Path, shape: LlamaShape, tokenizer_from: str | Path, seed: int = 0) -> Path:
    for n in (shape.n_embd, shape.n_ff):
        if n % BLOCK:
            raise ValueError(f"Q4_0 needs widths divisible by {BLOCK}, got {n}")
    path = Path(path)
    with atomic_path(path) as tmp:
        _write(tmp, shape, tokenizer_from, seed)
    return path


def _write(path: Path, shape: LlamaShape, tokenizer_from: str | Path, seed: int) -> None:
    w = llama_writer(path, shape, tokenizer_from, "edge-zo random Q4_0 llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    plan = tensor_plan(shape, vocab_size(tokenizer_from))
    for name, s in plan:
        if len(s) == 1:
            w.add_tensor_info(name, s, np.dtype(np.float32), s[0] * 4)
        else:
            w.add_tensor_info(name, (s[0], s[1] // BLOCK * BLOCK_BYTES), np.dtype(np.uint8),
                              s[0] * s[1] // BLOCK * BLOCK_BYTES, raw_dtype=Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, s in plan:
        w.write_tensor_data(np.ones(s, np.float32) if len(s) == 1 else random_q4_0(rng, *s))
    w.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--tokenizer", required=True, help="any GGUF with tokenizer.* fields")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t = time.perf_counter()
    path = write(args.out, SHAPES[args.shape], args.tokenizer, args.seed)
    print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
