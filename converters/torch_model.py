"""A transformers model, in float32, holding the same numbers as a GGUF model.

transformers can load a GGUF itself (`from_pretrained(dir, gguf_file=...)`),
but it parses the header with gguf-py's GGUFReader three times, which costs
~25 s of the 29 s it takes to load SmolLM2-135M. Here the config comes
from transformers' own GGUF->config tables read through our fast header, the
weights from gguf-py's dequantizers, and names and row order from
`hf_names.Layout`; `convert` then checks that torch and llama.cpp agree on the
loss of a calibration sequence before trusting any gradient.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_zo.constants import OUTPUT, General
from edge_zo.errors import InvalidInputError
from edge_zo.gguf_io import TensorFile

from .hf_names import ArchSpec, Layout, arch_spec, gguf_names


def config_from_gguf(tf: TensorFile, spec: ArchSpec):
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    arch = spec.gguf_arch
    header = tf.header
    kwargs = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}))
    for suffix, key in GGUF_CONFIG_MAPPING[arch].items():
        value = header.get(f"{arch}.{suffix}")
        if key is not None and value is not None:
            kwargs[key] = value
    kwargs |= llama_cpp_hparams(header, arch, kwargs)
    if "vocab_size" not in kwargs:
        kwargs["vocab_size"] = tf.tensors["token_embd.weight"].shape[0]
    kwargs["tie_word_embeddings"] = OUTPUT not in tf.tensors
    for key in ("bos", "eos", "padding"):
        tok = header.get(f"tokenizer.ggml.{key}_token_id")
        if tok is not None:
            kwargs[f"{'pad' if key == 'padding' else key}_token_id"] = tok
    return AutoConfig.for_model(spec.hf_model_type, **kwargs)


# llama.cpp's rule for Gemma's attention scale (llama-model.cpp, LLM_ARCH_GEMMA2/3): 1/sqrt(head_dim),
# except for the 27B models (46 and 62 layers), which scale by 1/sqrt(n_embd / n_head).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def llama_cpp_hparams(header, arch: str, kwargs: dict) -> dict:
    """Config values llama.cpp reads from a GGUF that transformers' GGUF->config table leaves at its
    config class's defaults, which fit the released checkpoints but not every file (a Qwen3 class
    defaults to head_dim 128, Gemma to 256 and to a query scale of 256)."""
    out = {}
    hidden, n_head = kwargs.get("hidden_size"), kwargs.get("num_attention_heads")
    head_dim = header.get(f"{arch}.attention.key_length")
    if head_dim is None and hidden and n_head:
        head_dim = hidden // n_head          # llama.cpp's default n_embd_head_k
    if head_dim:
        out["head_dim"] = int(head_dim)
        n_rot = header.get(f"{arch}.rope.dimension_count")
        if n_rot and n_rot < head_dim:       # llama.cpp rotates the first n_rot dimensions of each head
            out["partial_rotary_factor"] = n_rot / head_dim
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        value = header.get(f"{arch}.{key}")
        if value is not None:
            out[key] = float(value)
    if arch in _GEMMA_27B_LAYERS and head_dim:
        big = kwargs.get("num_hidden_layers") == _GEMMA_27B_LAYERS[arch]
        out["query_pre_attn_scalar"] = hidden // n_head if big else int(head_dim)
    return out


def layout_of(config, spec: ArchSpec) -> Layout:
    return Layout(spec, config.num_attention_heads, config.num_key_value_heads)


def model_from_gguf(tf: TensorFile, spec: ArchSpec):
    """(model, {parameter name: GGUF name}, Layout) for the GGUF in `tf`, dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = config_from_gguf(tf, spec)
    layout = layout_of(config, spec)
    with no_init_weights():  # every parameter is overwritten below; random init would cost seconds
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = gguf_names([n for n, _ in model.named_parameters(remove_duplicate=False)], spec, config.num_hidden_layers)
    state, missing = {}, []
    for hf_name, gguf_name in names.items():
        t = tf.tensors.get(gguf_name)
        if t is None:
            if gguf_name == OUTPUT and config.tie_word_embeddings:
                continue
            missing.append(gguf_name)
            continue
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(layout.hf_value(gguf_name, t.dequantize())))
    # A tied lm_head has no GGUF name of its own in some tables (gemma2 lists no output.weight); tie_weights sets it.
    tied = {id(p) for p in model.get_output_embeddings().parameters()} if config.tie_word_embeddings else set()
    unmapped = [n for n, p in model.named_parameters() if n not in names and id(p) not in tied]
    if missing or unmapped:
        raise InvalidInputError(f"{tf.path}: cannot map the GGUF onto transformers' {type(model).__name__}: "
                                f"missing tensors {missing[:5]}, unmapped parameters {unmapped[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model, names, layout


def load_gguf(path: str | Path):
    """`model_from_gguf` of the GGUF file at `path`, its architecture read from the file."""
    with TensorFile(path) as tf:
        return model_from_gguf(tf, arch_spec(tf.header.get(General.ARCHITECTURE), str(path)))


def model_from_hf(folder: Path, spec: ArchSpec):
    """(model, names, Layout) for a Hugging Face folder, loaded in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    config = model.config
    names = gguf_names([n for n, _ in model.named_parameters(remove_duplicate=False)], spec, config.num_hidden_layers)
    return model, names, layout_of(config, spec)
