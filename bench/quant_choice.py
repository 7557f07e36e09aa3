"""Which 4-bit type `edge-zo convert` should quantize a float source to: Q4_0 or Q4_1.

    python -m bench.quant_choice                    # Gemma-3-270M dequantized to F32, 2048 held-out tokens
    python -m bench.quant_choice --model m.gguf --rounds 7

Only Q4_0 and Q4_1 can be written bit-exactly without llama.cpp's quantizer.
The source is a real model dequantized to F32 (no float model installs from
the registries; Gemma-3-270M Q4_K_M is mostly Q5_0/Q8_0/Q6_K, so close to its
float weights). Each type is made by `edge-zo convert --mask random --split
keep` (dense = the quantized source, unchanged at the mask) and scored on the
same held-out text; speed is llama.cpp's forward over one batch, the two
models alternating for `--rounds` rounds (median tokens per second).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from converters import calib
from converters.convert import MODEL_NAME, Settings, run
from converters.dense import Split
from converters.fisher import MaskMethod
from edge_zo.gguf_io import write_f32_copy
from edge_zo.runtime import Runtime, RuntimeOptions

from ._common import emit, gemma


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    src = args.model or gemma()
    result = {"model": str(src), "types": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f32 = tmp / "f32.gguf"
        write_f32_copy(src, f32)
        models = {}
        for q in ("Q4_0", "Q4_1"):
            r = run(Settings(f32, tmp / q, mask=MaskMethod.RANDOM, split=Split.KEEP, quant=q, calib_tokens=512,
                             eval_tokens=args.eval_tokens, progress=False))
            models[q] = tmp / q / MODEL_NAME
            result["types"][q] = {"f32_loss": r.quality["source"]["loss"], "loss": r.quality["dense"]["loss"],
                                  "perplexity": r.quality["dense"]["perplexity"],
                                  "f32_perplexity": r.quality["source"]["perplexity"],
                                  "bytes": models[q].stat().st_size}
        opts = RuntimeOptions(batch_size=4, max_tokens=512)
        with Runtime(models["Q4_0"], opts) as rt:
            batch = calib.load(rt.native, None, 2048, 0, 512).train
        n_tok = sum(len(e.tokens) for e in batch)
        speeds = {q: [] for q in models}
        runtimes = {q: Runtime(m, opts) for q, m in models.items()}
        for q in models:
            runtimes[q].loss(batch)          # warm-up
        for _ in range(args.rounds):
            for q, rt in runtimes.items():
                t = time.perf_counter()
                rt.loss(batch)
                speeds[q].append(n_tok / (time.perf_counter() - t))
        for q, rt in runtimes.items():
            rt.close()
            result["types"][q]["tokens_per_s"] = round(statistics.median(speeds[q]), 1)
    return emit(result, args.json)


if __name__ == "__main__":
    sys.exit(main())
