"""`edge-zo tune --mask-from-data`: choose the tunable coordinates on the
training data itself when the model has no sidecar.

The same Fisher computation as `edge-zo convert` (torch on the dequantized
GGUF), but scored on the task's own examples and written as a `--split keep`
sidecar: base values zero, so tuning learns pure deltas on the unchanged model.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from .adapter import SparseAdapter
from .constants import Sparse
from .dataset import Example
from .model_info import ModelInfo


def fisher_sidecar(model_path: str | Path, examples: list[Example], density: float = 1e-3,
                   max_examples: int = 256) -> SparseAdapter:
    import torch

    from converters.convert import check_parity
    from converters.fisher import Scope, fisher_scores, select, sequence_loss
    from converters.gguf_tensors import TensorFile
    from converters.hf_names import arch_spec
    from converters.torch_model import model_from_gguf

    info = ModelInfo.open(model_path)
    spec = arch_spec(info.architecture, str(model_path))
    targets = info.block_matmul_weights()
    calib = examples[:max_examples]
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"edge-zo tune: --mask-from-data: Fisher of {len(targets)} weights over {len(calib)} training examples",
          file=sys.stderr)
    tf = TensorFile(Path(model_path), info.header)
    try:
        model, names, layout = model_from_gguf(tf, spec)
        from .runtime import Runtime

        with Runtime(model_path) as rt, torch.no_grad():
            check_parity(float(sequence_loss(model, calib[0])), rt.loss(calib[:1]).mean)
        scores = fisher_scores(model, names, layout, targets, calib)
    finally:
        tf.close()
    mask = select(scores, density, Scope.GLOBAL)
    weights = {name: (idx, np.zeros(len(idx), np.float32)) for name, idx in mask.items() if len(idx)}
    meta = {Sparse.ROLE: "sidecar", Sparse.MASK_METHOD: "fisher", Sparse.MASK_DENSITY: float(density),
            Sparse.MASK_SCOPE: Scope.GLOBAL.value, Sparse.CALIB_SOURCE: "the tuning data (--mask-from-data)",
            Sparse.CALIB_TOKENS: int(sum(len(e.tokens) for e in calib)), Sparse.SPLIT: "keep",
            Sparse.SOURCE_SHA256: info.sha256()}
    return SparseAdapter.from_weights(info.architecture, weights, meta)
