"""The runtime users program against: a GGUF model, its attached sparse
adapters, and losses from llama.cpp forward passes."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._native import ContextParams, NativeModel
from .adapter import SparseAdapter
from .dataset import Example
from .errors import InvalidInputError, NativeRuntimeError
from .model_info import ModelInfo


@dataclass(frozen=True)
class RuntimeOptions:
    batch_size: int = 16         # sequences per llama_decode
    max_tokens: int = 512        # tokens per sequence
    threads: int = 0             # 0: every core
    gpu_layers: int = 0
    kv_f32: bool = False
    verbose: bool = False
    # One KV cache shared by the batch instead of one per sequence. None: shared on a GPU
    # (gpu_layers > 0) when max_tokens < 256, where llama.cpp would pad every sequence's cache
    # to 256 cells (docs/gpu.md); per sequence otherwise, which keeps batched losses equal to
    # one-by-one losses bit for bit on the CPU.
    kv_unified: bool | None = None
    ubatch: int = 0              # tokens per graph; 0: 512 on the CPU, the whole batch up to 1024 on a GPU
    # Value sets evaluated in one decode (ValueSets; an SPSA step's θ±εz over its directions: 2 × directions):
    # the context holds batch_size × groups sequences.
    groups: int = 1
    # llama.cpp's extra CPU weight layouts (runtime-repacked Q4_0/IQ4_NL/Q8_0 blocks; AMX tiles on
    # CPUs with AMX). None: on unless this machine offers AMX (see weight_layouts_safe).
    extra_bufts: bool | None = None


SLOW_CPU_TYPES = ("Q4_1",)   # 4-bit types whose CPU kernels run at about half Q4_0's speed (docs/runtime.md)


def slow_cpu_type(info: ModelInfo) -> str | None:
    """The type of most of the model's block matmuls where it is one of SLOW_CPU_TYPES, else None."""
    import collections

    names = info.block_matmul_weights()
    if not names:
        return None
    common = collections.Counter(info.tensors[n].type_name for n in names).most_common(1)[0][0]
    return common if common in SLOW_CPU_TYPES else None


def weight_layouts_safe(offered: list[str] | None = None) -> bool:
    """Whether llama.cpp's extra CPU weight layouts may be turned on: they make Q4_0 forwards 1.3-1.5x
    faster (docs/runtime.md), but turning them on also turns on AMX where the CPU has it, and
    llama.cpp 0c1e570's AMX matmul crashes on some Sapphire Rapids machines: its worker threads run
    tile instructions without the per-thread XTILEDATA permission Linux requires (llama.cpp PR
    #26954). The layouts come as one switch, so a machine that offers AMX keeps all of them off."""
    from ._native import cpu_extra_buffer_types

    offered = cpu_extra_buffer_types() if offered is None else offered
    return not any(name.upper().startswith("AMX") for name in offered)


@dataclass(frozen=True)
class ValueSets:
    """Several value sets for the sparse values that attached adapters read from `live` (an SPSA
    step's θ+εz and θ−εz, for each of its directions): evaluated together, set k as if `live`
    held sets[k]. Slots reading other arrays (a fixed adapter underneath) are the same in all."""

    live: np.ndarray
    sets: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.sets)


@dataclass(eq=False)   # compared by identity: detach must find this one, not an equal-looking one
class Attachment:
    adapter: SparseAdapter
    slots: list[int]


@dataclass(frozen=True)
class LossResult:
    nll: np.ndarray     # summed NLL per example
    count: np.ndarray   # target tokens per example

    @property
    def mean(self) -> float:
        """Mean loss per target token."""
        return float(self.nll.sum() / max(int(self.count.sum()), 1))


class Runtime:
    def __init__(self, model_path: str | Path, options: RuntimeOptions = RuntimeOptions()):
        self.info = ModelInfo.open(model_path)
        self.options = options
        threads = options.threads or os.cpu_count() or 1
        if options.groups < 1:
            raise InvalidInputError(f"groups must be at least 1, got {options.groups}")
        n_seq = options.batch_size * options.groups
        n_batch = max(options.max_tokens, min(n_seq * options.max_tokens, 4096 * options.groups))
        on_gpu = options.gpu_layers > 0
        kv_unified = options.kv_unified
        if kv_unified is None:
            kv_unified = on_gpu and options.max_tokens < 256 and options.batch_size > 1
        # Each node the sparse path patches stops llama.cpp's graph; on a GPU every stop costs a
        # synchronization, so one graph for the whole batch (16 x 64 tokens: 1024) halves them, and
        # one for all the value sets of a step (groups) halves them again.
        ubatch = options.ubatch or (min(n_batch, 1024 * options.groups) if on_gpu else 512)
        self.context_params = ContextParams(
            n_ctx_seq=options.max_tokens, n_seq_max=n_seq, n_batch=n_batch,
            n_ubatch=ubatch, n_threads=threads, n_gpu_layers=options.gpu_layers, kv_unified=kv_unified,
            # Flash attention rounds K and V through F16 whatever the cache type: off with an F32 cache.
            kv_f32=options.kv_f32, flash_attn=0 if options.kv_f32 else -1, verbose=options.verbose,
            extra_bufts=weight_layouts_safe() if options.extra_bufts is None else options.extra_bufts)
        self.native = NativeModel(str(model_path), self.context_params)
        self._continuations = True   # multi-token choices scored after their shared prompt (choice_scores)
        self._groups_ok = self.native.can_group   # value sets evaluated in one decode (ValueSets)
        self.attachments: list[Attachment] = []

    def close(self):
        self.native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- adapters ----

    def attach(self, adapter: SparseAdapter, source: str = "adapter") -> Attachment:
        """Apply `adapter` in every later forward. Its `values` array is read live:
        writing into it changes the deltas without re-attaching."""
        adapter.check_against(self.info, source)
        slots = []
        try:
            for i, name in enumerate(adapter.names):
                shape = self.info.tensors[name].shape
                slots.append(self.native.add_sparse(name, shape, adapter.indices[i], adapter.weight_values(i)))
        except BaseException:
            for s in slots:
                self.native.remove_sparse(s)
            raise
        att = Attachment(adapter, slots)
        self.attachments.append(att)
        return att

    def detach(self, att: Attachment) -> None:
        for s in att.slots:
            self.native.remove_sparse(s)
        self.attachments.remove(att)

    # ---- losses ----

    def loss(self, examples: list[Example]) -> LossResult:
        """Per-example summed NLL of the target tokens, all in as few decodes as fit."""
        return self.losses(examples)[0]

    def losses(self, examples: list[Example], value_sets: ValueSets | None = None) -> list[LossResult]:
        """loss(examples) under each value set (one result without value sets), all in as few
        decodes as fit: each set evaluates its own copies of the examples' sequences."""
        if not examples:
            raise InvalidInputError("no examples to evaluate")
        n = len(examples)
        per_set = self._per_set(value_sets, lambda: [self.loss(examples)])
        if per_set is not None:
            return per_set
        k = 1 if value_sets is None else len(value_sets)
        tokens = np.concatenate([e.tokens for e in examples] * k)
        targets = np.concatenate([e.targets for e in examples] * k)
        start = np.cumsum([0] + [len(e.tokens) for e in examples] * k).astype(np.int32)
        with self._applied(value_sets):
            nll, count = self.native.loss(tokens, targets, start, _seq_group(value_sets, n))
        return [LossResult(nll[i * n:(i + 1) * n], count[i * n:(i + 1) * n]) for i in range(k)]

    def _applied(self, value_sets: ValueSets | None):
        """The native context in which sequence groups read the value sets (nothing without them)."""
        return contextlib.nullcontext() if value_sets is None else self.native.groups(value_sets.live, value_sets.sets)

    def _per_set(self, value_sets: ValueSets | None, evaluate) -> list | None:
        """Where this model cannot evaluate value sets together (recurrent and hybrid memories):
        evaluate() once per set with the set written into `live`, concatenated; else None."""
        if value_sets is None or self._groups_ok:
            return None
        return self._each_set(value_sets, evaluate)

    @staticmethod
    def _each_set(value_sets: ValueSets, evaluate) -> list:
        live = value_sets.live
        kept = live.copy()
        out = []
        try:
            for values in value_sets.sets:
                live[:] = values
                out += evaluate()
        finally:
            live[:] = kept
        return out

    def choice_scores(self, examples: list[Example], share_prompts: bool = True) -> list[np.ndarray]:
        """Per multiple-choice example, the mean log-likelihood per token of each choice (see
        choice_scores_under)."""
        return self.choice_scores_under(examples, None, share_prompts)[0]

    def choice_scores_under(self, examples: list[Example], value_sets: ValueSets | None,
                            share_prompts: bool = True) -> list[list[np.ndarray]]:
        """Per multiple-choice example, the mean log-likelihood per token of each choice.

        Rows whose choices are all one token after the same prompt are scored from a
        single forward of the prompt (the next-token log-probabilities of the choices); rows
        whose longer choices share a prompt decode it once and each choice on top of its cache
        (`share_prompts`, False: as whole sequences, the reference); other rows evaluate every
        choice as its own sequence."""
        if not examples or any(not e.choices for e in examples):
            raise InvalidInputError("every example needs 'choices' to be scored by them")
        per_set = self._per_set(value_sets, lambda: [self.choice_scores(examples, share_prompts)])
        if per_set is not None:
            return per_set
        k = 1 if value_sets is None else len(value_sets)
        scores: list[list[np.ndarray | None]] = [[None] * len(examples) for _ in range(k)]
        single = [i for i, e in enumerate(examples) if single_token_choices(e)]
        if single:
            prompts = [examples[i].choices[0].tokens[:-1] for i in single]
            start = np.cumsum([0] + [len(t) for t in prompts] * k).astype(np.int32)
            cands = [np.array([c.tokens[-1] for c in examples[i].choices], np.int32) for i in single]
            with self._applied(value_sets):
                logps = self.native.next_logprobs(np.concatenate(prompts * k), start, cands * k,
                                                  _seq_group(value_sets, len(single)))
            for j, logp in enumerate(logps):
                scores[j // len(single)][single[j % len(single)]] = logp
        rest = [i for i in range(len(examples)) if scores[0][i] is None]
        shared = [i for i in rest if shared_prompt(examples[i]) is not None] if share_prompts and self._continuations else []
        if shared:
            # Prompts decoded once and each choice on its cache: one value set at a time.
            group = [examples[i] for i in shared]
            try:
                per = ([self._scores_after_shared_prompts(group)] if value_sets is None else
                       self._each_set(value_sets, lambda: [self._scores_after_shared_prompts(group)]))
                for j, s in enumerate(per):
                    for i, si in zip(shared, s):
                        scores[j][i] = si
            except NativeRuntimeError:       # a recurrent model's memory cannot drop a tail: whole sequences
                self._continuations = False
        rest = [i for i in rest if scores[0][i] is None]
        if rest:
            for j, r in enumerate(self.losses([c for i in rest for c in examples[i].choices], value_sets)):
                per_token = -r.nll / np.maximum(r.count, 1)
                at = 0
                for i in rest:
                    n = len(examples[i].choices)
                    scores[j][i], at = per_token[at: at + n], at + n
        return scores

    def _scores_after_shared_prompts(self, examples: list[Example]) -> list[np.ndarray]:
        """Multi-token choices after a prompt they share: the prompt decoded once, each choice on
        top of its cache (ez_continuation_loss), instead of one whole sequence per choice."""
        prefixes, conts = [], []
        for p, e in enumerate(examples):
            n = shared_prompt(e)
            prefixes.append(e.choices[0].tokens[:n])
            conts += [(p, c.tokens[n:], c.targets[n:]) for c in e.choices]
        nll, count = self.native.continuation_loss(prefixes, conts)
        per_token = -nll / np.maximum(count, 1)
        return np.split(per_token, np.cumsum([len(e.choices) for e in examples])[:-1])

    def accuracy(self, examples: list[Example]) -> float:
        """Share of multiple-choice examples whose answer has the highest mean log-likelihood."""
        return float(np.mean(choice_correct(self.choice_scores(examples), examples)))

    # ---- text ----

    def generate(self, prompt: str, *, max_tokens: int = 128, temperature: float = 0.0, top_p: float = 0.95,
                 seed: int = 0, chat: bool = False):
        """Yield text pieces as they are generated (with every attached adapter applied)."""
        if chat:
            prompt = self.native.apply_chat_template([{"role": "user", "content": prompt}], add_assistant=True)
        ids = self.native.tokenize(prompt, add_special=True)
        pending = b""
        for tok in self.native.generate(ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed):
            pending += self.native.token_piece(tok)
            try:  # hold back bytes until they form whole UTF-8 characters
                text = pending.decode("utf-8")
            except UnicodeDecodeError:
                continue
            pending = b""
            yield text
        if pending:
            yield pending.decode("utf-8", "replace")


def _seq_group(value_sets: ValueSets | None, n: int) -> np.ndarray | None:
    """The group of each sequence when n sequences are repeated once per value set, set by set."""
    return None if value_sets is None else np.repeat(np.arange(len(value_sets), dtype=np.int32), n)


def shared_prompt(e: Example) -> int | None:
    """Length of the prompt every choice of `e` starts with, up to its first scored token, or None
    where the choices do not share one."""
    first = e.choices[0]
    scored = np.flatnonzero(first.targets)
    if len(scored) == 0 or scored[0] == 0:
        return None
    n = int(scored[0])
    for c in e.choices:
        if len(c.tokens) <= n or np.any(c.targets[:n]) or not np.array_equal(c.tokens[:n], first.tokens[:n]):
            return None
    return n


def single_token_choices(e: Example) -> bool:
    """Every choice is the same prompt plus one scored token."""
    first = e.choices[0]
    return all(len(c.tokens) == len(first.tokens) and c.n_targets == 1 and c.targets[-1] == 1
               and np.array_equal(c.tokens[:-1], first.tokens[:-1]) for c in e.choices)


def choice_correct(scores: list[np.ndarray], examples: list[Example]) -> np.ndarray:
    """Whether each example's answer scores highest (ties go to the first choice, as argmax does)."""
    return np.array([int(np.argmax(s)) == e.answer for s, e in zip(scores, examples)])


def choice_cross_entropy(scores: list[np.ndarray], examples: list[Example]) -> np.ndarray:
    """−log softmax(scores)[answer] per example: the loss over the row's choices alone, which
    spends a step's signal on telling the choices apart rather than on the rest of the vocabulary."""
    out = np.empty(len(examples))
    for i, (s, e) in enumerate(zip(scores, examples)):
        top = float(np.max(s))
        out[i] = top + np.log(np.sum(np.exp(s - top))) - float(s[e.answer])
    return out
