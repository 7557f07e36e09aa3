"""One source of tune settings: --help shows the dataclass defaults that run.json records,
every long option is a YAML key, and the shipped example config is the defaults."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest

from edge_zo.cli import main as cli
from edge_zo.commands.tune import build_parser
from edge_zo.errors import InvalidInputError
from edge_zo.tune_settings import FIELDS, RESULT_FIELDS, TuneSettings, example_yaml, option, parse_duration, resolve

from .test_tune import toy  # noqa: F401  (the tiny model, data and sidecar fixture)

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "tune.example.yaml"


def _help_defaults() -> dict[str, str]:
    """option dest -> the "(default: X)" its --help text shows."""
    found = {}
    for action in build_parser()._actions:
        m = re.search(r"\(default: ([^)]*)\)$", action.help or "")
        if m:
            found[action.dest] = m.group(1)
    return found


def test_help_defaults_are_what_run_json_records(toy, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    given = {"steps": "3", "lr": "1e-2", "eps": "1e-2", "eval_every": "3"}
    argv = ["tune", str(toy["model"]), str(toy["data"]), "--sidecar", str(toy["sidecar"]), "-o", str(out), "--quiet"]
    for k, v in given.items():
        argv += [option(k), v]
    assert cli(argv) == 0
    recorded = json.loads((out / "run.json").read_text())["settings"]
    helped = _help_defaults()
    checked = 0
    for name in RESULT_FIELDS:
        if name in given or FIELDS[name].default is None or isinstance(FIELDS[name].default, bool):
            assert recorded[name] == FIELDS[name].default or name in given, name   # flags: off by default
            continue
        assert name in helped, f"--help does not show the default of {option(name)}"
        assert helped[name] == str(recorded[name]), (name, helped[name], recorded[name])
        assert recorded[name] == FIELDS[name].default
        checked += 1
    assert checked >= 10


def test_every_long_option_is_a_yaml_key_with_the_same_meaning():
    parser = build_parser()
    samples = {"steps": 7, "batch_size": 3, "lr": 0.5, "eps": 0.01, "optimizer": "sign", "schedule": "cosine",
               "time": "2m", "objective": "nll", "max_tokens": 77, "chat": True, "threads": 1, "density": 0.01,
               "patience": 2, "valid_fraction": 0.2, "dist_timeout": 9.0, "quiet": True}
    for f in dataclasses.fields(TuneSettings):
        value = samples.get(f.name, f"x-{f.name}" if "str" in str(f.type) and "float" not in str(f.type)
                            else True if f.default is False else 5)
        args = parser.parse_args([])
        from_yaml = resolve(args, {f.name: value})
        flag = [option(f.name)] if value is True else \
            ["-o", str(value)] if f.name == "output" else [option(f.name), str(value)]
        if f.metadata.get("positional"):   # MODEL DATA
            flag = [str(value), "d.jsonl"] if f.name == "model" else ["m.gguf", str(value)]
        from_flag = resolve(parser.parse_args(flag))
        assert getattr(from_yaml, f.name) == getattr(from_flag, f.name) != f.default, f.name


def test_yaml_errors_name_the_file_and_the_option(tmp_path):
    args = build_parser().parse_args([])
    for cfg, words in [({"steps": "abc"}, "--steps must be a whole number, got 'abc'"),
                       ({"optimizer": "rmsprop"}, "--optimizer must be one of sgd"),
                       ({"lr": float("nan")}, "--lr must be a number or 'auto'"),
                       ({"eps": "inf"}, "--eps must be a number or 'auto'"),
                       ({"learning_rate": 1}, "unknown settings ['learning_rate']")]:
        with pytest.raises(InvalidInputError) as exc:
            resolve(args, cfg, config_name="tune.yaml")
        assert str(exc.value).startswith("tune.yaml: ") and words in str(exc.value), str(exc.value)


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("10m") == 600 and parse_duration("1.5h") == 5400
    assert parse_duration(30) == 30
    for bad in ("-1m", "soon", "0"):
        with pytest.raises(InvalidInputError, match="--time must be a positive duration"):
            parse_duration(bad)


def test_example_config_is_the_defaults_and_loads():
    assert EXAMPLE.read_text() == example_yaml(), "regenerate: python -m edge_zo.tune_settings > docs/tune.example.yaml"
    import yaml

    cfg = yaml.safe_load(EXAMPLE.read_text())
    assert set(cfg) == set(FIELDS)
    assert resolve(argparse.Namespace(), cfg) == TuneSettings()
