"""Which architectures convert supports, and how a transformers weight names the
same numbers as a GGUF weight.

Nothing here is a table of our own where the two libraries keep one:
- the architectures: those llama.cpp's gguf-py names (`gguf.MODEL_ARCH_NAMES`)
  and transformers can load from a GGUF (`GGUF_SUPPORTED_ARCHITECTURES`, its
  GGUF->config table), minus mixtures of experts (below);
- names: `model.layers.3.self_attn.q_proj.weight` is `blk.3.attn_q.weight`
  by gguf-py's TensorNameMap, the table llama.cpp's own converter uses; fused
  weights keep their fusion on both sides (phi3's qkv_proj is attn_qkv,
  gate_up_proj is ffn_up, rows in the same order);
- values: what transformers' GGUF loader does to a tensor
  (`TENSOR_PROCESSORS` in transformers.modeling_gguf_pytorch_utils). For llama
  it un-permutes the rows of attn_q and attn_k (llama.cpp's converter
  interleaves the two rotary halves of each head, `LlamaModel.permute`), so
  row r of q_proj is row `gguf_row(r)` of attn_q; for gemma2/gemma3/nemotron
  it subtracts 1 from every norm weight (llama.cpp stores them plus one).
  `permute_qk` and `norm_shift` are read off those processors; an architecture
  whose processor does anything else (bloom's qkv reshape, gpt2's transposes,
  split experts) is refused rather than guessed.

Architectures transformers cannot load from GGUF still run every command with
the torch-free activation mask (edge_zo.activation_mask); only the Fisher mask
needs this module. See docs/architectures.md.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from edge_zo.errors import InvalidInputError

# transformers' GGUF loader renames these GGUF architectures before it reads its tables, and loads
# gemma3/gemma4 files as their text-only model types (inline in `load_gguf_checkpoint`; keep in sync).
_HF_TABLE_KEY = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
_HF_MODEL_TYPE = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
# The Hugging Face folders edge-zo convert writes as a GGUF itself (converters/hf_gguf.py);
# any other folder goes through llama.cpp's convert_hf_to_gguf.py first.
_HF_FOLDER_ARCHS = {"llama": ("LlamaForCausalLM", "MistralForCausalLM"), "gemma3": ("Gemma3ForCausalLM",)}
# The architectures a tiny random model proves end to end (tests/test_architectures.py: torch and
# llama.cpp agree on the loss, perturbed coordinates land where the mapping says, tune, eval, export).
# Others that both libraries load are refused until such a test covers them.
VERIFIED = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "starcoder2", "stablelm")
ACTIVATION_HINT = ("The torch-free activation mask works on every dense architecture llama.cpp runs: `edge-zo tune "
                   "MODEL DATA` builds it by itself where the Fisher mask is not available, and `python -m "
                   "edge_zo.activation_mask MODEL -o sidecar.gguf` writes it (docs/architectures.md).")


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str                 # general.architecture
    hf_model_type: str             # transformers config.model_type of the text model
    hf_architectures: tuple[str, ...]  # config.json "architectures" convert writes as this GGUF arch itself
    permute_qk: bool               # llama.cpp permutes attn_q/attn_k rows
    norm_shift: float              # GGUF norm weight = HF norm weight + norm_shift


def supported() -> dict[str, ArchSpec]:
    """{GGUF architecture: spec} of every architecture the Fisher mask handles here."""
    return dict(_specs()[0])


@functools.cache
def _specs() -> tuple[dict[str, ArchSpec], dict[str, str]]:
    """({arch: spec}, {arch transformers loads but we refuse: why})."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as tg

    loads = set(tg.GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    ok, refused = {}, {}
    for arch in gguf.MODEL_ARCH_NAMES.values():
        if _HF_TABLE_KEY.get(arch, arch) not in loads:
            continue   # (transformers' "mistral" and "umt5" are files llama.cpp labels llama and t5)
        processor = tg.TENSOR_PROCESSORS.get(arch, tg.TensorProcessor)
        why = _why_not(arch, processor, tg)
        if why:
            refused[arch] = why
            continue
        shifted = processor(config={}).process(np.zeros(1, np.float32), "blk.0.attn_norm.weight").weights
        ok[arch] = ArchSpec(arch, _HF_MODEL_TYPE.get(arch, arch), _HF_FOLDER_ARCHS.get(arch, ()),
                            permute_qk=issubclass(processor, tg.LlamaTensorProcessor),
                            norm_shift=0.0 - float(shifted[0]))
    return ok, refused


def _why_not(arch: str, processor, tg) -> str | None:
    import gguf

    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    kinds = gguf.MODEL_TENSORS[key]
    if {gguf.MODEL_TENSOR.FFN_GATE_EXP, gguf.MODEL_TENSOR.FFN_DOWN_EXP, gguf.MODEL_TENSOR.FFN_GATE_UP_EXP} & set(kinds) \
            and arch not in ("llama", "deci"):   # llama's table lists experts for Mixtral; dense files have none
        return "a mixture of experts (3-D expert weights are not mapped to transformers' fused experts)"
    if not ({gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_QKV} & set(kinds)) \
            or gguf.MODEL_TENSOR.FFN_DOWN not in kinds:
        return "not a transformer decoder with attention and feed-forward matmuls (state-space or encoder-decoder)"
    names = [gguf.TENSOR_NAMES[k].format(bid=0) + ".weight" for k in kinds]
    if not _only_shifts_norms(processor, names):
        return f"transformers' GGUF loader reshapes its tensors ({processor.__name__}), which edge-zo does not mirror"
    return None


def _only_shifts_norms(processor, names: list[str]) -> bool:
    """Whether `processor` leaves every tensor but attn_q/attn_k (llama's permutation, mirrored
    here) as it is, save for one constant subtracted from norms."""
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    shifts = set()
    for name in names:
        if name.endswith((".attn_q.weight", ".attn_k.weight")) and issubclass(processor, _llama_processor()):
            continue
        try:
            if name.endswith("norm.weight"):
                got = processor(config={}).process(np.zeros(8, np.float32), name).weights
                shifts.add(float(got[0]))
                if not np.all(got == got[0]):
                    return False
            elif not np.array_equal(processor(config={}).process(w.copy(), name).weights, w):
                return False
        except Exception:   # a processor that needs the model's config reshapes something
            return False
    return len(shifts) <= 1


def _llama_processor():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor


def arch_spec(gguf_arch: str, source: str = "model") -> ArchSpec:
    """The spec of `gguf_arch`, or an InvalidInputError naming it and what to do instead."""
    try:
        specs, refused = _specs()
    except ImportError as exc:
        raise InvalidInputError(f"{source}: the Fisher mask needs transformers and torch ({exc}). "
                                + ACTIVATION_HINT) from exc
    spec = specs.get(gguf_arch)
    if spec is not None and gguf_arch not in VERIFIED:
        raise InvalidInputError(
            f"{source}: architecture '{gguf_arch}' is not verified for edge-zo convert's Fisher mask yet: transformers "
            "and llama.cpp both load it, but no test proves that torch's coordinates name llama.cpp's (verified: "
            f"{', '.join(VERIFIED)}; tests/test_architectures.py shows how to add one). " + ACTIVATION_HINT)
    if spec is None:
        why = refused.get(gguf_arch) or "transformers cannot load this architecture from a GGUF file"
        raise InvalidInputError(
            f"{source}: architecture '{gguf_arch}' is not supported by edge-zo convert's Fisher mask: {why} "
            f"(supported: {', '.join(VERIFIED)}). " + ACTIVATION_HINT)
    return spec


def spec_for_hf(architectures: list[str], source: str) -> ArchSpec:
    for arch, names in _HF_FOLDER_ARCHS.items():
        if any(a in names for a in architectures or []):
            return arch_spec(arch, source)
    known = sorted(a for names in _HF_FOLDER_ARCHS.values() for a in names)
    raise InvalidInputError(f"{source}: config.json architectures {architectures} are not written as a GGUF by "
                            f"edge-zo convert itself (it writes: {', '.join(known)}); convert the folder with "
                            "llama.cpp's convert_hf_to_gguf.py and pass the GGUF to edge-zo convert instead")


def gguf_names(hf_names, spec: ArchSpec, n_layers: int) -> dict[str, str]:
    """{transformers parameter name: GGUF tensor name} for every name gguf-py's table knows."""
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == spec.gguf_arch)
    table = gguf.get_tensor_name_map(arch, n_layers)
    out = {}
    for name in hf_names:
        base, _, suffix = name.rpartition(".")
        mapped = table.get_name(base)
        if mapped is not None:
            out[name] = f"{mapped}.{suffix}"
    return out


def _heads(gguf_name: str, n_head: int, n_head_kv: int) -> int | None:
    if gguf_name.endswith(".attn_q.weight"):
        return n_head
    if gguf_name.endswith(".attn_k.weight"):
        return n_head_kv
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers layout -> GGUF layout (llama.cpp's LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF layout -> transformers layout (the inverse of permute_rows)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@dataclass(frozen=True)
class Layout:
    """How one architecture's transformers tensors map onto its GGUF tensors."""

    spec: ArchSpec
    n_head: int
    n_head_kv: int

    def to_gguf(self, gguf_name: str, w: np.ndarray) -> np.ndarray:
        """A transformers-layout array (weight, gradient or score) in GGUF layout."""
        h = _heads(gguf_name, self.n_head, self.n_head_kv) if self.spec.permute_qk else None
        return permute_rows(w, h) if h else w

    def to_hf(self, gguf_name: str, w: np.ndarray) -> np.ndarray:
        h = _heads(gguf_name, self.n_head, self.n_head_kv) if self.spec.permute_qk else None
        return unpermute_rows(w, h) if h else w

    def gguf_row(self, gguf_name: str, hf_row: np.ndarray, n_rows: int) -> np.ndarray:
        """GGUF row index of transformers row index `hf_row`."""
        h = _heads(gguf_name, self.n_head, self.n_head_kv) if self.spec.permute_qk else None
        if not h:
            return np.asarray(hf_row)
        hf_of_gguf = permute_rows(np.arange(n_rows), h)   # GGUF row i holds transformers row hf_of_gguf[i]
        return np.argsort(hf_of_gguf)[hf_row]

    def gguf_value(self, gguf_name: str, hf_value: np.ndarray) -> np.ndarray:
        """A transformers weight's values as GGUF stores them (gemma norms carry +1)."""
        w = self.to_gguf(gguf_name, hf_value)
        if self.spec.norm_shift and gguf_name.endswith("norm.weight"):
            w = w + np.float32(self.spec.norm_shift)
        return w

    def hf_value(self, gguf_name: str, gguf_value: np.ndarray) -> np.ndarray:
        w = self.to_hf(gguf_name, gguf_value)
        if self.spec.norm_shift and gguf_name.endswith("norm.weight"):
            w = w - np.float32(self.spec.norm_shift)
        return w
