"""One step of our native sparse SPSA tune against the same step done the PyTorch
way (MeZO-style, fp32 on CPU), side by side in one run: step time and peak memory.

    python -m bench.torch_reference                  # SmolLM2-135M Q4_1, Fisher 0.1% mask, spam batch 8
    python -m bench.torch_reference --steps 5 --threads 2

Both arms take the same step: the same mask (Fisher 0.1% global, as `edge-zo convert`
finds it; the one bench/fidelity.py uses), the same batch (the first batch of the demo's spam
task, tokenized as `edge-zo tune` does), the same z = spsa.direction(seed, step, n), the
same ε and lr (edge_zo.trainer.LoopConfig's defaults), SGD.
- native: edge_zo.Runtime with a sparse adapter on the mask; spsa.estimate writes θ±εz
  into the live values, two llama.cpp forwards, spsa.take_step; the weights stay Q4_1.
- torch: the same GGUF dequantized to float32 (converters.torch_model.model_from_gguf);
  the masked coordinates (mapped to torch layout, q/k row permutation included) are
  perturbed in place on the weights by +εz, −2εz, +εz around two batched forwards
  (right-padded, attention mask, logits only at target positions, inference_mode), then
  θ −= lr·g·z in place.
A third arm, plain, times two llama.cpp forwards of the batch with no adapter attached
(what the native step costs without the sparse path; --no-plain skips it).
Each arm runs in its own process, so its peak RSS (VmHWM, which unlike ru_maxrss starts afresh
at exec instead of carrying over the parent's peak) is that arm's alone; the parent drives them step by step, alternating which goes first, so load from other
jobs on the machine falls on both alike. Step time excludes loading.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/fidelity.py

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from edge_zo import spsa  # noqa: E402
from edge_zo.dataset import Example  # noqa: E402

from ._common import (DEFAULT_BATCH, DEFAULT_EPS, DEFAULT_LR, ROOT, cache_dir, calibration_mask,  # noqa: E402
                      peak_rss_mib, smollm2, task_batch, task_rows, write_json, zero_adapter)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- the two arms (each runs in its own process) ----

class NativeArm:
    def __init__(self, model: str, mask: dict, batch: list[Example], threads: int):
        from edge_zo.runtime import Runtime, RuntimeOptions

        self.rt = Runtime(model, RuntimeOptions(batch_size=len(batch), max_tokens=256, threads=threads))
        self.adapter = zero_adapter(self.rt.info, mask)
        self.rt.attach(self.adapter)
        self.theta = self.adapter.values.copy()
        self.state = spsa.OptimizerState.create(spsa.Optimizer.SGD, len(self.theta))
        self.batch = batch

    def step(self, seed: int, step: int, eps: float, lr: float) -> float:
        z = spsa.direction(seed, step, len(self.theta))
        est = spsa.estimate(self.adapter.values, self.theta, z, eps, lambda: self.rt.loss(self.batch).mean)
        spsa.take_step(self.theta, self.state, [est.g], seed=seed, step=step, lr=lr)
        self.adapter.values[:] = self.theta
        return est.g


class PlainArm:
    """Context for the native arm: two llama.cpp forwards of the batch, no adapter, no update."""

    def __init__(self, model: str, mask: dict, batch: list[Example], threads: int):
        from edge_zo.runtime import Runtime, RuntimeOptions

        self.rt = Runtime(model, RuntimeOptions(batch_size=len(batch), max_tokens=256, threads=threads))
        self.batch = batch

    def step(self, seed: int, step: int, eps: float, lr: float) -> float:
        lp = self.rt.loss(self.batch).mean
        lm = self.rt.loss(self.batch).mean
        return (lp - lm) / (2 * eps)


class TorchArm:
    def __init__(self, model_path: str, mask: dict, batch: list[Example], threads: int):
        import torch

        from converters.fisher import target_parameters
        from converters.torch_model import load_gguf

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        self.model, names, layout = load_gguf(model_path)
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = target_parameters(self.model, names, sorted(mask))
        # The mask's GGUF coordinates in each torch weight's flat layout, in the adapter's order.
        self.segments = []
        for name in sorted(mask):
            p = params[name]
            n_rows, n_in = p.shape
            hf_of_gguf = layout.to_gguf(name, np.arange(n_rows))     # GGUF row i holds torch row hf_of_gguf[i]
            idx = np.asarray(mask[name], np.int64)
            hf_idx = hf_of_gguf[idx // n_in] * n_in + idx % n_in
            self.segments.append((p.data.view(-1), torch.from_numpy(hf_idx)))
        self.n = sum(len(i) for _, i in self.segments)
        # One right-padded batch; logits only where a target is predicted.
        T = max(len(e.tokens) for e in batch)
        ids = np.zeros((len(batch), T), np.int64)
        att = np.zeros((len(batch), T), np.int64)
        for b, e in enumerate(batch):
            ids[b, :len(e.tokens)] = e.tokens
            att[b, :len(e.tokens)] = 1
        self.ids, self.att = torch.from_numpy(ids), torch.from_numpy(att)
        rows, pos = zip(*[(b, p) for b, e in enumerate(batch) for p in np.flatnonzero(e.targets[1:])])
        keep = np.unique(pos)
        self.keep = torch.from_numpy(keep)
        self.rows = torch.tensor(rows)
        self.cols = torch.from_numpy(np.searchsorted(keep, pos))
        self.labels = self.ids[self.rows, torch.tensor(pos) + 1]
        self.torch = torch

    def _perturb(self, z, scale: float) -> None:
        k = 0
        for flat, idx in self.segments:
            flat.index_add_(0, idx, z[k: k + len(idx)], alpha=scale)
            k += len(idx)

    def loss(self) -> float:
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(input_ids=self.ids, attention_mask=self.att, logits_to_keep=self.keep).logits
            return float(torch.nn.functional.cross_entropy(logits[self.rows, self.cols].float(), self.labels))

    def step(self, seed: int, step: int, eps: float, lr: float) -> float:
        z = self.torch.from_numpy(spsa.direction(seed, step, self.n))
        self._perturb(z, eps)
        lp = self.loss()
        self._perturb(z, -2 * eps)
        lm = self.loss()
        self._perturb(z, eps)
        g = (lp - lm) / (2 * eps)
        self._perturb(z, -lr * g)
        return g


def child(args) -> None:
    """Load one arm, then answer 'step K' lines with one JSON line each; 'quit' reports memory."""
    with np.load(args.data) as z:
        mask = {k[5:]: z[k].astype(np.int64) for k in z.files if k.startswith("mask:")}
        batch = [Example(z[f"tok:{i}"], z[f"tgt:{i}"]) for i in range(int(z["n"]))]
    rss0 = rss_mib()
    t = time.perf_counter()
    arm = {"native": NativeArm, "plain": PlainArm, "torch": TorchArm}[args.arm](args.model, mask, batch, args.threads)
    load_s = time.perf_counter() - t
    print(json.dumps({"ready": True, "load_seconds": round(load_s, 2), "rss_before_load_mib": round(rss0, 1),
                      "rss_after_load_mib": round(rss_mib(), 1)}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "quit":
            break
        step = int(cmd[1])
        t = time.perf_counter()
        g = arm.step(args.seed, step, args.eps, args.lr)
        print(json.dumps({"step": step, "seconds": round(time.perf_counter() - t, 3), "g": g}), flush=True)
    print(json.dumps({"peak_rss_mib": round(peak_rss_mib(), 1), "rss_end_mib": round(rss_mib(), 1)}), flush=True)


# ---- the parent ----

def prepare(args):
    """Mask and batch into one npz that the children read (so none of them tokenizes or scores)."""
    args.model = str(args.model or smollm2())
    mask = calibration_mask(args.model, args.cache or cache_dir("fidelity"), args.threads, args.calib_tokens)
    batch = task_batch(args.model, task_rows("spam", args.task_file), args.batch or DEFAULT_BATCH, seed=args.seed)
    path = Path(tempfile.mkdtemp(prefix="edge-zo-torchref-")) / "data.npz"
    arrays = {f"mask:{n}": i for n, i in mask.items()}
    for i, e in enumerate(batch):
        arrays[f"tok:{i}"], arrays[f"tgt:{i}"] = e.tokens, e.targets
    np.savez(path, n=len(batch), **arrays)
    return path, mask, batch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default: edge-zo tune's)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first")
    ap.add_argument("--eps", type=float, default=DEFAULT_EPS)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens of the Fisher mask")
    ap.add_argument("--task-file", type=Path, default=None, help="the spam task's rows as JSONL (fidelity's `rows`)")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-forwards arm")
    ap.add_argument("--arm", choices=["native", "plain", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.arm:
        return child(args)

    data, mask, batch = prepare(args)
    load0 = os.getloadavg()
    procs, ready = {}, {}
    arms = ("native", "torch") if args.no_plain else ("native", "torch", "plain")
    for arm in arms:   # loaded one after the other, so loading never overlaps
        cmd = [sys.executable, "-m", "bench.torch_reference", "--arm", arm, "--data", str(data), "--model", args.model,
               "--threads", str(args.threads), "--eps", str(args.eps), "--lr", str(args.lr), "--seed", str(args.seed)]
        procs[arm] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      stderr=subprocess.DEVNULL, cwd=ROOT)
        ready[arm] = json.loads(procs[arm].stdout.readline())
        print(f"[torch_reference] {arm} loaded: {ready[arm]}", file=sys.stderr, flush=True)
    times = {a: [] for a in procs}
    gs = {a: [] for a in procs}
    for step in range(args.warmup + args.steps):
        order = arms[step % len(arms):] + arms[:step % len(arms)]   # rotate who goes first
        for arm in order:
            procs[arm].stdin.write(f"step {step}\n")
            procs[arm].stdin.flush()
            r = json.loads(procs[arm].stdout.readline())
            gs[arm].append(r["g"])
            if step >= args.warmup:
                times[arm].append(r["seconds"])
            print(f"[torch_reference] step {step} {arm}: {r['seconds']:.2f} s, g={r['g']:+.5f}",
                  file=sys.stderr, flush=True)
    mem = {}
    for arm, p in procs.items():
        p.stdin.write("quit\n")
        p.stdin.flush()
        mem[arm] = json.loads(p.stdout.readline())
        p.wait()
    med = {a: statistics.median(t) for a, t in times.items()}
    result = {
        "model": Path(args.model).name, "sparse_params": int(sum(len(i) for i in mask.values())),
        "batch": len(batch), "tokens": int(sum(len(e.tokens) for e in batch)),
        "target_tokens": int(sum(e.n_targets for e in batch)), "eps": args.eps, "lr": args.lr,
        "threads": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "timed_steps": args.steps, "load_average_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "native": {"step_seconds": times["native"], "step_seconds_median": med["native"], **ready["native"],
                   **mem["native"], "g": gs["native"]},
        "torch_fp32": {"step_seconds": times["torch"], "step_seconds_median": med["torch"], **ready["torch"],
                       **mem["torch"], "g": gs["torch"]},
        "step_time_ratio_torch_over_native": round(med["torch"] / med["native"], 3),
        **({"plain_two_forwards": {"step_seconds": times["plain"], "step_seconds_median": med["plain"], **ready["plain"],
                                   **mem["plain"]},
            "native_step_over_two_plain_forwards": round(med["native"] / med["plain"], 3)} if "plain" in procs else {}),
        "peak_rss_ratio_torch_over_native": round(mem["torch"]["peak_rss_mib"] / mem["native"]["peak_rss_mib"], 3),
    }
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=1))
    data.unlink(missing_ok=True)
    data.parent.rmdir()


if __name__ == "__main__":
    main()
