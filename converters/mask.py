"""The sensitive mask: which coordinates of a model become sparse-trainable.

One implementation for `edge-zo convert` (on calibration text), `edge-zo tune
--mask-from-data` (on the task's own rows) and the benchmarks:
- `compute`: scores by `MaskSpec.method` (fisher: torch autograd on the GGUF
  dequantized to float32, once torch and llama.cpp agree on the loss of the first
  sequence; activation: W^2 * E[x^2] with E[x^2] from llama.cpp, edge_zo.activation_mask;
  magnitude: |w|; random), then the top `density` share (`fisher.select`);
- `key`, `save`, `load`: a finished mask kept as an .npz under a key of everything
  that determines it, so an interrupted run or a benchmark does not score again;
- `sidecar_metadata`: what a sidecar says about its mask, assembled here alone;
- `fisher_sidecar`: the `--split keep` sidecar of a Fisher mask on a task's rows;
- `calibration_sidecar`: the same on the default calibration corpus, the mask `edge-zo tune`
  builds for a model without a sidecar where torch is installed (edge_zo.activation_mask.ensure).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_zo.adapter import SparseAdapter
from edge_zo.atomic import atomic_path
from edge_zo.constants import General, Sparse
from edge_zo.dataset import Example
from edge_zo.errors import InvalidInputError
from edge_zo.gguf_io import TensorFile
from edge_zo.model_info import ModelInfo

from .dense import Split
from .fisher import MaskMethod, Scope, fisher_scores, magnitude_scores, random_scores, select, sequence_loss
from .hf_names import arch_spec


@dataclass(frozen=True)
class MaskSpec:
    method: MaskMethod = MaskMethod.FISHER
    density: float = 0.001
    scope: Scope = Scope.GLOBAL
    seed: int = 0                 # of the random mask


def compute(tf: TensorFile, targets: list[str], spec: MaskSpec, examples: list[Example] | None = None, *,
            hf_folder: Path | None = None, native_probe: float | None = None, threads: int = 0,
            progress: bool = False, log=None) -> tuple[dict[str, np.ndarray], dict]:
    """({GGUF name: sorted flat indices}, torch_vs_native) for the model in `tf`.

    fisher needs `examples`; its torch model comes from `hf_folder` where the GGUF was written
    from one, else from the GGUF itself. `native_probe` is llama.cpp's loss of `examples[0]`
    (measured here when not given); torch_vs_native is {} for the masks that need no torch.
    `log` takes the progress lines (default: standard error)."""
    log = log or _log
    if spec.method is MaskMethod.RANDOM:
        return select(random_scores({n: tf.tensors[n].shape for n in targets}, spec.seed), spec.density,
                      spec.scope), {}
    if spec.method is MaskMethod.MAGNITUDE:
        return select(magnitude_scores(tf.tensors, targets), spec.density, spec.scope), {}
    if spec.method is MaskMethod.ACTIVATION:
        return _activation_mask(tf.path, targets, spec, examples, threads, log), {}
    if not examples:
        raise InvalidInputError("a Fisher mask needs calibration sequences with target tokens")
    import torch

    from .torch_model import model_from_gguf, model_from_hf

    torch.set_num_threads(threads or os.cpu_count() or 1)
    if native_probe is None:
        native_probe = _native_loss(tf.path, examples[0], threads)
    arch = arch_spec(tf.header.get(General.ARCHITECTURE), str(hf_folder or tf.path))
    log("loading the model into torch (float32)")
    model, names, layout = model_from_hf(hf_folder, arch) if hf_folder else model_from_gguf(tf, arch)
    with torch.no_grad():
        torch_probe = float(sequence_loss(model, examples[0]))
    parity = {"torch_loss": torch_probe, "native_loss": native_probe, "tokens": len(examples[0].tokens)}
    check_parity(torch_probe, native_probe)
    log(f"Fisher over {sum(len(e.tokens) for e in examples)} tokens ({len(examples)} sequences)")
    scores = fisher_scores(model, names, layout, targets, examples, progress=progress)
    del model
    return select(scores, spec.density, spec.scope), parity


def _activation_mask(path: Path, targets: list[str], spec: MaskSpec, examples: list[Example] | None, threads: int,
                     log) -> dict[str, np.ndarray]:
    """The torch-free mask (edge_zo.activation_mask) on the calibration sequences; selected from
    scores streamed a few rows at a time, as fisher.select would from whole arrays."""
    from edge_zo import activation_mask

    if not examples:
        raise InvalidInputError("an activation mask needs calibration sequences")
    log(f"activation statistics (llama.cpp) over {sum(len(e.tokens) for e in examples)} tokens "
        f"({len(examples)} sequences)")
    with activation_mask.stats_runtime(path, max(len(e.tokens) for e in examples), threads) as rt:
        e_x2 = activation_mask.activation_stats(rt, [e.tokens for e in examples], targets, log=log)
    return activation_mask.select_top(path, e_x2, spec.density, per_matrix=spec.scope is Scope.PER_MATRIX)


def check_parity(torch_loss: float, native_loss: float) -> None:
    """Gradients from torch only mean something if torch computes what llama.cpp computes."""
    if not abs(torch_loss - native_loss) <= 0.05 * abs(native_loss) + 0.02:
        raise InvalidInputError(
            f"torch and llama.cpp disagree on the source model: loss {torch_loss:.4f} vs {native_loss:.4f} on the "
            "same tokens. The transformers model does not match this GGUF (unsupported variant of the "
            "architecture?), so its gradients would not name the GGUF's coordinates.")


def _native_loss(path: Path, example: Example, threads: int) -> float:
    from edge_zo.runtime import Runtime, RuntimeOptions

    with Runtime(path, RuntimeOptions(batch_size=1, max_tokens=len(example.tokens), threads=threads)) as rt:
        return rt.loss([example]).mean


def _log(msg: str) -> None:
    print(f"edge-zo: {msg}", file=sys.stderr, flush=True)


# ---- the cache ----

_META = "__meta__"
_CALIBRATED = (MaskMethod.FISHER, MaskMethod.ACTIVATION)   # the masks that read calibration text


def key(source_sha: str, spec: MaskSpec, targets: list[str], calib: dict | None = None) -> str:
    """A name for the mask of these settings; `calib` describes the Fisher's text (ignored by the others)."""
    parts = {"source": source_sha, "method": spec.method.value, "density": spec.density, "scope": spec.scope.value,
             "targets": targets, "seed": spec.seed}
    if spec.method in _CALIBRATED:
        parts |= calib or {}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def corpus_key(corpus, seq_len: int) -> dict:
    """What pins a Fisher mask's calibration text, for `key`."""
    return {"calib": corpus.sha256, "tokens": corpus.train_tokens, "seq_len": seq_len}


def save(path: Path, mask: dict[str, np.ndarray], meta: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:   # np.savez appends .npz to a name without it
        np.savez(f, **mask, **{_META: np.frombuffer(json.dumps(meta).encode(), np.uint8)})


def load(path: Path, targets: list[str]) -> tuple[dict[str, np.ndarray] | None, dict]:
    """(mask, meta) saved at `path` for exactly these targets, or (None, {})."""
    if not path.is_file():
        return None, {}
    try:
        with np.load(path) as z:
            mask = {name: z[name].astype(np.int64) for name in z.files if name != _META}
            meta = json.loads(z[_META].tobytes()) if _META in z.files else {}
    except (OSError, ValueError):
        return None, {}
    return (mask, meta) if set(mask) == set(targets) else (None, {})


# ---- sidecars ----

def sidecar_metadata(spec: MaskSpec, split: Split, source_sha: str, calib_source: str, calib_tokens: int,
                     calib_sha: str | None = None, base_model_sha: str | None = None) -> dict:
    meta = {Sparse.ROLE: "sidecar", Sparse.MASK_METHOD: spec.method.value, Sparse.MASK_DENSITY: float(spec.density),
            Sparse.MASK_SCOPE: spec.scope.value, Sparse.SPLIT: split.value, Sparse.SOURCE_SHA256: source_sha}
    if spec.method in _CALIBRATED:
        meta |= {Sparse.CALIB_SOURCE: calib_source, Sparse.CALIB_TOKENS: int(calib_tokens)}
        if calib_sha:
            meta[Sparse.CALIB_SHA256] = calib_sha
    else:
        meta |= {Sparse.CALIB_SOURCE: f"none ({spec.method.value} mask, seed {spec.seed})", Sparse.CALIB_TOKENS: 0}
    if base_model_sha:
        meta[Sparse.BASE_MODEL_SHA256] = base_model_sha
    return meta


def fisher_sidecar(model_path: str | Path, examples: list[Example], density: float = 1e-3,
                   max_examples: int = 256) -> SparseAdapter:
    """`edge-zo tune --mask-from-data`: the top-`density` Fisher coordinates of every block matmul on
    the task's own rows, as a `--split keep` sidecar (values zero: tuning learns pure deltas)."""
    info = ModelInfo.open(model_path)
    targets = info.block_matmul_weights()
    calib = examples[:max_examples]
    spec = MaskSpec(density=density)
    def log(msg):
        print(f"edge-zo tune: --mask-from-data: {msg}", file=sys.stderr, flush=True)

    log(f"Fisher of {len(targets)} weights over {len(calib)} training examples")
    with TensorFile(info.path, info.header) as tf:
        mask, _ = compute(tf, targets, spec, calib, log=log)
    weights = {name: (idx, np.zeros(len(idx), np.float32)) for name, idx in mask.items() if len(idx)}
    meta = sidecar_metadata(spec, Split.KEEP, info.sha256(), "the tuning data (--mask-from-data)",
                            sum(len(e.tokens) for e in calib))
    return SparseAdapter.from_weights(info.architecture, weights, meta)


def calibration_sidecar(model_path: str | Path, density: float = 1e-3, calib_tokens: int = 4096, seq_len: int = 512,
                        threads: int = 0, log=None) -> tuple[SparseAdapter, dict]:
    """(the `--split keep` sidecar of the top-`density` Fisher coordinates of every block matmul on
    the default calibration corpus, a report): `edge-zo convert`'s mask, on the model as it is
    (values zero: tuning learns pure deltas), for `edge-zo tune` on a model without a sidecar."""
    import resource
    import time

    from edge_zo.runtime import Runtime, RuntimeOptions

    from . import calib

    t0 = time.perf_counter()
    log = log or _log
    info = ModelInfo.open(model_path)
    targets = info.block_matmul_weights()
    spec = MaskSpec(density=density)
    with Runtime(info.path, RuntimeOptions(batch_size=1, max_tokens=seq_len, threads=threads)) as rt:
        corpus = calib.load(rt.native, None, calib_tokens, 0, seq_len)
        probe = rt.loss(corpus.train[:1]).mean
    with TensorFile(info.path, info.header) as tf:
        mask, _ = compute(tf, targets, spec, corpus.train, native_probe=probe, threads=threads, log=log)
    sha = info.sha256()
    weights = {name: (idx, np.zeros(len(idx), np.float32)) for name, idx in mask.items() if len(idx)}
    meta = sidecar_metadata(spec, Split.KEEP, sha, corpus.source, corpus.train_tokens, corpus.sha256,
                            base_model_sha=sha)
    sidecar = SparseAdapter.from_weights(info.architecture, weights, meta)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return sidecar, {"coordinates": sidecar.n_params, "matrices": len(sidecar.names),
                     "calibration_tokens": corpus.train_tokens, "seconds": round(time.perf_counter() - t0, 2),
                     "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                     "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
