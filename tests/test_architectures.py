"""Every architecture the Fisher mask supports (converters.hf_names.VERIFIED), proven on a tiny random
model of it (tests/tiny_archs.py): torch and llama.cpp agree on the loss, a coordinate perturbed in
torch moves llama.cpp's loss the same way at the GGUF coordinate the mapping names (and llama's
unmapped attn_q/attn_k rows do not), and a stock Q4_0 file goes through the automatic mask, tune,
eval, generate and export, the merged file loading in stock llama.cpp (llama_cpp.Llama)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.fisher import sequence_loss
from converters.hf_names import VERIFIED, Layout, arch_spec, supported
from converters.torch_model import load_gguf
from edge_zo import activation_mask, corpora
from edge_zo.adapter import SparseAdapter
from edge_zo.cli import main as cli
from edge_zo.constants import Sparse
from edge_zo.dataset import Example
from edge_zo.errors import InvalidInputError
from edge_zo.model_info import ModelInfo, file_sha256
from edge_zo.runtime import Runtime, RuntimeOptions

from .conftest import FACTS, smollm2_path, write_jsonl
from .tiny_archs import ARCHS, write_tiny

TEXT = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
        "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
        "part of the world. It is a way I have of driving off the spleen and regulating the circulation.")
EXACT = RuntimeOptions(batch_size=2, max_tokens=64, threads=1, kv_f32=True)
# One thread everywhere: llama.cpp's spinning thread pool crawls when other jobs share two cores.
FAST = ["--steps", "2", "--eval-every", "2", "--lr", "1e-3", "--eps", "1e-2", "--max-tokens", "64",
        "--batch-size", "4", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module", params=VERIFIED)
def tiny(request, tmp_path_factory):
    return write_tiny(request.param, tmp_path_factory.mktemp(request.param), smollm2_path())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty edge-zo cache whose corpora are the ones already fetched (no download)."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "corpora").symlink_to(corpora.cache_root(), target_is_directory=True)
    monkeypatch.setenv("EDGE_ZO_CACHE", str(root))
    return root


def _examples(model: Path, n: int = 2, length: int = 32) -> list[Example]:
    with Runtime(model, EXACT) as rt:
        toks = rt.native.tokenize(TEXT, add_special=True, parse_special=False).astype(np.int32)
    out = []
    for i in range(n):
        t = toks[i * length: (i + 1) * length]
        tg = np.ones(len(t), np.uint8)
        tg[0] = 0
        out.append(Example(t, tg))
    return out


def _torch_nll(model, examples) -> float:
    import torch

    with torch.no_grad():
        return sum(float(sequence_loss(model, e)) * e.n_targets for e in examples)


def test_every_verified_architecture_is_one_both_libraries_load():
    assert set(VERIFIED) <= set(supported()) and set(ARCHS) == set(VERIFIED)


def test_torch_and_llama_cpp_agree_on_the_loss(tiny):
    ex = _examples(tiny.f32)
    model, _, _ = load_gguf(tiny.f32)
    with Runtime(tiny.f32, EXACT) as rt:
        native = float(rt.loss(ex).nll.sum())
    torch_loss = _torch_nll(model, ex)
    n = sum(e.n_targets for e in ex)
    assert abs(native - torch_loss) / n < 1e-4, (native / n, torch_loss / n)
    assert torch_loss == pytest.approx(_torch_nll(tiny.model, ex), rel=1e-5)   # the GGUF holds the model it came from
    assert abs(torch_loss / n - np.log(49152)) > 0.3        # logits far from uniform: a wrong mapping would show
    q4, _, _ = load_gguf(tiny.q4)                             # 4-bit: llama.cpp rounds activations to 8 bits
    with Runtime(tiny.q4, EXACT) as rt:
        assert float(rt.loss(ex).nll.sum()) / n == pytest.approx(_torch_nll(q4, ex) / n, abs=0.02)


def test_torch_coordinates_name_the_same_gguf_weights(tiny):
    """A delta at a coordinate in torch and at its mapped GGUF coordinate through the sparse path move
    the loss alike, for every kind of block matmul of the architecture; where llama.cpp permutes rows
    (llama's attn_q/attn_k), the same-numbered GGUF row moves it differently."""
    import torch

    ex = _examples(tiny.f32)
    model, names, layout = load_gguf(tiny.f32)
    hf_of = {g: h for h, g in names.items()}
    params = dict(model.named_parameters())
    info = ModelInfo.open(tiny.f32)
    targets = [n for n in info.block_matmul_weights() if n.startswith("blk.1.")]
    rng = np.random.default_rng(0)
    base_t = _torch_nll(model, ex)
    permuted_seen = False
    with Runtime(tiny.f32, EXACT) as rt:
        base_n = float(rt.loss(ex).nll.sum())
        for gname in targets:
            p = params[hf_of[gname]]
            n_out, n_in = p.shape
            hf_rows = rng.choice(n_out, 6, replace=False)
            g_rows = layout.gguf_row(gname, hf_rows, n_out)
            cols = rng.choice(n_in, 6)
            hf_idx, g_idx = hf_rows * n_in + cols, g_rows * n_in + cols
            for delta in (1.0, 4.0, 16.0):   # large enough to dwarf float rounding over ~60 tokens (~1e-3 nats)
                with torch.no_grad():
                    p.view(-1)[hf_idx] += delta
                    d_torch = _torch_nll(model, ex) - base_t
                    p.view(-1)[hf_idx] -= delta
                if abs(d_torch) > 0.05:
                    break
            effects = []
            for idx in (g_idx, hf_idx):
                order = np.argsort(idx)
                att = rt.attach(SparseAdapter.from_weights(info.architecture,
                                                           {gname: (idx[order], np.full(6, delta, np.float32))}))
                effects.append(float(rt.loss(ex).nll.sum()) - base_n)
                rt.detach(att)
            d_mapped, d_unmapped = effects
            assert abs(d_torch) > 0.05, f"{gname}: the delta barely moves the loss; the test would prove nothing"
            assert d_mapped == pytest.approx(d_torch, rel=0.02, abs=2e-3), gname
            if np.any(g_rows != hf_rows):
                permuted_seen = True
                assert abs(d_unmapped - d_torch) > 10 * abs(d_mapped - d_torch), gname
    assert permuted_seen == arch_spec(info.architecture).permute_qk


def test_llama_row_map_is_transformers_own_unpermutation():
    """The row map the Fisher mask uses inverts what transformers' GGUF loader does to attn_q/attn_k."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    layout = Layout(arch_spec("llama"), n_head=4, n_head_kv=2)
    rng = np.random.default_rng(0)
    for name, rows in (("blk.0.attn_q.weight", 64), ("blk.0.attn_k.weight", 32)):
        hf = rng.standard_normal((rows, 8))
        in_gguf = layout.to_gguf(name, hf)
        assert not np.array_equal(in_gguf, hf)
        assert np.array_equal(proc.process(in_gguf, name).weights, hf)
        assert np.array_equal(in_gguf[layout.gguf_row(name, np.arange(rows), rows)], hf)


def test_stock_file_tunes_evaluates_and_exports(tiny, cache, tmp_path, capsys):
    """`edge-zo tune MODEL DATA` on the architecture's stock Q4_0 file: the automatic (Fisher) mask
    with torch and llama.cpp agreeing, a few steps, eval and generate with the cached mask, export,
    and the merged GGUF loaded by stock llama.cpp scoring as our runtime scores it."""
    (tmp_path / "stock").mkdir()
    stock = Path(shutil.copyfile(tiny.q4, tmp_path / "stock" / "model.gguf"))
    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    info = ModelInfo.open(stock)
    assert cli(["tune", str(stock), str(data), "-o", str(tmp_path / "run"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "building its fisher mask" in err, err[-2000:]
    mask_path = activation_mask.cache_path(file_sha256(stock), 0.001, activation_mask.FISHER)
    mask = SparseAdapter.load(mask_path)
    targets = info.block_matmul_weights()
    assert mask.metadata[Sparse.MASK_METHOD] == "fisher" and set(mask.names) <= set(targets)
    assert mask.n_params == round(0.001 * sum(info.tensors[n].n_elements for n in targets))
    deltas = tmp_path / "run" / "deltas.gguf"
    assert SparseAdapter.load(deltas).architecture == info.architecture

    assert cli(["eval", str(stock), str(data), "--adapter", str(deltas), "--json", "--threads", "1",
                "--max-tokens", "64"]) == 0
    out = capsys.readouterr()
    assert "the mask tune cached" in out.err and np.isfinite(json.loads(out.out)["loss"])
    assert cli(["generate", str(stock), "--adapter", str(deltas), "-p", "My dog's name is", "-n", "2",
                "--threads", "1"]) == 0
    capsys.readouterr()
    # A visible edit, so that the merged file provably carries the adapters: the tuned deltas plus
    # a large value at a few coordinates of every weight the mask covers.
    tuned = SparseAdapter.load(deltas)
    bump = SparseAdapter.from_weights(info.architecture, {n: (tuned.indices[i][:4], np.full(min(4, len(
        tuned.indices[i])), 0.5, np.float32)) for i, n in enumerate(tuned.names)})
    bump.save(tmp_path / "bump.gguf")
    out_dir = tmp_path / "export"
    assert cli(["export", str(stock), "--adapter", str(deltas), "--adapter", str(tmp_path / "bump.gguf"), "-o",
                str(out_dir), "--json", "--threads", "1"]) == 0
    capsys.readouterr()
    merged = out_dir / "model-merged.gguf"
    ex = _examples(merged)
    with Runtime(stock, EXACT) as rt:
        base = float(rt.loss(ex).nll.sum())
        rt.attach(tuned)
        rt.attach(bump)
        adapted = float(rt.loss(ex).nll.sum())
    with Runtime(merged, EXACT) as rt:
        ours = [float(rt.loss([e]).nll.sum()) for e in ex]
    effect = adapted - base
    assert abs(effect) > 1e-2 and abs(sum(ours) - adapted) < 0.2 * abs(effect)   # 4-bit re-quantizing costs a little
    assert _stock_llama_cpp_nll(merged, ex) == pytest.approx(ours, rel=2e-3)


def _stock_llama_cpp_nll(model: Path, examples: list[Example]) -> list[float]:
    """Each example's summed next-token NLL of its targets, from llama-cpp-python's own Llama class."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=128, n_batch=64, n_threads=1, logits_all=True,
                          verbose=False)
    try:
        out = []
        for e in examples:
            llm.reset()
            llm.eval(e.tokens.tolist())
            logits = np.asarray(llm.scores[: len(e.tokens)], np.float64)
            logp = logits - logits.max(1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(1, keepdims=True))
            t = np.flatnonzero(e.targets[1:]) + 1           # target t is predicted at position t-1
            out.append(float(-logp[t - 1, e.tokens[t]].sum()))
        return out
    finally:
        llm.close()


def test_the_torch_free_mask_covers_every_block_matmul_kind(tiny, cache):
    """The activation mask (what a machine without torch builds) on the same stock file."""
    path = activation_mask.ensure(tiny.q4, method=activation_mask.METHOD, threads=1, say=lambda m: None)
    mask = SparseAdapter.load(path)
    info = ModelInfo.open(tiny.q4)
    targets = info.block_matmul_weights()
    assert mask.n_params == sum(round(0.001 * info.tensors[n].n_elements) for n in targets)   # per matrix
    assert set(mask.names) <= set(targets) and mask.architecture == info.architecture


@pytest.mark.parametrize("arch,why", [("bloom", "reshapes its tensors"), ("qwen2moe", "mixture of experts"),
                                      ("mamba", "not a transformer decoder"), ("olmo2", "cannot load"),
                                      ("nemotron", "not verified")])
def test_unsupported_architectures_are_named_with_the_torch_free_way(arch, why):
    with pytest.raises(InvalidInputError) as err:
        arch_spec(arch, "model.gguf")
    msg = str(err.value)
    assert f"architecture '{arch}'" in msg and why in msg and "activation mask" in msg, msg
