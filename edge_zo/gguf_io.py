"""GGUF files: the header read fast, tensors viewed in place, metadata copied to a writer.

gguf-py's GGUFReader builds a numpy view for every array element, which takes
seconds on a tokenizer of 50k tokens; every command reads a header when it
starts, so `read_header` parses it in one pass with numpy, and `TensorFile`
maps the file and views each tensor's bytes where they lie. Values keep their
GGUF types (gguf-py's own `GGUFValueType`), so `copy_fields` hands them to a
`gguf.GGUFWriter` unchanged. Writing tensors is gguf-py's (`GGUFWriter`,
`gguf.quants`).
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .atomic import atomic_path
from .errors import ModelFileError

VT = gguf.GGUFValueType
# numpy's reading of every fixed-size GGUF value type (strings and arrays are read apart).
_DTYPES = {VT.UINT8: np.dtype("<u1"), VT.INT8: np.dtype("<i1"), VT.UINT16: np.dtype("<u2"), VT.INT16: np.dtype("<i2"),
           VT.UINT32: np.dtype("<u4"), VT.INT32: np.dtype("<i4"), VT.FLOAT32: np.dtype("<f4"), VT.BOOL: np.dtype("?"),
           VT.UINT64: np.dtype("<u8"), VT.INT64: np.dtype("<i8"), VT.FLOAT64: np.dtype("<f8")}


@dataclass(frozen=True)
class Field:
    type: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None   # the element type of an ARRAY
    value: Any


@dataclass(frozen=True)
class TensorHeader:
    name: str
    shape: tuple[int, ...]   # GGUF order: ne[0] first (n_in, n_out, ...)
    type: int                # GGMLQuantizationType id
    offset: int              # from the start of the tensor data


@dataclass
class GGUFHeader:
    version: int
    fields: dict[str, Field]
    tensors: list[TensorHeader]
    data_offset: int         # where the tensor data starts in the file: the header's end, aligned

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.value

    @property
    def alignment(self) -> int:
        return int(self.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT))


def read_header(path: str | Path) -> GGUFHeader:
    """Parse magic, version, metadata and tensor infos; raise ValueError if malformed."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise ValueError("file too short to be GGUF")
        # Map, don't read: only the header's pages are touched.
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data)


class _Cursor:
    def __init__(self, data, pos: int):
        self.data, self.pos = data, pos

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

    def values(self, vtype: VT, n: int) -> list:
        if vtype == VT.STRING:
            return [self.string() for _ in range(n)]
        if vtype not in _DTYPES:
            raise ValueError(f"unsupported GGUF value type {int(vtype)}")
        arr = np.frombuffer(self.data, dtype=_DTYPES[vtype], count=n, offset=self.pos)
        self.pos += arr.nbytes
        values = arr.tolist()  # copy out before the map closes
        del arr
        return values

    def value_type(self) -> VT:
        t = self.take("<I")
        try:
            return VT(t)
        except ValueError:
            raise ValueError(f"unknown GGUF value type {t}") from None


def _parse(data) -> GGUFHeader:
    if data[:4] != gguf.GGUF_MAGIC.to_bytes(4, "little"):
        raise ValueError("bad magic: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    c = _Cursor(data, 24)
    try:
        fields = {}
        for _ in range(n_kv):
            key = c.string()
            vtype = c.value_type()
            if vtype == VT.ARRAY:
                sub = c.value_type()
                fields[key] = Field(vtype, sub, c.values(sub, c.take("<Q")))
            else:
                fields[key] = Field(vtype, None, c.values(vtype, 1)[0])
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            nd = c.take("<I")
            shape = tuple(c.take("<Q") for _ in range(nd))
            tensors.append(TensorHeader(name, shape, c.take("<I"), c.take("<Q")))
    except (struct.error, ValueError) as exc:
        raise ValueError(f"malformed header ({exc})") from exc
    header = GGUFHeader(version, fields, tensors, 0)
    header.data_offset = (c.pos + header.alignment - 1) // header.alignment * header.alignment
    return header


# ---- tensors ----

@dataclass(frozen=True)
class Tensor:
    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]       # numpy order: (n_out, n_in)
    raw: np.ndarray              # uint8 view of the bytes in the file

    @property
    def type_name(self) -> str:
        return self.type.name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    def dequantize(self) -> np.ndarray:
        """float32 values in numpy shape."""
        if self.type == gguf.GGMLQuantizationType.F32:
            return self.raw.view(np.float32).reshape(self.shape).copy()
        if self.type == gguf.GGMLQuantizationType.F16:
            return self.raw.view(np.float16).astype(np.float32).reshape(self.shape)
        return gguf.dequantize(self.raw, self.type).reshape(self.shape).astype(np.float32, copy=False)


class TensorFile:
    """A GGUF model's tensors as memory-mapped raw bytes:
    `with TensorFile(path) as tf: tf.tensors["blk.0.attn_q.weight"].dequantize()`."""

    def __init__(self, path: str | Path, header: GGUFHeader | None = None):
        self.path = Path(path)
        try:
            self.header = header or read_header(self.path)
            self._file = open(self.path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        self.alignment = self.header.alignment
        buf = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors: dict[str, Tensor] = {}
        for t in self.header.tensors:
            qtype = gguf.GGMLQuantizationType(t.type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(t.shape)) // block * type_size
            start = self.header.data_offset + t.offset
            if start + nbytes > len(buf):
                raise ModelFileError(f"{self.path}: tensor {t.name} runs past the end of the file (truncated?)")
            self.tensors[t.name] = Tensor(t.name, qtype, tuple(reversed(t.shape)), buf[start: start + nbytes])

    def close(self) -> None:
        self.tensors.clear()
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the map closes when it is released
            pass
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- writing ----

def copy_fields(header: GGUFHeader, writer: gguf.GGUFWriter, keep: Callable[[str], bool] = lambda key: True) -> None:
    """Copy every field `keep` accepts, except general.architecture, which GGUFWriter writes itself."""
    for key, f in header.fields.items():
        if key == gguf.Keys.General.ARCHITECTURE or not keep(key):
            continue
        writer.add_key_value(key, f.value, f.type, sub_type=f.sub_type)


def write_f32_copy(src: str | Path, out: str | Path) -> None:
    """Write `src` with every tensor dequantized to float32 and every metadata key kept: the model
    without quantization, for measurements that must not see llama.cpp's activation rounding."""
    with TensorFile(src) as tf, atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, tf.header.get(gguf.Keys.General.ARCHITECTURE))
        copy_fields(tf.header, w, keep=lambda key: key != gguf.Keys.General.FILE_TYPE)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        for name, t in tf.tensors.items():
            w.add_tensor(name, t.dequantize())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
