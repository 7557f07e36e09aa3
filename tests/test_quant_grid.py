"""Grid lifts (edge_zo.quant_grid) against gguf-py's decoder: deltas land, nothing else moves."""
import gguf
import numpy as np
import pytest

from edge_zo import quant_grid
from edge_zo.merge import merge_tensor

Q = gguf.GGMLQuantizationType
LIFTS = [("Q4_0", "Q4_0", 0), ("Q4_0", "Q5_0", 1), ("Q4_0", "Q8_0", 4), ("Q5_0", "Q8_0", 3), ("Q5_0", "Q5_0", 0),
         ("Q8_0", "Q8_0", 0), ("Q4_1", "Q4_1", 0), ("Q4_1", "Q5_1", 1), ("Q5_1", "Q5_1", 0)]


def quantized(type_name, rows=16, cols=256, seed=0):
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05
    raw = np.ascontiguousarray(gguf.quantize(w, Q[type_name])).view(np.uint8)
    return raw, gguf.dequantize(raw, Q[type_name]).reshape(-1)


@pytest.mark.parametrize("source,output,shift", LIFTS)
def test_max_shift(source, output, shift):
    assert quant_grid.max_shift(source, output) == shift


@pytest.mark.parametrize("source,output", [("Q8_0", "Q4_0"), ("Q5_0", "Q4_0"), ("Q4_1", "Q8_0"), ("Q4_0", "Q5_1"),
                                           ("Q4_0", "F16"), ("Q4_K", "Q8_0")])
def test_no_lift_between_families_or_to_a_coarser_grid(source, output):
    assert quant_grid.max_shift(source, output) is None
    with pytest.raises(ValueError, match="no grid lift"):
        quant_grid.lift(np.zeros((1, 34), np.uint8), source, output, np.zeros((1, 32), np.float32),
                        np.zeros((1, 32), bool))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_0", "Q8_0", "Q4_1", "Q5_1"])
def test_unpack_and_pack_agree_with_gguf(type_name):
    raw, values = quantized(type_name)
    size = gguf.GGML_QUANT_SIZES[Q[type_name]][1]
    d, m, k = quant_grid._unpack(raw.reshape(-1, size), type_name)
    np.testing.assert_array_equal((d[:, None] * k + m[:, None]).reshape(-1), values)
    assert np.array_equal(quant_grid._pack(d, m, k, type_name), raw.reshape(-1, size))


@pytest.mark.parametrize("source,output,shift", LIFTS)
def test_a_lift_moves_only_the_edited_values_and_rounds_them_finer(source, output, shift):
    raw, base = quantized(source, seed=shift)
    # Deltas of about a third of a 4-bit step, on values away from the edges of their block's range
    # (at an edge, a same-type merge clips or re-quantizes: test_export covers that).
    size = gguf.GGML_QUANT_SIZES[Q[source]][1]
    k_src = quant_grid._unpack(raw.reshape(-1, size), source)[2].reshape(-1)
    lo, hi = quant_grid.SYMMETRIC.get(source, (0, quant_grid.AFFINE.get(source)))
    margin = 0.15 * (hi - lo)
    rng = np.random.default_rng(7)
    idx = rng.choice(np.flatnonzero((k_src > lo + margin) & (k_src < hi - margin)), 300, replace=False)
    val = rng.standard_normal(300).astype(np.float32) * 0.004
    merged, summary = merge_tensor(raw, source, output, idx, val)
    got = gguf.dequantize(merged, Q[output]).reshape(-1)
    others = np.setdiff1d(np.arange(base.size), idx)
    np.testing.assert_array_equal(got[others], base[others])
    assert summary.collateral_norm == 0.0
    # Each edited value is on its block's output grid, within half a step |d_out|; the grid is
    # |d| / 2^shift unless an edited value would leave that range (then a coarser 2^s, down to the
    # source's own step, where a value pushed past the edge is clipped).
    d = np.abs(quant_grid._unpack(raw.reshape(-1, size), source)[0])
    d_out, _, k = quant_grid._unpack(merged.reshape(-1, gguf.GGML_QUANT_SIZES[Q[output]][1]), output)
    d_out, k = np.abs(d_out), k.reshape(-1)
    blocks = np.unique(idx // 32)
    assert np.mean(d_out[blocks] == d[blocks] / 2 ** shift) > 0.85
    assert np.all(np.isin(np.log2(d[blocks] / d_out[blocks]), np.arange(shift + 1)))
    lo, hi = quant_grid.SYMMETRIC.get(output, (0, quant_grid.AFFINE.get(output)))
    inside = (k[idx] > lo) & (k[idx] < hi)
    assert inside.mean() > 0.9
    err = np.abs(got[idx] - (base[idx] + val))
    assert np.all((err <= d_out[idx // 32] / 2 * (1 + 1e-5))[inside])
    if shift:   # a finer grid keeps more of the deltas than the source's own
        _, own = merge_tensor(raw, source, source, idx, val)
        assert summary.miss_norm < own.miss_norm / 1.5


def test_an_unedited_weight_lifts_exactly():
    raw, base = quantized("Q4_0")
    merged, summary = merge_tensor(raw, "Q4_0", "Q8_0", np.zeros(0, np.int64), np.zeros(0, np.float32))
    np.testing.assert_array_equal(gguf.dequantize(merged, Q.Q8_0).reshape(-1), base)
    assert summary.collateral_norm == summary.miss_norm == 0.0


def test_a_zero_block_with_a_delta_is_requantized():
    raw, base = quantized("Q4_0", rows=1, cols=64)
    raw = raw.reshape(2, 18).copy()
    raw[0] = np.ascontiguousarray(gguf.quantize(np.zeros((1, 32), np.float32), Q.Q4_0)).view(np.uint8)
    merged, _ = merge_tensor(raw.reshape(-1), "Q4_0", "Q8_0", np.array([5]), np.array([0.03], np.float32))
    got = gguf.dequantize(merged, Q.Q8_0).reshape(-1)
    assert got[5] == pytest.approx(0.03, rel=1e-2)
    assert not np.any(got[:32][np.arange(32) != 5])
