"""A GGUF model's tensors as memory-mapped raw bytes, and their float32 values.

`edge_zo.gguf_header` reads the metadata fast; this adds where the tensor data
starts (found by walking the header once more, skipping values without
decoding them) so that each tensor can be viewed in place without gguf-py's
GGUFReader, which takes seconds on a large tokenizer.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_zo.errors import ModelFileError
from edge_zo.gguf_header import ARRAY, STRING, GGUFHeader, read_header

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes


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
    """`with TensorFile(path) as tf: tf.tensors["blk.0.attn_q.weight"].dequantize()`."""

    def __init__(self, path: str | Path, header: GGUFHeader | None = None):
        self.path = Path(path)
        try:
            self.header = header or read_header(self.path)
            self._file = open(self.path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"{self.path}: not a readable GGUF file ({exc})") from exc
        self.alignment = int(self.header.get("general.alignment", 32))
        self.data_offset = _data_offset(self._map, self.alignment)
        buf = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors: dict[str, Tensor] = {}
        for t in self.header.tensors:
            qtype = gguf.GGMLQuantizationType(t.type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(t.shape)) // block * type_size
            start = self.data_offset + t.offset
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


def _data_offset(data, alignment: int) -> int:
    """Byte offset of the tensor data: the end of the header, rounded up to `alignment`."""
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    pos = 24

    def skip_string(p):
        (n,) = struct.unpack_from("<Q", data, p)
        return p + 8 + n

    for _ in range(n_kv):
        pos = skip_string(pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == STRING:
            pos = skip_string(pos)
        elif vtype == ARRAY:
            sub, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if sub == STRING:
                for _ in range(n):
                    pos = skip_string(pos)
            else:
                pos += _SIZES[sub] * n
        else:
            pos += _SIZES[vtype]
    for _ in range(n_tensors):
        pos = skip_string(pos)
        (nd,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * nd + 4 + 8
    return (pos + alignment - 1) // alignment * alignment
