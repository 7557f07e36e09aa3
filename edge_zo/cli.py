"""`edge-zo COMMAND ...`: a small dispatcher that imports a command only when it
runs, so `--help` is instant and torch loads only for the commands that need it.

It is also the one door between the project's two sides. The device side
(edge_zo/: the native gateway, runtime, adapters, data, SPSA, trainer, export)
never imports the workstation side (converters/: Hugging Face folders, torch,
Fisher, dense writing), which builds on it. `convert` lives on the workstation
side, and so does the Fisher mask of `tune --mask-from-data`: the tables below
name their modules, which are imported only when called."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {  # name: (module with main(argv), what it does)
    "convert": ("converters.cli_convert", "find the sensitive weights; write a dense 4-bit GGUF and a sparse sidecar"),
    "tune": ("edge_zo.commands.tune", "personalize a model: sparse zeroth-order fine-tuning on a JSONL file"),
    "eval": ("edge_zo.commands.eval", "mean loss (and accuracy) of a model, with adapters, on a JSONL file"),
    "generate": ("edge_zo.commands.generate", "generate text with a model and its adapters"),
    "export": ("edge_zo.commands.export", "sum adapters into one file and merge them into a GGUF for stock llama.cpp"),
}

USAGE = "usage: edge-zo COMMAND [options]   (edge-zo COMMAND --help for each)\n\ncommands:\n" + "\n".join(
    f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items())


# What the device side asks of the workstation side: function name -> its module, imported when called.
WORKSTATION = {"fisher_sidecar": "converters.mask", "calibration_sidecar": "converters.mask"}


def fisher_sidecar(model, examples, density: float = 1e-3):
    """`tune --mask-from-data`: a Fisher mask on the training rows, as a sidecar (needs torch)."""
    return _workstation("fisher_sidecar")(model, examples, density=density)


def calibration_sidecar(model, density: float = 1e-3, threads: int = 0, log=None):
    """`tune` on a model without a sidecar, where torch is installed: a Fisher mask on the default
    calibration corpus, as a sidecar, and a report (edge_zo.activation_mask.ensure)."""
    return _workstation("calibration_sidecar")(model, density=density, threads=threads, log=log)


def _workstation(name: str):
    return getattr(importlib.import_module(WORKSTATION[name]), name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"edge-zo: unknown command '{name}'\n\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
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
