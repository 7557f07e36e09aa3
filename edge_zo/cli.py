"""`edge-zo COMMAND ...`: a small dispatcher that imports a command only when it
runs, so `--help` is instant and torch loads only for the commands that need it."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "convert": "find the sensitive weights; write a dense 4-bit GGUF and a sparse sidecar",
    "tune": "personalize a model: sparse zeroth-order fine-tuning on a JSONL file",
    "eval": "mean loss (and accuracy) of a model, with adapters, on a JSONL file",
    "generate": "generate text with a model and its adapters",
    "export": "sum adapters into one file and merge them into a GGUF for stock llama.cpp",
}

USAGE = "usage: edge-zo COMMAND [options]   (edge-zo COMMAND --help for each)\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {doc}" for name, doc in COMMANDS.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"edge-zo: unknown command '{name}'\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"edge_zo.commands.{name}")
    from .errors import EdgeZoError

    try:
        return module.main(rest) or 0
    except EdgeZoError as exc:
        print(f"edge-zo {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"edge-zo {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
