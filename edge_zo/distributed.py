"""Tuning as one worker of W on torch.distributed (gloo), exchanging scalars only.

A zeroth-order step needs no gradient, only the scalar (L+ − L−)/2ε of each
direction, and a direction is regenerated from (seed, step, index). So direction
d of a step is evaluated by worker d % W, one all-gather puts every direction's
(g, L+, L−) on every worker in direction order, and every worker applies the
same update by regenerating all Q directions. Weights, gradients and deltas are
never sent: a step costs each worker (W − 1) · (24 · ceil(Q / W) + 8) bytes.
With every worker on the same batch, the deltas are bit-identical to one process
running all Q directions (same engine build, same threads).

`torchrun` sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Without them
edge-zo is one process and torch is never imported: this is the only module
that imports torch.distributed, and only inside `Team.join`.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidInputError, WorkerLostError
from .spsa import Estimate

DEFAULT_TIMEOUT_S = 300.0
FIELDS = 3            # g, L+, L− of a direction, float64 on the wire
WORD = 8              # bytes of a float64
LOST_GRACE_S = 5.0    # after a failed collective, how long survivors wait for each other to check in


@dataclass(frozen=True)
class World:
    """This process's place in the run, from the launcher's environment."""

    rank: int = 0
    size: int = 1
    restarts: int = 0     # TORCHELASTIC_RESTART_COUNT: >0 when torchrun restarted the workers

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "World":
        try:
            rank, size = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
            restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
        except ValueError as exc:
            raise InvalidInputError(f"RANK, WORLD_SIZE and TORCHELASTIC_RESTART_COUNT must be integers ({exc})") from exc
        if size < 1 or not 0 <= rank < size:
            raise InvalidInputError(f"expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={size}")
        if size > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
            raise InvalidInputError(f"WORLD_SIZE={size} but MASTER_ADDR/MASTER_PORT are not set: launch with torchrun "
                                    "(see docs/distributed.md)")
        return cls(rank, size, restarts)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def directions(self, q: int) -> range:
        """The directions of a step this worker evaluates."""
        return range(self.rank, q, self.size)


def step_payload_bytes(q: int, w: int) -> int:
    """What one worker contributes to a step's all-gather: its estimates, padded
    to ceil(Q / W), and its stop request."""
    return WORD * (FIELDS * math.ceil(q / w) + 1)


def step_sent_bytes(q: int, w: int) -> int:
    """Bytes one worker sends per step: gloo's all-gather is a ring, so each
    worker passes on W − 1 payloads (headers of TCP and gloo not counted)."""
    return (w - 1) * step_payload_bytes(q, w)


def digest(theta: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(theta).tobytes(), digest_size=16).hexdigest()


@dataclass
class Team:
    """The gloo process group of one run. Every collective of the run goes through
    here; a failed one becomes a WorkerLostError that names the missing workers."""

    world: World
    timeout_s: float
    sent: dict[str, int] = field(default_factory=lambda: {"steps": 0, "setup": 0})   # bytes this worker sent
    store: object = None   # the run's key-value store (torch.distributed.Store), for start-up and failures
    store_on_worker0: bool = False   # launched by hand, worker 0 hosts the store; under torchrun, the agent

    @classmethod
    def join(cls, world: World, timeout_s: float = DEFAULT_TIMEOUT_S) -> "Team":
        import datetime

        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        env = os.environ
        try:
            # torchrun's agent hosts the store (and keeps it across restarts); launched by hand, worker 0 does.
            agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.size,
                                  is_master=world.is_main and not agent, timeout=timeout)
            # Keys of their own per attempt: after an elastic restart, the last attempt's gloo addresses
            # would still be there, and the new workers would dial the dead ones (pytorch/pytorch#167288).
            store = dist.PrefixStore(f"edge_zo/attempt_{world.restarts}/", store)
            dist.init_process_group("gloo", store=store, rank=world.rank, world_size=world.size, timeout=timeout)
        except Exception as exc:  # DistStoreError, RuntimeError: someone never came
            raise WorkerLostError(f"not every one of the {world.size} workers joined within {timeout_s:g} s "
                                  f"({_first_line(exc)}); check that every worker was launched with the same "
                                  "--nnodes/--nproc-per-node and can reach MASTER_ADDR:MASTER_PORT") from None
        return cls(world, timeout_s, store=store, store_on_worker0=not agent)

    # ---- per step ----

    def gather(self, local: dict[int, Estimate], stop: bool, q: int) -> tuple[list[Estimate], bool]:
        """Every worker's estimates in direction order, and whether any worker asked to stop."""
        import torch

        w, k = self.world.size, math.ceil(q / self.world.size)
        mine = np.full((k, FIELDS), np.nan)
        for j, d in enumerate(self.world.directions(q)):
            e = local[d]
            mine[j] = (e.g, e.loss_plus, e.loss_minus)
        payload = torch.from_numpy(np.append(mine.reshape(-1), float(stop)))
        parts = [torch.empty_like(payload) for _ in range(w)]
        self._collective(lambda dist: dist.all_gather(parts, payload))
        self.sent["steps"] += (w - 1) * payload.numel() * WORD
        rows = [p.numpy()[:-1].reshape(k, FIELDS) for p in parts]
        out = [Estimate(*(float(x) for x in rows[d % w][d // w])) for d in range(q)]
        return out, any(p[-1].item() != 0.0 for p in parts)

    # ---- at start and at checkpoints ----

    def broadcast(self, obj):
        """Rank 0's obj on every worker (pickled: for start-up, not for steps)."""
        box = [obj if self.world.is_main else None]
        self._collective(lambda dist: dist.broadcast_object_list(box, src=0))
        if self.world.is_main:
            self.sent["setup"] += (self.world.size - 1) * len(pickle.dumps(obj))
        return box[0]

    def all_same(self, what: str, value: str | dict, hint: str) -> None:
        """Raise on every worker unless every worker holds the same `value`
        (a dict: the message names the keys that differ)."""
        values = [None] * self.world.size
        self._collective(lambda dist: dist.all_gather_object(values, value))
        self.sent["setup"] += (self.world.size - 1) * len(pickle.dumps(value))
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            keys = sorted({k for r in odd for k in _differ(values[0], values[r])})
            raise InvalidInputError(f"worker(s) {_ranks(odd)} hold different {what} from worker 0"
                                    + (f" ({', '.join(keys)})" if keys else "") + f": {hint}")

    # ---- failures ----

    def tell_failure(self, message: str) -> None:
        """Leave this worker's error where the others look when it stops answering."""
        try:
            self.store.set(self._key("failed", self.world.rank), message[:2000])
        except Exception:
            pass

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def _collective(self, run) -> None:
        import torch.distributed as dist

        t0 = time.monotonic()
        try:
            run(dist)
        except RuntimeError as exc:  # gloo: connection reset, timed out, ...
            waited = time.monotonic() - t0
            raise WorkerLostError(self._who_failed(exc, waited)) from None

    def _who_failed(self, exc: Exception, waited: float) -> str:
        """Survivors check in on the store; whoever does not is named."""
        w = self.world.size
        try:
            store = self.store
            store.set(self._key("alive", self.world.rank), "1")
            deadline = time.monotonic() + min(LOST_GRACE_S, self.timeout_s)
            while True:
                here = [r for r in range(w) if store.check([self._key("alive", r)])]
                if len(here) == w or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            missing = [r for r in range(w) if r not in here]
            failed = {r: store.get(self._key("failed", r)).decode() for r in missing
                      if store.check([self._key("failed", r)])}
        except Exception:  # the store is gone, and with it the worker that hosted it
            missing, failed = ([0] if self.store_on_worker0 and not self.world.is_main else None), {}
        cause = _first_line(exc)
        if failed:
            return "; ".join(f"worker {r} of {w} failed: {m}" for r, m in failed.items())
        who = f"worker(s) {_ranks(missing)} of {w}" if missing else f"a worker of {w}"
        if "Timed out" in cause:
            return f"{who} did not answer within {self.timeout_s:g} s (gloo: {cause})"
        return f"{who} stopped answering after {waited:.1f} s (gloo: {cause})"

    @staticmethod
    def _key(kind: str, rank: int) -> str:
        return f"{kind}/{rank}"


def _differ(a, b, prefix: str = "") -> list[str]:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return []
    return [k2 for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
            for k2 in (_differ(a.get(k), b.get(k), f"{prefix}{k}.") or [f"{prefix}{k}"])]


def _ranks(rs) -> str:
    return ", ".join(str(r) for r in rs)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and "] " in text:  # gloo's "[.../pair.cc:537] Read error ..."
        text = text.split("] ", 1)[1]
    return text.split(". This is typically")[0]
