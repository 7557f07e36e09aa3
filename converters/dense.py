"""Writing the dense model.gguf: every metadata key of the source, 4-bit block
matmuls, and the sensitive coordinates zeroed (--split zero) or kept.

Types. A source whose block matmuls are already mostly below 8 bits (Q4_0,
Q4_K_M, ...) keeps every tensor's type and bytes: re-quantizing a quantized
model to another type costs quality. The exception is SLOW_SOURCE_TYPES (Q4_1),
whose CPU kernels run at half the speed of the other 4-bit types' and which
llama.cpp does not repack: those block matmuls become Q4_0, the sensitive
coordinates zeroed first, so that the outliers no longer stretch the blocks
(SmolLM2: perplexity with the sidecar 30.32 -> 33.43, tune steps per minute
2.2x; docs/convert.md); not under --split keep, whose model stays as it is.
A float or Q8_0 source gets its block matmuls quantized to --quant (gguf-py
writes Q4_0/Q4_1 bit-exactly like llama.cpp) and float embeddings to Q8_0;
everything else (norms) keeps its type.

Zeroing. Where a tensor is re-quantized, its sensitive coordinates are set to
0 before quantizing, so they no longer stretch their block's scale (the
paper's dense-and-sparse split). Where a tensor keeps its quantized bytes, each
sensitive weight's code is moved to its block's value nearest zero
(`codes.zero_codes`), touching nothing else. Either way the sidecar's base
value is source value minus dense value, so dense + sidecar reproduces the
source at every sensitive coordinate up to FP16 rounding.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edge_zo.atomic import atomic_path
from edge_zo.constants import OUTPUT, TOKEN_EMBD, General
from edge_zo.errors import InvalidInputError
from edge_zo.gguf_io import TensorFile, copy_fields
from edge_zo.runtime import SLOW_CPU_TYPES

from . import codes

Q = gguf.GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
HIGH_PRECISION = FLOAT_TYPES + (Q.Q8_0,)
QUANT_CHOICES = ("Q4_0", "Q4_1")
# The 4-bit source types whose block matmuls become FAST_TYPE (module docstring).
SLOW_SOURCE_TYPES = tuple(Q[name] for name in SLOW_CPU_TYPES)
FAST_TYPE = Q.Q4_0
FILE_TYPES = {Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}


class Split(enum.Enum):
    ZERO = "zero"     # sensitive coordinates leave the dense model; the sidecar carries them
    KEEP = "keep"     # the dense model keeps them; the sidecar starts at zero (pure deltas)


@dataclass(frozen=True)
class TypePlan:
    types: dict[str, Q]          # output type of every tensor
    requantized: list[str]       # tensors whose type changes
    kept_source_types: bool      # the source was already low-bit and keeps its types (slow ones excepted)

    @property
    def file_type(self) -> int | None:
        """general.file_type for the output, or None to keep the source's."""
        mm = {self.types[n] for n in self.requantized if n.startswith("blk.")}
        return int(FILE_TYPES[mm.pop()]) if len(mm) == 1 and next(iter(mm)) in FILE_TYPES else None


def plan_types(tf: TensorFile, matmuls: list[str], quant: str | None, default_quant: str,
               faster: bool = True) -> TypePlan:
    """Choose each tensor's output type (see the module docstring); `faster`: False keeps a 4-bit
    source's SLOW_SOURCE_TYPES too (--split keep: a model that must stay as it is)."""
    src = {n: t.type for n, t in tf.tensors.items()}
    elems = {n: tf.tensors[n].n_elements for n in matmuls}
    low = sum(elems[n] for n in matmuls if src[n] not in HIGH_PRECISION)
    already_low = low * 2 >= sum(elems.values()) and quant is None
    target = Q[quant or default_quant]
    types = dict(src)
    if already_low and faster:
        for n in matmuls:
            if src[n] in SLOW_SOURCE_TYPES:
                types[n] = FAST_TYPE
    elif not already_low:
        for n in matmuls:
            if src[n] != target and (quant is not None or src[n] in HIGH_PRECISION):
                types[n] = target
        for n in (TOKEN_EMBD, OUTPUT):
            if n in src and src[n] in FLOAT_TYPES:
                types[n] = Q.Q8_0
    for n, t in list(types.items()):
        block = gguf.GGML_QUANT_SIZES[t][0]
        if t != src[n] and tf.tensors[n].shape[-1] % block:
            types[n] = src[n]       # rows not a whole number of blocks: leave as is
    return TypePlan(types, [n for n in types if types[n] != src[n]], already_low)


def write_dense(tf: TensorFile, out_path: Path, plan: TypePlan, mask: dict[str, np.ndarray], split: Split,
                progress: bool = True) -> dict[str, np.ndarray]:
    """Write the dense model atomically; return {name: dense value at each masked index}."""
    from tqdm import tqdm

    dense_at = {}
    with atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, tf.header.get(General.ARCHITECTURE))
        if "general.alignment" in tf.header.fields:
            w.data_alignment = int(tf.header.get("general.alignment"))
        ftype = plan.file_type
        copy_fields(tf.header, w, keep=lambda key: not (key == General.FILE_TYPE and ftype is not None))
        if ftype is not None:
            w.add_file_type(ftype)
        for name, t in tf.tensors.items():
            qt = plan.types[name]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor_info(name, t.shape, np.float32, t.n_elements // block * size, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, t in tqdm(tf.tensors.items(), desc="Writing model.gguf", unit="tensor",
                            disable=not progress, leave=False):
            idx = mask.get(name, np.zeros(0, np.int64))
            raw = _dense_bytes(t, plan.types[name], idx if split is Split.ZERO else idx[:0])
            if name in mask:
                dense_at[name] = codes.values_at(plan.types[name], raw, idx)
            w.write_tensor_data(raw)
        w.close()
    return dense_at


def _dense_bytes(t, out_type: Q, zero_idx: np.ndarray) -> np.ndarray:
    """The output bytes of tensor `t` in `out_type`, with the weights at `zero_idx` zeroed."""
    if out_type == t.type:
        if len(zero_idx) == 0:
            return t.raw
        if t.type in FLOAT_TYPES:
            vals = t.raw.copy().view({Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint16}[t.type])
            vals[zero_idx] = 0        # +0.0 has the all-zero bit pattern in every float type
            return vals.view(np.uint8)
        if not codes.supported(t.type):
            raise InvalidInputError(f"{t.name}: --split zero cannot edit {t.type.name} blocks in place; "
                                    f"use --split keep, or --quant {'/'.join(QUANT_CHOICES)} to re-quantize")
        return codes.zero_codes(t.type, t.raw, zero_idx)
    values = t.dequantize().reshape(-1)
    values[zero_idx] = 0.0
    values = values.reshape(t.shape)
    if out_type == Q.F32:
        return values.view(np.uint8).reshape(-1)
    if out_type == Q.F16:
        return values.astype(np.float16).view(np.uint8).reshape(-1)
    return gguf.quantize(values, out_type).reshape(-1)
