"""The tuned sparse deltas as a llama.cpp LoRA adapter: a file stock llama.cpp, llama-server and
Ollama load (`--lora`, `ADAPTER`) on every backend, with no edge-zo code.

Layout (llama.cpp's `llama_adapter_lora_init_impl` and `build_lora_mm`, as
convert_lora_to_gguf.py writes it): `general.type = "adapter"`, `adapter.type = "lora"`,
`adapter.lora.alpha`, and for each weight W of numpy shape (n_out, n_in) two tensors,
`W.lora_a` of shape (r, n_in) and `W.lora_b` of shape (n_out, r); llama.cpp computes
y = W·x + (alpha / r) · B·(A·x). Names and coordinates are the GGUF's own, so the attn_q/attn_k
rotary permutation (a Hugging Face matter) never enters. The token embedding's pair would be
flipped and transposed (llm_build_inp_embd): such weights are refused rather than guessed.

Factorization: the delta D of one weight is sparse, and the Fisher mask puts it in a few input
columns (the channels with outlier activations), so it is low-rank in practice. Its SVD is
taken on the submatrix of touched rows and columns, weighted by the input activations' RMS
s_j = sqrt(E[x_j^2]) (what the delta does to the output is D·x, so error in a column matters in
proportion to its activation): D·diag(s) = U Σ Vᵀ, B = U·sqrt(Σ), A = sqrt(Σ)·Vᵀ·diag(1/s).
Each weight's rank is the fewest singular values that capture `keep` of its own weighted delta;
over `max_bytes`, the ranks that hold the least of their weight per byte go first. The captured
share of each weight, and the mean over weights, are reported.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .adapter import SparseAdapter
from .atomic import atomic_path
from .constants import TOKEN_EMBD
from .errors import InvalidInputError
from .merge_types import column_scale
from .model_info import ModelInfo

ADAPTER_TYPE_LORA = "lora"    # llama.cpp's value of adapter.type for LoRA files
ALPHA = 1.0                   # adapter.lora.alpha; each B is stored times r/alpha so the scale is 1
BYTES_PER_VALUE = 2           # F16 tensors, as convert_lora_to_gguf.py writes by default


@dataclass
class WeightSVD:
    """The activation-weighted SVD of one weight's sparse delta, on its touched rows and columns."""

    name: str
    shape: tuple[int, int]
    rows: np.ndarray            # touched rows
    cols: np.ndarray            # touched columns
    u: np.ndarray               # (len(rows), k)
    sigma: np.ndarray           # (k,), descending
    vt: np.ndarray              # (k, len(cols)), already divided by the column scale

    @property
    def bytes_per_rank(self) -> int:
        return (self.shape[0] + self.shape[1]) * BYTES_PER_VALUE


@dataclass
class LoraReport:
    path: Path
    ranks: dict[str, int] = field(default_factory=dict)
    captured: dict[str, float] = field(default_factory=dict)   # per weight, share of its weighted norm^2
    captured_total: float = 0.0
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "seconds": round(self.seconds, 3),
                "captured": self.captured_total, "weights": len([r for r in self.ranks.values() if r]),
                "rank_total": int(sum(self.ranks.values())),
                "rank_max": int(max(self.ranks.values(), default=0)),
                "per_weight": {n: {"rank": self.ranks[n], "captured": self.captured[n]} for n in self.ranks}}


def weighted_svd(name: str, shape: tuple[int, int], idx: np.ndarray, val: np.ndarray,
                 e_x2: np.ndarray | None) -> WeightSVD:
    n_out, n_in = shape
    keep = val != 0
    idx, val = np.asarray(idx, np.int64)[keep], np.asarray(val, np.float64)[keep]
    rows, r_inv = np.unique(idx // n_in, return_inverse=True)
    cols, c_inv = np.unique(idx % n_in, return_inverse=True)
    if idx.size == 0:
        return WeightSVD(name, shape, rows, cols, np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))
    s = column_scale(e_x2, n_in)[cols]
    sub = np.zeros((len(rows), len(cols)))
    sub[r_inv.ravel(), c_inv.ravel()] = val
    u, sigma, vt = np.linalg.svd(sub * s, full_matrices=False)
    return WeightSVD(name, shape, rows, cols, u, sigma, vt / s)


def choose_ranks(svds: Mapping[str, WeightSVD], keep: float, max_bytes: int) -> dict[str, int]:
    """Ranks per weight: for each, the fewest singular values that capture `keep` of its own
    (weighted) σ²; then, while the adapter is over `max_bytes`, the rank whose singular value
    holds the smallest share of its weight per byte is dropped.

    Shares are per weight on purpose: pooled over weights, the layers with the largest
    activations (SmolLM2's massive-activation channels) take every rank, and the measured loss
    improvement kept fell to 45% at 99% of the pooled norm captured (docs/export.md)."""
    ranks, shares = {}, {}
    for name, w in svds.items():
        energy = float(np.sum(w.sigma ** 2))
        shares[name] = w.sigma ** 2 / energy if energy else np.zeros(0)
        ranks[name] = int(np.searchsorted(np.cumsum(shares[name]), keep * (1 - 1e-9)) + 1) if energy else 0
        ranks[name] = min(ranks[name], len(w.sigma))
    spent = sum(r * svds[n].bytes_per_rank for n, r in ranks.items())
    while spent > max_bytes:
        name = min((n for n, r in ranks.items() if r), key=lambda n: shares[n][ranks[n] - 1] / svds[n].bytes_per_rank)
        ranks[name] -= 1
        spent -= svds[name].bytes_per_rank
    return ranks


def factors(w: WeightSVD, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A of shape (rank, n_in), B of shape (n_out, rank)) with B·A the rank-`rank` approximation."""
    n_out, n_in = w.shape
    root = np.sqrt(w.sigma[:rank])
    a = np.zeros((rank, n_in), np.float32)
    b = np.zeros((n_out, rank), np.float32)
    a[:, w.cols] = root[:, None] * w.vt[:rank]
    b[w.rows] = w.u[:, :rank] * root
    return a, b


def lora_unsupported(model: ModelInfo, deltas: SparseAdapter) -> list[str]:
    """The weights of `deltas` a LoRA cannot hold here: the token embedding (llama.cpp flips its
    pair, and with tied embeddings the same tensor is the output matmul) and anything not 2-D."""
    return [n for n in deltas.names if n == TOKEN_EMBD or len(model.tensors[n].shape) != 2]


def export_lora(model: ModelInfo, deltas: SparseAdapter, out_path: str | Path, *, keep: float, max_bytes: int,
                e_x2: Mapping[str, np.ndarray] | None = None) -> LoraReport:
    """Write the low-rank LoRA of `deltas` (to be applied to the model before tuning: dense +
    sidecar) to `out_path`, atomically."""
    import gguf

    t0 = time.perf_counter()
    deltas.check_against(model, "the deltas")
    bad = lora_unsupported(model, deltas)
    if bad:
        raise InvalidInputError(f"a LoRA export covers 2-D matmul weights; these deltas cannot be one: "
                                f"{', '.join(bad)} (use the merged GGUF, or the sparse adapter with edge-zo)")
    svds = {n: weighted_svd(n, model.tensors[n].shape, deltas.indices[i], deltas.weight_values(i),
                            None if e_x2 is None else e_x2.get(n))
            for i, n in enumerate(deltas.names)}
    ranks = choose_ranks(svds, keep, max_bytes)
    report = LoraReport(Path(out_path))
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, model.architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, ADAPTER_TYPE_LORA)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)
        for name, w in svds.items():
            r = ranks[name]
            energy = float(np.sum(w.sigma ** 2))
            report.ranks[name] = r
            report.captured[name] = float(np.sum(w.sigma[:r] ** 2) / energy) if energy else 1.0
            if r == 0:
                continue
            a, b = factors(w, r)
            # llama.cpp scales B·A by alpha / r; store B times r / alpha so the product is the delta.
            writer.add_tensor(f"{name}.lora_a", a.astype(np.float16))
            writer.add_tensor(f"{name}.lora_b", (b * (r / ALPHA)).astype(np.float16))
        if not any(ranks.values()):
            raise InvalidInputError("the deltas are all zero: there is no LoRA to export")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    # The mean over weights: each weight's share counts the same, as the ranks were chosen.
    report.captured_total = float(np.mean(list(report.captured.values()))) if report.captured else 1.0
    report.bytes = Path(out_path).stat().st_size
    report.seconds = time.perf_counter() - t0
    return report
