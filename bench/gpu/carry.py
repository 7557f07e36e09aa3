"""Real models onto the device machine, whose carry limit (64 MiB a call) no model fits.

    python -m bench.gpu.carry split .xfer/chunks MODEL.gguf ...   # here: manifest.json and N/part pieces
    python -m bench.gpu.carry join .xfer/chunks/manifest.json BLOB DIR   # there: the models whose bytes all came

(bench.compare_methods prepare --chunks does the split for its bundle.)

`split` concatenates the models and cuts them into pieces of --chunk-mib, one folder per
device call (`bash bench/gpu/run_device.sh receive` appends the carried piece to BLOB);
`join` cuts BLOB back into the models listed in the manifest and checks their sha256.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edge_zo.model_info import file_sha256

from .._common import write_json


def manifest(models: dict[str, Path]) -> dict:
    """{"models": {name: file, bytes, sha256}}, in the order `split` concatenates them."""
    return {"models": {name: {"file": src.name, "bytes": src.stat().st_size, "sha256": file_sha256(src)}
                       for name, src in models.items()}}


def split(models: dict[str, Path], folder: Path, chunk_mib: int = 58) -> int:
    """Pieces folder/1/part, folder/2/part, ... of the models' bytes, and folder/manifest.json; their count."""
    size, k, left, f = chunk_mib << 20, 0, 0, None
    for src in models.values():
        with open(src, "rb") as r:
            while block := r.read(1 << 20):
                while block:
                    if f is None or left == 0:
                        if f:
                            f.close()
                        k += 1
                        (folder / str(k)).mkdir(parents=True, exist_ok=True)
                        f, left = open(folder / str(k) / "part", "wb"), size
                    n = min(left, len(block))
                    f.write(block[:n])
                    left, block = left - n, block[n:]
    if f:
        f.close()
    write_json(folder / "manifest.json", manifest(models))
    return k


def join(manifest_path: Path, blob: Path, models_dir: Path) -> list[Path]:
    """The models of the manifest whose bytes are all in `blob`, cut out and checked."""
    models = json.loads(manifest_path.read_text())["models"]
    models_dir.mkdir(parents=True, exist_ok=True)
    have = blob.stat().st_size if blob.is_file() else 0
    offset, done = 0, []
    for m in models.values():
        dest = models_dir / m["file"]
        start, offset = offset, offset + m["bytes"]
        if dest.is_file() and dest.stat().st_size == m["bytes"]:
            done.append(dest)
            continue
        if have < offset:
            print(f"{m['file']}: {max(0, have - start)} of {m['bytes']} bytes received so far", file=sys.stderr)
            continue
        part = dest.with_suffix(".part")
        with open(blob, "rb") as r, open(part, "wb") as w:
            r.seek(start)
            left = m["bytes"]
            while left:
                block = r.read(min(1 << 24, left))
                w.write(block)
                left -= len(block)
        if file_sha256(part) != m["sha256"]:
            sys.exit(f"{dest}: sha256 differs from the manifest's: a piece is corrupt or out of order")
        os.replace(part, dest)
        done.append(dest)
        print(f"{dest} verified", file=sys.stderr)
    return done


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("split", help="cut models into pieces for the device calls")
    p.add_argument("folder", type=Path)
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--chunk-mib", type=int, default=58)
    p = sub.add_parser("join", help="cut the received blob back into the models")
    p.add_argument("manifest", type=Path)
    p.add_argument("blob", type=Path)
    p.add_argument("models_dir", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "split":
        n = split({m.stem: m for m in args.models}, args.folder, args.chunk_mib)
        print(f"{n} pieces in {args.folder}", file=sys.stderr)
    else:
        join(args.manifest, args.blob, args.models_dir)


if __name__ == "__main__":
    main()
