"""A Hugging Face model folder written as a float GGUF that llama.cpp loads.

What llama.cpp's convert_hf_to_gguf.py does for the architectures in
`hf_names.ARCHS`, reduced to what they need:
- hyperparameters from config.json under llama.cpp's keys;
- weights from *.safetensors, renamed by gguf-py's TensorNameMap, q/k rows
  permuted (llama), norms +1 (gemma3), in their stored precision (F32, F16
  or BF16; 1-D tensors F32), plus llama3-style rope_freqs where needed;
- the tokenizer from tokenizer.json: byte-level BPE as llama.cpp's "gpt2"
  model with the pre-tokenizer found by llama.cpp's own hash table, or
  SentencePiece-style BPE (byte fallback, e.g. Gemma, Llama 2) as its "llama"
  model; merges, special ids and the chat template through gguf-py's
  SpecialVocab.
Then llama.cpp itself tokenizes a probe text and must give the ids the Hugging
Face tokenizer gives, or the GGUF is not kept.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import gguf
import numpy as np

from edge_zo.atomic import atomic_path
from edge_zo.errors import InvalidInputError, ModelFileError

from .hf_names import ArchSpec, Layout, gguf_names, spec_for_hf

PROBE = ("Call me Ishmael. Some years ago -- never mind how long precisely -- having little or no money "
         "in my purse, I thought I would sail about a little and see the watery part of the world.\n"
         "  Prices rose 3.5% in 1999; e-mail us at info@example.com!  \t\n")


def folder_sha256(folder: Path) -> str:
    """One digest over the files that define the model: config, weights, tokenizer."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and (p.suffix in (".json", ".safetensors", ".model", ".jinja", ".txt")):
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
    return h.hexdigest()


def read_config(folder: Path) -> tuple[dict, ArchSpec]:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFileError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: unreadable ({exc})") from exc
    return config, spec_for_hf(config.get("architectures"), str(folder))


def write_gguf(folder: Path, out: Path) -> Path:
    """Write `folder` as a GGUF at `out` (atomically) and check its tokenizer against transformers'."""
    folder, out = Path(folder), Path(out)
    config, spec = read_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{folder}: no *.safetensors weights (other formats are not supported)")
    tokenizer = _hf_tokenizer(folder)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(tmp, spec.gguf_arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(config.get("_name_or_path") or folder.name)
        n_vocab = _add_vocab(w, folder, tokenizer, spec)
        _add_hparams(w, config, spec)
        _add_tensors(w, files, config, spec, n_vocab)
        w.close()
        _check_tokenizer(tmp, tokenizer)
    return out


# ---- hyperparameters ----

def _rope(config: dict) -> tuple[dict, dict]:
    """(global-attention rope parameters, sliding-attention ones), for both config styles."""
    rp = config.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        return rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    legacy = dict(config.get("rope_scaling") or {})
    if "rope_theta" in config:
        legacy.setdefault("rope_theta", config["rope_theta"])
    if "rope_local_base_freq" in config:
        return {**legacy, **rp}, {"rope_theta": config["rope_local_base_freq"]}
    return {**legacy, **rp}, {}


def _add_hparams(w: gguf.GGUFWriter, c: dict, spec: ArchSpec) -> None:
    n_head = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // n_head
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c.get("max_position_embeddings", 2048))
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(c.get("num_key_value_heads", n_head))
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    rope, rope_swa = _rope(c)
    if "rope_theta" in rope:
        w.add_rope_freq_base(rope["rope_theta"])
    if "rope_theta" in rope_swa:
        w.add_rope_freq_base_swa(rope_swa["rope_theta"])
    rope_type = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope_type not in ("default", "llama3"):
        raise InvalidInputError(f"config.json: rope type '{rope_type}' is not supported by edge-zo convert")
    if spec.gguf_arch == "llama":
        w.add_vocab_size(c["vocab_size"])
        w.add_rope_dimension_count(head_dim)
        if c.get("head_dim"):
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    else:  # gemma3
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(c["final_logit_softcapping"])
        if c.get("sliding_window"):
            w.add_sliding_window(c["sliding_window"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)


def _llama3_rope_freqs(c: dict) -> np.ndarray | None:
    """llama.cpp applies Llama 3.1-style rope scaling through a rope_freqs tensor."""
    rope, _ = _rope(c)
    if (rope.get("rope_type") or rope.get("type") or "").lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


# ---- weights ----

def _add_tensors(w: gguf.GGUFWriter, files: list[Path], c: dict, spec: ArchSpec, n_vocab: int) -> None:
    import torch
    from safetensors import safe_open

    layout = Layout(spec, c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"]))
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    names = gguf_names(list(where), spec, c["num_hidden_layers"])
    tied = c.get("tie_word_embeddings", True)
    skipped = [k for k in where if k not in names and not k.endswith("rotary_emb.inv_freq")]
    if skipped:
        raise InvalidInputError(f"config.json architecture {spec.gguf_arch}: no GGUF name for tensors {skipped[:5]}")
    plan = []   # (gguf name, hf name, output type)
    for hf_name, gname in names.items():
        if gname == "output.weight" and tied:
            continue
        t = where[hf_name].get_slice(hf_name)
        shape = tuple(t.get_shape())
        if gname == "token_embd.weight" and spec.gguf_arch == "gemma3":
            shape = (min(shape[0], n_vocab),) + shape[1:]   # llama.cpp drops Gemma's padding rows
        dtype = t.get_dtype()
        qtype = gguf.GGMLQuantizationType.F32
        if len(shape) > 1 and dtype in ("F16", "BF16"):
            qtype = gguf.GGMLQuantizationType[dtype]
        plan.append((gname, hf_name, shape, qtype))
    rope_freqs = _llama3_rope_freqs(c)
    for gname, _, shape, qtype in plan:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor_info(gname, shape, np.float32, int(np.prod(shape)) // block * size, raw_dtype=qtype)
    if rope_freqs is not None:
        w.add_tensor_info("rope_freqs.weight", rope_freqs.shape, np.float32, rope_freqs.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gname, hf_name, shape, qtype in plan:
        value = where[hf_name].get_tensor(hf_name).to(torch.float32).numpy()[: shape[0]]
        value = np.ascontiguousarray(layout.gguf_value(gname, value), dtype=np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.write_tensor_data(value)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.write_tensor_data(value.astype(np.float16))
        else:
            w.write_tensor_data(gguf.quantize(value, qtype))
    if rope_freqs is not None:
        w.write_tensor_data(rope_freqs)


# ---- tokenizer ----

def _hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not (folder / "tokenizer.json").is_file():
        raise InvalidInputError(
            f"{folder}: no tokenizer.json. edge-zo convert reads the fast tokenizer's file; create it once with "
            "`AutoTokenizer.from_pretrained(folder).save_pretrained(folder)`.")
    return AutoTokenizer.from_pretrained(str(folder))


def _add_vocab(w: gguf.GGUFWriter, folder: Path, tokenizer, spec: ArchSpec) -> int:
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj["model"]
    if model.get("type") != "BPE":
        raise InvalidInputError(f"{folder}/tokenizer.json: {model.get('type')} tokenizers are not supported "
                                "(byte-level BPE and SentencePiece-style BPE are)")
    vocab = tokenizer.get_vocab()
    n_vocab = max(vocab.values()) + 1
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1000.0)
            continue
        a = added.get(i)
        if a is not None and (a.get("special") or _looks_special(text)):
            ty, score = gguf.TokenType.CONTROL, -1000.0
        elif a is not None:
            ty, score = gguf.TokenType.USER_DEFINED, -1000.0
            if byte_fallback:
                text = text.replace("\u2581", " ")
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            ty, score = gguf.TokenType.BYTE, 0.0
        else:
            # SentencePiece BPE ranks pieces by score, and its vocabulary is in score order.
            ty, score = gguf.TokenType.NORMAL, -float(i)
        tokens.append(text)
        types.append(ty)
        scores.append(score)
    if byte_fallback:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(scores)
        w.add_add_space_prefix(_prepends_space(tj))
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(_bpe_pre(tokenizer, folder))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=not byte_fallback, n_vocab=n_vocab).add_to_gguf(w, quiet=True)
    return n_vocab


def _looks_special(text: str) -> bool:
    """llama.cpp's converter also treats these added tokens as control tokens (does_token_look_special)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _prepends_space(tj: dict) -> bool:
    norm = json.dumps(tj.get("normalizer") or {}) + json.dumps(tj.get("pre_tokenizer") or {})
    return '"Prepend"' in norm or '"prepend_scheme": "always"' in norm


def _bpe_pre(tokenizer, folder: Path) -> str:
    from .bpe_pre import CHKTXT, PRE_BY_HASH

    chkhsh = hashlib.sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    pre = PRE_BY_HASH.get(chkhsh)
    if pre is None:
        raise InvalidInputError(
            f"{folder}: llama.cpp does not know this BPE pre-tokenizer (hash {chkhsh}); convert the folder with "
            "llama.cpp's convert_hf_to_gguf.py and pass the GGUF to edge-zo convert instead")
    return pre


def _check_tokenizer(path: Path, tokenizer) -> None:
    """llama.cpp must tokenize like transformers, or every token id downstream is wrong."""
    from edge_zo._native import ContextParams, NativeModel

    native = NativeModel(str(path), ContextParams(n_ctx_seq=64, n_seq_max=1, n_batch=64, n_ubatch=64, n_threads=1))
    try:
        for text in (PROBE, PROBE.upper()):
            ours = native.tokenize(text, add_special=True, parse_special=False).tolist()
            theirs = list(tokenizer.encode(text, add_special_tokens=True))
            if ours != theirs:
                k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                raise ModelFileError(
                    f"the GGUF written from this folder tokenizes differently from its Hugging Face tokenizer "
                    f"(first difference at token {k}: llama.cpp {ours[k:k + 5]} vs transformers {theirs[k:k + 5]}); "
                    "convert the folder with llama.cpp's convert_hf_to_gguf.py and pass the GGUF instead")
    finally:
        native.close()
