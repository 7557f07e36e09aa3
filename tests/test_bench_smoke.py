"""Every benchmark of bench/ runs end to end on a tiny model for a step or two, so none of them
rots unnoticed; the figures they print are checked for shape and sense, not for value."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(module: str, *args, timeout: float = 300) -> str:
    """`python -m bench.MODULE ARGS` from the repository root, as bench/README.md runs it; its stdout."""
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"bench.{module} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def last_json(stdout: str) -> dict:
    """The JSON object a benchmark prints last (pretty-printed or on one line)."""
    start = stdout.rfind("\n{") + 1
    return json.loads(stdout[start:])


@pytest.fixture(scope="module")
def fisher_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fisher_cache")


def test_overhead(tiny_q4):
    r = last_json(bench("overhead", "--model", tiny_q4.path, "--seqs", 2, "--tokens", 16, "--rounds", 1, "--steps", 1))
    assert r["sparse_params"] > 0 and r["path_counts"]["host"] > 0
    assert all(r[k] > 0 for k in ("plain_median_s", "split_median_s", "sparse_median_s", "tune_step_median_s"))
    assert 0 <= r["step_share_outside_forwards"] < 1


def test_step_groups(tiny_q4):
    r = last_json(bench("step_groups", "--model", tiny_q4.path, "--shapes", "2x16", "--directions", 1, 2,
                        "--rounds", 1, "--random-tokens"))
    assert [c["value_sets"] for c in r["cells"]] == [2, 4]
    for c in r["cells"]:
        assert c["grouped_decodes"] == 1 and c["speedup"] > 0 and c["over_plain"] > 0
        assert c["max_loss_difference"] < 1e-6   # a quantized tiny model: the layouts agree


def test_fidelity_tables(tiny_q4, fisher_cache, tmp_path):
    common = ["--model", tiny_q4.path, "--calib-tokens", 256, "--directions", 3, "--threads", 2,
              "--cache", fisher_cache, "--out", tmp_path]
    eps = last_json(bench("fidelity", "eps", *common, "--eps", "1e-2", "auto", "--f32-eps", "1e-2", "--batch", 2))
    assert [r["cell"] for r in eps["rows"]][0] == "KV F16 eps 0.01" and len(eps["rows"]) == 3
    assert "eps_probe" in eps["rows"][1] and abs(eps["rows"][0]["pearson_r"]) <= 1
    assert (tmp_path / "fidelity-eps.json").is_file() and (tmp_path / "fidelity-eps.png").is_file()
    assert len(last_json(bench("fidelity", "batch", *common, "--sizes", 1, 2))["rows"]) == 2
    dense = last_json(bench("fidelity", "dense", *common, "--types", "Q4_0", "F32", "--batch", 2))
    assert [r["block_matmul_types"] for r in dense["rows"]] == [{"Q4_0": 14}, {"F32": 14}]
    noise = last_json(bench("fidelity", "noise", *common, "--types", "Q4_0", "--kv", "F16", "--batch", 2))
    assert noise["rows"][0]["loss_at_+dz"] == noise["rows"][0]["loss_at_+dz_again"]   # llama.cpp repeats itself


def test_torch_reference_measures_each_arm_in_its_own_process(tiny_q4, fisher_cache):
    r = last_json(bench("torch_reference", "--model", tiny_q4.path, "--calib-tokens", 256, "--cache", fisher_cache,
                        "--steps", 1, "--warmup", 0, "--threads", 2, "--batch", 2))
    peaks = {arm: r[key]["peak_rss_mib"] for arm, key in (("native", "native"), ("torch", "torch_fp32"),
                                                          ("plain", "plain_two_forwards"))}
    assert peaks["torch"] > 2 * peaks["native"] and peaks["torch"] > 2 * peaks["plain"], peaks   # no shared peak
    assert r["native"]["g"] and r["torch_fp32"]["g"]


def test_mask_coverage(tiny_q4, tmp_path):
    bench("mask_coverage", "--model", tiny_q4.path, "--calib-tokens", 256, "--seq-len", 64, "--task-examples", 4,
          "--densities", 0.01, "--json", tmp_path / "cov.json")
    rows = json.loads((tmp_path / "cov.json").read_text())["rows"]
    assert [r["scope"] for r in rows] == ["global", "per-matrix"]
    assert all(r["oracle"] >= r["fisher"] and r["oracle"] >= r["random"] for r in rows)   # nothing beats the oracle
    scaling = json.loads((tmp_path / "cov.json").read_text())["direction_scaling"]
    assert scaling["F^0 (today)"] == 1.0 and all(v > 0 for v in scaling.values()), scaling


def test_mask_tune_and_quant_choice(tiny_q4, tiny, tmp_path):
    r = last_json(bench("mask_tune", "--source", tiny_q4.path, "--masks", "random", "--steps", 2, "--max-tokens", 32,
                        "--work", tmp_path / "mt", "--extra", "--lr", "1e-3", "--eps", "1e-2"))
    assert r["rows"][0]["steps"] == 2 and r["summary"]["random"]["test_loss_after_mean"] > 0
    q = last_json(bench("quant_choice", "--model", tiny.path, "--eval-tokens", 256, "--rounds", 1))
    assert set(q["types"]) == {"Q4_0", "Q4_1"} and all(t["tokens_per_s"] > 0 for t in q["types"].values())


def test_dense_type(tiny_q4, tmp_path):
    import shutil

    from .conftest import FACTS, write_jsonl, zero_sidecar

    d = tmp_path / "conv"
    d.mkdir()
    shutil.copy(tiny_q4.path, d / "model.gguf")
    zero_sidecar(d / "model.gguf", d / "sidecar.gguf")
    r = last_json(bench("dense_type", "--model-dir", d, "--types", "Q4_0", "Q8_0", "--rounds", 1, "--batch", 2,
                        "--max-tokens", 32, "--eval-tokens", 256, "--task-file", write_jsonl(tmp_path / "f.jsonl", FACTS)))
    assert r["source_type"] == "Q4_0" and set(r["types"]) == {"Q4_0", "Q8_0"}
    q4, q8 = r["types"]["Q4_0"], r["types"]["Q8_0"]
    assert q4["plain"]["speedup"] == 1.0 and q8["bytes"] > q4["bytes"]
    assert all(t[k]["tokens_per_s"] > 0 and t["perplexity"] > 1 for t in (q4, q8) for k in ("plain", "repacked"))


def test_choice_scoring(tiny_q4, tmp_path):
    from .conftest import write_jsonl

    rows = [{"prompt": f"Row {i}: who wrote it?", "completion": " Herman Melville",
             "choices": [" Herman Melville", " William Shakespeare", " a U.S. President"]} for i in range(4)]
    r = last_json(bench("choice_scoring", "--model", tiny_q4.path, "--task-file", write_jsonl(tmp_path / "m.jsonl", rows),
                        "--batch", 4, "--rounds", 1, "--threads", 1))
    assert r["choices"] == [3] * 4 and max(max(t) for t in r["choice_tokens"]) > 1
    assert r["shared_prompt_s"] > 0 and r["whole_sequences_s"] > 0 and r["max_score_difference"] < 1e-3


def test_compare_methods_and_its_torch_arms(tiny_q4, tmp_path):
    bundle, models = tmp_path / "bundle", tmp_path / "models"
    bench("compare_methods", "prepare", "-o", bundle, "--models", "--source", f"tiny={tiny_q4.path}",
          "--masks", "random", "--task-sizes", 12, 6, 6, "--work", tmp_path / "work", "--chunks", tmp_path / "chunks",
          "--chunk-mib", 1)
    blob = tmp_path / "blob"
    pieces = sorted((p for p in (tmp_path / "chunks").iterdir() if p.is_dir()), key=lambda p: int(p.name))
    blob.write_bytes(b"".join((p / "part").read_bytes() for p in pieces))   # as run_device.sh's receive stages do
    bench("gpu.carry", "join", bundle / "manifest.json", blob, models)
    assert (models / tiny_q4.path.name).read_bytes() == tiny_q4.path.read_bytes()
    bench("compare_methods", "run", "--bundle", bundle, "--models-dir", models, "--models", "tiny", "--tasks", "spam",
          "--methods", "zero-shot", "zo-random", "--seeds", 0, "--steps", 2, "--eps", "1e-2", "--gpu-layers", 0,
          "--max-tokens", 32, "--work", tmp_path / "runs")
    lines = [json.loads(x) for x in (bundle / "results.jsonl").read_text().splitlines()]
    assert {x["method"] for x in lines} == {"zero-shot", "zo-random"}
    bench("torch_arms", models / tiny_q4.path.name, bundle / "tasks" / "spam", "--methods", "icl", "mezo-full", "adam",
          "--seeds", 0, "--steps", 1, "--probe-steps", 1, "--max-tokens", 32, "--out", tmp_path / "torch.jsonl",
          "--tag", "tiny")
    torch_lines = [json.loads(x) for x in (tmp_path / "torch.jsonl").read_text().splitlines()]
    assert [x["method"] for x in torch_lines] == ["icl", "mezo-full", "adam"]
    bench("compare_methods", "report", bundle / "results.jsonl", tmp_path / "torch.jsonl", "--out", tmp_path / "report")
    table = json.loads((tmp_path / "report" / "compare.json").read_text())["table"]["tiny"]["spam"]
    assert set(table) == {"zero-shot", "zo-random", "icl", "mezo-full", "adam"}


def test_distributed(tiny_q4):
    r = json.loads(bench("distributed", "--model", tiny_q4.path, "--workers", 1, 2, "--steps", 3, "--directions", 2,
                         "--cores", 2, "--rounds", 3, "--no-dense").strip().splitlines()[-1])
    assert [x["workers"] for x in r["results"]] == [1, 2] and r["results"][1]["scalar_bytes_per_worker_per_step"] > 0
    assert r["exchange_only"][0]["workers"] == 2


def test_gpu_scripts_on_the_cpu(tiny_q4, tmp_path):
    made = tmp_path / "random.gguf"
    bench("gpu.make_models", "tiny", made, "--tokenizer", tiny_q4.path)
    r = last_json(bench("gpu.unified_check", "--model", made, "--gpu-layers", 0, "--seqs", 3, "--tokens", 16))
    assert r["per_sequence"]["batched_repeatable"] and r["unified"]["batched_repeatable"]


def test_torch_arms_put_the_sidecar_at_its_gguf_coordinates(tiny, tmp_path):
    """MODEL + sidecar in torch (what the time_to_quality torch arms train) is the model whose GGUF
    weights hold the sidecar's values: attn_q/attn_k rows are permuted between GGUF and torch."""
    import numpy as np
    import torch

    from bench import torch_arms
    from edge_zo.adapter import SparseAdapter
    from edge_zo.model_info import ModelInfo
    from edge_zo.objective import Objective

    info = ModelInfo.open(tiny.path)
    rng = np.random.default_rng(3)
    edits = {}
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight"):
        idx = np.sort(rng.choice(info.tensors[name].n_elements, 40, replace=False))
        edits[name] = (idx, rng.integers(-8, 9, 40).astype(np.float32) / 8)   # exact in F16
    SparseAdapter.from_weights(info.architecture, edits).save(tmp_path / "sidecar.gguf")
    with_sidecar, coords, _ = torch_arms.load_with_sidecar(str(tiny.path), str(tmp_path / "sidecar.gguf"), "cpu")
    edited = torch_arms.load_model(str(tiny.edited(tmp_path / "edited.gguf", edits)), "cpu")
    plain = torch_arms.load_model(str(tiny.path), "cpu")
    changed = [n for n, p in plain.state_dict().items() if not torch.equal(p, with_sidecar.state_dict()[n])]
    assert len(changed) == 3
    for n, p in edited.state_dict().items():
        assert torch.equal(p, with_sidecar.state_dict()[n]), n
    # MeZO on the sparse set writes there too: its deltas at d = 0 give back the same weights
    arm = torch_arms.MezoSparse(with_sidecar, coords, "cpu", Objective.NLL, seed=0)
    arm.restore(torch.ones(arm.n_params))
    arm.restore(torch.zeros(arm.n_params))
    assert all(torch.equal(p, with_sidecar.state_dict()[n]) for n, p in edited.state_dict().items())


def test_time_to_quality_kept_curve():
    from bench.time_to_quality import kept_curve

    curve = [{"elapsed_s": 3, "valid_loss": 0.9, "valid_accuracy": 0.6}, {"elapsed_s": 1, "valid_loss": 1.0,
             "valid_accuracy": 0.5}, {"elapsed_s": 5, "valid_loss": 0.95, "valid_accuracy": 0.9}]
    assert kept_curve(curve, "valid_accuracy") == ([1, 3, 5], [0.5, 0.6, 0.6])   # the best loss's state is kept


def test_time_to_quality(tiny_q4, tmp_path):
    """Every kind of arm under a 4-second budget (fixed eps/lr and 2-step probes, so that a tiny
    model gets steps in), resumed, and reported."""
    from bench._common import random_adapter
    from edge_zo.model_info import ModelInfo

    model_dir, out, docs = tmp_path / "model", tmp_path / "out", tmp_path / "docs"
    model_dir.mkdir()
    (model_dir / "model.gguf").write_bytes(tiny_q4.path.read_bytes())
    random_adapter(ModelInfo.open(tiny_q4.path), 0.01, seed=1, scale=1e-2).save(model_dir / "sidecar.gguf")
    quick = "--probe-steps 2 --eval-every 3"
    arms = {"zero-shot": None, "icl": None, "ez": "edge-zo --eps 1e-2 --lr 1e-3 --eval-every 3",
            "sparse": f"mezo-sparse {quick}", "full": f"mezo-full {quick}", "lora": f"lora-adam {quick} --rank 4"}
    cmd = ["run", "--model-dir", model_dir, "--out", out, "--tasks", "spam", "--task-sizes", 16, 8, 8, "--budgets", "4s",
           "--seeds", 0, "--threads", 1, "--arms", *arms]
    for name, spec in arms.items():
        if spec:
            cmd += ["--define", f"{name}={spec}"]
    bench("time_to_quality", *cmd)
    lines = {r["arm"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert set(lines) == set(arms) and not [r["error"] for r in lines.values() if "error" in r]
    for name in ("ez", "sparse", "full", "lora"):
        r = lines[name]
        assert r["budget_s"] == 4 and r["steps"] > 0 and 0 <= r["test_accuracy"] <= 1 and r["test_loss"] > 0, r
        times = [v["elapsed_s"] for v in r["curve"]]
        assert len(times) >= 2 and times == sorted(times) and r["curve"][0]["step"] == 0
        assert times[-1] > 3 and r["best_step"] <= r["steps"]   # trained until the budget was (nearly) spent
    for name in ("sparse", "full", "lora"):   # the torch processes' own peak is what wait4 measured
        r = lines[name]
        assert abs(r["peak_rss_mib"] - r["self_peak_rss_mib"]) < 0.1 * r["self_peak_rss_mib"], r
        assert r["lr"] in r["grid"] and len(r["lr_search"]) == len(r["grid"])
    assert lines["sparse"]["n_params"] == lines["ez"]["n_params"] < lines["lora"]["n_params"] < lines["full"]["n_params"]
    assert lines["zero-shot"]["seed"] == -1 and lines["zero-shot"]["budget_s"] is None
    assert lines["icl"]["prefix_tokens"] > 0 and lines["ez"]["peak_rss_mib"] < lines["sparse"]["peak_rss_mib"]
    before = (out / "results.jsonl").read_text()
    bench("time_to_quality", *cmd)   # resumed: every cell is there already
    assert (out / "results.jsonl").read_text() == before
    bench("time_to_quality", "report", out / "results.jsonl", "--out", docs)
    table = (docs / "time-to-quality.md").read_text()
    assert all(f"| {name} | " in table for name in arms) and "## spam: test accuracy" in table
    assert (docs / "time-to-quality-spam.png").read_bytes()[:4] == b"\x89PNG"


def test_objective_grid(tiny_q4, tmp_path):
    """Two configurations on a tiny choice task: every result row scored on test rows, and the report."""
    from bench._common import random_adapter
    from edge_zo.model_info import ModelInfo

    from .conftest import write_jsonl

    model_dir, tasks = tmp_path / "model", tmp_path / "tasks" / "toy"
    model_dir.mkdir()
    tasks.mkdir(parents=True)
    (model_dir / "model.gguf").write_bytes(tiny_q4.path.read_bytes())
    random_adapter(ModelInfo.open(tiny_q4.path), 0.01, seed=1, scale=1e-2).save(model_dir / "sidecar.gguf")
    rows = [{"prompt": f"Item {i}. Warm? Answer:", "completion": [" yes", " no"][i % 2], "choices": [" yes", " no"]}
            for i in range(12)]
    for split in ("train", "valid", "test"):
        write_jsonl(tasks / f"{split}.jsonl", rows)
    out = tmp_path / "grid.jsonl"
    configs = [{"objective": "choices", "optimizer": "adam", "lr": 1e-3, "steps": 4},
               {"objective": "nll", "optimizer": "sgd", "lr": 1e-3, "steps": 4, "seed": 1},
               {"objective": "choices", "optimizer": "adam", "lr": 1e-3, "steps": 4, "head": True, "batch": 4},
               {"objective": "choices", "optimizer": "adam", "lr": 0.1, "steps": 4, "relative": True}]
    table = bench("objective_grid", "--model-dir", model_dir, "--tasks-dir", tasks.parent, "--tasks", "toy",
                  "--configs", json.dumps(configs), "--out", out, "--eval-every", 2, "--threads", 1)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"] for r in rows] == configs and not any(r["error"] for r in rows)
    for r in rows:
        assert [c[0] for c in r["curve"]] == [0, 2, 4] and 0 <= r["test_accuracy"] <= 1 and r["test_choice_ce"] > 0
    assert "| choices | adam | 0.001 | 4 | sidecar.gguf | " in table
    assert "| nll | sgd | 0.001 | 4 | sidecar.gguf | " in table
    assert "| choices | adam | 0.001 | 4 | sidecar.gguf, batch 4, head True | " in table
    assert "| choices | adam | 0.1 | 4 | sidecar.gguf, relative True | " in table
    assert [c[2] for c in rows[3]["curve"]] != [c[2] for c in rows[0]["curve"]]   # relative steps: another run
    # the head run tunes the mask and the label words' two rows of the output matrix
    n_embd = ModelInfo.open(tiny_q4.path).tensors["token_embd.weight"].shape[1]
    assert rows[2]["coordinates"] == rows[0]["coordinates"] + 2 * n_embd
