"""Tiny random models of each architecture edge-zo's Fisher mask supports, as GGUF files llama.cpp loads.

Each model is built by transformers from its own config class, with random weights and every norm
and bias moved off its initial value (so a mapping that loses a +1 or a bias shows in the loss),
then written the way llama.cpp's convert_hf_to_gguf.py writes it: tensor names from gguf-py's
TensorNameMap and rows and norm values through converters.hf_names.Layout, hyperparameters through
the inverse of transformers' GGUF->config table (plus the few keys llama.cpp reads that the table
lacks), and the tokenizer copied from the real SmolLM2 GGUF, as tests/conftest.py's TinyLlama does.
The writer shares the mapping under test; what proves it is llama.cpp, which reads the file by its
own rules, agreeing with torch on the loss (tests/test_architectures.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from converters.hf_names import Layout, arch_spec, gguf_names
from converters.synthetic import add_tensor
from edge_zo.constants import OUTPUT, TOKEN_EMBD
from edge_zo.gguf_io import copy_fields, read_header

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024)


@dataclass(frozen=True)
class TinyArch:
    gguf_arch: str
    config: dict = field(default_factory=dict)   # over COMMON
    why: str = ""                                 # what this architecture adds to the test


# The config values that differ from COMMON mirror what the released models of each family do:
# Qwen3 and Gemma heads wider than hidden/heads, Phi-4-mini's partial rotary, Qwen2.5's tied
# embeddings and q/k/v biases, Gemma 2's soft-capping.
ARCHS = {
    "llama": TinyArch("llama", dict(tie_word_embeddings=False), "attn_q/attn_k rows permuted by llama.cpp"),
    "qwen2": TinyArch("qwen2", dict(tie_word_embeddings=True), "q/k/v biases, tied embeddings"),
    "qwen3": TinyArch("qwen3", dict(head_dim=32, tie_word_embeddings=True), "q_norm/k_norm, head_dim != hidden/heads"),
    "phi3": TinyArch("phi3", dict(partial_rotary_factor=0.75, pad_token_id=0, tie_word_embeddings=False),
                     "fused attn_qkv and ffn_up (gate+up), partial rotary"),
    "gemma2": TinyArch("gemma2", dict(head_dim=32, sliding_window=16, query_pre_attn_scalar=32, attn_logit_softcapping=20.0,
                                      final_logit_softcapping=10.0),
                       "norms +1, post-norms, attention and final logit soft-capping"),
    "gemma3": TinyArch("gemma3", dict(head_dim=32, sliding_window=16, query_pre_attn_scalar=32),
                       "norms +1, q_norm/k_norm, post-norms, sliding-window attention"),
    "starcoder2": TinyArch("starcoder2", dict(), "LayerNorm, a bias on every matmul, an ungated GELU MLP"),
    "stablelm": TinyArch("stablelm", dict(tie_word_embeddings=False), "LayerNorm, rotary on a quarter of each head"),
}


def hf_model(arch: TinyArch, vocab: int, seed: int = 0):
    """A random transformers model of `arch` (float32, eval mode)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = arch_spec(arch.gguf_arch)
    config = AutoConfig.for_model(spec.hf_model_type, vocab_size=vocab, **(COMMON | arch.config))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:   # norms and biases: off their initial 0 or 1
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
            else:             # wide enough that logits are far from uniform and a wrong row shows
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return model.eval()


def write_gguf(model, path: Path, tokenizer_from: Path, matmul_type: str = "F32", embd_type: str = "F32") -> Path:
    """`model` as a GGUF of its architecture; 2-D block weights in `matmul_type`."""
    config = model.config
    spec = _spec_of(config)
    w = gguf.GGUFWriter(Path(path), spec.gguf_arch)
    w.add_type(gguf.GGUFType.MODEL)
    # Not the architecture's name: llama.cpp sets per-model token attributes by general.name
    # ("phi3" looks up Phi-3's own tokens, which the SmolLM2 vocabulary lacks).
    w.add_name("edge-zo tiny random model")
    for key, value in hparams(config, spec.gguf_arch).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, float(value))
    copy_fields(read_header(tokenizer_from), w, keep=lambda key: key.startswith("tokenizer."))
    layout = Layout(spec, config.num_attention_heads, config.num_key_value_heads)
    params = dict(model.named_parameters())   # a tied lm_head is not listed: it is token_embd
    names = gguf_names(list(params), spec, config.num_hidden_layers)
    unnamed = [n for n in params if n not in names]
    assert not unnamed, f"gguf-py has no name for {unnamed}"
    for hf_name, gname in names.items():
        if gname == OUTPUT and config.tie_word_embeddings:
            continue
        value = np.ascontiguousarray(layout.gguf_value(gname, params[hf_name].detach().numpy()), np.float32)
        kind = "F32" if value.ndim == 1 else embd_type if gname in (TOKEN_EMBD, OUTPUT) else matmul_type
        add_tensor(w, gname, value, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def _spec_of(config):
    from converters.hf_names import supported

    return next(s for s in supported().values() if s.hf_model_type == config.model_type)


def hparams(config, arch: str) -> dict:
    """{GGUF key: value}: transformers' GGUF->config table read backwards, plus what
    convert_hf_to_gguf.py also writes (head sizes, rotary dimensions, soft-capping)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    rope = config.rope_parameters
    rope = rope.get("full_attention", rope) if isinstance(rope, dict) else {}
    values = {**config.to_dict(), "rope_theta": rope.get("rope_theta")}
    out = {}
    for suffix, key in GGUF_CONFIG_MAPPING[arch].items():
        if key is not None and values.get(key) is not None and suffix != "vocab_size":
            out[f"{arch}.{suffix}"] = values[key]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    out[f"{arch}.attention.key_length"] = out[f"{arch}.attention.value_length"] = int(head_dim)
    out[f"{arch}.rope.dimension_count"] = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if values.get(key) is not None:
            out[f"{arch}.{key}"] = float(values[key])
    return out


@dataclass
class TinyModel:
    """One tiny architecture written twice: F32 (exact, for the mapping checks) and with Q4_0 block
    matmuls and Q8_0 embeddings (what a user's file looks like, for tune/eval/export)."""

    arch: TinyArch
    model: object            # the transformers model the files were written from
    f32: Path
    q4: Path


def write_tiny(arch: str, folder: Path, tokenizer_from: Path, seed: int = 0) -> TinyModel:
    spec = ARCHS[arch]
    model = hf_model(spec, len(read_header(tokenizer_from).get("tokenizer.ggml.tokens")), seed)
    folder.mkdir(parents=True, exist_ok=True)
    f32 = write_gguf(model, folder / f"tiny-{arch}-f32.gguf", tokenizer_from)
    q4 = write_gguf(model, folder / f"tiny-{arch}-q4_0.gguf", tokenizer_from, "Q4_0", "Q8_0")
    return TinyModel(spec, model, f32, q4)
