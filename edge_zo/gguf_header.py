"""A fast reader for a GGUF file's header: metadata and tensor infos.

gguf-py's GGUFReader builds a numpy view for every array element, which takes
seconds on a tokenizer of 50k tokens; we need the header on every command
start, so this reads it in one pass with struct and numpy. Values keep their
GGUF types so they can be copied to a writer unchanged.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"

# GGUFValueType ids (keep in sync with gguf.GGUFValueType / ggml's gguf.h).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_NUMPY = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4", FLOAT32: "<f4",
          BOOL: "?", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}


@dataclass(frozen=True)
class Field:
    type: int
    sub_type: int | None
    value: Any


@dataclass(frozen=True)
class TensorHeader:
    name: str
    shape: tuple[int, ...]   # GGUF order: ne[0] first (n_in, n_out, ...)
    type: int                # GGMLQuantizationType id
    offset: int


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, Field]
    tensors: list[TensorHeader]

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.take("<Q")
        s = self.data[self.pos: self.pos + n]
        if len(s) != n:
            raise ValueError("string runs past the end of the header")
        self.pos += n
        return s.decode("utf-8", "replace")

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype])
        raise ValueError(f"unknown GGUF value type {vtype}")

    def array(self) -> tuple[int, list]:
        sub, n = self.take("<I"), self.take("<Q")
        if sub == STRING:
            return sub, [self.string() for _ in range(n)]
        if sub not in _NUMPY:
            raise ValueError(f"unsupported GGUF array type {sub}")
        arr = np.frombuffer(self.data, dtype=_NUMPY[sub], count=n, offset=self.pos)
        self.pos += arr.nbytes
        values = arr.tolist()  # copy out before the map closes
        del arr
        return sub, values


def read_header(path: str | Path) -> GGUFHeader:
    """Parse magic, version, metadata and tensor infos; raise ValueError if malformed."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise ValueError("file too short to be GGUF")
        # Map, don't read: only the header's pages are touched.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data)


def _parse(data) -> GGUFHeader:
    if data[:4] != GGUF_MAGIC:
        raise ValueError("bad magic: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    c = _Cursor(data)
    c.pos = 24
    try:
        fields = {}
        for _ in range(n_kv):
            key = c.string()
            vtype = c.take("<I")
            if vtype == ARRAY:
                sub, val = c.array()
                fields[key] = Field(ARRAY, sub, val)
            else:
                fields[key] = Field(vtype, None, c.value(vtype))
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            nd = c.take("<I")
            shape = tuple(c.take("<Q") for _ in range(nd))
            tensors.append(TensorHeader(name, shape, c.take("<I"), c.take("<Q")))
    except (struct.error, ValueError) as exc:
        raise ValueError(f"malformed header ({exc})") from exc
    return GGUFHeader(version, fields, tensors)
