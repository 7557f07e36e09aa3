"""Files that appear whole or not at all.

Every file edge-zo writes (models, adapters, checkpoints, reports, task data) goes to a
temporary file in the target's own folder and is renamed over the target only once it is
complete: a rename within one file system is atomic, so a crash or Ctrl-C never leaves a
half-written file under the final name.

Fault injection (tests only): with EDGE_ZO_KILL_AT="LABEL@N" in the environment the process
kills itself with SIGKILL at the N-th write point whose label contains LABEL. Labels are
"<file name>:partial" (the temporary file, or an appended line, holds only its first
EDGE_ZO_KILL_CUT share of bytes, default 0.5: a write cut short), "<file name>:written"
(complete, not yet renamed) and "<file name>:renamed"; metrics.jsonl's appends add
"metrics.jsonl:appending" (a torn line) and "metrics.jsonl:appended". tests/test_faults.py kills a run at
every kind of point and checks that --resume ends bit-identical to an uninterrupted run.
"""
from __future__ import annotations

import os
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error, rename it
    over `path`, otherwise delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        fault_point(path.name, "partial", tmp)
        fault_point(path.name, "written")
        os.replace(tmp, path)
        fault_point(path.name, "renamed")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


KILL_ENV, CUT_ENV = "EDGE_ZO_KILL_AT", "EDGE_ZO_KILL_CUT"
_seen: dict[str, int] = {}


def cut_share() -> float:
    return float(os.environ.get(CUT_ENV, "0.5"))


def armed(name: str, phase: str) -> bool:
    """True at the write point where EDGE_ZO_KILL_AT says to die (see the module's docstring)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return False
    label, _, n = spec.rpartition("@")
    if label not in f"{name}:{phase}":
        return False
    _seen[label] = _seen.get(label, 0) + 1
    return _seen[label] == int(n)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fault_point(name: str, phase: str, partial: Path | None = None) -> None:
    """A place where a kill -9 could land; a no-op unless EDGE_ZO_KILL_AT names it.
    `partial`: a file to cut short before dying."""
    if armed(name, phase):
        if partial is not None:
            os.truncate(partial, int(partial.stat().st_size * cut_share()))
        die()
