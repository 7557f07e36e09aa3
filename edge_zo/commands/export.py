"""edge-zo export: what was tuned, as files stock llama.cpp runs, and proof that they keep it.

Writes into OUTDIR:
  adapter.gguf        the sum of the sidecar and every --adapter: one sparse adapter for edge-zo
  model-merged.gguf   MODEL with that adapter folded into its weights; runs in any llama.cpp, llama-server,
                      Ollama or LM Studio with no adapter (skipped with --no-merge)
  lora.gguf           the tuned deltas alone as a llama.cpp LoRA adapter (`llama-cli -m BASE --lora lora.gguf`,
                      Ollama `ADAPTER`), to be applied to the model before tuning (skipped with --no-lora)
  model-original.gguf the model before tuning (MODEL with its sidecar folded in), the base the LoRA applies to;
                      written only when the sidecar holds values and no --lora-base is given
  export.json         what was written, sizes, times and, with --data, the held-out comparison

How the merged model keeps the deltas: a tuned delta is often smaller than half a 4-bit step, so
re-quantizing its block into the model's own 4-bit type rounds it away. Every edited weight is merged
in its own type and in the finer types that hold its grid (Q5_0 at half a Q4_0 step, Q8_0 at a
sixteenth: every other value stays exactly where it was), each result's error against the adapter
path is measured (weighted by the input activations of a short calibration text), and the upgrades
that remove the most error per added byte are bought first, until the file reaches --max-size times
the model's size. --edited-type forces one type for every edited weight instead.

How the LoRA is made: each weight's delta is sparse and sits in a few input columns, so its
activation-weighted SVD is short; each weight gets the fewest ranks that capture --lora-keep of
its own delta, and over --lora-max-size of the model's size the ranks holding the least of their
weight per byte go first.

Measured on SmolLM2, 400 held-out rows (docs/export.md): the merged file at 1.15x kept the accuracy
(0.608 against 0.610) but not all of the loss over the choices (+2.6%); the LoRA, 2.0% of the
model's size, kept all of it.

With --data, every variant is scored on the rows in one pass each (loss and, for rows with
choices, the cross-entropy over the choices and accuracy): the original model (MODEL + sidecar,
before tuning), the adapter path (+ the tuned deltas: what `edge-zo eval --adapter` measures), the
merged GGUF, and the LoRA run by stock llama-cpp-python on its base. The report says plainly when
an export keeps less than it should: the merged model's loss more than 2% above the adapter path's
or its accuracy more than 1 point off; the LoRA keeping less than 90% of the loss improvement.
For rows with choices the loss judged is the one over the choices, which tune minimizes there.

The sidecar beside the model (DIR/sidecar.gguf beside DIR/model.gguf, as `edge-zo convert`
writes them) is summed in first, as tune attaches it; --no-sidecar leaves it out, and it is
left out anyway when an --adapter is a sidecar or an adapter.gguf exported before.

Examples:
  edge-zo export DIR/model.gguf --adapter run/deltas.gguf -o export/ --data test.jsonl
  edge-zo export DIR/model.gguf --adapter run/deltas.gguf -o export/ --lora-base source.gguf   # the GGUF you converted
  edge-zo export DIR/model.gguf --adapter run/deltas.gguf -o export/ --max-size 1.0            # same size, own types
  edge-zo export DIR/model.gguf --adapter run/deltas.gguf -o export/ --edited-type Q8_0
  edge-zo export DIR/model.gguf --adapter run/deltas.gguf -o export/ --no-merge --no-lora      # adapter.gguf only
  edge-zo export model.gguf --adapter sidecar.gguf --adapter run/deltas.gguf -o export/         # a sidecar elsewhere
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .. import atomic
from ..adapter import SparseAdapter
from ..constants import Sparse
from ..dataset import Tokenizer, load_jsonl
from ..errors import EdgeZoError, InvalidInputError
from ..lora_export import lora_unsupported
from ..merge import REQUANTIZABLE, f16_rounding, merge_into_gguf, output_nbytes, plan_merge, sum_adapters
from ..model_info import ModelInfo
from ..runtime import Runtime
from ._common import (SIDECAR_ROLES, adapter_paths, add_allow_other_base, add_runtime_options, add_sidecar_option,
                      runtime_options, say_adapters)

ADAPTER_FILE = "adapter.gguf"
MERGED_FILE = "model-merged.gguf"
LORA_FILE = "lora.gguf"
ORIGINAL_FILE = "model-original.gguf"
REPORT_FILE = "export.json"

# Defaults and targets, in one place (docs/export.md measures them).
MAX_SIZE = 1.15            # merged file, times the model's size
LORA_KEEP = 0.99           # share of the deltas' activation-weighted norm^2 the LoRA captures
LORA_MAX_SIZE = 0.05       # LoRA file, share of the model's size
CALIB_TOKENS = 1024        # calibration tokens for the activation statistics
MERGED_LOSS_TOLERANCE = 0.02     # merged loss may exceed the adapter path's by this share
MERGED_ACCURACY_TOLERANCE = 0.01  # and its accuracy may differ by this much
LORA_KEPT_TARGET = 0.90          # share of the loss improvement the LoRA must keep


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
                   help="held-out rows: score the original model, the adapter path and each export on them "
                        "(default: skip)")
    p.add_argument("--chat", action="store_true", help="wrap prompt/completion rows of --data in the chat template")
    g = p.add_argument_group("merged GGUF")
    g.add_argument("--no-merge", action="store_true", help="do not write model-merged.gguf")
    g.add_argument("--max-size", type=float, default=None, metavar="X",
                   help=f"largest merged file, times the model's size: room for edited weights in Q8_0 where "
                        f"4 bits lose their deltas (default {MAX_SIZE}; 1.0 keeps every weight's type)")
    g.add_argument("--edited-type", choices=REQUANTIZABLE, default=None,
                   help="write every edited weight in this type instead of choosing per weight")
    g = p.add_argument_group("LoRA adapter")
    g.add_argument("--no-lora", action="store_true", help="do not write lora.gguf")
    g.add_argument("--lora-keep", type=float, default=None, metavar="SHARE",
                   help=f"share of the deltas' activation-weighted effect the ranks must capture "
                        f"(default {LORA_KEEP})")
    g.add_argument("--lora-max-size", type=float, default=None, metavar="SHARE",
                   help=f"largest LoRA file, as a share of the model's size (default {LORA_MAX_SIZE})")
    g.add_argument("--lora-base", default=None, metavar="GGUF",
                   help="the model the LoRA is applied to: the one you tuned from, e.g. the GGUF given to "
                        f"`edge-zo convert` (default: MODEL when the sidecar is all zeros, else "
                        f"{ORIGINAL_FILE}, written for it)")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help=f"tokens of calibration text whose activations weight the errors (default {CALIB_TOKENS}; "
                        "0: plain weight-space errors)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object instead of text")
    add_runtime_options(p)
    return p


def _pick(value, default):
    return default if value is None else value


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    settings = {"max_size": _pick(args.max_size, MAX_SIZE), "lora_keep": _pick(args.lora_keep, LORA_KEEP),
                "lora_max_size": _pick(args.lora_max_size, LORA_MAX_SIZE),
                "calib_tokens": _pick(args.calib_tokens, CALIB_TOKENS)}
    _check_settings(settings)
    model = ModelInfo.open(args.model)
    paths = adapter_paths(args)
    adapters = [SparseAdapter.load(path) for path in paths]
    for path, a in zip(paths, adapters):
        a.check_against(model, str(path))
        if not args.allow_other_base:
            a.check_base(model.sha256(), model.path, str(path))
    say_adapters("export", paths, args)
    personalized = sum_adapters(adapters, paths)
    original, tuned = _split(adapters, paths)
    plan = None if args.no_merge else plan_merge(model, personalized, args.edited_type)
    lora_skipped = None
    if args.no_lora:
        lora_skipped = "--no-lora"
    elif tuned is None:
        lora_skipped = ("every adapter holds a sidecar's values (or is an exported sum), so the tuned deltas alone "
                        "are unknown; pass the sidecar and the deltas.gguf separately")
    elif lora_unsupported(model, tuned):
        lora_skipped = (f"a llama.cpp LoRA here covers 2-D matmul weights, and the deltas also edit "
                        f"{', '.join(lora_unsupported(model, tuned))}; use the merged GGUF")
    want_lora = lora_skipped is None
    if lora_skipped and not args.no_lora:
        _say(f"no LoRA: {lora_skipped}")
    lora_base = Path(args.lora_base) if args.lora_base else None
    if lora_base is not None:
        ModelInfo.open(lora_base)   # a missing or broken file fails before the long work
    data = load_jsonl(args.data) if args.data else None   # bad data fails before the long merge
    model_bytes = model.path.stat().st_size
    need = (0 if plan is None else int(model_bytes * settings["max_size"])) + \
        (model_bytes if want_lora and lora_base is None and _has_values(original) else 0)
    out = _output_dir(args.output, model, need_bytes=need)

    report: dict = {"model": str(model.path), "model_bytes": model_bytes, "adapters": paths, "settings": settings}
    personalized.save(out / ADAPTER_FILE)
    report["adapter"] = {"path": str(out / ADAPTER_FILE), "weights": len(personalized.names),
                         "entries": personalized.n_params, "bytes": (out / ADAPTER_FILE).stat().st_size,
                         "f16_max_abs_rounding": f16_rounding(personalized)}
    opts = runtime_options(args)
    e_x2 = None
    if (plan is not None and args.edited_type is None) or want_lora:
        e_x2, report["activations"] = _activation_stats(model.path, original, personalized.names,
                                                        settings["calib_tokens"], opts.threads)
    merged_path = None
    if plan is not None:
        merged_path = out / MERGED_FILE
        report["merge"] = _merge(model, personalized, original, merged_path, args.edited_type,
                                 settings["max_size"], e_x2, progress=not args.json)
    lora_path = None
    if lora_skipped:
        report["lora"] = {"skipped": lora_skipped}
    if want_lora:
        lora_path = out / LORA_FILE
        report["lora"] = _lora(model, tuned, lora_path, settings, e_x2)
        if lora_base is None:
            lora_base = model.path
            if _has_values(original):
                lora_base = out / ORIGINAL_FILE
                base = merge_into_gguf(model.path, original, lora_base, progress=not args.json)
                report["original_gguf"] = {"path": str(lora_base), "bytes": base.bytes_out,
                                           "seconds": round(base.seconds, 3)}
        report["lora"]["base"] = str(lora_base)
    if data is not None:
        report["evaluation"] = _evaluate(args, opts, model.path, original, adapters, paths, merged_path,
                                         lora_path, lora_base, data)
    else:
        report["evaluation"] = {"skipped": "no --data given; pass --data held-out.jsonl to measure what each "
                                           "export keeps"}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    atomic.write_text(out / REPORT_FILE, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report) if args.json else _summary(report, out / REPORT_FILE))
    return 0


def _say(msg: str) -> None:
    print(f"edge-zo export: {msg}", file=sys.stderr)


def _check_settings(s: dict) -> None:
    if not s["max_size"] >= 1.0:
        raise InvalidInputError(f"--max-size must be at least 1.0 (the model's own size), got {s['max_size']}")
    if not 0.0 < s["lora_keep"] <= 1.0:
        raise InvalidInputError(f"--lora-keep must be a share in (0, 1], got {s['lora_keep']}")
    if not 0.0 < s["lora_max_size"] <= 1.0:
        raise InvalidInputError(f"--lora-max-size must be a share in (0, 1], got {s['lora_max_size']}")
    if s["calib_tokens"] < 0:
        raise InvalidInputError(f"--calib-tokens must be 0 or more, got {s['calib_tokens']}")


def _split(adapters: list[SparseAdapter], paths: list[str]) -> tuple[SparseAdapter | None, SparseAdapter | None]:
    """(the values the model had before tuning: the sidecars, summed; the tuned deltas, summed).
    Either is None when no adapter of that kind was given; the tuned part is None too when an
    adapter is an exported sum, whose deltas cannot be told from its sidecar."""
    roles = [a.metadata.get(Sparse.ROLE) for a in adapters]
    side = [(a, p) for a, p, r in zip(adapters, paths, roles) if r in SIDECAR_ROLES]
    rest = [(a, p) for a, p, r in zip(adapters, paths, roles) if r not in SIDECAR_ROLES]
    original = sum_adapters(*zip(*side)) if side else None
    summed = any(r == SIDECAR_ROLES[1] for r in roles)
    tuned = sum_adapters(*zip(*rest)) if rest and not summed else None
    return original, tuned


def _has_values(a: SparseAdapter | None) -> bool:
    return a is not None and bool(np.any(a.values != 0))


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
    for name in (ADAPTER_FILE, MERGED_FILE, LORA_FILE, ORIGINAL_FILE):
        target = out / name
        if target.exists() and target.samefile(model.path):
            raise InvalidInputError(f"{target} is the input model; pass another folder with -o")
    free = shutil.disk_usage(out).free
    if need_bytes and free < need_bytes + (64 << 20):
        raise InvalidInputError(f"{out}: the export needs about {need_bytes / 2**30:.2f} GiB but only "
                                f"{free / 2**30:.2f} GiB are free; free some space, pass another folder with -o, "
                                "or use --no-merge")
    return out


def _activation_stats(model: Path, original: SparseAdapter | None, names: list[str], n_tokens: int,
                      threads: int) -> tuple[dict | None, dict]:
    """E[x^2] per input column of every edited weight, on the model before tuning, over the default
    calibration corpus; (None, why) when weighting is off or the corpus cannot be read."""
    if n_tokens == 0:
        return None, {"weighted": False, "why": "--calib-tokens 0"}
    from ..activation_mask import DEFAULT, activation_stats, calibration_sequences, stats_runtime

    t0 = time.perf_counter()
    try:
        with stats_runtime(model, DEFAULT.seq_len, threads) as rt:
            if original is not None:
                rt.attach(original, source="the sidecar")
            seqs, source, _ = calibration_sequences(rt.native, n_tokens, DEFAULT.seq_len)
            e_x2 = activation_stats(rt, seqs, names, output_every=DEFAULT.output_every)
    except EdgeZoError as exc:
        _say(f"activation statistics unavailable ({exc}); errors are measured unweighted")
        return None, {"weighted": False, "why": str(exc)}
    return e_x2, {"weighted": True, "tokens": n_tokens, "source": source,
                  "seconds": round(time.perf_counter() - t0, 3)}


def _merge(model: ModelInfo, personalized: SparseAdapter, original: SparseAdapter | None, path: Path,
           edited_type: str | None, max_size: float, e_x2: dict | None, progress: bool) -> dict:
    from ..gguf_io import TensorFile
    from ..merge_types import choose_types, collateral_share, kept_share, measure_tensor

    t0 = time.perf_counter()
    with TensorFile(model.path, model.header) as tf:
        choices = {n: measure_tensor(tf.tensors[n], personalized, original, None if e_x2 is None else e_x2.get(n))
                   for n in personalized.names}
    if edited_type is not None:
        types = dict.fromkeys(personalized.names, edited_type)
    else:
        plain = output_nbytes(model, plan_merge(model, personalized))
        budget = int(model.path.stat().st_size * max_size) - (plain + _non_tensor_bytes(model))
        types = choose_types(choices, max(budget, 0))
    measured = all(types[n] in [o.type_name for o in c.options] for n, c in choices.items())
    choose_seconds = time.perf_counter() - t0
    merge = merge_into_gguf(model.path, personalized, path, types=types, progress=progress)
    d = merge.to_dict()
    d["seconds"] = round(merge.seconds + choose_seconds, 3)
    d["choose_seconds"] = round(choose_seconds, 3)
    d["size_ratio"] = merge.bytes_out / merge.bytes_in
    d["types"] = {t: sum(1 for v in types.values() if v == t) for t in sorted(set(types.values()))}
    d["deltas_kept"] = kept_share(choices, types) if measured else None
    d["deltas_kept_own_type"] = kept_share(choices, {n: c.options[0].type_name for n, c in choices.items()})
    d["weighted_collateral"] = collateral_share(choices, types) if measured else None
    d["weighted"] = e_x2 is not None
    return d


def _non_tensor_bytes(model: ModelInfo) -> int:
    """The file's bytes beside tensor data (header, metadata, padding), which a merge copies."""
    return max(model.path.stat().st_size - output_nbytes(model, {}), 0)


def _lora(model: ModelInfo, tuned: SparseAdapter, path: Path, settings: dict, e_x2: dict | None) -> dict:
    from ..lora_export import export_lora

    r = export_lora(model, tuned, path, keep=settings["lora_keep"],
                    max_bytes=int(settings["lora_max_size"] * model.path.stat().st_size), e_x2=e_x2)
    d = r.to_dict()
    d["size_share"] = r.bytes / model.path.stat().st_size
    return d


def _evaluate(args, opts, model: Path, original: SparseAdapter | None, adapters: list[SparseAdapter],
              paths: list[str], merged: Path | None, lora: Path | None, lora_base: Path | None, data) -> dict:
    """Each variant scored on the rows, one pass each; then the verdicts."""
    from ..export_eval import evaluate

    variants: dict = {}

    def score(name: str, scorer) -> None:   # one line per variant: scoring is most of the command's time
        variants[name] = r = evaluate(scorer, examples, data.has_choices)
        acc = f", choice loss {r['choice_loss']:.4f}, accuracy {r['accuracy']:.3f}" if "accuracy" in r else ""
        _say(f"scored {name} on {len(examples)} rows: loss {r['loss']:.4f}{acc} in {r['seconds']:.0f} s")

    with Runtime(model, opts) as rt:
        examples = Tokenizer(rt.native, max_tokens=opts.max_tokens, chat=args.chat).examples(data)
        if original is not None:
            rt.attach(original, source="the sidecar")
        score("original", rt)
        for p, a in zip(paths, adapters):
            if a.metadata.get(Sparse.ROLE) not in SIDECAR_ROLES:
                rt.attach(a, source=p)
        score("adapter_path", rt)
    if merged is not None:
        with Runtime(merged, opts) as rt:
            score("merged", rt)
    if lora is not None:
        from ..stock_llama import StockLlama

        from ..export_eval import needs_all_logits

        stock = dict(n_ctx=opts.max_tokens, threads=opts.threads, gpu_layers=opts.gpu_layers, kv_f32=opts.kv_f32,
                     all_logits=needs_all_logits(examples, data.has_choices))
        with StockLlama(lora_base, **stock) as llm:
            score("lora_base", llm)
        with StockLlama(lora_base, lora=lora, **stock) as llm:
            score("lora", llm)
    result = {"data": str(data.path), "examples": len(examples),
              "tokens": int(sum(e.n_targets for e in examples)), "variants": variants}
    result["verdicts"] = _verdicts(variants)
    return result


def judged_loss(variant: dict) -> str:
    """The loss the verdicts compare: over the choices where the rows have them (what tune
    minimizes there, and what moves their accuracy; the NLL over the whole vocabulary can rise
    while it falls), else the NLL of the completion."""
    return "choice_loss" if "choice_loss" in variant else "loss"


def _verdicts(v: dict) -> dict:
    """Plain statements of what each export keeps, against the targets."""
    out = {}
    ref, orig = v["adapter_path"], v["original"]
    key = judged_loss(ref)
    improvement = orig[key] - ref[key]
    if "merged" in v:
        m = v["merged"]
        gap = (m[key] - ref[key]) / ref[key] if ref[key] else 0.0
        acc_gap = abs(m["accuracy"] - ref["accuracy"]) if "accuracy" in m else 0.0
        # rounded: 0.610 - 0.600 is 0.010000000000000009, and one point is within one point
        ok = gap <= MERGED_LOSS_TOLERANCE and round(acc_gap, 9) <= MERGED_ACCURACY_TOLERANCE
        out["merged"] = {"loss": key, "loss_gap": gap, "accuracy_gap": acc_gap if "accuracy" in m else None,
                         "improvement_kept": (orig[key] - m[key]) / improvement if improvement else None,
                         "ok": ok}
    if "lora" in v:
        lo = v["lora"]
        # Against its base in the same engine: stock llama.cpp's defaults (F16 KV cache, flash
        # attention) differ from the runtime's by more than a small tuned effect.
        start = v.get("lora_base", orig)[key]
        kept = (start - lo[key]) / improvement if improvement else None
        out["lora"] = {"loss": key, "improvement_kept": kept, "loss_gap": (lo[key] - ref[key]) / ref[key],
                       "ok": kept is not None and kept >= LORA_KEPT_TARGET}
    return out


def _summary(r: dict, report_path: Path) -> str:
    mib = lambda b: f"{b / 2**20:.1f} MiB"   # noqa: E731
    a = r["adapter"]
    lines = [f"adapter   {a['path']}  {a['entries']} entries in {a['weights']} weights  {a['bytes'] / 2**20:.2f} MiB"]
    if "merge" in r:
        m = r["merge"]
        kinds = ", ".join(f"{n} in {t}" for t, n in m["types"].items())
        kept = "" if m["deltas_kept"] is None else (
            f"; {m['deltas_kept']:.0%} of the deltas kept ({m['deltas_kept_own_type']:.0%} in the model's own types)"
            + ("" if m["weighted"] else ", unweighted"))
        lines.append(f"merged    {m['path']}  {mib(m['bytes_out'])} ({m['size_ratio']:.2f}x the model)  "
                     f"edited weights: {kinds}{kept}; {m['seconds']:.1f} s")
    if "lora" in r and "skipped" in r["lora"]:
        lines.append(f"lora      skipped: {r['lora']['skipped']}")
    elif "lora" in r:
        lo = r["lora"]
        lines.append(f"lora      {lo['path']}  {mib(lo['bytes'])} ({lo['size_share']:.1%} of the model)  "
                     f"{lo['weights']} weights, rank up to {lo['rank_max']} (total {lo['rank_total']}), "
                     f"{lo['captured']:.1%} of the deltas captured; apply to {lo['base']}")
    ev = r["evaluation"]
    if "skipped" in ev:
        lines.append(f"held-out  skipped: {ev['skipped']}")
    else:
        lines.append(f"held-out  {ev['data']}: {ev['examples']} rows, {ev['tokens']} target tokens")
        names = {"original": "original (model + sidecar)", "adapter_path": "adapter path (+ tuned deltas)",
                 "merged": "merged GGUF", "lora_base": "LoRA base alone (stock)", "lora": "LoRA on its base (stock)"}
        for key, label in names.items():
            if key in ev["variants"]:
                x = ev["variants"][key]
                acc = f"  choice loss {x['choice_loss']:.4f}  accuracy {x['accuracy']:.3f}" if "accuracy" in x else ""
                lines.append(f"  {label:<30} loss {x['loss']:.4f}{acc}  ({x['seconds']:.1f} s)")
        vd = ev["verdicts"]
        if "merged" in vd:
            m = vd["merged"]
            acc = "" if m["accuracy_gap"] is None else f", accuracy off by {m['accuracy_gap'] * 100:.1f} points"
            what = "choice loss" if m["loss"] == "choice_loss" else "loss"
            lines.append(f"verdict   merged: {what} {m['loss_gap']:+.1%} against the adapter path{acc}: " + (
                "keeps the tuned result" if m["ok"] else
                f"KEEPS LESS THAN IT SHOULD (target: within {MERGED_LOSS_TOLERANCE:.0%} and "
                f"{MERGED_ACCURACY_TOLERANCE * 100:.0f} point); a larger --max-size keeps more of the deltas "
                "(docs/export.md measures how much)"))
        if "lora" in vd:
            lv = vd["lora"]
            kept = "n/a (the deltas do not move the loss)" if lv["improvement_kept"] is None else \
                f"{lv['improvement_kept']:.0%}"
            what = "choice loss" if lv["loss"] == "choice_loss" else "loss"
            lines.append(f"verdict   LoRA: keeps {kept} of the {what} improvement: " + (
                "as it should" if lv["ok"] else
                f"KEEPS LESS THAN IT SHOULD (target {LORA_KEPT_TARGET:.0%}); raise --lora-keep or --lora-max-size"))
    lines.append(f"report    {report_path}  ({r['seconds']:.1f} s)")
    return "\n".join(lines)
