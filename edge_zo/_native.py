"""The one module that touches cffi objects.

Everything crossing into C is checked here (dtype, shape, contiguity), status
codes become typed exceptions carrying the C side's message, and results come
back as plain Python or numpy values. Nothing above this module sees a cdata.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError, ModelFileError, NativeBuildError, NativeRuntimeError

try:
    import llama_cpp  # noqa: F401  (loads libllama/libggml once, before our extension links to them)
except ModuleNotFoundError as exc:
    # Built against a standalone llama.cpp (EDGE_ZO_LLAMA_LIB, see native/build_ffi.py):
    # the extension finds that libllama through its rpath.
    if exc.name != "llama_cpp":
        raise
try:
    from ._edge_zo_native import ffi, lib
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise NativeBuildError(
        f"edge-zo's native core is not built or does not load ({exc}). "
        "Reinstall with `pip install -e .` (it compiles native/edge_zo.c against llama-cpp-python==0.3.36)."
    ) from exc

HAS_CUDA = bool(lib.ez_has_cuda())  # this build carries the CUDA kernels (native/edge_zo_cuda.cu)

_ERRORS = {
    lib.EZ_ERR_IO: ModelFileError,
    lib.EZ_ERR_INVALID: InvalidInputError,
    lib.EZ_ERR_RUNTIME: NativeRuntimeError,
    lib.EZ_ERR_NOMEM: MemoryError,
}


def _check(rc: int) -> None:
    if rc != lib.EZ_OK:
        message = ffi.string(lib.ez_last_error()).decode("utf-8", "replace")
        raise _ERRORS.get(rc, NativeRuntimeError)(message)


def _array(a, dtype, name: str) -> np.ndarray:
    out = np.ascontiguousarray(a, dtype=dtype)
    if out.ndim != 1:
        raise InvalidInputError(f"{name} must be one-dimensional, got shape {out.shape}")
    return out


def quantize(src: str, dst: str, file_type: str, threads: int = 0) -> None:
    """llama.cpp's own quantizer on a whole GGUF file (its K-quants included, which gguf-py
    cannot write): `file_type` names a llama.cpp file type, e.g. "Q4_K_M" or "Q8_0"."""
    import gguf

    try:
        ftype = gguf.LlamaFileType[f"MOSTLY_{file_type.upper()}"]
    except KeyError:
        names = sorted(t.name[len("MOSTLY_"):] for t in gguf.LlamaFileType if t.name.startswith("MOSTLY_"))
        raise InvalidInputError(f"unknown llama.cpp file type {file_type!r}; one of {', '.join(names)}") from None
    _check(lib.ez_quantize(str(src).encode(), str(dst).encode(), int(ftype), threads))


def cpu_extra_buffer_types() -> list[str]:
    """The extra CPU weight layouts llama.cpp offers on this machine ("CPU_REPACK", "AMX", ...):
    what ContextParams.extra_bufts turns on."""
    buf = ffi.new("char[]", 256)
    _check(lib.ez_cpu_extra_bufts(buf, 256))
    names = ffi.string(buf).decode()
    return names.split(",") if names else []


@dataclass(frozen=True)
class ContextParams:
    """How big a llama.cpp context to create (see ez_model_params in edge_zo.h)."""

    n_ctx_seq: int = 512
    n_seq_max: int = 16
    n_batch: int = 2048
    n_ubatch: int = 512
    n_threads: int = 0
    n_gpu_layers: int = 0
    kv_f32: bool = False
    flash_attn: int = -1
    verbose: bool = False
    extra_bufts: bool = False
    kv_unified: bool = False


class NativeModel:
    """A llama.cpp model and context with sparse deltas applied in every forward."""

    def __init__(self, path: str, params: ContextParams = ContextParams()):
        self._m = None
        p = ffi.new("ez_model_params *")
        lib.ez_default_params(p)
        for field in ContextParams.__dataclass_fields__:
            setattr(p, field, int(getattr(params, field)))
        out = ffi.new("ez_model **")
        _check(lib.ez_model_open(str(path).encode(), p, out))
        self._m = out[0]
        self._slots: dict[int, np.ndarray] = {}  # slot id -> the values array C borrows
        self.n_vocab = int(lib.ez_n_vocab(self._m))
        self.n_ctx_seq = int(lib.ez_n_ctx_seq(self._m))
        self.n_seq_max = int(lib.ez_n_seq_max(self._m))
        self.n_batch = int(lib.ez_n_batch(self._m))
        self.bos = int(lib.ez_token_bos(self._m))
        self.eos = int(lib.ez_token_eos(self._m))
        self.add_bos = bool(lib.ez_add_bos(self._m))

    def close(self) -> None:
        if self._m is not None:
            lib.ez_model_close(self._m)
            self._m = None
            self._slots.clear()

    def __del__(self):
        self.close()

    def _live(self):
        if self._m is None:
            raise NativeRuntimeError("this model has been closed")
        return self._m

    @property
    def fallback_count(self) -> int:
        """How many tensors the sparse path had to copy from a non-host backend."""
        return int(lib.ez_fallback_count(self._live()))

    @property
    def path_counts(self) -> dict[str, int]:
        """Graph nodes patched so far per path: host kernels, CUDA kernels, and
        tensors copied through the host (the fallback for other device buffers)."""
        m = self._live()
        return {"host": int(lib.ez_host_count(m)), "cuda": int(lib.ez_cuda_count(m)),
                "fallback": int(lib.ez_fallback_count(m))}

    @property
    def decode_count(self) -> int:
        """llama_decode calls so far."""
        return int(lib.ez_decode_count(self._live()))

    # ---- text ----

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> np.ndarray:
        data = text.encode("utf-8")
        cap = len(data) + 16
        while True:
            buf = np.empty(cap, dtype=np.int32)
            n = ffi.new("int32_t *")
            rc = lib.ez_tokenize(self._live(), data, len(data), add_special, parse_special,
                                 ffi.from_buffer("int32_t[]", buf), cap, n)
            if rc == lib.EZ_ERR_NOMEM and n[0] > cap:
                cap = n[0]
                continue
            _check(rc)
            return buf[: n[0]].copy()

    def token_piece(self, token: int) -> bytes:
        cap = 64
        while True:
            buf = ffi.new("char[]", cap)
            n = ffi.new("int32_t *")
            rc = lib.ez_token_piece(self._live(), int(token), buf, cap, n)
            if rc == lib.EZ_ERR_NOMEM and n[0] > cap:
                cap = n[0]
                continue
            _check(rc)
            return ffi.buffer(buf, n[0])[:]

    def detokenize(self, tokens) -> str:
        return b"".join(self.token_piece(t) for t in tokens).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict], *, add_assistant: bool) -> str:
        keep = [ffi.new("char[]", str(m[k]).encode()) for m in messages for k in ("role", "content")]
        roles = ffi.new("const char *[]", keep[0::2])
        contents = ffi.new("const char *[]", keep[1::2])
        cap = 2 * sum(len(m["content"]) + len(m["role"]) for m in messages) + 512
        while True:
            buf = ffi.new("char[]", cap)
            n = ffi.new("int32_t *")
            rc = lib.ez_chat_template(self._live(), roles, contents, len(messages), add_assistant, buf, cap, n)
            if rc == lib.EZ_ERR_NOMEM and n[0] > cap:
                cap = n[0] + 1
                continue
            _check(rc)
            return ffi.buffer(buf, n[0])[:].decode("utf-8")

    # ---- sparse deltas ----

    def add_sparse(self, name: str, shape: tuple[int, ...], indices, values: np.ndarray) -> int:
        """Attach deltas to weight `name` of numpy shape (n_out, n_in) or (n_expert, n_out, n_in).

        `values` must be a contiguous float32 array; C reads it on every forward,
        so writing into it between forwards changes the deltas without a copy.
        """
        if not isinstance(values, np.ndarray) or values.dtype != np.float32 or not values.flags.c_contiguous:
            raise InvalidInputError(f"{name}: sparse values must be a contiguous float32 numpy array")
        idx = _array(indices, np.int64, f"{name} indices")
        if values.ndim != 1 or len(values) != len(idx):
            raise InvalidInputError(f"{name}: {len(idx)} indices but {values.size} values")
        if len(shape) == 2:
            n_expert, (n_out, n_in) = 1, shape
        elif len(shape) == 3:
            n_expert, n_out, n_in = shape
        else:
            raise InvalidInputError(f"{name}: sparse deltas need a 2-D or 3-D weight, got shape {shape}")
        slot = ffi.new("int64_t *")
        _check(lib.ez_sparse_add(self._live(), name.encode(), n_in, n_out, n_expert,
                                 ffi.from_buffer("int64_t[]", idx), ffi.from_buffer("float[]", values),
                                 len(idx), slot))
        self._slots[int(slot[0])] = values
        return int(slot[0])

    def remove_sparse(self, slot: int) -> None:
        _check(lib.ez_sparse_remove(self._live(), int(slot)))
        self._slots.pop(int(slot), None)

    # ---- perturbation groups ----

    @property
    def can_group(self) -> bool:
        """Whether `groups` works for this model (not for recurrent or hybrid memories)."""
        return bool(lib.ez_can_group(self._live()))

    @contextlib.contextmanager
    def groups(self, base: np.ndarray, sets: list[np.ndarray]) -> Iterator[None]:
        """Within the block, sequences given a group g in `loss` and `next_logprobs` read sets[g]
        wherever an attached slot's values lie in `base` (see ez_groups_set): several value sets
        evaluated in one llama_decode."""
        for name, a in [("base", base)] + [(f"value set {g}", v) for g, v in enumerate(sets)]:
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous or a.ndim != 1:
                raise InvalidInputError(f"{name} must be a contiguous one-dimensional float32 array")
            if len(a) != len(base):
                raise InvalidInputError(f"{name} has {len(a)} values, the base {len(base)}")
        views = [ffi.from_buffer("float[]", v) for v in sets]   # C borrows them until the block ends
        ptrs = ffi.new("float *[]", views)
        _check(lib.ez_groups_set(self._live(), ffi.from_buffer("float[]", base), len(base), ptrs, len(sets)))
        try:
            yield
        finally:
            lib.ez_groups_clear(self._live())
            del views, ptrs

    @staticmethod
    def _groups(seq_group, n_seq: int):
        if seq_group is None:
            return ffi.NULL, None
        g = _array(seq_group, np.int32, "seq_group")
        if len(g) != n_seq:
            raise InvalidInputError(f"{len(g)} sequence groups for {n_seq} sequences")
        return ffi.from_buffer("int32_t[]", g), g

    # ---- loss and generation ----

    def loss(self, tokens, targets, seq_start, seq_group=None) -> tuple[np.ndarray, np.ndarray]:
        """Summed target NLL and target count per sequence (see ez_loss); seq_group: the value
        set of each sequence, inside `groups`."""
        tok = _array(tokens, np.int32, "tokens")
        tgt = _array(targets, np.uint8, "targets")
        start = _array(seq_start, np.int32, "seq_start")
        if len(tgt) != len(tok) or len(start) < 2 or start[-1] != len(tok):
            raise InvalidInputError("tokens, targets and seq_start do not describe the same batch")
        n_seq = len(start) - 1
        nll = np.zeros(n_seq, dtype=np.float64)
        count = np.zeros(n_seq, dtype=np.int32)
        groups, _keep = self._groups(seq_group, n_seq)
        _check(lib.ez_loss(self._live(), ffi.from_buffer("int32_t[]", tok), ffi.from_buffer("uint8_t[]", tgt),
                           ffi.from_buffer("int32_t[]", start), n_seq, groups,
                           ffi.from_buffer("double[]", nll), ffi.from_buffer("int32_t[]", count)))
        return nll, count

    def next_logprobs(self, tokens, seq_start, candidates: list[np.ndarray], seq_group=None) -> list[np.ndarray]:
        """log p(c | sequence s) of each candidate token c after the whole of sequence s
        (see ez_next_logprobs): one forward scores every single-token choice of a prompt."""
        tok = _array(tokens, np.int32, "tokens")
        start = _array(seq_start, np.int32, "seq_start")
        n_seq = len(start) - 1
        if n_seq < 1 or start[-1] != len(tok) or len(candidates) != n_seq:
            raise InvalidInputError("tokens, seq_start and candidates do not describe the same batch")
        cand = _array(np.concatenate(candidates) if candidates else [], np.int32, "candidates")
        cand_start = np.cumsum([0] + [len(c) for c in candidates]).astype(np.int32)
        logp = np.zeros(len(cand), dtype=np.float64)
        groups, _keep = self._groups(seq_group, n_seq)
        _check(lib.ez_next_logprobs(self._live(), ffi.from_buffer("int32_t[]", tok),
                                    ffi.from_buffer("int32_t[]", start), n_seq, groups,
                                    ffi.from_buffer("int32_t[]", cand), ffi.from_buffer("int32_t[]", cand_start),
                                    ffi.from_buffer("double[]", logp)))
        return np.split(logp, cand_start[1:-1])

    def continuation_loss(self, prefixes: list[np.ndarray], continuations: list[tuple[int, np.ndarray, np.ndarray]]
                          ) -> tuple[np.ndarray, np.ndarray]:
        """(summed NLL, target count) of each continuation (prefix index, tokens, target flags) as if
        it were one sequence with its prefix (see ez_continuation_loss): each prefix is decoded once
        however many continuations follow it."""
        if not prefixes or not continuations:
            raise InvalidInputError("no prefixes or no continuations to score")
        tok = _array(np.concatenate(prefixes), np.int32, "prefixes")
        start = np.cumsum([0] + [len(p) for p in prefixes]).astype(np.int32)
        c_tok = _array(np.concatenate([c[1] for c in continuations]), np.int32, "continuation tokens")
        c_tgt = _array(np.concatenate([c[2] for c in continuations]), np.uint8, "continuation targets")
        if len(c_tgt) != len(c_tok):
            raise InvalidInputError("each continuation needs one target flag per token")
        c_start = np.cumsum([0] + [len(c[1]) for c in continuations]).astype(np.int32)
        c_prefix = _array([c[0] for c in continuations], np.int32, "continuation prefixes")
        nll = np.zeros(len(continuations), np.float64)
        count = np.zeros(len(continuations), np.int32)
        _check(lib.ez_continuation_loss(self._live(), ffi.from_buffer("int32_t[]", tok), ffi.from_buffer("int32_t[]", start),
                                        len(prefixes), ffi.from_buffer("int32_t[]", c_tok),
                                        ffi.from_buffer("uint8_t[]", c_tgt), ffi.from_buffer("int32_t[]", c_start),
                                        ffi.from_buffer("int32_t[]", c_prefix), len(continuations),
                                        ffi.from_buffer("double[]", nll), ffi.from_buffer("int32_t[]", count)))
        return nll, count

    def activation_sumsq(self, tokens, seq_start, weights: list[tuple[str, int]],
                         outputs=None) -> tuple[list[np.ndarray], np.ndarray]:
        """Per-column sums of squared inputs of the matmuls of `weights` [(GGUF name, n_in)] over
        forwards of the sequences (see ez_activation_sumsq): ([float64 array of n_in sums per
        weight], int64 token columns each weight saw). `outputs` (one flag per token, optional)
        asks for logits at more positions than each sequence's last."""
        tok = _array(tokens, np.int32, "tokens")
        start = _array(seq_start, np.int32, "seq_start")
        n_seq = len(start) - 1
        if n_seq < 1 or start[-1] != len(tok):
            raise InvalidInputError("tokens and seq_start do not describe the same batch")
        out = None
        if outputs is not None:
            out = _array(outputs, np.uint8, "outputs")
            if len(out) != len(tok):
                raise InvalidInputError(f"{len(out)} output flags for {len(tok)} tokens")
        if not weights:
            raise InvalidInputError("no weights to gather activation statistics for")
        n_in = _array([int(n) for _, n in weights], np.int64, "n_in")
        if np.any(n_in < 1):
            raise InvalidInputError("every weight needs at least one input column")
        keep = [ffi.new("char[]", str(name).encode()) for name, _ in weights]
        names = ffi.new("const char *[]", keep)
        sumsq = np.zeros(int(n_in.sum()), dtype=np.float64)
        count = np.zeros(len(weights), dtype=np.int64)
        _check(lib.ez_activation_sumsq(self._live(), ffi.from_buffer("int32_t[]", tok),
                                       ffi.NULL if out is None else ffi.from_buffer("uint8_t[]", out),
                                       ffi.from_buffer("int32_t[]", start), n_seq, names,
                                       ffi.from_buffer("int64_t[]", n_in), len(weights),
                                       ffi.from_buffer("double[]", sumsq), ffi.from_buffer("int64_t[]", count)))
        return np.split(sumsq, np.cumsum(n_in)[:-1]), count

    def generate(self, prompt, *, max_tokens: int, temperature: float, top_p: float, seed: int):
        """Yield generated token ids until end of generation or max_tokens."""
        tok = _array(prompt, np.int32, "prompt")
        _check(lib.ez_generate_begin(self._live(), ffi.from_buffer("int32_t[]", tok), len(tok),
                                     float(temperature), float(top_p), int(seed) & 0xFFFFFFFF))
        out = ffi.new("int32_t *")
        for _ in range(max_tokens):
            _check(lib.ez_generate_next(self._live(), out))
            if out[0] < 0:
                return
            yield int(out[0])
