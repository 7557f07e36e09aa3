"""`--eps auto` (edge_zo.eps_probe) on numpy objectives whose window is known.

The objective is what llama.cpp's loss looks like to SPSA (docs/fidelity.md): a linear term, a
cubic one along another direction that matches it at ε = `bend` (past it, the difference has
parts that z·∇L does not explain and that grow like ε³, as measured), plus a rounding noise that
is a fixed function of the values (the same values give the same loss, any change a fresh draw).
The test of a choice is the one bench/fidelity.py makes on real models: over fresh directions, does
(L(θ+εz) − L(θ−εz)) / 2ε follow the exact z·∇L?"""
import hashlib

import numpy as np
import pytest

from edge_zo import eps_probe, spsa

N = 2000


def objective(grad_rms: float, noise: float, bend: float):
    rng = np.random.default_rng(0)
    g, w = rng.standard_normal(N), rng.standard_normal(N)
    g *= grad_rms / np.linalg.norm(g)          # z ~ N(0, I): rms(z·g) = |g|
    w /= np.linalg.norm(w)
    kappa = grad_rms / (np.sqrt(15) * bend ** 2)   # rms of κ(w·εz)³ terms = ε·|g| at ε = bend
    calls = []

    def loss_at(k, offset):
        calls.append(k)
        h = int.from_bytes(hashlib.sha256(offset.tobytes() + bytes([k % 256])).digest()[:8], "little")
        return (5.0 + float(g @ offset) + kappa * float(w @ offset) ** 3
                + noise * np.random.default_rng(h).standard_normal() / np.sqrt(2))

    return loss_at, calls, g


def fidelity_r(loss_at, g, eps: float, n: int = 64) -> float:
    zs = [spsa.direction(123, d, N) for d in range(n)]
    e = np.float32(eps)
    native = [(loss_at(1000 + d, e * z) - loss_at(1000 + d, -e * z)) / (2 * eps) for d, z in enumerate(zs)]
    return float(np.corrcoef(native, [z @ g for z in zs])[0, 1])


# (rms z·∇L, noise, bend): like SmolLM2's spam batch on CUDA, Gemma's, a text task, and two off the ladder
CASES = [(95, 0.25, 3e-2), (320, 0.085, 8e-3), (2.5, 0.007, 3e-2), (3000, 0.05, 8e-4), (4, 0.01, 0.3)]


@pytest.mark.parametrize("grad_rms, noise, bend", CASES)
def test_the_chosen_eps_gives_a_faithful_estimate(grad_rms, noise, bend):
    loss_at, calls, g = objective(grad_rms, noise, bend)
    c = eps_probe.choose_eps(loss_at, N, seed=0)
    assert c.forwards == len(calls) == 2 * c.directions * len(c.rms_diff)
    assert set(calls) == set(range(eps_probe.DIRECTIONS))      # one batch per direction
    assert fidelity_r(loss_at, g, c.eps) >= 0.9, c
    assert c.agreement >= eps_probe.POOR_AGREEMENT and eps_probe.warning(c) is None
    assert c.pair[1] == pytest.approx(c.pair[0] * eps_probe.STEP) and c.pair[0] < c.eps < c.pair[1]


def test_the_ladder_grows_toward_the_window():
    steep, _, _ = objective(3000, 0.05, 8e-4)    # at 1e-3 already bent: rungs below the ladder
    c = eps_probe.choose_eps(steep, N, seed=0)
    assert min(float(e) for e in c.rms_diff) < eps_probe.LADDER[0] and c.eps < 1e-3
    flat, _, _ = objective(4, 0.01, 0.3)         # at 2.7e-2 still in the noise's reach: rungs above
    c = eps_probe.choose_eps(flat, N, seed=0)
    assert max(float(e) for e in c.rms_diff) > eps_probe.LADDER[-1] and c.eps > 1e-2


def test_warns_when_noise_or_flatness_wins():
    noisy, _, _ = objective(40, 3.0, 1e-2)       # the noise is above the signal until the loss bends
    c = eps_probe.choose_eps(noisy, N, seed=0)
    assert "agree poorly" in eps_probe.warning(c)
    dead = eps_probe.choose_eps(lambda k, off: 4.0, N, seed=0)
    assert "did not move" in eps_probe.warning(dead)


def test_deterministic_and_apart_from_the_run_directions():
    a = eps_probe.choose_eps(objective(95, 0.25, 3e-2)[0], N, seed=7)
    b = eps_probe.choose_eps(objective(95, 0.25, 3e-2)[0], N, seed=7)
    assert a == b
    seen = []
    eps_probe.choose_eps(lambda k, off: seen.append(off.copy()) or 1.0, N, seed=7)
    z0 = seen[0] / np.float32(eps_probe.LADDER[0])
    assert not np.allclose(z0, spsa.direction(7, 0, N), atol=1e-2)


def test_a_loss_that_is_not_finite_stops_the_probe():
    with pytest.raises(FloatingPointError, match="not finite"):
        eps_probe.choose_eps(lambda k, off: float("nan"), N, seed=0)
    with pytest.raises(ValueError):
        eps_probe.choose_eps(lambda k, off: 1.0, 0, seed=0)


def test_through_the_live_buffer_around_theta_and_back():
    loss_at, _, g = objective(95, 0.0, 3e-2)       # no noise: θ + offset − θ rounds, a fresh draw would differ
    theta = np.random.default_rng(1).standard_normal(N).astype(np.float32) * 1e-3
    live = theta.copy()
    seen = []

    def batch_loss(k):
        seen.append(live - theta)
        return loss_at(k, live - theta)

    c = eps_probe.choose_eps_live(live, batch_loss, seed=0)
    assert np.array_equal(live, theta)                         # θ is back
    direct = eps_probe.choose_eps(loss_at, N, seed=0)         # the same offsets, around θ
    assert (c.eps, c.pair) == (direct.eps, direct.pair) and c.agreement == pytest.approx(direct.agreement)
    assert np.allclose(seen[0], np.float32(eps_probe.LADDER[0]) * spsa.direction(0, 0, N, eps_probe.PROBE_STREAM),
                       atol=1e-9)
