"""Which architectures convert supports, and how a transformers weight names the
same numbers as a GGUF weight.

Two things differ between the two layouts:
- names: `model.layers.3.self_attn.q_proj.weight` is `blk.3.attn_q.weight`
  (gguf-py's TensorNameMap, the table llama.cpp's own converter uses);
- for llama-family models llama.cpp's converter permutes the rows of attn_q and
  attn_k (`LlamaModel.permute` in convert_hf_to_gguf.py: the two rotary halves
  of each head are interleaved), and transformers undoes it when it loads a
  GGUF. Row r of q_proj is row `gguf_row(r)` of attn_q.
- gemma3 stores RMSNorm weights plus one in GGUF; norms are never sparse
  targets, but loading a GGUF into torch has to undo it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_zo.errors import InvalidInputError


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str                 # general.architecture
    hf_model_type: str             # transformers config.model_type of the text model
    hf_architectures: tuple[str, ...]  # config.json "architectures" that convert to this GGUF arch
    permute_qk: bool               # llama.cpp permutes attn_q/attn_k rows
    norm_shift: float              # GGUF norm weight = HF norm weight + norm_shift


ARCHS = {
    "llama": ArchSpec("llama", "llama", ("LlamaForCausalLM", "MistralForCausalLM"), permute_qk=True, norm_shift=0.0),
    "gemma3": ArchSpec("gemma3", "gemma3_text", ("Gemma3ForCausalLM",), permute_qk=False, norm_shift=1.0),
}


def arch_spec(gguf_arch: str, source: str = "model") -> ArchSpec:
    spec = ARCHS.get(gguf_arch)
    if spec is None:
        raise InvalidInputError(
            f"{source}: architecture '{gguf_arch}' is not supported by edge-zo convert "
            f"(supported: {', '.join(sorted(ARCHS))}). The coordinate mapping between transformers and "
            "llama.cpp is architecture-specific; see converters/hf_names.py to add one.")
    return spec


def spec_for_hf(architectures: list[str], source: str) -> ArchSpec:
    for spec in ARCHS.values():
        if any(a in spec.hf_architectures for a in architectures or []):
            return spec
    known = sorted(a for s in ARCHS.values() for a in s.hf_architectures)
    raise InvalidInputError(f"{source}: config.json architectures {architectures} are not supported by "
                            f"edge-zo convert (supported: {', '.join(known)})")


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
