"""Which dense 4-bit type, and which of llama.cpp's CPU weight layouts, tune should run on:
speed and quality measured together, side by side in one run.

    python -m bench.dense_type                              # the demo's converted SmolLM2, 2 threads
    python -m bench.dense_type --model-dir DIR --types Q4_1 Q4_0 Q4_K_M --rounds 5 --json out.json

DIR holds `edge-zo convert`'s model.gguf and sidecar.gguf. Each other type is made from
model.gguf by llama.cpp's own quantizer (what `edge-zo convert --quant` or a user's
`llama-quantize` gives), the sidecar unchanged. For every type, with llama.cpp's repacked CPU
buffers off and on:
  - speed: one forward of a tune step's batch (task rows, `--batch` sequences, logits at the
    last position as the choices objective reads them), the variants taking turns for
    `--rounds` rounds; median seconds and the ratio to the first type without repacking;
  - quality: perplexity of held-out public-domain text (convert's calibration corpus, the part
    it does not calibrate on) with the sidecar attached, i.e. the model tuning starts from.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edge_zo import _native
from edge_zo.adapter import SparseAdapter
from edge_zo.model_info import ModelInfo
from edge_zo.runtime import Runtime, RuntimeOptions

from ._common import emit, last_target_only, log, task_batch, task_rows


def _type_name(path: Path) -> str:
    """The file's llama.cpp type (general.file_type), else its block matmuls' most common type."""
    import collections

    import gguf

    info = ModelInfo.open(path)
    if info.file_type is not None:
        return gguf.LlamaFileType(int(info.file_type)).name.removeprefix("MOSTLY_")
    return collections.Counter(info.tensors[n].type_name for n in info.block_matmul_weights()).most_common(1)[0][0]


def _perplexity(model: Path, sidecar: Path, eval_tokens: int, threads: int) -> float:
    from converters import calib

    with Runtime(model, RuntimeOptions(batch_size=4, max_tokens=512, threads=threads)) as rt:
        held = calib.load(rt.native, None, 512, eval_tokens, 512).held_out
        rt.attach(SparseAdapter.load(sidecar), "sidecar")
        return math.exp(rt.loss(held).mean)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=None, help="convert's output (default: the demo's SmolLM2)")
    ap.add_argument("--types", nargs="+", default=["Q4_1", "Q4_0", "Q4_K_M"],
                    help="llama.cpp file types; model.gguf's own type is used as is")
    ap.add_argument("--task", default="spam", help="the task whose rows make the timed batch")
    ap.add_argument("--task-file", type=Path, default=None, help="a JSONL file to take those rows from instead")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.model_dir is None:
        from edge_zo.demo import prepare

        args.model_dir = Path(prepare()[0]).parent
    src, sidecar = args.model_dir / "model.gguf", args.model_dir / "sidecar.gguf"
    own = _type_name(src)
    result = {"model_dir": str(args.model_dir), "source_type": own, "threads": args.threads, "batch": args.batch,
              "types": {}}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for q in args.types:
            if q.upper() == own:
                files[q] = src
                continue
            files[q] = Path(tmp) / f"{q}.gguf"
            t = time.perf_counter()
            _native.quantize(str(src), str(files[q]), q, threads=args.threads)
            log("dense_type", f"{own} -> {q} in {time.perf_counter() - t:.1f} s")
        batch = last_target_only(task_batch(src, task_rows(args.task, args.task_file), args.batch))
        n_tok = sum(len(e.tokens) for e in batch)
        runtimes = {}
        for q, f in files.items():
            for repack in (False, True):
                runtimes[q, repack] = rt = Runtime(f, RuntimeOptions(batch_size=args.batch, max_tokens=args.max_tokens,
                                                                      threads=args.threads, extra_bufts=repack))
                rt.attach(SparseAdapter.load(sidecar), "sidecar")
                rt.loss(batch)   # warm-up: page in the weights, build the graph once
        seconds = {k: [] for k in runtimes}
        for _ in range(args.rounds):
            for k, rt in runtimes.items():
                t = time.perf_counter()
                rt.loss(batch)
                seconds[k].append(time.perf_counter() - t)
        for rt in runtimes.values():
            rt.close()
        base = statistics.median(seconds[args.types[0], False])
        for q, f in files.items():
            row = {"bytes": f.stat().st_size, "perplexity": round(_perplexity(f, sidecar, args.eval_tokens,
                                                                              args.threads), 3)}
            for repack in (False, True):
                med = statistics.median(seconds[q, repack])
                key = "repacked" if repack else "plain"
                row[key] = {"forward_s": round(med, 3), "tokens_per_s": round(n_tok / med, 1),
                            "speedup": round(base / med, 2)}
            result["types"][q] = row
            print(f"{q:8s} {row['bytes'] / 2**20:6.1f} MiB  ppl {row['perplexity']:8.3f}  "
                  f"plain {row['plain']['forward_s']:.3f} s ({row['plain']['speedup']:.2f}x)  "
                  f"repacked {row['repacked']['forward_s']:.3f} s ({row['repacked']['speedup']:.2f}x)", flush=True)
    result["tokens"] = n_tok
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
