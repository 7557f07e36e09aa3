"""Every setting of `edge-zo tune`, with its default, in one place.

`TuneSettings` is the single source: `edge-zo tune --help` is generated from it, a `--config`
YAML file takes its field names as keys (the long options with `_` for `-`), and `run.json`
records the resolved object. The order is command line over YAML over these defaults
(argparse defaults are None, so "unset" is visible). `tune.example.yaml` shows every key.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import distributed
from .eps_probe import FALLBACK_EPS
from .errors import InvalidInputError
from .lr_search import SEARCH_SHARE
from .objective import AUTO, Objective
from .spsa import Optimizer, Schedule
from .trainer import LoopConfig

INPUT, OPTIM, DATA, RUNTIME, WORKERS = "inputs", "optimization", "data", "runtime", \
    "several workers (launch with torchrun; see docs/distributed.md)"


def _opt(default, help: str, group: str = OPTIM, **cli):
    return field(default=default, metadata={"help": help, "group": group, **cli})


@dataclass(frozen=True)
class TuneSettings:
    # ---- inputs (positional MODEL and DATA on the command line) ----
    model: str | None = _opt(None, "GGUF model (default: the demo, SmolLM2-135M-Instruct)", INPUT, positional=True)
    data: str | None = _opt(None, "training JSONL: prompt/completion, messages or text rows", INPUT, positional=True)
    output: str | None = _opt(None, "run folder (default: runs/<data name>)", INPUT, flags=("-o", "--output"))
    valid: str | None = _opt(None, "validation JSONL (default: a held-out split of the training data, fixed by --seed)",
                             INPUT)
    sidecar: str | None = _opt(None, "sparse sidecar naming the tunable coordinates (default: beside the model, else "
                               "a mask built once and cached, docs/mask.md)", INPUT)
    mask_from_data: bool = _opt(False, "no sidecar: pick the top-density Fisher coordinates on the training data "
                                "(needs torch)", INPUT)
    density: float = _opt(1e-3, "share of block weights to tune with --mask-from-data or the automatic mask", INPUT)
    # ---- optimization ----
    objective: str = _opt(AUTO, "what a step minimizes: 'choices' (cross-entropy over each row's choices), 'nll' "
                          "(NLL of the completion over the whole vocabulary) or 'auto': choices when every "
                          "training row has them (docs/objective.md)",
                          choices=(AUTO, *(o.value for o in Objective)))
    steps: int = _opt(200, "SPSA steps (the most; --time and early stopping may end the run sooner; with --time "
                      "and no --steps, the budget alone ends the run)")
    time: str | None = _opt(None, "wall-clock budget, probes and validation included: 90s, 10m, 1h or seconds; the "
                            "run validates and stops when it is spent")
    patience: int = _opt(0, "stop after this many validations without a new best validation loss (0: never)")
    batch_size: int = _opt(8, "examples per step")
    lr: float | str = _opt(1e-3, "learning rate, or 'auto': 20-step probes over the optimizer's grid from the start, "
                           "then one grid step below the best (docs/tune.md). With adam (the default) it is about "
                           "how far each tuned weight moves per step")
    eps: float | str = _opt(AUTO, "perturbation size ε, or 'auto': about 100 forwards on the first batches find "
                            "where this model, backend and data give loss differences that scale with ε "
                            f"(docs/fidelity.md); under --time it gets a {SEARCH_SHARE:g} share of the budget, and "
                            f"the run tunes at {FALLBACK_EPS:g} unprobed where its smallest probe would take longer; "
                            "a number skips the probe")
    optimizer: str = _opt(Optimizer.ADAM.value, "the update rule: adam (ZO-Adam: moments of the estimates, per "
                          "tuned weight), sgd (MeZO's ZO-SGD), momentum or sign (docs/objective.md)",
                          choices=tuple(o.value for o in Optimizer))
    schedule: str = _opt(Schedule.CONSTANT.value, "learning-rate schedule over --steps",
                         choices=tuple(s.value for s in Schedule))
    warmup: int = _opt(0, "linear warm-up steps")
    directions: int = _opt(1, "random directions averaged per step")
    seed: int = _opt(0, "seed of directions, batches and the validation split")
    eval_every: int = _opt(25, "validate every N steps")
    save_every: int = _opt(25, "checkpoint every N steps")
    # ---- data ----
    max_tokens: int = _opt(256, "tokens per sequence; a longer row loses the start of its prompt", DATA)
    chat: bool = _opt(False, "wrap prompt/completion rows in the model's chat template", DATA)
    valid_fraction: float = _opt(0.1, "share of the training rows held out for validation when there is no "
                                 "--valid", DATA)
    valid_max: int = _opt(64, "at most this many held-out validation rows", DATA)
    # ---- runtime ----
    threads: int = _opt(0, "CPU threads (0: every core)", RUNTIME)
    gpu_layers: int = _opt(0, "layers to offload to a GPU backend", RUNTIME)
    kv_f32: bool = _opt(False, "keep the KV cache in F32 instead of F16 (and turn flash attention off)", RUNTIME)
    one_decode: bool = _opt(False, "evaluate a step's value sets (θ+εz and θ−εz of each direction) together in one "
                            "llama_decode, each on its own copy of the batch, instead of one decode each. On an "
                            "H100 it made SmolLM2's steps 1.4-2.3x faster and a 7B model's no faster; on a 2-core "
                            "CPU no faster (docs/runtime.md)", RUNTIME)
    verbose: bool = _opt(False, "show llama.cpp's log", RUNTIME)
    quiet: bool = _opt(False, "no progress bar", RUNTIME)
    # ---- several workers ----
    shard_data: bool = _opt(False, "worker r draws its batches from its own shard (every W-th training row from r) "
                            "instead of every worker using the same batch; the deltas then depend on the number "
                            "of workers", WORKERS)
    dist_timeout: float = _opt(distributed.DEFAULT_TIMEOUT_S, "seconds a worker waits for the others (start-up, "
                               "each step, worker 0's validation) before the run stops with a resumable checkpoint",
                               WORKERS)

    # ---- derived views ----

    def loop(self) -> LoopConfig:
        """The training loop's part (lr and eps must be resolved to numbers first)."""
        return LoopConfig(steps=self.steps, batch_size=self.batch_size, eps=self.eps, lr=self.lr,
                          optimizer=Optimizer(self.optimizer), schedule=Schedule(self.schedule), warmup=self.warmup,
                          directions=self.directions, seed=self.seed, eval_every=self.eval_every,
                          save_every=self.save_every)

    def result_settings(self, data_shards: int = 1) -> dict:
        """What determines the tuned deltas: recorded in run.json, compared on --resume."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in RESULT_FIELDS}
        if data_shards > 1:
            d["data_shards"] = data_shards   # absent: runs of any size agree
        return d

    def grouped(self) -> bool:
        """Whether a step's value sets are evaluated in one decode (--one-decode)."""
        return self.one_decode

    def step_groups(self, workers: int = 1) -> int:
        """Value sets one worker evaluates per step in one decode: θ±εz of each of its directions."""
        return 2 * -(-self.directions // workers) if self.grouped() else 1

    def time_seconds(self) -> float | None:
        return None if self.time is None else parse_duration(self.time)


# --steps when --time is given without it: the budget ends the run, not a step count.
STEPS_UNDER_TIME = 1_000_000
# Settings that change the deltas (the others name files, or change speed and display only).
RESULT_FIELDS = ("objective", "steps", "batch_size", "lr", "eps", "optimizer", "schedule", "warmup", "directions",
                 "seed", "eval_every", "save_every", "patience", "max_tokens", "chat", "valid_fraction", "valid_max",
                 "density", "one_decode")
# What runs recorded before a setting existed behaved as.
UNRECORDED = {"one_decode": False, "value_sets": "separate"}
# Settings a --resume may change without changing what the run computes (more steps extend it).
RESUMABLE = ("steps", "time", "save_every")   # eval_every and patience pick the best step: not these
FIELDS = {f.name: f for f in dataclasses.fields(TuneSettings)}
_INT, _FLOAT = {"steps", "patience", "batch_size", "warmup", "directions", "seed", "eval_every", "save_every",
                "max_tokens", "valid_max", "threads", "gpu_layers"}, {"density", "valid_fraction", "dist_timeout"}
_AT_LEAST_1 = ("steps", "batch_size", "directions", "eval_every", "save_every", "max_tokens", "valid_max")
_AT_LEAST_0 = ("patience", "warmup", "seed", "threads", "gpu_layers")


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One option per field, its default shown from the dataclass (argparse's own default is None)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TuneSettings):
        meta = f.metadata
        group = meta["group"]
        target = p if group == INPUT else groups.setdefault(group, p.add_argument_group(group))
        default = "" if f.default is None or isinstance(f.default, bool) else f" (default: {f.default})"
        if meta.get("positional"):
            target.add_argument(f.name, nargs="?", help=meta["help"])
        elif f.type in ("bool", bool):
            target.add_argument(*meta.get("flags", (option(f.name),)), dest=f.name, action="store_true",
                                default=None, help=meta["help"])
        else:
            target.add_argument(*meta.get("flags", (option(f.name),)), dest=f.name, default=None,
                                choices=meta.get("choices"), metavar=None if meta.get("choices") else "X",
                                help=meta["help"] + default)


def resolve(args: argparse.Namespace, config: dict | None = None, fill: dict | None = None,
            config_name: str | None = None) -> TuneSettings:
    """Command line over YAML (`config`, read from `config_name`) over `fill` (the demo's preset)
    over the defaults, each value checked and converted; an error names the option (and the
    file it came from) and what it takes."""
    config, fill = dict(config or {}), dict(fill or {})
    where = f"{config_name}: " if config_name else ""
    unknown = sorted(set(config) - set(FIELDS))
    if unknown:
        raise InvalidInputError(f"{where}unknown settings {unknown}; the keys are the long options of "
                                "`edge-zo tune --help` with _ for -")
    values = {}
    for name, f in FIELDS.items():
        v, prefix = getattr(args, name, None), ""
        if v is None and name in config:
            v, prefix = config[name], where
        elif v is None:
            v = fill.get(name)
        if v is not None:
            try:
                values[name] = _convert(name, f, v)
            except InvalidInputError as exc:
                raise InvalidInputError(prefix + str(exc)) from None
    if "time" in values and "steps" not in values:
        values["steps"] = STEPS_UNDER_TIME   # the budget decides; a schedule then spans this many
    s = TuneSettings(**values)
    for name in _AT_LEAST_1:
        if getattr(s, name) < 1:
            raise InvalidInputError(f"{option(name)} must be at least 1, got {getattr(s, name)}")
    for name in _AT_LEAST_0:
        if getattr(s, name) < 0:
            raise InvalidInputError(f"{option(name)} must be 0 or more, got {getattr(s, name)}")
    if not 0 < s.density <= 1 or not 0 < s.valid_fraction < 1:
        raise InvalidInputError("--density must lie in (0, 1] and --valid-fraction in (0, 1)")
    if not (s.dist_timeout > 0 and math.isfinite(s.dist_timeout)):
        raise InvalidInputError(f"--dist-timeout must be a positive number of seconds, got {s.dist_timeout}")
    s.time_seconds()  # checks the format
    return s


def _convert(name: str, f, v):
    try:
        if name in ("lr", "eps"):
            if v == AUTO:
                return v
            x = float(v)
            if not (math.isfinite(x) and x > 0):
                raise ValueError
            return x
        if f.type in ("bool", bool):
            if isinstance(v, bool):
                return v
            raise ValueError
        if name in _INT:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return int(v)
        if name in _FLOAT:
            x = float(v)
            if not math.isfinite(x):
                raise ValueError
            return x
        if f.metadata.get("choices") and v not in f.metadata["choices"]:
            raise ValueError
        return str(v)
    except (TypeError, ValueError):
        takes = ("a number or 'auto' (positive)" if name in ("lr", "eps") else "true or false" if f.type in ("bool", bool)
                 else "a whole number" if name in _INT else "a number" if name in _FLOAT
                 else "one of " + ", ".join(f.metadata["choices"]) if f.metadata.get("choices") else "a string")
        raise InvalidInputError(f"{option(name)} must be {takes}, got {v!r}") from None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min|h)?\s*$")


def parse_duration(text: str | float) -> float:
    """'90s', '10m', '1.5h' or a number of seconds -> seconds."""
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise InvalidInputError(f"--time must be a positive duration such as 90s, 10m or 1h, got {text!r}")
    unit = {"m": 60, "min": 60, "h": 3600}.get(m.group(2) or "s", 1)
    return float(m.group(1)) * unit


def load_config(path: str) -> dict:
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InvalidInputError(f"{path}: cannot read the config ({exc})") from exc
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"{path}: a config is a mapping of settings (key: value), got {type(cfg).__name__}")
    return cfg


def example_yaml() -> str:
    """docs/tune.example.yaml: every key with its default and what it does (a test keeps the file
    equal to this, so it cannot drift from the defaults)."""
    import textwrap

    lines = ["# Settings of `edge-zo tune`, every key at its default.",
             "#   edge-zo tune model.gguf train.jsonl --config tune.yaml",
             "# Keys are the long options with _ for -; flags given on the command line win.", ""]
    group = None
    for f in dataclasses.fields(TuneSettings):
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines += ["", f"# ---- {group} ----"]
        lines += textwrap.wrap(f.metadata["help"], 100, initial_indent="# ", subsequent_indent="# ")
        value = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        lines.append(f"{f.name}: {value}")
    return "\n".join(lines[:4] + lines[5:]) + "\n"


if __name__ == "__main__":  # python -m edge_zo.tune_settings > docs/tune.example.yaml
    print(example_yaml(), end="")
