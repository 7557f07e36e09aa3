"""Copy GGUF metadata fields to a writer, keeping their types."""
from __future__ import annotations

from collections.abc import Callable

import gguf

from edge_zo.gguf_header import ARRAY, GGUFHeader


def copy_fields(header: GGUFHeader, writer: gguf.GGUFWriter, keep: Callable[[str], bool] = lambda key: True) -> None:
    """Copy every field `keep` accepts, except general.architecture, which GGUFWriter writes itself."""
    for key, f in header.fields.items():
        if key == gguf.Keys.General.ARCHITECTURE or not keep(key):
            continue
        sub = gguf.GGUFValueType(f.sub_type) if f.type == ARRAY else None
        writer.add_key_value(key, f.value, gguf.GGUFValueType(f.type), sub_type=sub)


def write_f32_copy(src, out) -> None:
    """Write `src` with every tensor dequantized to float32 and every metadata key kept: the model
    without quantization, for measurements that must not see llama.cpp's activation rounding."""
    from .gguf_tensors import TensorFile

    with TensorFile(src) as tf:
        w = gguf.GGUFWriter(out, tf.header.get(gguf.Keys.General.ARCHITECTURE))
        copy_fields(tf.header, w, keep=lambda key: key != gguf.Keys.General.FILE_TYPE)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        for name, t in tf.tensors.items():
            w.add_tensor(name, t.dequantize())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
