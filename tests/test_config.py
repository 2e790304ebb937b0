"""The configuration as the single source of truth: every field has a flag and a help text,
the parser and the checks agree, and the lists derived from the metadata agree with it."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from tprop.cli import build_parser
from tprop.config import (
    DEFAULTS,
    META,
    NOT_IDENTITY,
    RESUMABLE,
    ConfigError,
    TrainConfig,
    applies,
    check_value,
    field_of,
    flag_of,
    make_config,
    parse_value,
    view,
)
from tprop.constraints import StateTerms
from tprop.solvers import SolverSettings


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


def test_every_field_has_a_flag_and_a_help_text() -> None:
    actions = {a.dest: a for a in train_parser()._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in META, f.name
        meta = META[f.name]
        assert meta.help and len(meta.help) > 3, f.name
        assert f.name in actions, f"--{f.name} has no flag"
        action = actions[f.name]
        assert flag_of(f.name) in action.option_strings
        assert meta.help in action.help.replace("%%", "%")
        for alias in meta.aliases:
            assert alias in action.option_strings
        if meta.kind == "choice":
            assert tuple(action.choices) == meta.choices


def test_flags_name_their_fields() -> None:
    for name, meta in META.items():
        assert field_of(flag_of(name)) == name
        for alias in meta.aliases:
            assert field_of(alias) == name
    assert field_of("lambda") == "lam" and field_of("block-size") == "block_size"
    assert field_of("--no-such-flag") is None


@pytest.mark.parametrize("name", [n for n, m in META.items() if m.kind in ("int", "float")])
def test_parser_and_validate_accept_the_same_numbers(name: str) -> None:
    """For each numeric field: values just inside and outside its bounds are accepted or
    refused alike by the flag parser and by TrainConfig.validate."""
    meta = META[name]
    probes = [0, 1, -1, 0.5, 2, 1e400, math.nan]
    if meta.lo is not None:
        probes += [meta.lo, meta.lo + 1]
    if meta.hi is not None:
        probes += [meta.hi, meta.hi - 0.5]
    for v in probes:
        if meta.kind == "int" and not (isinstance(v, int) or float(v).is_integer()):
            continue
        value = int(v) if meta.kind == "int" and math.isfinite(v) else v
        text = repr(value) if not isinstance(value, float) or math.isfinite(value) else str(v)
        try:
            parsed = parse_value(meta, text)
            parsed_ok = True
        except ValueError:
            parsed_ok = False
        valid = check_value(meta, value) is None
        assert parsed_ok == valid, (name, text)
        if valid:
            assert parsed == value
            kw = {name: value}
            if name == "l1_weight" and value != 0:
                kw["state_constraint"] = "l1"
            if name in ("emsize", "nhid"):
                kw.update(emsize=value, nhid=value)
            make_config(dataset="ptb", **kw)
        else:
            with pytest.raises(ConfigError, match=flag_of(name)):
                make_config(dataset="ptb", **{name: value})


def test_defaults_are_valid_and_reported() -> None:
    cfg = TrainConfig()
    cfg.validate()
    assert cfg.to_dict() == DEFAULTS


def test_resume_help_lists_exactly_the_resumable_fields() -> None:
    action = next(a for a in train_parser()._actions if a.dest == "resume")
    listed = {w.strip(",;()") for w in action.help.split() if w.startswith("--")}
    listed.discard("--nproc")
    assert listed == {flag_of(k) for k in RESUMABLE}
    assert set(RESUMABLE) <= set(NOT_IDENTITY)  # what may change on resume is not identity


def test_views_hold_their_fields_with_the_configs_defaults() -> None:
    s = SolverSettings()
    for name in view("solver"):
        assert getattr(s, name) == DEFAULTS[name]
    assert {f.name for f in dataclasses.fields(SolverSettings)} == set(view("solver"))
    assert {f.name for f in dataclasses.fields(StateTerms)} == set(view("terms"))
    cfg = make_config(dataset="ptb", h_steps=3, lam=0.25)
    assert SolverSettings.from_config(cfg).h_steps == 3
    assert SolverSettings.from_config(cfg).lam == 0.25


def test_method_metadata() -> None:
    assert applies("h_steps", "pm") and not applies("h_steps", "bptt")
    assert applies("batch_size", "bptt") and not applies("batch_size", "pm")
    assert applies("lr", "alm") and applies("lr", "bptt")
    for name, meta in META.items():
        if meta.methods is not None:
            assert set(meta.methods) <= {"bptt", "pm", "admm", "alm"}, name
