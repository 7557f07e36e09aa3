"""The PyTorch arms of bench.compare_methods (docs/compare.md): zero-shot, in-context
examples, MeZO over all parameters, and first-order Adam, on the GGUF dequantized to float32.

Everything that is not the optimizer is the product's: the model's numbers
(converters.torch_model.model_from_gguf, the same dequantized weights the native runtime
multiplies), the tokens (edge_zo.dataset.Tokenizer on llama.cpp's tokenizer), the batches
(trainer.batch_indices), the loss (summed NLL of the target tokens / their number) and the
accuracy rule (the choice with the lowest mean NLL per token), and the learning-rate rule of
`edge-zo tune --lr auto` (20 steps per grid value from the start, lowest loss on a fixed probe
batch wins). So the arms differ only in what they optimise and how.

    python -m bench.torch_arms MODEL.gguf TASK_DIR --methods zero-shot icl mezo-full adam \\
        --seeds 0 1 2 --steps 300 --out results.jsonl     # one JSON line per (method, seed)

The wall-clock arms of bench.time_to_quality (MeZO on the sidecar's coordinates or on every
parameter, LoRA with Adam; each trained until a deadline on tune's objective) are at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edge_zo.dataset import Example, Tokenizer, load_jsonl
from edge_zo.runtime import Runtime, RuntimeOptions
from edge_zo.trainer import batch_indices

# Learning-rate grids, searched by the rule of `edge-zo tune --lr auto` (its own grid is 1e-5 … 1e-3,
# for the sparse values). MeZO's paper tunes full-parameter ZO-SGD over 1e-7 … 1e-6 at ε = 1e-3;
# this grid goes higher because 300 steps is far fewer than its 100k.
MEZO_GRID = (1e-7, 3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4)
MEZO_EPS = 1e-3
ADAM_GRID = (1e-6, 1e-5, 1e-4)
PROBE_STEPS = 20
ICL_PER_CLASS = 2      # in-context examples per choice (spam: 4 demonstrations, author: 6)
ICL_TEXT = 2           # passages before a held-out passage in the text task
LOGITS_BUDGET = 2 << 30  # bytes of float32 logits per forward chunk


def log(msg: str) -> None:
    print(f"torch_arms: {msg}", file=sys.stderr, flush=True)


# ---- data ----

class Task:
    """A task folder's splits, tokenized with llama.cpp's tokenizer as `edge-zo tune` does."""

    def __init__(self, model: str, folder: Path, max_tokens: int):
        with Runtime(model, RuntimeOptions(batch_size=1, max_tokens=max_tokens, threads=2)) as rt:
            tok = Tokenizer(rt.native, max_tokens=max_tokens)
            self.data = {s: load_jsonl(folder / f"{s}.jsonl") for s in ("train", "valid", "test")}
            self.ex = {s: tok.examples(d) for s, d in self.data.items()}
            self.bos = rt.native.bos
            self.sep = rt.native.tokenize("\n\n", add_special=False, parse_special=False).astype(np.int32)
        self.has_choices = self.data["test"].has_choices

    def without_bos(self, tokens: np.ndarray, targets: np.ndarray):
        if len(tokens) > 1 and tokens[0] == self.bos:
            return tokens[1:], targets[1:]
        return tokens, targets

    def prefixed(self, prefix: np.ndarray, e: Example) -> Example:
        """`e` after the in-context prefix; the same target tokens as `e` alone."""
        tokens, targets = self.without_bos(e.tokens, e.targets)
        return Example(np.concatenate([prefix, tokens]).astype(np.int32),
                       np.concatenate([np.zeros(len(prefix), np.uint8), targets]))

    def icl_prefix(self, seed: int) -> np.ndarray:
        """Demonstrations drawn from the training split with `seed`: ICL_PER_CLASS per choice
        (shuffled), or ICL_TEXT passages, each as tokenized for tuning, "\\n\\n" between."""
        rng = np.random.default_rng(seed)
        train = self.ex["train"]
        if self.has_choices:
            picks = [i for a in range(len(train[0].choices))
                     for i in rng.choice([j for j, e in enumerate(train) if e.answer == a], ICL_PER_CLASS,
                                         replace=False)]
            rng.shuffle(picks)
        else:
            picks = rng.choice(len(train), ICL_TEXT, replace=False)
        parts = []
        for k, i in enumerate(picks):
            tokens = train[int(i)].tokens
            parts += [tokens if k == 0 else self.without_bos(tokens, tokens)[0], self.sep]
        return np.concatenate(parts).astype(np.int32)


# ---- losses ----

def padded(examples: list[Example], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, target flags), right-padded to the longest row. Right padding needs no attention
    mask: a causal model's real positions never see what comes after them."""
    width = max(len(e.tokens) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    tgt = torch.zeros(len(examples), width, dtype=torch.bool)
    for j, e in enumerate(examples):
        ids[j, : len(e.tokens)] = torch.from_numpy(e.tokens.astype(np.int64))
        tgt[j, : len(e.tokens)] = torch.from_numpy(e.targets.astype(bool))
    return ids.to(device), tgt.to(device)


def summed_nll(model, examples: list[Example], device) -> tuple[np.ndarray, np.ndarray]:
    """Per example: summed NLL of its target tokens, and their number (as Runtime.loss)."""
    vocab = model.config.vocab_size
    nll, count = np.zeros(len(examples)), np.zeros(len(examples), np.int64)
    i = 0
    while i < len(examples):
        width = max(len(e.tokens) for e in examples[i: i + 64])
        n = max(1, min(64, LOGITS_BUDGET // (width * vocab * 4)))
        chunk = examples[i: i + n]
        ids, tgt = padded(chunk, device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        mask = tgt[:, 1:]                       # position p predicts token p + 1
        per_tok = torch.nn.functional.cross_entropy(logits[mask], ids[:, 1:][mask], reduction="none")
        rows = mask.nonzero()[:, 0]
        s = torch.zeros(len(chunk), device=device, dtype=torch.float64).index_add_(0, rows, per_tok.double())
        nll[i: i + len(chunk)] = s.cpu().numpy()
        count[i: i + len(chunk)] = mask.sum(1).cpu().numpy()
        i += len(chunk)
    return nll, count


def mean_loss(model, examples, device) -> float:
    nll, count = summed_nll(model, examples, device)
    return float(nll.sum() / max(int(count.sum()), 1))


def batch_loss(model, examples, device) -> torch.Tensor:
    """The training loss with a graph: summed NLL of the batch's targets / their number."""
    ids, tgt = padded(examples, device)
    logits = model(input_ids=ids).logits[:, :-1].float()
    mask = tgt[:, 1:]
    return torch.nn.functional.cross_entropy(logits[mask], ids[:, 1:][mask])


def accuracy(model, examples: list[Example], device) -> float:
    flat = [c for e in examples for c in e.choices]
    nll, count = summed_nll(model, flat, device)
    per_token = nll / np.maximum(count, 1)
    right, k = 0, 0
    for e in examples:
        right += int(np.argmin(per_token[k: k + len(e.choices)]) == e.answer)
        k += len(e.choices)
    return right / len(examples)


def evaluate(model, task: Task, device, prefix: np.ndarray | None = None) -> dict:
    def wrap(exs):
        return exs if prefix is None else prefixed_examples(task, prefix, exs)

    with torch.no_grad():
        test = wrap(task.ex["test"])
        res = {"test_loss": mean_loss(model, test, device), "valid_loss": mean_loss(model, wrap(task.ex["valid"]), device)}
        if task.has_choices:
            res["test_accuracy"] = accuracy(model, test, device)
    return res


# ---- optimizers ----

class Reset:
    """θ0 kept on the device, put back before every run."""

    def __init__(self, model):
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def __call__(self):
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(self.state[k])


def mezo(model, task: Task, device, seed: int, steps: int, batch: int, lr: float, eps: float = MEZO_EPS) -> list[float]:
    """ZO-SGD over every parameter (MeZO, Malladi et al. 2023): z regenerated from its seed
    instead of stored, θ+εz, θ−εz, then θ back and the step in one pass."""
    params = [p for p in model.parameters()]
    train = task.ex["train"]

    def perturb(z_seed: int, scale: float):
        g = torch.Generator(device=device)
        g.manual_seed(z_seed)
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, device=device, dtype=p.dtype), alpha=scale)

    losses = []
    with torch.no_grad():
        for step in range(steps):
            examples = [train[int(i)] for i in batch_indices(seed, step, len(train), batch)]
            z_seed = (seed * 1_000_003 + step) & 0x7FFFFFFF
            perturb(z_seed, eps)
            lp = float(batch_loss(model, examples, device))
            perturb(z_seed, -2 * eps)
            lm = float(batch_loss(model, examples, device))
            g = (lp - lm) / (2 * eps)
            if not math.isfinite(g):
                raise FloatingPointError(f"non-finite loss at step {step}")
            perturb(z_seed, eps - lr * g)
            losses.append((lp + lm) / 2)
    return losses


def adam(model, task: Task, device, seed: int, steps: int, batch: int, lr: float) -> list[float]:
    """First-order fine-tuning of every parameter with Adam: the upper reference."""
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    train = task.ex["train"]
    losses = []
    try:
        for step in range(steps):
            examples = [train[int(i)] for i in batch_indices(seed, step, len(train), batch)]
            loss = batch_loss(model, examples, device)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in params:
            p.requires_grad_(False)
        del opt
    return losses


def search_lr(run, reset: Reset, model, task: Task, device, seed: int, batch: int, grid,
              probe_steps: int = PROBE_STEPS) -> tuple[float, dict]:
    """`edge-zo tune --lr auto`'s rule: `probe_steps` steps per value from θ0; lowest probe loss wins."""
    train = task.ex["train"]
    probe = [train[int(i)] for i in batch_indices(seed, 10**6, len(train), max(batch, 16))]
    losses = {}
    for lr in grid:
        reset()
        try:
            run(model, task, device, seed, probe_steps, batch, lr)
            with torch.no_grad():
                losses[lr] = mean_loss(model, probe, device)
        except FloatingPointError:
            losses[lr] = float("inf")
        if not math.isfinite(losses[lr]):
            losses[lr] = float("inf")
    reset()
    best = min(losses, key=lambda k: losses[k])
    return best, {str(k): v for k, v in losses.items()}


# ---- main ----

def load_model(path: str, device):
    from converters.torch_model import load_gguf

    model, _, _ = load_gguf(path)
    model.eval().requires_grad_(False)
    return model.to(device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("task", type=Path, help="folder with train/valid/test.jsonl")
    ap.add_argument("--methods", nargs="+", default=["zero-shot", "icl", "mezo-full", "adam"],
                    choices=["zero-shot", "icl", "mezo-full", "adam"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="steps per learning rate of the search")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True, help="JSON lines are appended here")
    ap.add_argument("--tag", default="", help="copied into every line (e.g. the model's name)")
    args = ap.parse_args(argv)

    torch.backends.cuda.matmul.allow_tf32 = False   # float32 means float32: ε-sized differences matter
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    t0 = time.perf_counter()
    task = Task(args.model, args.task, args.max_tokens)
    model = load_model(args.model, device)
    reset = Reset(model)
    log(f"{args.model} on {device}, task {args.task.name}: {time.perf_counter() - t0:.0f} s to load")

    def emit(method: str, seed: int, res: dict, **extra):
        line = {"tag": args.tag, "task": args.task.name, "method": method, "seed": seed, **res, **extra}
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        log(json.dumps(line))

    for method in args.methods:
        if method == "zero-shot":   # deterministic: one line serves every seed
            emit(method, -1, evaluate(model, task, device))
            continue
        for seed in args.seeds:
            t = time.perf_counter()
            if method == "icl":
                emit(method, seed, evaluate(model, task, device, prefix=task.icl_prefix(seed)))
                continue
            run, grid = (mezo, MEZO_GRID) if method == "mezo-full" else (adam, ADAM_GRID)
            lr, probe = search_lr(run, reset, model, task, device, seed, args.batch_size, grid, args.probe_steps)
            losses = run(model, task, device, seed, args.steps, args.batch_size, lr)
            res = evaluate(model, task, device)
            reset()
            emit(method, seed, res, lr=lr, lr_search=probe, steps=args.steps, batch_size=args.batch_size,
                 train_loss_first=float(np.mean(losses[:10])), train_loss_last=float(np.mean(losses[-10:])),
                 wall_s=round(time.perf_counter() - t, 1))


# ---- the wall-clock arms of bench.time_to_quality ----
#
# Each arm (MezoSparse, MezoFull, LoraAdam: step, snapshot, restore) trains until a deadline in
# train_until, validating as `edge-zo tune` does (at step 0 after the learning-rate search, every
# `eval_every` steps, and once more when the time is spent), keeps the state of the best
# validation loss, and is tested on it. The loss is the product's objective (edge_zo.objective:
# `choices`, the cross-entropy over a row's choices, by default for rows with choices; `nll`
# selectable), scored as edge_zo.runtime scores it (rows whose choices are one token after the
# same prompt from one forward of the prompt).

BUDGET_GRIDS = {
    "mezo-sparse": None,                  # what `edge-zo tune --optimizer sgd --lr auto` searches (lr_search.LR_GRID)
    "mezo-full": (1e-6, 1e-5, 1e-4),      # around what compare_methods' 7-value grid picked (3e-7 ... 3e-5)
    "lora-adam": (1e-4, 3e-4, 1e-3),      # the usual LoRA-with-Adam range
}
LORA_RANK, LORA_ALPHA = 8, 16
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EVAL_CHUNK = 8    # rows per no-grad forward when validating and testing


def budget_grid(method: str) -> tuple[float, ...]:
    from edge_zo.lr_search import LR_GRID

    return BUDGET_GRIDS[method] or LR_GRID


def load_with_sidecar(model_path: str, sidecar_path: str | None, device):
    """(model, sparse coordinates, sidecar) for MODEL as `edge-zo tune` and `eval` see it: the GGUF
    dequantized to float32 plus the sidecar's values added at its coordinates (`convert --split zero`
    zeroes them in model.gguf and keeps the base values in the sidecar). The coordinates are
    `sparse_coordinates` of the sidecar, in its value order."""
    from converters.torch_model import load_gguf
    from edge_zo.adapter import SparseAdapter
    from edge_zo.model_info import ModelInfo

    model, names, layout = load_gguf(model_path)
    model.eval().requires_grad_(False)
    model = model.to(device)
    if sidecar_path is None:
        return model, None, None
    sidecar = SparseAdapter.load(sidecar_path)
    sidecar.check_against(ModelInfo.open(model_path), str(sidecar_path))
    coords = sparse_coordinates(model, names, layout, sidecar, device)
    with torch.no_grad():
        for i, (flat, idx) in enumerate(coords):
            flat.index_add_(0, idx, torch.from_numpy(sidecar.weight_values(i)).to(device))
    return model, coords, sidecar


def sparse_coordinates(model, names: dict, layout, adapter, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per weight of `adapter`: (the torch parameter's flat view, the adapter's GGUF flat indices in
    that parameter's layout). GGUF attn_q/attn_k rows are permuted against transformers'; the row
    map is converters.hf_names.Layout's, as bench.torch_reference uses it."""
    from converters.fisher import target_parameters

    params = target_parameters(model, names, list(adapter.names))
    out = []
    for name, idx in zip(adapter.names, adapter.indices):
        p = params[name]
        if p.dim() != 2:
            raise ValueError(f"{name}: only 2-D weights take sparse values here, got shape {tuple(p.shape)}")
        n_rows, n_in = p.shape
        hf_of_gguf = layout.to_gguf(name, np.arange(n_rows))     # GGUF row i holds torch row hf_of_gguf[i]
        hf_idx = hf_of_gguf[idx // n_in] * n_in + idx % n_in
        out.append((p.data.view(-1), torch.from_numpy(hf_idx.astype(np.int64)).to(device)))
    return out


def prefixed_examples(task: Task, prefix: np.ndarray, examples: list[Example]) -> list[Example]:
    """`examples` after an in-context prefix, their choices too (same answers, same targets)."""
    out = []
    for e in examples:
        p = task.prefixed(prefix, e)
        p.choices = [task.prefixed(prefix, c) for c in e.choices] if e.choices else e.choices
        p.answer = e.answer
        out.append(p)
    return out


def target_logits(model, examples: list[Example], device):
    """(float32 logits predicting every target token [N, V], its token [N], its example [N]), from one
    right-padded forward that computes logits only where a target is predicted."""
    ids, tgt = padded(examples, device)
    rows, pos = tgt[:, 1:].nonzero(as_tuple=True)          # position p predicts token p + 1
    keep = torch.unique(pos)
    logits = model(input_ids=ids, logits_to_keep=keep).logits
    return logits[rows, torch.searchsorted(keep, pos)].float(), ids[rows, pos + 1], rows


def choice_scores(model, examples: list[Example], device) -> list[torch.Tensor]:
    """Per example, the mean log-likelihood per token of each choice: Runtime.choice_scores in torch
    (with a graph when grad is on)."""
    from edge_zo.runtime import single_token_choices   # the product's rule for the one-forward case

    out: list[torch.Tensor | None] = [None] * len(examples)
    single = [i for i, e in enumerate(examples) if single_token_choices(e)]
    if single:
        logits, _, _ = target_logits(model, [examples[i].choices[0] for i in single], device)   # one target each
        logp = torch.log_softmax(logits, dim=-1)
        for k, i in enumerate(single):
            cands = torch.tensor([int(c.tokens[-1]) for c in examples[i].choices], device=device)
            out[i] = logp[k, cands]
    rest = [i for i in range(len(examples)) if out[i] is None]
    if rest:
        flat = [c for i in rest for c in examples[i].choices]
        logits, labels, rows = target_logits(model, flat, device)
        nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        summed = torch.zeros(len(flat), device=device).index_add(0, rows, nll)
        per_token = -summed / torch.bincount(rows, minlength=len(flat)).clamp(min=1)
        k = 0
        for i in rest:
            n = len(examples[i].choices)
            out[i], k = per_token[k: k + n], k + n
    return out


def objective_loss(model, examples: list[Example], device, objective) -> torch.Tensor:
    """The mean of `objective` (edge_zo.objective.Objective) over the examples: the choices'
    cross-entropy per row, or the summed NLL of the completions' tokens / their number."""
    from edge_zo.objective import Objective

    if objective is Objective.CHOICES:
        scores = choice_scores(model, examples, device)
        return torch.stack([torch.logsumexp(s, 0) - s[e.answer] for s, e in zip(scores, examples)]).mean()
    logits, labels, _ = target_logits(model, examples, device)
    return torch.nn.functional.cross_entropy(logits, labels)


def mean_nll(model, examples: list[Example], device) -> float:
    """Mean NLL per target token (what `edge-zo eval` reports as loss), without a graph."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), EVAL_CHUNK):
            logits, labels, _ = target_logits(model, examples[i: i + EVAL_CHUNK], device)
            nll += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    return nll / max(count, 1)


def scored(model, examples: list[Example], device, objective, split: str, nll: bool = False) -> dict:
    """SPLIT_loss (the objective) and SPLIT_accuracy where every row has choices, from the same
    forwards as edge_zo.objective.validation; with `nll` (or where the loss is the NLL) also
    SPLIT_nll, the mean NLL per target token that `edge-zo eval` reports as loss."""
    from edge_zo.objective import Objective
    from edge_zo.runtime import choice_correct, choice_cross_entropy

    out = {}
    if examples and all(e.choices for e in examples):
        with torch.no_grad():
            scores = [s.double().cpu().numpy() for i in range(0, len(examples), EVAL_CHUNK)
                      for s in choice_scores(model, examples[i: i + EVAL_CHUNK], device)]
        out[f"{split}_accuracy"] = float(np.mean(choice_correct(scores, examples)))
        if objective is Objective.CHOICES:
            out[f"{split}_loss"] = float(np.mean(choice_cross_entropy(scores, examples)))
    if nll or f"{split}_loss" not in out:
        out[f"{split}_nll"] = mean_nll(model, examples, device)
        out.setdefault(f"{split}_loss", out[f"{split}_nll"])
    return out


class MezoSparse:
    """MeZO's ZO-SGD on the sidecar's coordinates only: the values live as deltas `d` on top of
    the loaded weights there, z is edge-zo's own direction for (seed, step) (edge_zo.spsa), and every
    evaluation writes base + d (+ εz) into the weights, so nothing drifts."""

    def __init__(self, model, coords, device, objective, seed: int, eps: float = MEZO_EPS):
        self.model, self.coords, self.device, self.objective = model, coords, device, objective
        self.seed, self.eps = seed, eps
        self.base = [flat[idx].clone() for flat, idx in coords]
        self.sizes = [len(idx) for _, idx in coords]
        self.d = torch.zeros(sum(self.sizes), device=device)

    def _write(self, values: torch.Tensor) -> None:
        for (flat, idx), base, part in zip(self.coords, self.base, torch.split(values, self.sizes)):
            flat.index_copy_(0, idx, base + part)

    def step(self, examples, step: int, lr: float) -> float:
        from edge_zo import spsa

        z = torch.from_numpy(spsa.direction(self.seed, step, len(self.d))).to(self.device)
        with torch.no_grad():
            self._write(self.d + self.eps * z)
            lp = float(objective_loss(self.model, examples, self.device, self.objective))
            self._write(self.d - self.eps * z)
            lm = float(objective_loss(self.model, examples, self.device, self.objective))
            g = (lp - lm) / (2 * self.eps)
            if not math.isfinite(g):
                self._write(self.d)
                raise FloatingPointError(f"non-finite loss at step {step}")
            self.d -= lr * g * z
            self._write(self.d)
        return (lp + lm) / 2

    def snapshot(self, into=None):
        if into is None:
            return self.d.clone()
        into.copy_(self.d)
        return into

    def restore(self, snap) -> None:
        self.d.copy_(snap)
        with torch.no_grad():
            self._write(self.d)

    @property
    def n_params(self) -> int:
        return len(self.d)


class MezoFull:
    """ZO-SGD over every parameter (MeZO): z regenerated from (seed, step) instead of stored. Keeping
    the best validated state costs one copy of the weights (MeZO's own trainer checkpoints to disk)."""

    def __init__(self, model, device, objective, seed: int, eps: float = MEZO_EPS):
        self.model, self.device, self.objective, self.seed, self.eps = model, device, objective, seed, eps
        self.params = list(model.parameters())

    def _perturb(self, z_seed: int, scale: float) -> None:
        g = torch.Generator(device=self.device)
        g.manual_seed(z_seed)
        for p in self.params:
            p.add_(torch.randn(p.shape, generator=g, device=self.device, dtype=p.dtype), alpha=scale)

    def step(self, examples, step: int, lr: float) -> float:
        z_seed = (self.seed * 1_000_003 + step) & 0x7FFFFFFF
        with torch.no_grad():
            self._perturb(z_seed, self.eps)
            lp = float(objective_loss(self.model, examples, self.device, self.objective))
            self._perturb(z_seed, -2 * self.eps)
            lm = float(objective_loss(self.model, examples, self.device, self.objective))
            g = (lp - lm) / (2 * self.eps)
            if not math.isfinite(g):
                self._perturb(z_seed, self.eps)
                raise FloatingPointError(f"non-finite loss at step {step}")
            self._perturb(z_seed, self.eps - lr * g)
        return (lp + lm) / 2

    def snapshot(self, into=None):
        if into is None:
            return [p.detach().clone() for p in self.params]
        for b, p in zip(into, self.params):
            b.copy_(p)
        return into

    def restore(self, snap) -> None:
        with torch.no_grad():
            for p, b in zip(self.params, snap):
                p.copy_(b)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


class LoraAdam:
    """First-order LoRA with Adam, in plain torch: y = Wx + (alpha/r)·B(Ax) on every Linear named in
    LORA_TARGETS (forward hooks; the base weights stay frozen). A starts as nn.Linear's default
    (uniform ±1/sqrt(fan_in), from `seed`), B at zero, so training starts from the loaded model."""

    def __init__(self, model, device, objective, seed: int, rank: int = LORA_RANK, alpha: float = LORA_ALPHA,
                 targets: tuple[str, ...] = LORA_TARGETS):
        self.model, self.device, self.objective = model, device, objective
        self.scale = alpha / rank
        gen = torch.Generator().manual_seed(seed)
        self.pairs, self.hooks = [], []
        for name, mod in model.named_modules():
            if name.rpartition(".")[2] in targets and isinstance(mod, torch.nn.Linear):
                bound = 1 / math.sqrt(mod.in_features)
                a = ((torch.rand(rank, mod.in_features, generator=gen) * 2 - 1) * bound).to(device).requires_grad_()
                b = torch.zeros(mod.out_features, rank, device=device, requires_grad=True)
                self.pairs.append((a, b))
                self.hooks.append(mod.register_forward_hook(self._hook(a, b)))
        if not self.pairs:
            raise ValueError(f"no Linear module named one of {targets} in {type(model).__name__}")
        self.opt = None

    def _hook(self, a, b):
        def add_lora(mod, inputs, out):
            return out + self.scale * torch.nn.functional.linear(torch.nn.functional.linear(inputs[0], a), b)
        return add_lora

    def step(self, examples, step: int, lr: float) -> float:
        if self.opt is None:
            self.opt = torch.optim.Adam([t for pair in self.pairs for t in pair], lr=lr)
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss = objective_loss(self.model, examples, self.device, self.objective)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def snapshot(self, into=None):
        if into is None:
            return [t.detach().clone() for pair in self.pairs for t in pair]
        for dst, src in zip(into, (t for pair in self.pairs for t in pair)):
            dst.copy_(src)
        return into

    def restore(self, snap) -> None:
        """Put the adapter back to `snap`; Adam starts over (its moments belong to the discarded path)."""
        with torch.no_grad():
            for t, s in zip((t for pair in self.pairs for t in pair), snap):
                t.copy_(s)
        self.opt = None

    @property
    def n_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.pairs)


def train_until(method, train: list[Example], valid: list[Example], device, objective, *, seed: int, batch: int,
                grid: tuple[float, ...], probe_steps: int, eval_every: int, deadline: float, clock) -> dict:
    """Search the learning rate (`probe_steps` from the start per grid value, lowest objective on a fixed
    16-row probe batch wins, as search_lr), then train until `deadline` (time.perf_counter()),
    validating at step 0, every `eval_every` steps and when the time is spent; a probe the deadline
    cuts short does not count; a grid of one rate is not searched. Leaves `method` at the state of the
    lowest validation loss."""
    probe = [train[int(i)] for i in batch_indices(seed, 10**6, len(train), max(batch, 16))]
    anchor = method.snapshot()
    searched = {}
    for lr in grid if len(grid) > 1 else ():
        if time.perf_counter() >= deadline:
            break
        method.restore(anchor)
        try:
            for step in range(probe_steps):
                if time.perf_counter() >= deadline:
                    raise TimeoutError
                method.step([train[int(i)] for i in batch_indices(seed, step, len(train), batch)], step, lr)
            with torch.no_grad():
                searched[lr] = float(objective_loss(method.model, probe, device, objective))
        except FloatingPointError:
            searched[lr] = float("inf")
        except TimeoutError:
            continue
        if not math.isfinite(searched[lr]):
            searched[lr] = float("inf")
    method.restore(anchor)
    lr = grid[0] if len(grid) == 1 else min(searched, key=lambda k: searched[k]) if searched else None
    log(f"lr search {searched} -> {lr} at {clock():.1f} s")

    curve, best, step, diverged = [], {"valid_loss": float("inf"), "step": 0}, 0, None

    def check():
        nonlocal best
        v = {"step": step, **scored(method.model, valid, device, objective, "valid"), "elapsed_s": round(clock(), 3)}
        curve.append(v)
        log(json.dumps(v))
        if v["valid_loss"] < best["valid_loss"]:   # NaN never wins
            best = v
            method.snapshot(into=anchor)    # the probes' start point is not needed any more

    check()
    while lr is not None and time.perf_counter() < deadline:
        try:
            method.step([train[int(i)] for i in batch_indices(seed, step, len(train), batch)], step, lr)
        except FloatingPointError as exc:
            diverged = str(exc)
            break
        step += 1
        if step % eval_every == 0:
            check()
    if diverged is None and curve[-1]["step"] != step:
        check()
    method.restore(anchor)
    return {"lr": lr, "lr_search": {str(k): v for k, v in searched.items()}, "steps": step, "best_step": best["step"],
            "diverged": diverged, "curve": curve}


if __name__ == "__main__":
    main()
