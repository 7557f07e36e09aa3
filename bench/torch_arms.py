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
        if prefix is None:
            return exs
        out = []
        for e in exs:
            p = task.prefixed(prefix, e)
            p.choices = [task.prefixed(prefix, c) for c in e.choices] if e.choices else e.choices
            p.answer = e.answer
            out.append(p)
        return out

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


if __name__ == "__main__":
    main()
