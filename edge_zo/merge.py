"""Folding sparse adapters into a model: one summed adapter, or one merged GGUF.

Pure functions, no command line (that is `edge_zo.commands.export`):

- `sum_adapters` stacks adapters into one (union of coordinates, values added
  where they coincide), exactly what the runtime does when several are attached.
- `plan_merge` decides, before anything is written, the type each edited weight
  will have in the merged file, and refuses what cannot be merged.
- `merge_into_gguf` writes a GGUF that stock llama.cpp runs with no adapter.
  Only the quantization blocks that hold a nonzero delta are touched: each is
  dequantized, the deltas are added, and it is quantized back to the source type
  with gguf-py (bit-exact with llama.cpp for Q4_0..Q8_0). A weight moved to a finer
  type keeps its grid instead (`edge_zo.quant_grid`): its other values stay exactly
  as they were, only the edited ones are rounded. Every other block and
  tensor keeps its bytes (read in place through `edge_zo.gguf_io` and
  streamed out one tensor at a time), and all metadata is copied. K-quants (and
  any type gguf-py can only dequantize) cannot be re-quantized here: such a
  weight is written whole as Q8_0 and listed in the report.

A delta under half a 4-bit step still rounds away in its own type (a finer
grid, Q5_0 or Q8_0 at a half or a sixteenth of the step, keeps it), and
re-quantizing a block whose largest value changed moves all 32 of its values; `MergedTensor`
measures both in weight space, and the export command measures what they cost
in loss.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import quant_grid
from .adapter import SparseAdapter
from .atomic import atomic_path
from .constants import Sparse
from .errors import IncompatibleAdapterError, InvalidInputError
from .gguf_io import TensorFile, copy_fields
from .model_info import ModelInfo

PERSONALIZED = "personalized"   # value of adapter.sparse.role on a summed adapter
FALLBACK_TYPE = "Q8_0"          # what weights of a type gguf-py cannot quantize become
# Types gguf-py quantizes like llama.cpp does; a weight of one of these keeps its type.
REQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


# ---- summing adapters ----

def sum_adapters(adapters: Sequence[SparseAdapter], sources: Sequence[str] | None = None) -> SparseAdapter:
    """One adapter whose values are the sum of `adapters` (union of coordinates).

    Metadata is carried over (later adapters win on conflicting keys) and
    `adapter.sparse.role` becomes "personalized". Adapters that name different
    architectures or different base-model hashes are refused: they cannot
    belong to the same model.
    """
    if not adapters:
        raise InvalidInputError("nothing to sum: pass at least one adapter")
    sources = list(sources) if sources is not None else [f"adapter {i + 1}" for i in range(len(adapters))]
    archs = {a.architecture for a in adapters}
    if len(archs) > 1:
        listing = ", ".join(f"{s}: '{a.architecture}'" for s, a in zip(sources, adapters))
        raise IncompatibleAdapterError(f"the adapters were made for different architectures ({listing})")
    hashes = {(s, a.metadata[Sparse.BASE_MODEL_SHA256]) for s, a in zip(sources, adapters)
              if Sparse.BASE_MODEL_SHA256 in a.metadata}
    if len({h for _, h in hashes}) > 1:
        listing = ", ".join(f"{s}: {h[:12]}" for s, h in sorted(hashes))
        raise IncompatibleAdapterError(f"the adapters were made for different base models ({Sparse.BASE_MODEL_SHA256}: "
                                       f"{listing}); export each with its own model")

    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    metadata: dict = {}
    for a in adapters:
        metadata.update(a.metadata)
        for i, name in enumerate(a.names):
            parts.setdefault(name, []).append((a.indices[i], a.weight_values(i)))
    weights = {}
    for name, ps in parts.items():
        idx = np.concatenate([p[0] for p in ps])
        val = np.concatenate([p[1] for p in ps]).astype(np.float64)
        coords, inverse = np.unique(idx, return_inverse=True)
        weights[name] = (coords, np.bincount(inverse.ravel(), weights=val, minlength=len(coords)).astype(np.float32))
    metadata[Sparse.ROLE] = PERSONALIZED
    return SparseAdapter.from_weights(archs.pop(), weights, metadata)


def f16_rounding(adapter: SparseAdapter) -> float:
    """Largest change the adapter file's F16 storage makes to a summed value."""
    v = adapter.values
    return float(np.max(np.abs(v.astype(np.float16).astype(np.float32) - v))) if len(v) else 0.0


# ---- planning ----

@dataclass(frozen=True)
class PlannedTensor:
    name: str
    source_type: str
    output_type: str

    @property
    def converted(self) -> bool:
        return self.source_type != self.output_type


def plan_merge(model: ModelInfo, adapter: SparseAdapter, edited_type: str | None = None,
               types: Mapping[str, str] | None = None) -> dict[str, PlannedTensor]:
    """The output type of every weight the adapter edits; raises, listing every
    weight that cannot be merged, before anything is written.

    By default an edited weight keeps its type, or becomes Q8_0 where gguf-py
    cannot quantize its type (K-quants). `edited_type` (one of REQUANTIZABLE)
    writes every edited weight in that type instead: deltas smaller than half a
    4-bit step vanish when re-quantized to 4 bits, and survive in Q8_0 or F16.
    `types` names the type of single weights and wins over both (what
    `edge_zo.merge_types.choose_types` measured).
    """
    import gguf

    types = dict(types or {})
    for wanted in ([edited_type] if edited_type is not None else []) + sorted(set(types.values())):
        if wanted not in REQUANTIZABLE:
            raise InvalidInputError(f"cannot write edited weights as {wanted}; "
                                    f"choose one of {', '.join(REQUANTIZABLE)}")
    adapter.check_against(model, "the adapter")
    plan, problems = {}, []
    for name in adapter.names:
        t = model.tensors[name]
        out = types.get(name) or edited_type or (t.type_name if t.type_name in REQUANTIZABLE else FALLBACK_TYPE)
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[out]][0]
        qtype = getattr(gguf.GGMLQuantizationType, t.type_name, None)
        if out == t.type_name:
            plan[name] = PlannedTensor(name, t.type_name, out)
        elif qtype is None or not _can_dequantize(qtype):
            problems.append(f"{name}: type {t.type_name} cannot be dequantized by gguf-py")
        elif t.shape[-1] % block:
            problems.append(f"{name}: type {t.type_name} must become {out}, "
                            f"but its rows of {t.shape[-1]} are not a multiple of {block}")
        else:
            plan[name] = PlannedTensor(name, t.type_name, out)
    if problems:
        listing = "\n  ".join(problems)
        raise InvalidInputError(f"{model.path}: these weights cannot be merged:\n  {listing}\n"
                                "Keep using the adapter with the runtime (edge-zo eval/generate --adapter), "
                                "or convert the model to Q8_0/Q4_x first.")
    return plan


def _can_dequantize(qtype) -> bool:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
    except (NotImplementedError, gguf.quants.QuantError, ValueError):
        return False
    return True


# ---- merging one tensor ----

@dataclass(frozen=True)
class MergedTensor:
    """What merging did to one weight (norms in weight units)."""

    name: str
    source_type: str
    output_type: str
    entries: int            # nonzero deltas merged
    blocks_changed: int     # quantization blocks re-quantized
    blocks: int             # blocks in the weight
    delta_norm: float       # ||D||: the deltas asked for
    miss_norm: float        # ||(W_merged - W_base) - D|| at the edited coordinates: deltas rounded away
    collateral_norm: float  # ||W_merged - W_base|| at every other coordinate: neighbours moved by re-quantizing

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def merge_tensor(raw: np.ndarray, source_type: str, output_type: str, idx: np.ndarray, val: np.ndarray,
                 name: str = "tensor") -> tuple[np.ndarray, MergedTensor]:
    """Add deltas `val` at flat element indices `idx` to a tensor stored as `raw`
    bytes of `source_type`; return the new bytes (of `output_type`) and a summary.

    With equal types only the blocks holding a nonzero delta are re-quantized, so a zero adapter
    returns the bytes unchanged. Into a finer type of the same grid family (`quant_grid`: Q4_0 ->
    Q5_0/Q8_0, Q4_1 -> Q5_1, Q5_0 -> Q8_0) blocks keep their grid and only the edited values are
    rounded; otherwise the whole weight is dequantized and quantized to `output_type`.
    """
    import gguf

    src = gguf.GGMLQuantizationType[source_type]
    out = gguf.GGMLQuantizationType[output_type]
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    block, size = gguf.GGML_QUANT_SIZES[src]
    n_blocks = raw.size // size
    idx, inverse = np.unique(np.asarray(idx, np.int64).ravel(), return_inverse=True)  # duplicates add up
    val = np.bincount(inverse.ravel(), weights=np.asarray(val, np.float64).ravel(), minlength=len(idx))
    idx, val = idx[val != 0], val[val != 0].astype(np.float32)
    if src == out and idx.size == 0:
        return raw.copy(), MergedTensor(name, source_type, output_type, 0, 0, int(n_blocks), 0.0, 0.0, 0.0)

    # Into a finer type of the same grid family, every block is lifted onto the source's grid, so
    # no other value moves. Within one type, re-quantizing puts unedited values back where they
    # were unless an edited value becomes the block's largest; then it sets the scale, as a
    # quantizer would have (a sidecar's outliers folded back, for one).
    lifts = src != out and quant_grid.max_shift(source_type, output_type) is not None
    if src == out or lifts:
        blocks = np.unique(idx // block) if src == out else np.arange(n_blocks)
        where = np.searchsorted(blocks, idx // block)
        pos = (where, idx % block)
        before = _dequantize(raw.reshape(n_blocks, size)[blocks], src, block)
        target = before.copy()
        target[pos] += val
        if lifts:
            edited = np.zeros(target.shape, bool)
            edited[pos] = True
            new, misfit = quant_grid.lift(raw.reshape(n_blocks, size)[blocks], source_type, output_type,
                                          target, edited)
            if misfit.any():   # an edited value past the block's range: it sets a new scale
                new[misfit] = _quantize(target[misfit], out, int(misfit.sum()))
        else:
            new = _quantize(target, out, len(blocks))
        if src == out:
            merged = raw.copy()
            merged.reshape(n_blocks, size)[blocks] = new
        else:
            merged = new.reshape(-1)
        change = _dequantize(new, out, block) - before
        n_changed = len(blocks)
    else:
        out_block = gguf.GGML_QUANT_SIZES[out][0]
        before = _dequantize(raw, src, block).reshape(-1)
        pos = idx
        target = before.copy()
        target[pos] += val
        merged = _quantize(target.reshape(-1, out_block), out, target.size // out_block).reshape(-1)
        change = _dequantize(merged, out, out_block).reshape(-1) - before
        n_changed = n_blocks
    miss = change[pos] - val
    change[pos] = 0.0
    summary = MergedTensor(name, source_type, output_type, int(idx.size), int(n_changed), int(n_blocks),
                           _norm(val), _norm(miss), _norm(change))
    return merged, summary


def _norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64).ravel()))


def _dequantize(raw: np.ndarray, qtype, block: int) -> np.ndarray:
    import gguf

    raw = np.ascontiguousarray(raw).view(np.uint8)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    return np.array(gguf.quants.dequantize(raw.reshape(-1, size), qtype), np.float32).reshape(-1, block)


def _quantize(values: np.ndarray, qtype, n_blocks: int) -> np.ndarray:
    import gguf

    q = gguf.quants.quantize(np.ascontiguousarray(values, np.float32), qtype)
    return np.ascontiguousarray(q).view(np.uint8).reshape(n_blocks, -1)


# ---- merging a model ----

@dataclass
class MergeReport:
    path: Path
    tensors: list[MergedTensor] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0

    @property
    def converted(self) -> list[str]:
        """Weights written in another type than the source's (K-quants, or `edited_type`)."""
        return [t.name for t in self.tensors if t.source_type != t.output_type]

    def _ratio(self, key: str) -> float:
        delta = np.sqrt(sum(t.delta_norm ** 2 for t in self.tensors))
        return float(np.sqrt(sum(getattr(t, key) ** 2 for t in self.tensors)) / delta) if delta else 0.0

    @property
    def missed(self) -> float:
        """Share of the deltas' norm that re-quantization rounded away (0: all landed;
        1: as if no delta had been merged at all, when every one rounded back)."""
        return self._ratio("miss_norm")

    @property
    def collateral(self) -> float:
        """Norm of the change to values the adapter does not touch, relative to the deltas'."""
        return self._ratio("collateral_norm")

    def to_dict(self) -> dict:
        return {"path": str(self.path), "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "seconds": round(self.seconds, 3), "missed": self.missed,
                "collateral": self.collateral, "converted": self.converted,
                "tensors": [t.to_dict() for t in self.tensors]}


def output_nbytes(model: ModelInfo, plan: dict[str, PlannedTensor]) -> int:
    """Bytes of tensor data the merged file will hold (for a disk-space check)."""
    import gguf

    total = 0
    for name, t in model.tensors.items():
        type_name = plan[name].output_type if name in plan else t.type_name
        qtype = getattr(gguf.GGMLQuantizationType, type_name, None)
        if qtype is None:
            continue
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        total += t.n_elements // block * size
    return total


def merge_into_gguf(model_path: str | Path, adapter: SparseAdapter, out_path: str | Path, *,
                    edited_type: str | None = None, types: Mapping[str, str] | None = None,
                    progress: bool = True) -> MergeReport:
    """Write `model_path` with `adapter` folded into its weights to `out_path`,
    atomically (a temporary file in the destination folder, then a rename).
    `edited_type`, `types`: see `plan_merge`."""
    import gguf
    from tqdm import tqdm

    t0 = time.perf_counter()
    model = ModelInfo.open(model_path)
    plan = plan_merge(model, adapter, edited_type, types)
    out_path = Path(out_path)
    edits = {name: (adapter.indices[i], adapter.weight_values(i)) for i, name in enumerate(adapter.names)}
    report = MergeReport(out_path, bytes_in=model.path.stat().st_size)

    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, model.architecture)
        try:
            with TensorFile(model.path, model.header) as source:
                if source.alignment != gguf.GGUF_DEFAULT_ALIGNMENT:  # copied as a key below; pad to match it
                    writer.data_alignment = source.alignment
                copy_fields(model.header, writer)
                for t in source.tensors.values():
                    qtype = gguf.GGMLQuantizationType[plan[t.name].output_type] if t.name in plan else t.type
                    block, size = gguf.GGML_QUANT_SIZES[qtype]
                    writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.n_elements // block * size,
                                           raw_dtype=qtype)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for t in tqdm(source.tensors.values(), desc="merging", unit="tensor",
                              disable=None if progress else True):
                    raw = t.raw
                    if t.name in plan:
                        p = plan[t.name]
                        raw, summary = merge_tensor(raw, p.source_type, p.output_type, *edits[t.name], name=t.name)
                        report.tensors.append(summary)
                    writer.write_tensor_data(raw)
        finally:
            writer.close()
    report.bytes_out = out_path.stat().st_size
    report.seconds = time.perf_counter() - t0
    return report
