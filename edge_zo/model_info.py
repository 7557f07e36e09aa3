"""What a GGUF model file says about itself: architecture, tensors, shapes.

Read with `gguf_io.read_header`, which maps the file and parses only its header, so
opening even a large model costs little; nothing here loads weights into llama.cpp.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .constants import BLOCK_MATMUL_SUFFIXES, General
from .errors import ModelFileError
from .gguf_io import GGUFHeader, read_header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]   # numpy order: (n_out, n_in) or (n_expert, n_out, n_in)
    type_name: str           # GGML type, e.g. "Q4_1"

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelInfo:
    path: Path
    architecture: str
    file_type: int | None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    _header: GGUFHeader | None = field(default=None, repr=False, compare=False)

    @property
    def header(self) -> GGUFHeader:
        """The file's whole header (every metadata key, the tensor infos), parsed again on first use
        and kept: a 49k-token vocabulary alone is ~10 MB of Python strings, which an open Runtime need
        not hold beside the model (docs/mask.md: the activation mask's peak memory)."""
        if self._header is None:
            self._header = read_header(self.path)
        return self._header

    @classmethod
    def open(cls, path: str | Path) -> "ModelInfo":
        import gguf

        path = Path(path)
        if path.is_dir():
            raise ModelFileError(f"{path}: is a folder; pass the .gguf model file inside it (e.g. {path}/model.gguf).")
        if not path.is_file():
            raise ModelFileError(f"{path}: no such model file. Pass the path of a .gguf model.")
        try:
            header = read_header(path)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{path}: not a readable GGUF file ({exc}). Re-download or re-convert it.") from exc
        arch = header.get(General.ARCHITECTURE)
        if not isinstance(arch, str) or header.get(General.TYPE, "model") != "model":
            raise ModelFileError(f"{path}: this GGUF is not a model ({General.ARCHITECTURE}={arch!r}, "
                                 f"{General.TYPE}={header.get(General.TYPE)!r})")
        tensors = {}
        for t in header.tensors:
            try:
                type_name = gguf.GGMLQuantizationType(t.type).name
            except ValueError:
                type_name = f"type{t.type}"
            tensors[t.name] = TensorInfo(t.name, tuple(reversed(t.shape)), type_name)
        ftype = header.get(General.FILE_TYPE)
        return cls(path, arch, int(ftype) if ftype is not None else None, tensors)

    def block_matmul_weights(self) -> list[str]:
        """Weights multiplied inside the transformer blocks: the default tuning targets."""
        return [n for n in self.tensors if n.startswith("blk.") and n.endswith(BLOCK_MATMUL_SUFFIXES)]

    def sha256(self) -> str:
        return file_sha256(self.path)


_hashed: dict[tuple, str] = {}


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    """The file's SHA-256, remembered per (file, size, mtime) so checking every adapter costs one read."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashed:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        _hashed[key] = h.hexdigest()
    return _hashed[key]


