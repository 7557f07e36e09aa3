"""`edge-zo convert`: split a model into a dense 4-bit GGUF and a sparse sidecar.

Phases, each a plain function call below, in order:
 1. source: a GGUF, or a Hugging Face folder first written as a float GGUF;
 2. data: calibration and held-out sequences, tokenized by llama.cpp;
 3. mask: scores (Fisher through torch, or magnitude, or random), then the top
    `density` coordinates; cached in OUTDIR/.work so a rerun skips it;
 4. outputs: model.gguf and sidecar.gguf, written under OUTDIR/.work;
 5. quality: held-out loss of source, dense alone and dense + sidecar;
 6. model.gguf and sidecar.gguf renamed into OUTDIR, then convert.json.
No file appears under its final name until it is complete.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edge_zo import atomic
from edge_zo.adapter import SparseAdapter
from edge_zo.errors import InvalidInputError, ModelFileError
from edge_zo.gguf_io import TensorFile
from edge_zo.model_info import ModelInfo, file_sha256
from edge_zo.runtime import Runtime, RuntimeOptions

from . import calib
from . import mask as masks
from .codes import values_at
from .dense import FAST_TYPE, QUANT_CHOICES, Split, plan_types, write_dense
from .fisher import MaskMethod, Scope
from .hf_names import arch_spec

DEFAULT_QUANT = "Q4_1"          # measured in docs/convert.md: better perplexity than Q4_0 at nearly equal speed
MODEL_NAME, SIDECAR_NAME, REPORT_NAME, WORK_DIR = "model.gguf", "sidecar.gguf", "convert.json", ".work"


@dataclass(frozen=True)
class Settings:
    source: Path
    outdir: Path
    calib: Path | None = None           # None: the built-in public-domain corpus
    calib_tokens: int = 8192
    eval_tokens: int = 4096
    seq_len: int = 512
    density: float = 0.001
    mask: MaskMethod = MaskMethod.FISHER
    scope: Scope = Scope.GLOBAL
    targets: tuple[str, ...] = ()       # fnmatch patterns over GGUF names; () = every block matmul
    split: Split = Split.ZERO
    quant: str | None = None            # None: keep a 4-bit source's types, else DEFAULT_QUANT
    seed: int = 0
    threads: int = 0
    progress: bool = True

    @property
    def mask_spec(self) -> masks.MaskSpec:
        return masks.MaskSpec(self.mask, self.density, self.scope, self.seed)

    def validate(self) -> None:
        if not 0 < self.density < 1:
            raise InvalidInputError(f"--density {self.density}: must lie strictly between 0 and 1 "
                                    "(0.001 keeps 0.1% of the target weights)")
        if self.quant is not None and self.quant not in QUANT_CHOICES:
            raise InvalidInputError(f"--quant {self.quant}: choose one of {', '.join(QUANT_CHOICES)}")
        if self.eval_tokens < 0:
            raise InvalidInputError(f"--eval-tokens {self.eval_tokens}: must be 0 or more")


@dataclass
class Report:
    """What convert.json holds; `phases` are seconds."""

    source: str
    source_sha256: str
    architecture: str
    settings: dict
    calibration: dict = field(default_factory=dict)
    mask: dict = field(default_factory=dict)
    per_matrix: dict = field(default_factory=dict)
    torch_vs_native: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    phases: dict = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0     # user + system time of this process: steadier than wall time on a busy machine
    peak_rss_mib: float = 0.0
    outputs: dict = field(default_factory=dict)


def log(msg: str) -> None:
    print(f"edge-zo convert: {msg}", file=sys.stderr, flush=True)


def run(s: Settings) -> Report:
    s.validate()
    t_start = time.perf_counter()
    clock = _Clock()
    outdir = Path(s.outdir)
    work = outdir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)

    # 1. source
    src = Path(s.source)
    if src.is_dir():
        from .hf_gguf import folder_sha256, write_gguf
        source_sha = folder_sha256(src)
        gguf_path = work / f"source-{source_sha[:16]}.gguf"
        if not gguf_path.is_file():
            log(f"writing {src} as a float GGUF")
            write_gguf(src, gguf_path)
        clock.lap("hf_to_gguf")
    elif src.is_file():
        gguf_path, source_sha = src, None
    else:
        raise ModelFileError(f"{src}: no such file or folder. Pass a .gguf model or a Hugging Face model folder.")
    info = ModelInfo.open(gguf_path)
    if s.mask is MaskMethod.FISHER:   # the Fisher mask needs torch to load the architecture: refuse early, before any work
        arch_spec(info.architecture, str(src))
    source_sha = source_sha or info.sha256()
    targets = resolve_targets(info, s.targets)
    tf = TensorFile(gguf_path, info.header)
    report = Report(str(src), source_sha, info.architecture, _settings_dict(s))
    clock.lap("open")

    # 2. data, and the source's own held-out loss
    opts = RuntimeOptions(batch_size=8, max_tokens=s.seq_len, threads=s.threads)
    with Runtime(gguf_path, opts) as rt:
        corpus = calib.load(rt.native, s.calib, s.calib_tokens, s.eval_tokens, s.seq_len)
        if not corpus.train:
            raise InvalidInputError("the calibration text yields no sequence with a target token")
        if corpus.held_out:
            report.quality["source"] = _loss(rt, corpus.held_out)
        native_probe = rt.loss(corpus.train[:1]).mean if s.mask is MaskMethod.FISHER else None
    report.calibration = {"source": corpus.source, "sha256": corpus.sha256, "tokens": corpus.train_tokens,
                          "sequences": len(corpus.train), "held_out_tokens": corpus.held_out_tokens}
    clock.lap("data")

    # 3. mask
    spec = s.mask_spec
    cache = work / f"mask-{masks.key(source_sha, spec, targets, masks.corpus_key(corpus, s.seq_len))}.npz"
    selected, report.torch_vs_native = masks.load(cache, targets)
    if selected is None:
        selected, report.torch_vs_native = masks.compute(
            tf, targets, spec, corpus.train, hf_folder=src if src.is_dir() else None, native_probe=native_probe,
            threads=s.threads, progress=s.progress, log=log)
        masks.save(cache, selected, report.torch_vs_native)
        clock.lap("scores")
    else:
        log(f"reusing the mask in {cache} (from an interrupted run with the same settings)")
    n_sel = sum(len(v) for v in selected.values())
    n_all = sum(info.tensors[n].n_elements for n in targets)
    report.mask = {"method": s.mask.value, "scope": s.scope.value, "density": s.density,
                   "selected": n_sel, "target_elements": n_all, "actual_density": n_sel / n_all}

    # 4. outputs, staged under .work
    plan = plan_types(tf, info.block_matmul_weights(), s.quant, DEFAULT_QUANT, faster=s.split is Split.ZERO)
    staged_model, staged_sidecar = work / MODEL_NAME, work / SIDECAR_NAME
    kept = "source types kept" + (f", {'/'.join(sorted({tf.tensors[n].type_name for n in plan.requantized}))} "
                                  f"block matmuls to {FAST_TYPE.name}" if plan.requantized else "")
    log(f"writing {MODEL_NAME} ({kept if plan.kept_source_types else 'quantizing'}, "
        f"split {s.split.value})")
    dense_at = write_dense(tf, staged_model, plan, selected, s.split, s.progress)
    base = {name: (idx, sidecar_base(tf.tensors[name], idx, dense_at[name], s.split))
            for name, idx in selected.items()}
    model_sha = file_sha256(staged_model)
    meta = masks.sidecar_metadata(spec, s.split, source_sha, corpus.source, corpus.train_tokens, corpus.sha256,
                                  base_model_sha=model_sha)
    sidecar = SparseAdapter.from_weights(info.architecture, base, meta)
    sidecar.save(staged_sidecar)
    for name in sorted(tf.tensors):
        t = tf.tensors[name]
        if name in targets or name in plan.requantized:
            report.per_matrix[name] = {"shape": list(t.shape), "type_in": t.type_name,
                                       "type_out": plan.types[name].name,
                                       "selected": int(len(selected.get(name, ())))}
    tf.close()
    clock.lap("write")

    # 5. quality
    if corpus.held_out:
        with Runtime(staged_model, opts) as rt:
            report.quality["dense"] = _loss(rt, corpus.held_out)
            rt.attach(SparseAdapter.load(staged_sidecar), source=str(staged_sidecar))
            report.quality["dense+sidecar"] = _loss(rt, corpus.held_out)
        clock.lap("quality")

    # 6. publish
    os.replace(staged_model, outdir / MODEL_NAME)
    os.replace(staged_sidecar, outdir / SIDECAR_NAME)
    cache.unlink(missing_ok=True)
    if src.is_dir():
        gguf_path.unlink(missing_ok=True)   # the float copy of an HF folder was only needed until now
    _remove_empty_work(work)
    report.outputs = {"model": str(outdir / MODEL_NAME), "sidecar": str(outdir / SIDECAR_NAME),
                      "model_sha256": model_sha}
    report.phases = clock.laps
    report.seconds = round(time.perf_counter() - t_start, 2)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report.cpu_seconds = round(usage.ru_utime + usage.ru_stime, 1)
    report.peak_rss_mib = round(usage.ru_maxrss / 1024, 1)
    atomic.write_text(outdir / REPORT_NAME, json.dumps(asdict(report), indent=1) + "\n")
    return report


def sidecar_base(t, idx: np.ndarray, dense_values: np.ndarray, split: Split) -> np.ndarray:
    """The sidecar's starting values: what the dense model lacks of the source (zero), or nothing (keep)."""
    if split is Split.KEEP:
        return np.zeros(len(idx), np.float32)
    return values_at(t.type, t.raw, idx) - dense_values


def resolve_targets(info: ModelInfo, patterns: tuple[str, ...]) -> list[str]:
    """Target weight names: every block matmul, or the 2-D weights matching the patterns."""
    if not patterns:
        return info.block_matmul_weights()
    two_d = [n for n, t in info.tensors.items() if len(t.shape) == 2]
    out, unmatched = [], []
    for p in patterns:
        hits = [n for n in two_d if fnmatch.fnmatchcase(n, p)]
        if not hits:
            unmatched.append(p)
        out += [n for n in hits if n not in out]
    if unmatched:
        raise InvalidInputError(f"--targets {','.join(unmatched)}: matches no 2-D weight of {info.path}; names look "
                                f"like {', '.join(two_d[:4])}, ... (patterns use * and ?, e.g. 'blk.*.ffn_*')")
    return [n for n in info.tensors if n in out]


def _loss(rt: Runtime, examples) -> dict:
    r = rt.loss(examples)
    return {"loss": round(r.mean, 5), "perplexity": round(math.exp(min(r.mean, 700.0)), 4),
            "tokens": int(r.count.sum())}


def _settings_dict(s: Settings) -> dict:
    d = asdict(s)
    for k, v in d.items():
        if isinstance(v, Path):
            d[k] = str(v)
        elif hasattr(v, "value"):
            d[k] = v.value
        elif isinstance(v, tuple):
            d[k] = list(v)
    return d


def _remove_empty_work(work: Path) -> None:
    try:
        work.rmdir()
    except OSError:
        pass   # still holds an HF source's GGUF or another run's cache


class _Clock:
    def __init__(self):
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self.t, 2)
        self.t = now

