"""`edge-zo tune` on W local workers (torchrun, gloo): directions per second,
bytes exchanged per step, and what the same step would cost if the workers
exchanged gradients or deltas instead of one scalar per direction.

    python -m bench.distributed                                  # SmolLM2-135M, 0.1%, Q = 4, W = 1 2 4
    python -m bench.distributed --workers 1 2 4 8 16 --directions 16 --cores 16

Every W runs the real command on the same model, sparse set, data and Q: W = 1
is one plain process with every core, W > 1 is torchrun with cores / W threads
per worker (or --threads each), a GPU hidden from them. A run's speed is rank 0's median step time over
the steps after the first (the all-gather included, and with it the wait for
the slowest worker); directions/s = Q / that. Bytes per step are what gloo's
ring all-gather sends, counted from the payload (TCP and gloo headers not
included); the alternatives are ring all-reduces of float32 vectors,
2 (W − 1) / W · 4 n bytes per worker.

Then, with no model, W workers time the exchange alone on this host: the
step's all-gather of scalars (edge_zo.distributed.Team.gather), and the gloo
all-reduce of a float32 vector the size of the sparse set and of the dense model,
which is what a step would cost if gradients or deltas travelled instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_zo import distributed, run_dir
from edge_zo.corpora import calibration_text
from edge_zo.model_info import ModelInfo

from ._common import ROOT, random_adapter, smollm2

LINK_BYTES_PER_S = 1e9 / 8   # 1 Gb/s Ethernet, to put the byte counts in seconds


def all_reduce_bytes(n_floats: int, w: int) -> int:
    """Bytes one worker sends in a ring all-reduce of n float32 values."""
    return 0 if w == 1 else int(2 * (w - 1) / w * 4 * n_floats)


def python_path() -> str:
    """The workers import this checkout, and whatever PYTHONPATH already names (carried wheels)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def write_task(root: Path, rows: int, words: int) -> tuple[Path, Path]:
    """`rows` text rows of `words` words of real prose, and a one-row validation file."""
    text, _ = calibration_text(rows * words * 8)
    ws = text.split()
    lines = [json.dumps({"text": " ".join(ws[i * words:(i + 1) * words])}) for i in range(rows + 1)]
    (root / "train.jsonl").write_text("\n".join(lines[:rows]) + "\n")
    (root / "valid.jsonl").write_text(lines[rows] + "\n")
    return root / "train.jsonl", root / "valid.jsonl"


def run(w: int, args, model: str, sidecar: Path, train: Path, valid: Path, out: Path) -> dict:
    threads = args.threads or max(1, args.cores // w)
    tune = ["-m", "edge_zo", "tune", model, str(train), "--valid", str(valid), "--sidecar", str(sidecar),
            "-o", str(out), "--quiet", "--steps", str(args.steps), "--directions", str(args.directions),
            "--batch-size", str(args.batch_size), "--max-tokens", str(args.tokens), "--threads", str(threads),
            "--lr", "1e-4", "--eps", "3e-3", "--eval-every", "1000000", "--save-every", "1000000"]   # no searches
    launch = [] if w == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(w)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *launch, *tune], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": python_path(), "OMP_NUM_THREADS": str(threads),
                               "CUDA_VISIBLE_DEVICES": ""})   # CPU workers: llama.cpp would move big matmuls to a GPU
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"W={w} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    steps = [r for r in run_dir.read_metrics(out) if "step_seconds" in r][1:]
    step_s = statistics.median(r["step_seconds"] for r in steps)
    gather_s = statistics.median(r.get("gather_seconds", 0.0) for r in steps)
    return {"workers": w, "threads_per_worker": threads, "step_median_s": step_s, "gather_median_s": gather_s,
            "directions_per_s": args.directions / step_s, "wall_s": wall}


def exchange_worker(q: int, n_sparse: int, n_dense: int, rounds: int) -> None:
    """Under torchrun: time the exchange alone; rank 0 prints one EXCHANGE line."""
    import torch
    import torch.distributed as dist

    from edge_zo.spsa import Estimate

    world = distributed.World.from_env()
    team = distributed.Team.join(world, 600)
    local = {d: Estimate(0.1 * d, 1.0, 2.0) for d in world.directions(q)}

    def timed(fn, n):
        ts = []
        for _ in range(n):
            dist.barrier()
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    out = {"workers": world.size, "scalars_gather_s": timed(lambda: team.gather(local, False, q), rounds)}
    sparse = torch.ones(n_sparse, dtype=torch.float32)
    out["sparse_allreduce_s"] = timed(lambda: dist.all_reduce(sparse), max(3, rounds // 10))
    if n_dense:
        dense = torch.ones(n_dense, dtype=torch.float32)
        out["dense_allreduce_s"] = timed(lambda: dist.all_reduce(dense), 2)
    team.close()
    if world.is_main:
        print("EXCHANGE " + json.dumps(out), flush=True)


def exchange(w: int, q: int, n_sparse: int, n_dense: int, rounds: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(w),
           "-m", "bench.distributed", "--exchange-worker", str(q), str(n_sparse), str(n_dense), str(rounds)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": python_path()})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("EXCHANGE ")), None)
    if proc.returncode or line is None:
        sys.exit(f"exchange W={w} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("EXCHANGE "):])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 5 and argv[0] == "--exchange-worker":
        return exchange_worker(*(int(x) for x in argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--directions", type=int, default=4, help="Q, the same for every W")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.001)
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared among the W workers")
    ap.add_argument("--threads", type=int, default=0, help="threads per worker (default: cores / W)")
    ap.add_argument("--rounds", type=int, default=200, help="all-gathers timed per W in the exchange-only part")
    ap.add_argument("--no-dense", action="store_true", help="skip timing the all-reduce of a dense-model-sized vector")
    args = ap.parse_args(argv)
    model = str(args.model or smollm2())

    with tempfile.TemporaryDirectory(prefix="edge_zo_bench_") as tmp:
        root = Path(tmp)
        info = ModelInfo.open(model)
        adapter = random_adapter(info, args.density, seed=0)
        sidecar = root / "sidecar.gguf"
        adapter.save(sidecar)
        n_sparse, n_dense = adapter.n_params, sum(t.n_elements for t in info.tensors.values())
        train, valid = write_task(root, rows=64, words=args.tokens)
        results = [run(w, args, model, sidecar, train, valid, root / f"w{w}") for w in args.workers]
    exchanges = [exchange(w, args.directions, n_sparse, 0 if args.no_dense else n_dense, args.rounds)
                 for w in args.workers if w > 1]

    base = next((r["directions_per_s"] for r in results if r["workers"] == 1), None)
    q = args.directions
    for r in results:
        w = r["workers"]
        r["speedup"] = r["directions_per_s"] / base if base else None
        r["scalar_bytes_per_worker_per_step"] = distributed.step_sent_bytes(q, w)
        r["scalar_bytes_per_step_all_workers"] = w * distributed.step_sent_bytes(q, w)
        # What a data-parallel step would send instead: the same update built from gradients, or θ itself.
        r["sparse_grad_allreduce_bytes_per_worker"] = all_reduce_bytes(n_sparse, w)
        r["deltas_allreduce_bytes_per_worker"] = all_reduce_bytes(n_sparse, w)
        r["dense_grad_allreduce_bytes_per_worker"] = all_reduce_bytes(n_dense, w)
        r["dense_grad_s_at_1gbps"] = r["dense_grad_allreduce_bytes_per_worker"] / LINK_BYTES_PER_S
        r["sparse_grad_s_at_1gbps"] = r["sparse_grad_allreduce_bytes_per_worker"] / LINK_BYTES_PER_S
        r["scalar_s_at_1gbps"] = r["scalar_bytes_per_worker_per_step"] / LINK_BYTES_PER_S
    summary = {"model": Path(model).name, "sparse_params": n_sparse, "dense_params": n_dense, "directions": q,
               "batch_size": args.batch_size, "tokens": args.tokens, "steps": args.steps, "cores": args.cores,
               "threads": args.threads or "cores / W",
               "host_cpus": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "results": results,
               "exchange_only": exchanges}
    for r in results:
        print(f"W={r['workers']}: {r['directions_per_s']:.2f} directions/s (x{r['speedup']:.2f}), "
              f"step {r['step_median_s']:.3f} s of which all-gather {r['gather_median_s'] * 1e3:.1f} ms, "
              f"{r['scalar_bytes_per_worker_per_step']} B/worker/step; sparse gradients would send "
              f"{r['sparse_grad_allreduce_bytes_per_worker']:,} B, dense gradients "
              f"{r['dense_grad_allreduce_bytes_per_worker']:,} B", file=sys.stderr)
    for e in exchanges:
        print(f"W={e['workers']}, exchange alone: scalars {e['scalars_gather_s'] * 1e6:.0f} us, sparse-gradient "
              f"all-reduce {e['sparse_allreduce_s'] * 1e3:.1f} ms"
              + (f", dense-gradient all-reduce {e['dense_allreduce_s']:.2f} s" if "dense_allreduce_s" in e else ""),
              file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
