"""Sparse adapters: reading, writing and checking them against a model.

On disk a sparse adapter is a GGUF file in llama.cpp's adapter conventions:
`general.type = "adapter"`, `adapter.type = "sparse"`, `general.architecture`
equal to the base model's, and for each weight W two tensors, `W.sparse_idx`
(I32 flat indices row*n_in + col, strictly increasing) and `W.sparse_val` (F16).

In memory all values live in one flat float32 array (what SPSA perturbs), with
`offsets` marking each weight's slice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .constants import IDX_SUFFIX, SPARSE_FORMAT_VERSION, VAL_SUFFIX, VALUE_MAX, Adapter, General, Sparse
from .errors import IncompatibleAdapterError, InvalidInputError, ModelFileError
from .model_info import ModelInfo

_INT32_MAX = np.iinfo(np.int32).max


@dataclass
class SparseAdapter:
    architecture: str
    names: list[str]
    indices: list[np.ndarray]            # int64 flat indices per weight
    values: np.ndarray                   # float32, all weights concatenated
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.values = np.ascontiguousarray(self.values, dtype=np.float32)
        self.offsets = np.cumsum([0] + [len(i) for i in self.indices]).astype(np.int64)
        if self.offsets[-1] != len(self.values):
            raise InvalidInputError(f"{self.offsets[-1]} indices but {len(self.values)} values")

    @classmethod
    def from_weights(cls, architecture: str, weights: dict[str, tuple[np.ndarray, np.ndarray]],
                     metadata: dict[str, Any] | None = None) -> "SparseAdapter":
        """Build from {weight name: (flat indices, values)}; sorts each weight by index."""
        names, indices, values = [], [], []
        for name in sorted(weights):
            idx, val = weights[name]
            idx = np.asarray(idx, dtype=np.int64).ravel()
            val = np.asarray(val, dtype=np.float32).ravel()
            if idx.shape != val.shape:
                raise InvalidInputError(f"{name}: {idx.size} indices but {val.size} values")
            order = np.argsort(idx, kind="stable")
            names.append(name)
            indices.append(idx[order])
            values.append(val[order])
        flat = np.concatenate(values) if values else np.zeros(0, np.float32)
        return cls(architecture, names, indices, flat, dict(metadata or {}))

    @property
    def n_params(self) -> int:
        return int(self.offsets[-1])

    def weight_values(self, i: int) -> np.ndarray:
        """A view (not a copy) of weight i's values inside the flat array."""
        return self.values[self.offsets[i]: self.offsets[i + 1]]

    def with_values(self, values: np.ndarray, metadata: dict[str, Any] | None = None) -> "SparseAdapter":
        """Same coordinates, new values (e.g. tuned deltas)."""
        return SparseAdapter(self.architecture, list(self.names), self.indices, np.array(values, np.float32),
                             {**self.metadata, **(metadata or {})})

    # ---- checks ----

    def validate(self, source: str = "adapter") -> None:
        """Indices sorted, unique, non-negative and representable as I32."""
        for name, idx in zip(self.names, self.indices):
            if len(idx) and (idx[0] < 0 or idx[-1] > _INT32_MAX):
                raise InvalidInputError(f"{source}: {name}: indices must lie in [0, 2^31)")
            if len(idx) > 1 and np.any(np.diff(idx) <= 0):
                bad = int(np.argmax(np.diff(idx) <= 0)) + 1
                raise InvalidInputError(
                    f"{source}: {name}: indices must be strictly increasing (entry {bad}: "
                    f"{idx[bad - 1]} then {idx[bad]}); sort them and merge duplicates")

    def check_against(self, model: ModelInfo, source: str = "adapter") -> None:
        """Raise one error listing every way this adapter does not fit `model`."""
        problems = []
        if self.architecture != model.architecture:
            problems.append(f"made for architecture '{self.architecture}' but the model is '{model.architecture}'")
        for name, idx in zip(self.names, self.indices):
            t = model.tensors.get(name)
            if t is None:
                problems.append(f"{name}: the model has no such weight")
            elif len(t.shape) not in (2, 3):
                problems.append(f"{name}: weight has shape {t.shape}; only 2-D and 3-D weights take sparse deltas")
            elif len(idx) and idx[-1] >= t.n_elements:
                problems.append(f"{name}: index {int(idx[-1])} is out of range for shape {t.shape} "
                                f"({t.n_elements} elements)")
        if problems:
            listing = "\n  ".join(problems)
            raise IncompatibleAdapterError(
                f"{source} does not fit model {model.path}:\n  {listing}\n"
                "Use the adapter with the model it was made for, or rebuild it with `edge-zo convert`.")

    def check_base(self, model_sha256: str, model_path: str | Path, source: str = "adapter") -> None:
        """Refuse an adapter that records another base model (adapter.sparse.base_model_sha256)
        than `model_sha256`: same shapes do not make the same model."""
        made_for = self.metadata.get(Sparse.BASE_MODEL_SHA256)
        if made_for is not None and made_for != model_sha256:
            raise IncompatibleAdapterError(
                f"{source} was made for another base model ({Sparse.BASE_MODEL_SHA256} {made_for[:16]}..., but "
                f"{model_path} has sha256 {model_sha256[:16]}...). Use it with the model it was made for (a run's "
                "run.json names it), or pass --allow-other-base to apply it to this one anyway.")

    # ---- files ----

    def save(self, path: str | Path) -> None:
        """Write atomically: a temporary file in the same folder, then rename."""
        import gguf

        self.validate(str(path))
        beyond = np.flatnonzero(~(np.abs(self.values) <= VALUE_MAX))   # NaN compares false: caught too
        if len(beyond):
            w = int(np.searchsorted(self.offsets, beyond[0], side="right")) - 1
            raise InvalidInputError(f"{path}: {self.names[w]}: value {int(beyond[0] - self.offsets[w])} is "
                                    f"{self.values[beyond[0]]:g}; an adapter stores F16 values within "
                                    f"±{VALUE_MAX:g}")
        with atomic_path(path) as tmp:
            w = gguf.GGUFWriter(tmp, self.architecture)
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(Adapter.TYPE, Adapter.SPARSE)
            w.add_uint32(Sparse.FORMAT_VERSION, SPARSE_FORMAT_VERSION)
            for key, value in sorted(self.metadata.items()):
                _add_metadata(w, key, value)
            for i, name in enumerate(self.names):
                w.add_tensor(name + IDX_SUFFIX, self.indices[i].astype(np.int32))
                w.add_tensor(name + VAL_SUFFIX, self.weight_values(i).astype(np.float16))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()

    @classmethod
    def load(cls, path: str | Path) -> "SparseAdapter":
        import gguf

        path = Path(path)
        if path.is_dir():
            raise ModelFileError(f"{path}: is a folder; pass the adapter's .gguf file (e.g. RUN/deltas.gguf)")
        if not path.is_file():
            raise ModelFileError(f"{path}: no such adapter file")
        try:   # gguf-py raises many kinds of errors on a damaged file; each means the same to the user
            reader = gguf.GGUFReader(path)
            fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
            tensors = {t.name: t for t in reader.tensors}
        except Exception as exc:
            raise ModelFileError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); it is damaged or "
                                 "not an adapter: use another copy, or rerun the command that wrote it") from None
        if fields.get(General.TYPE) != "adapter" or fields.get(Adapter.TYPE) != Adapter.SPARSE:
            raise ModelFileError(
                f"{path}: not a sparse adapter ({General.TYPE}={fields.get(General.TYPE)!r}, "
                f"{Adapter.TYPE}={fields.get(Adapter.TYPE)!r}); expected 'adapter' and 'sparse'")
        version = fields.get(Sparse.FORMAT_VERSION)
        if version != SPARSE_FORMAT_VERSION:
            raise ModelFileError(f"{path}: sparse adapter format version {version!r}; this edge-zo reads "
                                 f"version {SPARSE_FORMAT_VERSION}. Upgrade edge-zo or re-export the adapter.")
        arch = fields.get(General.ARCHITECTURE)
        if not isinstance(arch, str) or not isinstance(fields.get(Sparse.BASE_MODEL_SHA256, ""), str):
            raise ModelFileError(f"{path}: {General.ARCHITECTURE} and {Sparse.BASE_MODEL_SHA256} must be strings")
        weights = {}
        for tname, t in tensors.items():
            if tname.endswith(VAL_SUFFIX) and tname[: -len(VAL_SUFFIX)] + IDX_SUFFIX not in tensors:
                raise ModelFileError(f"{path}: tensor {tname} has no matching {IDX_SUFFIX} tensor")
            if not tname.endswith(IDX_SUFFIX):
                if not tname.endswith(VAL_SUFFIX):
                    raise ModelFileError(f"{path}: unexpected tensor {tname} in a sparse adapter")
                continue
            name = tname[: -len(IDX_SUFFIX)]
            v = tensors.get(name + VAL_SUFFIX)
            if v is None:
                raise ModelFileError(f"{path}: tensor {tname} has no matching {name + VAL_SUFFIX} tensor")
            if t.tensor_type != gguf.GGMLQuantizationType.I32 or v.tensor_type not in (
                    gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
                raise ModelFileError(f"{path}: {name}: expected I32 indices and F16 values, got "
                                     f"{t.tensor_type.name} and {v.tensor_type.name}")
            try:
                idx = np.asarray(t.data, dtype=np.int64).ravel()
                val = np.asarray(v.data, dtype=np.float32).ravel()
            except Exception as exc:
                raise ModelFileError(f"{path}: {name}: unreadable tensor data ({type(exc).__name__}: {exc})") from None
            if idx.size != val.size:
                raise ModelFileError(f"{path}: {name}: {idx.size} indices but {val.size} values")
            bad = np.flatnonzero(~np.isfinite(val))
            if len(bad):
                raise ModelFileError(f"{path}: tensor {name + VAL_SUFFIX}: value {int(bad[0])} is {val[bad[0]]} "
                                     f"({len(bad)} not finite in all); the adapter is damaged or was saved from a "
                                     "diverged run: use an earlier one, or tune again with a smaller --lr")
            weights[name] = (idx, val)
        meta = {k: v for k, v in fields.items()
                if k.startswith("adapter.sparse.") and k != Sparse.FORMAT_VERSION}
        names = sorted(weights)
        adapter = cls(str(arch), names, [weights[n][0] for n in names],
                      np.concatenate([weights[n][1] for n in names]) if names else np.zeros(0, np.float32), meta)
        try:
            adapter.validate(str(path))
        except InvalidInputError as exc:
            raise ModelFileError(str(exc)) from exc
        return adapter


def _add_metadata(w, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint64(key, value) if value >= 0 else w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float64(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        raise InvalidInputError(f"metadata {key}: unsupported value type {type(value).__name__}")
