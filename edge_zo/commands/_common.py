"""Options several commands share: the runtime's size and the adapters to attach."""
from __future__ import annotations

import argparse

from ..adapter import SparseAdapter
from ..runtime import Runtime, RuntimeOptions


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


def runtime_options(args, **overrides) -> RuntimeOptions:
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


def attach_adapters(rt: Runtime, paths: list[str]) -> None:
    for path in paths:
        rt.attach(SparseAdapter.load(path), source=str(path))
