"""Scoring a GGUF, with or without a LoRA adapter, through stock llama-cpp-python alone.

This is how a user of the exported files runs them: `llama_cpp.Llama(model_path=...,
lora_path=...)`, none of edge-zo's native core in the loop. `StockLlama` offers the two
methods `edge_zo.export_eval` needs from a scorer, with the meaning `edge_zo.runtime.Runtime`
gives them (summed NLL of each example's targets; per-token mean log-likelihood of each choice),
on the token ids edge-zo's tokenizer made. One sequence per decode: slower than the runtime's
batches, fine for the few hundred rows an export is checked on.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .dataset import Example
from .errors import InvalidInputError, ModelFileError
from .runtime import LossResult, single_token_choices

GGML_TYPE_F32 = 0   # ggml_type value for an F32 KV cache (llama.h's enum)


class StockLlama:
    def __init__(self, model: str | Path, *, lora: str | Path | None = None, n_ctx: int = 512, threads: int = 0,
                 gpu_layers: int = 0, kv_f32: bool = False, all_logits: bool = True):
        """`all_logits=False`: only the last position's logits are computed (the output matmul
        over the vocabulary is then paid once per sequence), enough for single-token choices."""
        import llama_cpp

        self.all_logits = all_logits
        kwargs = dict(model_path=str(model), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=all_logits,
                      n_threads=threads or os.cpu_count() or 1, n_gpu_layers=gpu_layers, verbose=False)
        if lora is not None:
            kwargs["lora_path"] = str(lora)
        if kv_f32:
            kwargs.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
        try:
            # llama.cpp writes its load log to stderr even with verbose=False for some messages.
            with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
                self.llm = llama_cpp.Llama(**kwargs)
        except ValueError as exc:   # llama-cpp-python's way to say a file did not load
            what = f"{model}" + (f" with LoRA {lora}" if lora else "")
            raise ModelFileError(f"stock llama.cpp could not load {what}: {exc}") from exc
        self.n_ctx = n_ctx

    def close(self) -> None:
        self.llm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _logprobs(self, tokens: np.ndarray, last_only: bool = False) -> np.ndarray:
        """log-softmax of the logits at every position of one sequence, (len(tokens), n_vocab), or
        at the last position only, (1, n_vocab)."""
        if len(tokens) > self.n_ctx:
            raise InvalidInputError(f"a sequence of {len(tokens)} tokens does not fit a context of {self.n_ctx}")
        if not last_only and not self.all_logits:
            raise InvalidInputError("this scorer keeps only the last logits; open it with all_logits=True for losses")
        self.llm.reset()
        self.llm.eval([int(t) for t in tokens])
        if self.all_logits:
            logits = np.asarray(self.llm.scores[: len(tokens)], np.float64)
        else:   # llama-cpp-python stores no scores then; llama.cpp holds the last position's logits
            logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(1, self.llm.n_vocab())).astype(np.float64)
        if last_only:
            logits = logits[-1:]
        top = logits.max(axis=1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))

    def loss(self, examples: list[Example]) -> LossResult:
        nll, count = np.zeros(len(examples)), np.zeros(len(examples), np.int64)
        for i, e in enumerate(examples):
            lp = self._logprobs(e.tokens)
            pos = np.flatnonzero(e.targets[1:]) + 1          # token p is predicted at position p - 1
            nll[i] = -float(lp[pos - 1, e.tokens[pos]].sum())
            count[i] = len(pos)
        return LossResult(nll, count)

    def choice_scores(self, examples: list[Example]) -> list[np.ndarray]:
        scores = []
        for e in examples:
            if single_token_choices(e):
                lp = self._logprobs(e.choices[0].tokens[:-1], last_only=True)[-1]
                scores.append(np.array([lp[c.tokens[-1]] for c in e.choices]))
            else:
                r = self.loss(e.choices)
                scores.append(-r.nll / np.maximum(r.count, 1))
        return scores

    def generate(self, prompt: str, max_tokens: int) -> str:
        """Greedy continuation of `prompt`."""
        out = self.llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"]
