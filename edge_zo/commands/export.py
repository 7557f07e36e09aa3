"""edge-zo export: the personalized adapter as one file, and a merged GGUF for stock llama.cpp.

Writes into OUTDIR:
  adapter.gguf       the sum of the model's sidecar and every --adapter (e.g. tuned deltas), one sparse adapter
  model-merged.gguf  MODEL with that adapter folded into its weights, same types and metadata;
                     runs in any llama.cpp with no adapter (skipped with --no-merge)
  export.json        what was merged, sizes, time and, with --data, the loss the merge costs

Edited blocks are re-quantized to the model's own type (Q4_0/Q4_1/Q5_x/Q8_0/F16/BF16/F32);
weights in K-quant types cannot be re-quantized here and are written as Q8_0 (listed).
A delta smaller than half a 4-bit step vanishes in a 4-bit block (the report's "missed" share
says how much did): --edited-type Q8_0 keeps such deltas, at 8.5 bits per weight for every
edited weight and a slower export (each edited weight is re-quantized whole).

The sidecar beside the model (DIR/sidecar.gguf beside DIR/model.gguf, as `edge-zo convert`
writes them) is summed in first, as tune attaches it; --no-sidecar leaves it out, and it is
left out anyway when an --adapter is a sidecar or an adapter.gguf exported before.

Examples:
  edge-zo export DIR/model.gguf --adapter run/deltas.gguf -o export/
  edge-zo export DIR/model.gguf --adapter run/deltas.gguf -o export/ --data valid.jsonl --kv-f32
  edge-zo export DIR/model.gguf --adapter run/deltas.gguf -o export/ --data valid.jsonl --edited-type Q8_0
  edge-zo export DIR/model.gguf --adapter run/deltas.gguf -o export/ --no-merge
  edge-zo export model.gguf --adapter sidecar.gguf --adapter run/deltas.gguf -o export/   # a sidecar elsewhere
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .. import atomic
from ..adapter import SparseAdapter
from ..dataset import Tokenizer, load_jsonl
from ..errors import InvalidInputError
from ..merge import REQUANTIZABLE, f16_rounding, merge_into_gguf, output_nbytes, plan_merge, sum_adapters
from ..model_info import ModelInfo
from ..runtime import Runtime
from ._common import (adapter_paths, add_allow_other_base, add_runtime_options, add_sidecar_option, runtime_options,
                      say_adapters)

ADAPTER_FILE = "adapter.gguf"
MERGED_FILE = "model-merged.gguf"
REPORT_FILE = "export.json"
LOSSY = 0.5                                       # share of the deltas rounded away above which we warn
LOW_BIT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-zo export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GGUF model file the adapters were made for")
    p.add_argument("--adapter", action="append", default=[], metavar="FILE", required=True,
                   help="sparse adapter GGUF (a sidecar or tuned deltas); repeat to stack them, their values add")
    add_sidecar_option(p)
    add_allow_other_base(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="folder for the outputs (created if missing)")
    p.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help="measure the loss base+adapters vs the merged model on this JSONL file (default: skip)")
    p.add_argument("--chat", action="store_true", help="wrap prompt/completion rows of --data in the chat template")
    p.add_argument("--no-merge", action="store_true", help="write only adapter.gguf (and export.json)")
    p.add_argument("--edited-type", choices=REQUANTIZABLE, default=None,
                   help="write every edited weight in this type "
                        "(default: keep each weight's type; K-quants become Q8_0)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of text")
    add_runtime_options(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    model = ModelInfo.open(args.model)
    paths = adapter_paths(args)
    adapters = [SparseAdapter.load(path) for path in paths]
    for path, a in zip(paths, adapters):
        a.check_against(model, str(path))
        if not args.allow_other_base:
            a.check_base(model.sha256(), model.path, str(path))
    say_adapters("export", paths, args)
    personalized = sum_adapters(adapters, paths)
    plan = None if args.no_merge else plan_merge(model, personalized, args.edited_type)
    data = load_jsonl(args.data) if args.data else None   # bad data fails before the long merge
    out = _output_dir(args.output, model, need_bytes=0 if plan is None else output_nbytes(model, plan))

    report: dict = {"model": str(model.path), "adapters": paths}
    personalized.save(out / ADAPTER_FILE)
    report["adapter"] = {"path": str(out / ADAPTER_FILE), "weights": len(personalized.names),
                         "entries": personalized.n_params, "bytes": (out / ADAPTER_FILE).stat().st_size,
                         "f16_max_abs_rounding": f16_rounding(personalized)}
    merged_path = None
    if plan is not None:
        merged_path = out / MERGED_FILE
        merge = merge_into_gguf(model.path, personalized, merged_path, edited_type=args.edited_type,
                                progress=not args.json)
        report["merge"] = merge.to_dict()
    report["loss"] = _losses(args, list(zip(paths, adapters)), out / ADAPTER_FILE, merged_path, data)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    _write_json(out / REPORT_FILE, report)
    print(json.dumps(report) if args.json else _summary(report, out / REPORT_FILE))
    return 0


def _output_dir(path: str, model: ModelInfo, need_bytes: int) -> Path:
    """Create OUTDIR, prove it writable and roomy enough, and refuse to overwrite the model itself."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".edge-zo-export.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InvalidInputError(f"{out}: cannot write the export there ({exc.strerror or exc}); "
                                "pass another folder with -o") from exc
    for name in (ADAPTER_FILE, MERGED_FILE):
        target = out / name
        if target.exists() and target.samefile(model.path):
            raise InvalidInputError(f"{target} is the input model; pass another folder with -o")
    free = shutil.disk_usage(out).free
    if need_bytes and free < need_bytes + (64 << 20):
        raise InvalidInputError(f"{out}: the merged model needs about {need_bytes / 2**30:.2f} GiB but only "
                                f"{free / 2**30:.2f} GiB are free; free some space, pass another folder with -o, "
                                "or use --no-merge")
    return out


def _losses(args, adapters: list[tuple[str, SparseAdapter]], adapter_file: Path, merged: Path | None, data) -> dict:
    """Mean loss of the base model, base + the given adapters, base + the written adapter
    file (F16 values), and the merged model alone."""
    if data is None:
        return {"skipped": "no --data given; pass --data valid.jsonl to measure what merging costs"}
    opts = runtime_options(args)
    result: dict = {"data": str(data.path), "examples": len(data)}
    with Runtime(args.model, opts) as rt:
        examples = Tokenizer(rt.native, max_tokens=opts.max_tokens, chat=args.chat).examples(data)
        result["tokens"] = int(sum(e.n_targets for e in examples))
        result["base"] = rt.loss(examples).mean
        attached = [rt.attach(a, source=p) for p, a in adapters]
        result["adapters"] = rt.loss(examples).mean
        for att in attached:
            rt.detach(att)
        rt.attach(SparseAdapter.load(adapter_file), source=str(adapter_file))
        result["adapter_file"] = rt.loss(examples).mean
    if merged is not None:
        with Runtime(merged, opts) as rt:
            result["merged"] = rt.loss(examples).mean
        result["merge_gap"] = result["merged"] - result["adapters"]
        change = result["adapters"] - result["base"]
        # Share of the adapters' effect on the loss that the merged model keeps (1.0: all of it).
        result["effect_kept"] = (result["merged"] - result["base"]) / change if change else None
    return result


def _write_json(path: Path, obj: dict) -> None:
    atomic.write_text(path, json.dumps(obj, indent=2) + "\n")


def _summary(r: dict, report_path: Path) -> str:
    a = r["adapter"]
    lines = [f"adapter  {a['path']}  {a['entries']} entries in {a['weights']} weights  {a['bytes'] / 2**20:.2f} MiB"]
    if "merge" in r:
        m = r["merge"]
        lines.append(f"merged   {m['path']}  {m['bytes_out'] / 2**20:.1f} MiB  {len(m['tensors'])} weights "
                     f"re-quantized in {m['seconds']:.1f} s; deltas landed within {m['missed']:.0%} of their norm, "
                     f"other values moved {m['collateral']:.0%} of it")
        converted = [t for t in m["tensors"] if t["source_type"] != t["output_type"]]
        if converted:
            kinds = sorted({f"{t['source_type']} -> {t['output_type']}" for t in converted})
            lines.append(f"note     {len(converted)} edited weights changed type ({', '.join(kinds)}): "
                         + ", ".join(t["name"] for t in converted))
        if m["missed"] > LOSSY and any(t["output_type"] in LOW_BIT for t in m["tensors"]):
            lines.append("note     most deltas are smaller than half a 4/5-bit step and were rounded away; "
                         "--edited-type Q8_0 keeps them (a larger file; compare the losses with --data)")
    loss = r["loss"]
    if "skipped" in loss:
        lines.append(f"loss     skipped: {loss['skipped']}")
    else:
        line = (f"loss     base {loss['base']:.4f}  base+adapters {loss['adapters']:.4f}  "
                f"adapter.gguf {loss['adapter_file']:.4f}")
        if "merged" in loss:
            kept = loss["effect_kept"]
            line += f"  merged {loss['merged']:.4f}  (gap {loss['merge_gap']:+.4f}"
            line += f", {kept:.0%} of the effect kept)" if kept is not None else ")"
        lines.append(line + f"  on {loss['tokens']} target tokens")
    lines.append(f"report   {report_path}  ({r['seconds']:.1f} s)")
    return "\n".join(lines)
