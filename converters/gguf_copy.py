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
