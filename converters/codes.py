"""Editing single weights inside llama.cpp's quantized blocks, without re-quantizing.

In every block type below, one weight's value is affine in its own integer code
(Q4_0: d*(q-8); Q4_1: d*q+m; Q4_K: d*sc*q - dmin*m; ...) and the block's scales
do not depend on it. So a weight can be moved to the representable value
nearest zero by rewriting only its code bits: every other weight in the file
keeps its exact bytes. That is how `--split zero` treats a source that is
already 4-bit (including K-quants, which gguf-py cannot quantize): the dense
model holds the nearest-to-zero code, the sidecar holds the rest of the value.

Bit layouts follow ggml's block structs (ggml-common.h) and gguf-py's
dequantizers, which the tests hold this module to.
"""
from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

from edge_zo.errors import InvalidInputError

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class Part:
    byte: np.ndarray    # byte offset inside the block, per element
    shift: np.ndarray   # bit shift inside that byte, per element
    bits: int           # how many bits of the code this part holds
    pos: int            # where they go in the code


@dataclass(frozen=True)
class Codec:
    block: int          # weights per block
    size: int           # bytes per block
    parts: tuple[Part, ...]
    signed: bool = False   # the code is an int8 (Q8_0)

    @property
    def code_range(self) -> tuple[int, int]:
        bits = sum(p.bits for p in self.parts)
        return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if self.signed else (0, (1 << bits) - 1)


def _nibbles(offset: int, block: int = 32) -> Part:
    j = np.arange(block)
    return Part(offset + j % 16, 4 * (j // 16), 4, 0)


def _k_low(offset: int) -> Part:      # Q4_K / Q5_K: 4 chunks of 64 weights over 32 bytes each
    j = np.arange(256)
    return Part(offset + (j // 64) * 32 + j % 32, 4 * ((j % 64) // 32), 4, 0)


_j32, _j256 = np.arange(32), np.arange(256)
_r = _j256 % 128
CODECS = {
    Q.Q4_0: Codec(32, 18, (_nibbles(2),)),
    Q.Q4_1: Codec(32, 20, (_nibbles(4),)),
    Q.Q5_0: Codec(32, 22, (_nibbles(6), Part(2 + _j32 // 8, _j32 % 8, 1, 4))),
    Q.Q5_1: Codec(32, 24, (_nibbles(8), Part(4 + _j32 // 8, _j32 % 8, 1, 4))),
    Q.Q8_0: Codec(32, 34, (Part(2 + _j32, np.zeros(32, np.int64), 8, 0),), signed=True),
    Q.Q4_K: Codec(256, 144, (_k_low(16),)),
    Q.Q5_K: Codec(256, 176, (_k_low(48), Part(16 + _j256 % 32, _j256 // 32, 1, 4))),
    Q.Q6_K: Codec(256, 210, (Part((_j256 // 128) * 64 + _r % 64, 4 * (_r // 64), 4, 0),
                             Part(128 + (_j256 // 128) * 32 + _r % 32, 2 * (_r // 32), 2, 4))),
}


def supported(qtype: Q) -> bool:
    return qtype in CODECS


def _codec(qtype: Q) -> Codec:
    c = CODECS.get(qtype)
    if c is None:
        raise InvalidInputError(f"cannot edit single weights of {qtype.name} blocks (editable: "
                                f"{', '.join(t.name for t in CODECS)}); use --split keep or --quant Q4_0/Q4_1")
    return c


def get_codes(codec: Codec, blocks: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Code of element j[i] of block row i of `blocks` (n, size) uint8."""
    rows = np.arange(len(j))
    code = np.zeros(len(j), np.int64)
    for p in codec.parts:
        bits = (blocks[rows, p.byte[j]].astype(np.int64) >> p.shift[j]) & ((1 << p.bits) - 1)
        code |= bits << p.pos
    if codec.signed:
        code = np.where(code >= 128, code - 256, code)
    return code


def set_codes(codec: Codec, flat: np.ndarray, block: np.ndarray, j: np.ndarray, code: np.ndarray) -> None:
    """Write `code` for element j of block `block` into `flat` (all blocks' bytes, uint8), in place.

    Several elements may share a byte (two nibbles): the unbuffered ufunc.at
    calls touch only each element's own bits, so they never clobber each other.
    """
    code = np.asarray(code, np.int64) & 0xFF if codec.signed else np.asarray(code, np.int64)
    for p in codec.parts:
        mask = (1 << p.bits) - 1
        where = block * codec.size + p.byte[j]
        shift = p.shift[j]
        np.bitwise_and.at(flat, where, (~(mask << shift) & 0xFF).astype(np.uint8))
        np.bitwise_or.at(flat, where, (((code >> p.pos) & mask) << shift).astype(np.uint8))


def zero_codes(qtype: Q, raw: np.ndarray, flat_idx: np.ndarray) -> np.ndarray:
    """A copy of the quantized bytes `raw` where each weight at `flat_idx` holds its block's
    representable value nearest zero; nothing else changes."""
    codec = _codec(qtype)
    out = np.array(raw, dtype=np.uint8, copy=True)
    if len(flat_idx) == 0:
        return out
    flat_idx = np.asarray(flat_idx, np.int64)
    block, j = flat_idx // codec.block, flat_idx % codec.block
    blocks = out.reshape(-1, codec.size)
    lo, hi = codec.code_range
    # The value at two codes gives the affine map code -> value of each element.
    probe = blocks[block].copy()
    pflat = probe.reshape(-1)
    rows = np.arange(len(j))
    set_codes(codec, pflat, rows, j, np.full(len(j), lo))
    v0 = gguf.dequantize(probe, qtype).reshape(len(j), codec.block)[rows, j].astype(np.float64)
    set_codes(codec, pflat, rows, j, np.full(len(j), lo + 1))
    v1 = gguf.dequantize(probe, qtype).reshape(len(j), codec.block)[rows, j].astype(np.float64)
    step = v1 - v0
    current = get_codes(codec, blocks[block], j)
    with np.errstate(divide="ignore", invalid="ignore"):
        best = np.where(step != 0, lo + np.rint(-v0 / step), current)
    best = np.clip(best, lo, hi).astype(np.int64)
    set_codes(codec, out, block, j, best)
    return out


def values_at(qtype: Q, raw: np.ndarray, flat_idx: np.ndarray) -> np.ndarray:
    """Dequantized values of the weights at `flat_idx`, decoding only their blocks."""
    flat_idx = np.asarray(flat_idx, np.int64)
    if len(flat_idx) == 0:
        return np.zeros(0, np.float32)
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return gguf.dequantize(raw, qtype).reshape(-1)[flat_idx].astype(np.float32)
    bs, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(raw, np.uint8).reshape(-1, size)
    uniq, inv = np.unique(flat_idx // bs, return_inverse=True)
    vals = gguf.dequantize(blocks[uniq], qtype).reshape(len(uniq), bs)
    return vals[inv, flat_idx % bs].astype(np.float32)
