"""Adding sparse deltas to 4/5/8-bit blocks without moving any other value.

A block of Q4_0, Q5_0 or Q8_0 holds w = d·k (k a small signed integer, d one F16 scale per 32
values); Q4_1 and Q5_1 hold w = d·q + m (q unsigned). Re-quantizing a block after adding a
delta (what gguf-py's `quantize` does) picks a new scale from the block's largest value and
rounds all 32 values again, so the neighbours of an edited value move, and a delta smaller than
half a step is lost.

A grid lift keeps the block's own grid instead: the new block's scale is d / 2^s, so every
unedited value is still exactly on it (k becomes k·2^s), and only the edited values are rounded,
to a step 2^s times finer. How far s can go depends on the two types' integer ranges:

    Q4_0 -> Q5_0 s <= 1   Q4_0 -> Q8_0 s <= 4   Q5_0 -> Q8_0 s <= 3   Q4_1 -> Q5_1 s <= 1

(`max_shift` is 0 within one type; `merge` re-quantizes there, as a quantizer would).

Per block the largest s that keeps every edited value in range (and d / 2^s exact in F16) is
taken. A block where an edited value is past the range even at s = 0 (a sidecar's outlier put
back into a block whose scale was set without it, say) is left to the caller, who re-quantizes
it the usual way: the new value then sets the scale, as it would have in the first place.
The result is an ordinary block of the output type, which every llama.cpp backend reads.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32
# Integer range of each symmetric type's values, in units of its scale (w = d·k).
SYMMETRIC = {"Q4_0": (-8, 7), "Q5_0": (-16, 15), "Q8_0": (-128, 127)}
AFFINE = {"Q4_1": 15, "Q5_1": 31}   # q in [0, top], w = d·q + m


def max_shift(source: str, output: str) -> int | None:
    """The largest s for which `output` holds `source`'s grid scaled by 2^s; None when no lift
    exists (different families, or a smaller output range)."""
    if source in SYMMETRIC and output in SYMMETRIC:
        (lo, hi), (out_lo, out_hi) = SYMMETRIC[source], SYMMETRIC[output]
        fits = lambda s: lo << s >= out_lo and hi << s <= out_hi   # noqa: E731
    elif source in AFFINE and output in AFFINE:
        top, out_top = AFFINE[source], AFFINE[output]
        fits = lambda s: top << s <= out_top                        # noqa: E731
    else:
        return None
    if not fits(0):
        return None
    s = 0
    while fits(s + 1):
        s += 1
    return s


def lift(raw: np.ndarray, source: str, output: str, values: np.ndarray, edited: np.ndarray,
         ) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of `source` (raw bytes, one row per block), their target `values` (float32, one row
    of 32 per block) where `edited` is True, written as blocks of `output` on the source grid.

    Returns the bytes (one row per block) and a mask of the blocks that did not fit, whose rows
    are to be re-quantized: an edited value is past the range, or the block's scale is 0 (all its
    values on m) and a delta was added to it."""
    s_max = max_shift(source, output)
    if s_max is None:
        raise ValueError(f"no grid lift from {source} to {output}")
    d, m, k = _unpack(raw, source)
    lo, hi = (0, AFFINE[output]) if source in AFFINE else SYMMETRIC[output]
    out_d = np.zeros_like(d)
    out_k = np.zeros(k.shape, np.int32)
    todo = np.ones(len(d), bool)
    for s in range(s_max, -1, -1):
        scale = (d / np.float32(2 ** s)).astype(np.float16)
        exact = scale.astype(np.float32) * np.float32(2 ** s) == d
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint((values - m[:, None]) / scale.astype(np.float32)[:, None])
        q = np.where(edited, q, k.astype(np.float64) * 2 ** s)
        ok = todo & exact & (d != 0) & np.all((q >= lo) & (q <= hi), axis=1)
        out_d[ok], out_k[ok] = d[ok] / np.float32(2 ** s), q[ok]
        todo &= ~ok
    todo &= ~((d == 0) & ~edited.any(axis=1))   # an all-zero block with nothing added stays as it is
    return _pack(out_d, m, out_k, output), todo


def _unpack(raw: np.ndarray, t: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, m, k) of each block: scale, offset (0 for symmetric types) and the integer values."""
    raw = np.ascontiguousarray(raw, np.uint8)
    d = raw[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float32)
    m = raw[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32) if t in AFFINE else np.zeros_like(d)
    if t == "Q8_0":
        return d, m, raw[:, 2:34].view(np.int8).astype(np.int32)
    qs = raw[:, {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[t]:][:, :16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)
    if t in ("Q5_0", "Q5_1"):
        qh = raw[:, {"Q5_0": 2, "Q5_1": 4}[t]:][:, :4].copy().view("<u4")[:, 0]
        q |= ((qh[:, None] >> np.arange(BLOCK, dtype=np.uint32)) & 1).astype(np.int32) << 4
    return d, m, q + (SYMMETRIC[t][0] if t in SYMMETRIC else 0)


def _pack(d: np.ndarray, m: np.ndarray, k: np.ndarray, t: str) -> np.ndarray:
    """Blocks of type t from scales d, offsets m and integer values k (in the type's range)."""
    head = [d.astype(np.float16).reshape(-1, 1).view(np.uint8)]
    if t in AFFINE:
        head.append(m.astype(np.float16).reshape(-1, 1).view(np.uint8))
    if t == "Q8_0":
        return np.concatenate(head + [k.astype(np.int8).view(np.uint8)], axis=1)
    q = (k - (SYMMETRIC[t][0] if t in SYMMETRIC else 0)).astype(np.uint32)
    if t in ("Q5_0", "Q5_1"):
        qh = np.bitwise_or.reduce(((q >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32), axis=1)
        head.append(qh.astype("<u4").reshape(-1, 1).view(np.uint8))
    qs = ((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)).astype(np.uint8)
    return np.concatenate(head + [qs], axis=1)
