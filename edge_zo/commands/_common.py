"""Options several commands share: the runtime's size and the adapters to attach.

A model that `edge-zo convert` made has its sidecar beside it (DIR/sidecar.gguf beside
DIR/model.gguf): under the default `--split zero` the model alone lacks its most sensitive
weights. So tune, eval, generate and export find that sidecar the same way (`find_sidecar`),
attach it unless told otherwise, and say which adapters they attached. A stock model without
one has the mask tune built and cached for it (edge_zo.activation_mask; zero values, so
attaching it changes no output), found the same way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..adapter import SparseAdapter
from ..constants import Sparse
from ..errors import InvalidInputError
from ..gguf_io import read_header
from ..merge import PERSONALIZED
from ..runtime import Runtime, RuntimeOptions

SIDECAR_ROLES = ("sidecar", PERSONALIZED)   # adapter.sparse.role of the adapters that hold a sidecar's values


def add_runtime_options(p: argparse.ArgumentParser, batch_size: bool = True) -> None:
    g = p.add_argument_group("runtime")
    if batch_size:
        g.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (default 16)")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens per sequence; longer rows are cut (default 512)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    g.add_argument("--gpu-layers", type=int, default=None, help="layers to offload to a GPU backend (default 0)")
    g.add_argument("--kv-f32", action="store_true", help="keep the KV cache in F32 instead of F16 (and turn flash attention off)")
    g.add_argument("--verbose", action="store_true", help="show llama.cpp's log")


def add_adapter_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", action="append", default=[], metavar="FILE",
                   help="sparse adapter GGUF (a sidecar or tuned deltas); repeat to stack them, their values add")
    add_sidecar_option(p)
    add_allow_other_base(p)


def add_allow_other_base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-other-base", action="store_true",
                   help="use adapters made for another base model (their recorded base sha256 differs); "
                        "for deliberate transplants between models of the same shapes")


def runtime_options(args, **overrides) -> RuntimeOptions:
    for option, least in (("batch_size", 1), ("max_tokens", 1), ("threads", 0)):
        value = overrides.get(option, getattr(args, option, None))
        if value is not None and value < least:
            raise InvalidInputError(f"--{option.replace('_', '-')} must be at least {least}, got {value}")
    d = RuntimeOptions()
    pick = lambda v, default: default if v is None else v  # noqa: E731
    return RuntimeOptions(
        batch_size=overrides.get("batch_size", pick(getattr(args, "batch_size", None), d.batch_size)),
        max_tokens=overrides.get("max_tokens", pick(args.max_tokens, d.max_tokens)),
        threads=pick(args.threads, d.threads),
        gpu_layers=pick(args.gpu_layers, d.gpu_layers),
        kv_f32=args.kv_f32,
        verbose=args.verbose,
    )


def add_sidecar_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-sidecar", action="store_true",
                   help="leave out the sidecar found beside the model (DIR/sidecar.gguf or MODEL.sidecar.gguf) or "
                        "cached for it by tune, which is otherwise attached first unless an --adapter already holds "
                        "a sidecar's values")


def find_sidecar(model: Path, explicit: str | None, cached: bool = True) -> Path | None:
    """`explicit`, else the sidecar `edge-zo convert` wrote beside `model`, else (unless `cached`
    is False) the mask `edge-zo tune` built for this model file and cached by its SHA-256
    (edge_zo.activation_mask), else None."""
    if explicit:
        return Path(explicit)
    for cand in (model.parent / "sidecar.gguf", model.with_suffix(".sidecar.gguf")):
        if cand.is_file():
            return cand
    if cached:
        from ..activation_mask import cached_sidecar

        return cached_sidecar(model)
    return None


def _is_cached(path: str) -> bool:
    from ..activation_mask import mask_dir

    return Path(path).parent == mask_dir()


def adapter_paths(args) -> list[str]:
    """The files of --adapter, after the model's own sidecar where one lies beside it, unless
    --no-sidecar or an --adapter already holds a sidecar's values (a sidecar, or an exported sum)."""
    paths = [str(p) for p in args.adapter]
    if args.no_sidecar or any(_role(p) in SIDECAR_ROLES for p in paths):
        return paths
    sidecar = find_sidecar(Path(args.model), None)
    return paths if sidecar is None else [str(sidecar), *paths]


def say_adapters(command: str, paths: list[str], args) -> None:
    """One line on standard error naming the adapters attached; the sidecar found beside the model is marked."""
    names = [p if p in args.adapter else f"{p} (" + ("the mask tune cached for this model" if _is_cached(p) else
                                                      "found beside the model") + "; --no-sidecar leaves it out)"
             for p in paths]
    print(f"edge-zo {command}: adapters: {', '.join(names) or 'none'}", file=sys.stderr)


def _role(path: str) -> str | None:
    try:
        return read_header(path).get(Sparse.ROLE)
    except (OSError, ValueError):
        return None   # SparseAdapter.load says what is wrong with the file


def attach_adapters(rt: Runtime, paths: list[str], allow_other_base: bool = False) -> None:
    """Load every adapter first (so a bad one fails before any is attached), check each
    against the model's shapes and, unless allowed otherwise, its recorded base model."""
    adapters = [SparseAdapter.load(path) for path in paths]
    for path, adapter in zip(paths, adapters):
        if not allow_other_base:
            adapter.check_base(rt.info.sha256(), rt.info.path, str(path))
        rt.attach(adapter, source=str(path))
