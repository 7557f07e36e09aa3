"""edge-zo eval: mean loss per target token of a model (plus adapters) on a JSONL file.

The sidecar beside the model (DIR/sidecar.gguf beside DIR/model.gguf) is attached first,
as tune attaches it; --no-sidecar leaves it out.

Examples:
  edge-zo eval DIR/model.gguf valid.jsonl
  edge-zo eval DIR/model.gguf valid.jsonl --adapter run/deltas.gguf --json
"""
from __future__ import annotations

import argparse
import json
import math
import time

from ..dataset import Tokenizer, load_jsonl
from ..errors import NativeRuntimeError
from ..runtime import Runtime
from ._common import (adapter_paths, add_adapter_option, add_runtime_options, attach_adapters, runtime_options,
                      say_adapters)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-zo eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GGUF model file")
    p.add_argument("data", help="JSONL file: prompt/completion, messages or text rows (see README 'Data format')")
    add_adapter_option(p)
    p.add_argument("--chat", action="store_true", help="wrap prompt/completion rows in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_runtime_options(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    data = load_jsonl(args.data)
    t0 = time.perf_counter()
    with Runtime(args.model, runtime_options(args)) as rt:
        adapters = adapter_paths(args)
        attach_adapters(rt, adapters, args.allow_other_base)
        say_adapters("eval", adapters, args)
        examples = Tokenizer(rt.native, max_tokens=rt.options.max_tokens, chat=args.chat).examples(data)
        result = rt.loss(examples)
        if not math.isfinite(result.mean):
            raise NativeRuntimeError(f"{args.data}: the loss is {result.mean} with {args.model}"
                                     + (f" and {', '.join(args.adapter)}" if args.adapter else "")
                                     + ": the model or an adapter gives non-finite log-likelihoods; check that "
                                     "the adapters belong to this model and come from a run that did not diverge")
        report = {
            "loss": result.mean,
            "perplexity": math.exp(min(result.mean, 700.0)),
            "tokens": int(result.count.sum()),
            "examples": len(examples),
            "format": data.format.value,
        }
        if data.has_choices:
            report["accuracy"] = rt.accuracy(examples)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if args.json:
        print(json.dumps(report))
    else:
        acc = f"  accuracy {report['accuracy']:.4f}" if "accuracy" in report else ""
        print(f"loss {report['loss']:.4f}  ppl {report['perplexity']:.3f}{acc}  "
              f"({report['tokens']} target tokens, {report['examples']} examples, {report['seconds']} s)")
    return 0
