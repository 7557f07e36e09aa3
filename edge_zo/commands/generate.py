"""edge-zo generate: generate text with a model and its sparse adapters.

The sidecar beside the model (DIR/sidecar.gguf beside DIR/model.gguf) is attached first,
as tune attaches it; --no-sidecar leaves it out.

Examples:
  edge-zo generate DIR/model.gguf --prompt "My dog's name is"
  edge-zo generate DIR/model.gguf --chat --prompt "What is my dog's name?" --adapter run/deltas.gguf
"""
from __future__ import annotations

import argparse
import sys

from ..errors import InvalidInputError
from ..runtime import Runtime
from ._common import (adapter_paths, add_adapter_option, add_runtime_options, attach_adapters, runtime_options,
                      say_adapters)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-zo generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GGUF model file")
    p.add_argument("--prompt", "-p", required=True, help="text to continue")
    add_adapter_option(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", "-n", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_runtime_options(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise InvalidInputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 0.0 <= args.temp < float("inf"):
        raise InvalidInputError(f"--temp must be 0 (greedy) or a positive number, got {args.temp}")
    if not 0.0 < args.top_p <= 1.0:
        raise InvalidInputError(f"--top-p must lie in (0, 1], got {args.top_p}")
    with Runtime(args.model, runtime_options(args, batch_size=1, max_tokens=args.max_tokens or 2048)) as rt:
        adapters = adapter_paths(args)
        attach_adapters(rt, adapters, args.allow_other_base)
        say_adapters("generate", adapters, args)
        for piece in rt.generate(args.prompt, max_tokens=args.max_new_tokens, temperature=args.temp,
                                 top_p=args.top_p, seed=args.seed, chat=args.chat):
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
