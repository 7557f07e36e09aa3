"""Fuzz driver for tests/test_faults.py, run in its own process so that an interpreter
crash or a hang is seen as one (and pins the input that caused it).

    python -m tests.fuzz_readers adapter GOOD.gguf MODEL.gguf SEED N
    python -m tests.fuzz_readers jsonl   GOOD.jsonl MODEL.gguf SEED N

Writes N seeded mutations of GOOD next to it (half of them byte edits anywhere; the other
half confined to an adapter's tensor data, or edits of a JSONL file's parsed records), reads each (an adapter: load, check it
against MODEL, attach it and run a forward; JSONL: load and tokenize with MODEL's
tokenizer) and prints one line per input, "begin I" before and "ok I" or "error I
EdgeZoError-subclass" after. Any other exception prints "BUG I ..." and the driver goes on.
"""
from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np

JSON_PIECES = [b"{", b"}", b"[", b"]", b'"', b",", b":", b"\\", b"\\u", b"\\ud800", b"\\u0000", b"null", b"1e999",
               b"NaN", b"-", b"\n", b"\r\n", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\x00", b'"choices"', b'"messages"',
               b'"role"', b'"content"', b'"assistant"', b'"prompt"', b'"completion"', b'"text"', b'""', b"[]",
               b"{}", b'" x"', b"true", b"0", b"-1", b"\xf0\x9f\x98\x80", b"\xed\xa0\x80"]


def mutate(data: bytes, rng: np.random.Generator, pieces: list[bytes], lo: int = 0) -> bytes:
    """One to four random edits at or after byte `lo`: flip, set, insert, delete, duplicate or
    truncate bytes, or splice in a piece that format readers care about."""
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(0, 7))
        start = min(lo, len(b))
        at = int(rng.integers(start, max(len(b), start + 1)))
        if kind == 0 and at < len(b):
            b[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and at < len(b):
            b[at] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, int(rng.integers(0, 256))]))
        elif kind == 2:
            b[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        elif kind == 3:
            del b[at: at + int(rng.integers(1, 17))]
        elif kind == 4:
            n = int(rng.integers(1, 65))
            b[at:at] = b[at: at + n]
        elif kind == 5:
            del b[int(rng.integers(start, len(b) + 1)):]
        else:
            b[at:at] = pieces[int(rng.integers(0, len(pieces)))]
    return bytes(b)


JSON_VALUES = ["", " ", "\ud800", "a\x00b", "😀", "x" * 3000, "\n" * 50, "<|im_start|>", "assistant", 0, -1, 1.5,
               1e308, None, True, [], {}, [""], [" Rex", " Rex"], [" Rex"], [" Rex", " Max", " Rex"],
               {"role": "assistant", "content": ""}, {"role": "user"}, [{"role": "assistant", "content": "ok"}],
               [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]]
JSON_KEYS = ["prompt", "completion", "choices", "messages", "text", "role", "content", "extra"]


def mutate_json(data: bytes, rng: np.random.Generator) -> bytes:
    """One to three edits of the parsed records (drop, replace or add a value anywhere, or
    drop a record), written back as JSON lines: the checks past the JSON syntax get exercised."""
    rows = [json.loads(line) for line in data.splitlines() if line.strip()]
    pick = lambda seq: seq[int(rng.integers(0, len(seq)))]  # noqa: E731
    for _ in range(int(rng.integers(1, 4))):
        if len(rows) > 1 and rng.random() < 0.1:
            rows.pop(int(rng.integers(0, len(rows))))
            continue
        node = pick(rows)
        while isinstance(node, (dict, list)) and node and rng.random() < 0.5:   # descend a random depth
            child = pick(list(node.values()) if isinstance(node, dict) else node)
            if not isinstance(child, (dict, list)):
                break
            node = child
        value = json.loads(json.dumps(pick(JSON_VALUES)))
        if isinstance(node, dict):
            key = pick(list(node) + JSON_KEYS)
            if key in node and rng.random() < 0.3:
                del node[key]
            else:
                node[key] = value
        elif isinstance(node, list):
            at = int(rng.integers(0, len(node) + 1))
            if node and rng.random() < 0.3:
                node.pop(min(at, len(node) - 1))
            else:
                node.insert(at, value)
    ascii_only = bool(rng.random() < 0.5)
    text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows)
    return text.encode("utf-8", "surrogatepass")


def adapter_pieces(good: bytes) -> list[bytes]:
    """Little-endian integers that GGUF counts, lengths, types and offsets are made of."""
    ints = [0, 1, 2, 7, 8, 12, 30, 31, 32, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]
    return [v.to_bytes(8, "little") for v in ints] + [v.to_bytes(4, "little") for v in ints if v < 2**32] + [
        b"\x00\x7e", b"\x00\x7c", b"\x00\xfc", b"\xff\x7f", good[:4]]   # F16 NaN, +Inf, -Inf, 65504


def main(kind: str, good_path: str, model_path: str, seed: int, n: int) -> None:
    from edge_zo.errors import EdgeZoError

    good = Path(good_path).read_bytes()
    rng = np.random.default_rng(seed)
    work = Path(good_path).parent / f"fuzz-{kind}"
    work.mkdir(exist_ok=True)
    pieces = adapter_pieces(good) if kind == "adapter" else JSON_PIECES
    check = _adapter_checker(model_path) if kind == "adapter" else _jsonl_checker(model_path)
    # Half of an adapter's mutations stay in its tensor data (indices and values), past the header.
    data_start = _data_offset(good_path) if kind == "adapter" else 0
    for i in range(n):
        path = work / (f"{i}.gguf" if kind == "adapter" else f"{i}.jsonl")
        if kind == "jsonl" and i % 2:
            path.write_bytes(mutate_json(good, rng))
        else:
            path.write_bytes(mutate(good, rng, pieces, lo=data_start if i % 2 else 0))
        print(f"begin {i}", flush=True)
        try:
            check(path)
            print(f"ok {i}", flush=True)
        except EdgeZoError as exc:
            print(f"error {i} {type(exc).__name__}", flush=True)
        except Exception as exc:
            print(f"BUG {i} {type(exc).__name__}: {exc!s:.200}", flush=True)
            traceback.print_exc()
        path.unlink()


def _data_offset(path: str) -> int:
    import gguf

    return min(int(t.data_offset) for t in gguf.GGUFReader(path).tensors)


def _adapter_checker(model_path: str):
    from edge_zo.adapter import SparseAdapter
    from edge_zo.runtime import Runtime, RuntimeOptions

    rt = Runtime(model_path, RuntimeOptions(batch_size=1, max_tokens=16, threads=1))
    tokens, targets, start = np.array([1, 2, 3, 4], np.int32), np.array([0, 1, 1, 1], np.uint8), np.array([0, 4])

    def check(path: Path) -> None:
        adapter = SparseAdapter.load(path)
        att = rt.attach(adapter, source=str(path))   # checks names, shapes and ranges against the model
        try:
            nll, _ = rt.native.loss(tokens, targets, start)
        finally:
            rt.detach(att)
        if not np.all(np.isfinite(nll)) and np.all(np.abs(adapter.values) < 1e3):
            raise AssertionError(f"finite, modest values gave the loss {nll}")
    return check


def _jsonl_checker(model_path: str):
    from edge_zo.dataset import Tokenizer, load_jsonl
    from edge_zo.runtime import Runtime, RuntimeOptions

    rt = Runtime(model_path, RuntimeOptions(batch_size=1, max_tokens=64, threads=1))
    tok = Tokenizer(rt.native, max_tokens=64)
    chat = Tokenizer(rt.native, max_tokens=64, chat=True)

    def check(path: Path) -> None:
        data = load_jsonl(path)
        tok.examples(data)
        chat.examples(data)
    return check


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
