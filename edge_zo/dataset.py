"""JSONL training and evaluation data in mlx-lm's formats.

One JSON object per line; the format is detected from the first record's keys:
- `{"prompt": ..., "completion": ...}`: loss on the completion only. An optional
  `"choices": [...]` (which must contain the completion) makes the row a
  multiple-choice question: the choice with the highest likelihood wins.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the
  model's chat template; loss on the assistant turns.
- `{"text": ...}`: loss on every token after the first.
Every problem names the file and line; nothing is tokenized until all rows parse.
Files are UTF-8 (a leading byte-order mark is allowed); either every
prompt/completion row has `choices` or none does.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InvalidInputError

DATA_HELP = "see README.md, section 'Data format'"


class Format(enum.Enum):
    COMPLETION = "prompt/completion"
    CHAT = "messages"
    TEXT = "text"


@dataclass(frozen=True)
class Record:
    line: int
    fields: dict


@dataclass
class Dataset:
    path: Path
    format: Format
    records: list[Record]

    def __len__(self):
        return len(self.records)

    @property
    def has_choices(self) -> bool:
        return self.format is Format.COMPLETION and all("choices" in r.fields for r in self.records)


@dataclass
class Example:
    """Token ids of one sequence and which of them are loss targets."""

    tokens: np.ndarray            # int32
    targets: np.ndarray           # uint8, 1 where the token is predicted and scored
    choices: list["Example"] = field(default_factory=list)  # alternatives, for accuracy
    answer: int = -1              # index of the right choice

    @property
    def n_targets(self) -> int:
        return int(self.targets.sum())


def _fail(path, line, why):
    raise InvalidInputError(f"{path}:{line}: {why} ({DATA_HELP})")


def load_jsonl(path: str | Path) -> Dataset:
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{path}: is a folder; pass a .jsonl file ({DATA_HELP}).")
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such data file. Pass a .jsonl file ({DATA_HELP}).")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InvalidInputError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark); "
                                f"save it as UTF-8 ({DATA_HELP})")
    raw = raw.removeprefix(b"\xef\xbb\xbf")   # a UTF-8 byte-order mark, as some editors write
    records, fmt = [], None
    for line_no, data in enumerate(raw.split(b"\n"), 1):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            _fail(path, line_no, f"not UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start + 1}); "
                  "save the file as UTF-8")
        if not line.strip():
            continue
        if "\0" in line:
            _fail(path, line_no, f"holds a NUL byte at column {line.index(chr(0)) + 1}: is the file UTF-16 or "
                  "binary? Save it as UTF-8 text")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(path, line_no, f"not valid JSON: {exc.msg} at column {exc.colno}")
        except RecursionError:
            _fail(path, line_no, "not valid JSON here: nested too deeply")
        if not isinstance(obj, dict):
            _fail(path, line_no, f"expected a JSON object, got {type(obj).__name__}")
        fmt = fmt or _detect(path, line_no, obj)
        _check_record(path, line_no, obj, fmt)
        records.append(Record(line_no, obj))
    if not records:
        raise InvalidInputError(f"{path}: the file has no records ({DATA_HELP})")
    with_choices = [r for r in records if "choices" in r.fields]
    if with_choices and len(with_choices) < len(records):
        without = next(r for r in records if "choices" not in r.fields)
        _fail(path, without.line, f"no 'choices', but line {with_choices[0].line} has them: give every row "
              "'choices' (for accuracy) or none")
    return Dataset(path, fmt, records)


def _detect(path, line_no, obj) -> Format:
    if "prompt" in obj and "completion" in obj:
        return Format.COMPLETION
    if "messages" in obj:
        return Format.CHAT
    if "text" in obj:
        return Format.TEXT
    _fail(path, line_no, f"cannot tell the format from keys {sorted(obj)}: expected "
          "'prompt' and 'completion', 'messages', or 'text'")


def _check_record(path, line_no, obj, fmt: Format) -> None:
    _check_strings(path, line_no, obj)

    def need_str(key):
        if not isinstance(obj.get(key), str):
            _fail(path, line_no, f"'{key}' must be a string in {fmt.value} data"
                  + ("" if key in obj else f" (missing; the first record set the format to {fmt.value})"))

    if fmt is Format.COMPLETION:
        need_str("prompt")
        need_str("completion")
        if not obj["completion"]:
            _fail(path, line_no, "'completion' is empty: there is nothing to learn or score")
        if "choices" in obj:
            ch = obj["choices"]
            if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
                _fail(path, line_no, "'choices' must be a list of at least two non-empty strings")
            if obj["completion"] not in ch:
                _fail(path, line_no, "'completion' must be one of 'choices'")
            twice = next((c for i, c in enumerate(ch) if c in ch[:i]), None)
            if twice is not None:
                _fail(path, line_no, f"'choices' lists {twice!r} twice; each choice must be different")
    elif fmt is Format.TEXT:
        need_str("text")
        if not obj["text"].strip():
            _fail(path, line_no, "'text' is empty")
    else:
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            _fail(path, line_no, "'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                _fail(path, line_no, f"message {i} must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            _fail(path, line_no, "no 'assistant' message: there is nothing to learn or score")


def _check_strings(path, line_no, obj: dict) -> None:
    """Every string must travel to the tokenizer whole: UTF-8 encodable (no lone surrogate
    such as \\ud800) and free of NUL, which C strings would cut."""
    todo = [("", obj)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            todo += [(f"{where}.{k}" if where else f"'{k}'", v) for k, v in value.items()] + [(where, k) for k in value]
        elif isinstance(value, list):
            todo += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                _fail(path, line_no, f"{where or 'a key'} holds a lone surrogate ({value[exc.start]!a}) at character "
                      f"{exc.start + 1}; write the character itself, or both halves of a surrogate pair")
            if "\0" in value:
                _fail(path, line_no, f"{where or 'a key'} holds a NUL character (\\u0000) at character "
                      f"{value.index(chr(0)) + 1}; remove it")


class Tokenizer:
    """Turns records into Examples with the model's own tokenizer and chat template."""

    def __init__(self, native, *, max_tokens: int, chat: bool = False):
        self.native = native
        self.max_tokens = max_tokens
        self.chat = chat  # wrap prompt/completion rows in the chat template

    def _ids(self, text: str, first: bool) -> np.ndarray:
        return self.native.tokenize(text, add_special=first, parse_special=True)

    def _pairs(self, prompt: str, completions: list[str]) -> list[Example]:
        """prompt + each completion. Too long: the prompt's start is dropped, never the completion
        being scored, and by the same count for every completion, so a row's choices are scored
        after the very same prompt (and Runtime.choice_scores can decode it once for all)."""
        if self.chat:
            prompt = self.native.apply_chat_template([{"role": "user", "content": prompt}], add_assistant=True)
        p = self._ids(prompt, True)
        if len(p) == 0:  # an empty prompt on a model without BOS: start from BOS anyway
            p = np.array([self.native.bos], np.int32)
        cs = [self._ids(c, False) for c in completions]
        keep = max(self.max_tokens - max(len(c) for c in cs), 1)
        if len(p) > keep:
            p = p[len(p) - keep:]
        return [self._cap(Example(np.concatenate([p, c]).astype(np.int32),
                                  np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(c), np.uint8)])))
                for c in cs]

    def _cap(self, ex: Example) -> Example:
        # Text and chat rows longer than the context are cut at the end, as mlx-lm does.
        if len(ex.tokens) > self.max_tokens:
            ex.tokens, ex.targets = ex.tokens[: self.max_tokens], ex.targets[: self.max_tokens]
        return ex

    def example(self, record: Record, fmt: Format) -> Example:
        r = record.fields
        if fmt is Format.TEXT:
            t = self._ids(r["text"], True)
            tg = np.ones(len(t), np.uint8)
            tg[0] = 0
            return self._cap(Example(t.astype(np.int32), tg))
        if fmt is Format.COMPLETION:
            if "choices" not in r:
                return self._pairs(r["prompt"], [r["completion"]])[0]
            choices = self._pairs(r["prompt"], r["choices"])
            answer = r["choices"].index(r["completion"])
            return Example(choices[answer].tokens, choices[answer].targets, choices, answer)
        return self._cap(self._chat(r["messages"]))

    def _chat(self, messages: list[dict]) -> Example:
        # Render growing prefixes so each assistant turn's text span is known,
        # then tokenize span by span: template text carries no loss.
        pieces, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.native.apply_chat_template(messages[:i], add_assistant=True) if i else ""
            after = self.native.apply_chat_template(messages[: i + 1], add_assistant=False)
            if not before.startswith(done) or not after.startswith(before):
                raise InvalidInputError("the chat template does not render conversations prefix by prefix")
            pieces += [(before[len(done):], 0), (after[len(before):], 1)]
            done = after
        toks, tgts = [], []
        for k, (text, is_target) in enumerate(pieces):
            if not text:
                continue
            ids = self._ids(text, k == 0)
            toks.append(ids)
            tgts.append(np.full(len(ids), is_target, np.uint8))
        tokens = np.concatenate(toks).astype(np.int32)
        targets = np.concatenate(tgts)
        targets[0] = 0
        return Example(tokens, targets)

    def examples(self, dataset: Dataset) -> list[Example]:
        out = []
        for rec in dataset.records:
            try:
                ex = self.example(rec, dataset.format)
            except InvalidInputError as exc:
                _fail(dataset.path, rec.line, str(exc))
            if ex.n_targets == 0:
                _fail(dataset.path, rec.line, f"no target tokens left within {self.max_tokens} tokens")
            out.append(ex)
        return out
