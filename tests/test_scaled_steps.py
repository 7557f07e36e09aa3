"""SPSA in rescaled units (spsa's `scale`: a diagonal preconditioner of the perturbation and the
step): the same run as one in the units u = θ / scale, and replayable; and the scale of
bench.objective_grid's "relative" runs, read from the model's own numbers."""
from __future__ import annotations

import numpy as np

from bench.objective_grid import matrix_rms
from edge_zo import spsa
from edge_zo.adapter import SparseAdapter
from edge_zo.gguf_io import TensorFile
from edge_zo.model_info import ModelInfo
from edge_zo.trainer import LoopConfig, LoopState, train

N = 96
TARGET = np.linspace(-1, 1, N).astype(np.float32)
SCALE = np.repeat(np.float32([0.04, 0.2, 1.0]), N // 3)   # three "matrices" of different sizes


def _run(optimizer: spsa.Optimizer, lr: float, loss_of, scale=None, steps=30):
    live = np.zeros(N, np.float32)
    cfg = LoopConfig(steps=steps, batch_size=1, eps=1e-2, lr=lr, optimizer=optimizer, eval_every=10,
                     save_every=10**9)
    state = train(cfg, LoopState.fresh(np.zeros(N, np.float32), cfg), n_examples=4, live=live,
                  loss=lambda idx: loss_of(live), evaluate=lambda: {"valid_loss": loss_of(live)},
                  report=lambda r: None, checkpoint=lambda s: None, scale=scale)
    return state, cfg


def test_a_scaled_run_is_the_plain_run_in_relative_units():
    """Tuning θ with `scale` s is tuning u = θ/s without it, on the loss seen through θ = s⊙u:
    so a relative lr means the same thing for a model of large weights and one of small."""
    loss_theta = lambda th: float(np.sum((th / SCALE - TARGET) ** 2))   # noqa: E731  (a loss in relative units)
    loss_u = lambda u: float(np.sum((u - TARGET) ** 2))                 # noqa: E731
    for opt, lr in ((spsa.Optimizer.SGD, 5e-3), (spsa.Optimizer.ADAM, 5e-2)):
        scaled, _ = _run(opt, lr, loss_theta, SCALE)
        plain, _ = _run(opt, lr, loss_u)
        np.testing.assert_allclose(scaled.theta / SCALE, plain.theta, rtol=2e-4, atol=2e-5)
        assert loss_u(plain.theta) < 0.8 * loss_u(np.zeros(N, np.float32))   # and it learned


def test_a_scaled_run_replays_bit_exactly():
    loss = lambda th: float(np.sum((th / SCALE - TARGET) ** 2))   # noqa: E731
    state, cfg = _run(spsa.Optimizer.ADAM, 5e-2, loss, SCALE)
    replayed = spsa.replay(np.zeros(N, np.float32), state.scalars, seed=cfg.seed, optimizer=cfg.optimizer,
                           lr_at=cfg.lr_at, scale=SCALE)
    assert np.array_equal(state.theta, replayed)
    unscaled = spsa.replay(np.zeros(N, np.float32), state.scalars, seed=cfg.seed, optimizer=cfg.optimizer,
                           lr_at=cfg.lr_at)
    assert not np.allclose(unscaled, replayed)


def test_matrix_rms_is_each_weights_rms(tiny_q4):
    info = ModelInfo.open(tiny_q4.path)
    names = info.block_matmul_weights()[:3] + ["token_embd.weight"]
    adapter = SparseAdapter.from_weights(info.architecture, {n: (np.arange(5 + i), np.zeros(5 + i))
                                                              for i, n in enumerate(names)})
    scale = matrix_rms(tiny_q4.path, adapter)
    assert scale.shape == (adapter.n_params,) and scale.dtype == np.float32
    with TensorFile(tiny_q4.path, info.header) as tf:
        for i, name in enumerate(adapter.names):
            w = tf.tensors[name].dequantize().astype(np.float64)
            part = scale[adapter.offsets[i]: adapter.offsets[i + 1]]
            np.testing.assert_allclose(part, np.sqrt(np.mean(w * w)), rtol=1e-6)
