"""Every file edge-zo writes appears whole or not at all, with the mode a plain open() gives."""
from __future__ import annotations

import os
import stat

import pytest

from edge_zo import atomic


def test_written_file_has_the_umask_mode_and_no_temporary_is_left(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "sub" / "a.json", "{}\n")
    finally:
        os.umask(old)
    path = tmp_path / "sub" / "a.json"
    assert path.read_text() == "{}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's private 0600
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic.atomic_path(path) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("disk on fire")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
