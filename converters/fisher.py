"""Sensitivity scores of weight coordinates, and the sparse mask they select.

Three scores, all returned per GGUF weight in GGUF layout (n_out, n_in), so
that selecting coordinates is the same step for each:
- fisher: the diagonal empirical Fisher, mean over calibration sequences of
  the squared gradient of the sequence's next-token loss, computed by
  transformers on the model dequantized to float32 (Guo et al. 2024, sec. 3);
- magnitude: |w| of the (dequantized) source weight;
- random: uniform noise from a generator derived from (seed, weight name).

`select` keeps the top `density` share of coordinates, either over all target
weights at once (global) or in each weight separately (per-matrix).
"""
from __future__ import annotations

import enum
import zlib
from collections.abc import Callable

import numpy as np

from edge_zo.dataset import Example
from edge_zo.errors import InvalidInputError


class MaskMethod(enum.Enum):
    FISHER = "fisher"
    ACTIVATION = "activation"   # W^2 * E[x^2] from llama.cpp's forwards: edge_zo.activation_mask (no torch)
    RANDOM = "random"
    MAGNITUDE = "magnitude"


class Scope(enum.Enum):
    GLOBAL = "global"
    PER_MATRIX = "per-matrix"


# ---- scores ----

def target_parameters(model, names: dict[str, str], targets: list[str]) -> dict[str, object]:
    """{GGUF name: the torch Parameter holding it} for every target (tied weights appear once)."""
    params = dict(model.named_parameters())          # de-duplicated: a tied weight under its first name
    by_gguf = {}
    for hf_name, gguf_name in names.items():
        if gguf_name in targets and hf_name in params:
            by_gguf.setdefault(gguf_name, params[hf_name])
    missing = [t for t in targets if t not in by_gguf]
    if missing:
        raise InvalidInputError(f"no transformers parameter holds target weights {missing[:5]}")
    return by_gguf


def sequence_loss(model, ex: Example):
    """Mean next-token loss of one Example's target tokens (transformers shifts the labels)."""
    import torch

    ids = torch.from_numpy(ex.tokens.astype(np.int64))[None]
    labels = torch.where(torch.from_numpy(ex.targets.astype(bool))[None], ids, torch.full_like(ids, -100))
    return model(input_ids=ids, labels=labels).loss


def squared_gradients(model, params: dict[str, object], examples: list[Example],
                      on_sequence: Callable[[Example], None] | None = None) -> dict[str, np.ndarray]:
    """Mean over `examples` of each parameter's squared gradient (torch layout, float32)."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    n = 0
    for ex in examples:
        if ex.n_targets == 0:
            continue
        for p in params.values():
            p.grad = None
        sequence_loss(model, ex).backward()
        with torch.no_grad():
            for name, p in params.items():
                if p.grad is not None:
                    acc[name].addcmul_(p.grad, p.grad)
        n += 1
        if on_sequence:
            on_sequence(ex)
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    if n == 0:
        raise InvalidInputError("no calibration sequence has a target token")
    return {name: (a / n).numpy() for name, a in acc.items()}


def fisher_scores(model, names: dict[str, str], layout, targets: list[str], examples: list[Example],
                  progress: bool = True) -> dict[str, np.ndarray]:
    """Diagonal empirical Fisher of every target weight, in GGUF layout."""
    from tqdm import tqdm

    params = target_parameters(model, names, targets)
    total = sum(len(e.tokens) for e in examples)
    with tqdm(total=total, desc="Fisher (tokens)", unit="tok", disable=not progress, leave=False) as bar:
        sq = squared_gradients(model, params, examples, on_sequence=lambda ex: bar.update(len(ex.tokens)))
    return {name: np.ascontiguousarray(layout.to_gguf(name, sq[name])) for name in targets}


def magnitude_scores(tensors, targets: list[str]) -> dict[str, np.ndarray]:
    return {name: np.abs(tensors[name].dequantize()) for name in targets}


def random_scores(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    return {name: np.random.default_rng([seed, zlib.crc32(name.encode())]).random(shape, dtype=np.float32)
            for name, shape in shapes.items()}


# ---- selection ----

def select(scores: dict[str, np.ndarray], density: float, scope: Scope) -> dict[str, np.ndarray]:
    """{name: sorted flat indices} of the highest-scoring `density` share of coordinates.

    Exactly round(density * n) coordinates per weight (per-matrix) or over all
    weights (global); ties at the threshold go to the earlier weight and index.
    """
    if not 0 < density < 1:
        raise InvalidInputError(f"density {density}: must lie strictly between 0 and 1")
    for name, s in scores.items():
        if not np.all(np.isfinite(s)) or (s.size and s.min() < 0):
            raise InvalidInputError(f"{name}: scores must be finite and non-negative")
    if scope is Scope.PER_MATRIX:
        return {name: _top_k(s.reshape(-1), int(round(density * s.size))) for name, s in scores.items()}
    total = sum(s.size for s in scores.values())
    k = int(round(density * total))
    flat = {name: s.reshape(-1) for name, s in scores.items()}
    t = _kth_largest(list(flat.values()), k)
    out, need_ties = {}, k - sum(int((f > t).sum()) for f in flat.values())
    for name, f in flat.items():
        above = np.flatnonzero(f > t)
        ties = np.flatnonzero(f == t) if need_ties > 0 else np.zeros(0, np.int64)
        take = ties[:need_ties]
        need_ties -= len(take)
        out[name] = np.sort(np.concatenate([above, take])).astype(np.int64)
    return out


def _top_k(f: np.ndarray, k: int) -> np.ndarray:
    if k <= 0:
        return np.zeros(0, np.int64)
    if k >= f.size:
        return np.arange(f.size, dtype=np.int64)
    # Stable order (score descending, index ascending) makes ties deterministic.
    t = np.partition(f, f.size - k)[f.size - k]
    above = np.flatnonzero(f > t)
    ties = np.flatnonzero(f == t)[: k - len(above)]
    return np.sort(np.concatenate([above, ties])).astype(np.int64)


def _kth_largest(arrays: list[np.ndarray], k: int) -> np.float32:
    """The k-th largest value over all arrays (non-negative float32), by bisection on the
    bit patterns, which order non-negative floats; memory stays O(1) beyond the scores."""
    if k <= 0:
        return np.float32(np.inf)
    lo, hi = 0, 0x7F800000          # bit patterns of 0.0 and +inf
    views = [a.astype(np.float32, copy=False).view(np.int32) for a in arrays]
    while lo < hi:                  # largest bit pattern b with count(>= b) >= k
        mid = (lo + hi + 1) // 2
        if sum(int(np.count_nonzero(v >= mid)) for v in views) >= k:
            lo = mid
        else:
            hi = mid - 1
    return np.array([lo], np.int32).view(np.float32)[0]


def coverage(grad_sq: dict[str, np.ndarray], mask: dict[str, np.ndarray]) -> float:
    """Share of the gradient's squared norm (over the weights in `grad_sq`) inside `mask`."""
    total = sum(float(g.sum(dtype=np.float64)) for g in grad_sq.values())
    inside = sum(float(grad_sq[n].reshape(-1)[idx].sum(dtype=np.float64)) for n, idx in mask.items() if n in grad_sq)
    return inside / total if total > 0 else 0.0
