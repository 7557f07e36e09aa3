"""Random-weight llama-family GGUF models of any shape, with a real tokenizer.

No tiny pretrained model ships on the registries, and the device machine can
carry no real 7B model, so tests and benchmarks write models of the shape they
need: random N(0, 0.02) weights, the tokenizer (and chat template) copied from
a real GGUF so that text round-trips, block matmuls in any type gguf-py can
quantize (F32, F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_zo.gguf_io import copy_fields, read_header


@dataclass(frozen=True)
class LlamaShape:
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx: int = 2048
    tied: bool = True            # output projection reuses token_embd.weight

    @classmethod
    def llama2_7b(cls) -> "LlamaShape":
        return cls(n_embd=4096, n_layer=32, n_head=32, n_head_kv=32, n_ff=11008, n_ctx=4096, tied=False)


def random_weights(shape: LlamaShape, n_vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Name -> float32 array in numpy order (n_out, n_in)."""
    rng = np.random.default_rng(seed)
    hd = shape.n_embd // shape.n_head
    kv = shape.n_head_kv * hd

    def w(*s):
        return (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float32)

    out = {"token_embd.weight": w(n_vocab, shape.n_embd),
           "output_norm.weight": np.ones(shape.n_embd, np.float32)}
    if not shape.tied:
        out["output.weight"] = w(n_vocab, shape.n_embd)
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        out |= {
            b + "attn_norm.weight": np.ones(shape.n_embd, np.float32),
            b + "attn_q.weight": w(shape.n_embd, shape.n_embd),
            b + "attn_k.weight": w(kv, shape.n_embd),
            b + "attn_v.weight": w(kv, shape.n_embd),
            b + "attn_output.weight": w(shape.n_embd, shape.n_embd),
            b + "ffn_norm.weight": np.ones(shape.n_embd, np.float32),
            b + "ffn_gate.weight": w(shape.n_ff, shape.n_embd),
            b + "ffn_up.weight": w(shape.n_ff, shape.n_embd),
            b + "ffn_down.weight": w(shape.n_embd, shape.n_ff),
        }
    return out


def llama_writer(path: str | Path, shape: LlamaShape, tokenizer_from: str | Path,
                 name: str = "edge-zo synthetic llama") -> gguf.GGUFWriter:
    """A GGUFWriter holding a llama's hyperparameters for `shape` and the tokenizer.* fields of `tokenizer_from`."""
    w = gguf.GGUFWriter(Path(path), "llama")
    w.add_name(name)
    w.add_context_length(shape.n_ctx)
    w.add_embedding_length(shape.n_embd)
    w.add_block_count(shape.n_layer)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(shape.n_embd // shape.n_head)
    copy_fields(read_header(tokenizer_from), w, keep=lambda key: key.startswith("tokenizer."))
    return w


def write_llama(path: str | Path, shape: LlamaShape, weights: dict[str, np.ndarray], tokenizer_from: str | Path,
                matmul_type: str = "F32", embd_type: str = "F32") -> Path:
    """Write `weights` as a llama GGUF; 2-D weights in blocks use `matmul_type`."""
    path = Path(path)
    w = llama_writer(path, shape, tokenizer_from)
    for name, arr in weights.items():
        qname = embd_type if name in ("token_embd.weight", "output.weight") else matmul_type
        if arr.ndim == 1:
            qname = "F32"
        add_tensor(w, name, arr, qname)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_tensor(w: gguf.GGUFWriter, name: str, arr: np.ndarray, type_name: str) -> None:
    qtype = gguf.GGMLQuantizationType[type_name]
    if qtype == gguf.GGMLQuantizationType.F32:
        w.add_tensor(name, arr.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        w.add_tensor(name, arr.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)


def vocab_size(tokenizer_from: str | Path) -> int:
    return len(read_header(tokenizer_from).get("tokenizer.ggml.tokens"))
