"""The runs of a sweep spec: the grid's product crossed with the zip, each a named, validated
configuration (:class:`Point`).

Every point is one run directory under the sweep's output folder, named by the point's grid
and zip values in spec order, e.g. ``method=pm,bptt=5,h_steps=10``: readable,
filesystem-safe and deterministic.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, make_config
from .corpora import resolve_data
from .spec import Spec, SpecError, canon_key, display_key, resolve, varying_keys

__all__ = ["Point", "cpu_count", "expand", "format_value", "resolve", "run_name",
           "varying_keys"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")


@dataclass
class Point:
    """One run of a sweep: its directory name, varying parameters and full config."""

    name: str
    params: dict[str, Any]
    config: dict[str, Any]


def format_value(v: Any) -> str:
    """A value as a run name spells it (``true``, ``none``, ``0.1``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def run_name(params: dict[str, Any]) -> str:
    """The directory name of a run: ``key=value`` pairs joined by commas, filesystem-safe."""
    if not params:
        return "run"
    parts = [f"{display_key(k)}={_UNSAFE.sub('_', format_value(v))}" for k, v in params.items()]
    name = ",".join(parts)
    if len(name) > 180:
        name = name[:160] + "-" + _digest(params)
    return name


def _digest(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:8]


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _combos(grid: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(varied, fixed)`` values of every point of the grid tables' products, in order."""
    combos: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for g in grid or [{}]:
        keys = [k for k, v in g.items() if isinstance(v, list)]
        fixed = {k: v for k, v in g.items() if not isinstance(v, list)}
        combos += [(dict(zip(keys, vals)), fixed)
                   for vals in itertools.product(*(g[k] for k in keys))]
    return combos


def _zip_rows(zipt: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(zipt)
    return [dict(zip(keys, vals)) for vals in zip(*(zipt[k] for k in keys))] or [{}]


def _overrides(spec: Spec, overrides: dict[str, Any] | None, order: list[str]) -> dict[str, Any]:
    over = {}
    for key, value in (overrides or {}).items():
        k = canon_key(key, "overrides", spec.source)
        if k in order:
            raise SpecError(f"{spec.source}: cannot override {display_key(k)}: the spec varies "
                            "it")
        over[k] = value
    return over


def _validate(spec: Spec, name: str, preset: str | None, cfg: dict[str, Any]) -> None:
    try:
        make_config(**cfg)
    except ConfigError as e:
        raise SpecError(f"{spec.source}: run {name}"
                        f"{f' (preset {preset})' if preset else ''}: {e}") from None
    except TypeError as e:
        raise SpecError(f"{spec.source}: run {name}: {e}") from None


def _place(cfg: dict[str, Any], name: str, out: str | os.PathLike,
           synth: dict[str, dict[str, Any]]) -> None:
    """Point the run's ``out`` (and a ``data_dir`` naming a corpus of ``[data]``) into the
    sweep folder ``out``."""
    cfg["out"] = str(Path(out) / name)
    if cfg.get("data_dir") in synth:
        cfg["data_dir"] = str(Path(out) / "data" / cfg["data_dir"])


def expand(spec: Spec, preset: str | None = None, overrides: dict[str, Any] | None = None,
           out: str | os.PathLike | None = None, workers: int = 1, threads: int | None = None,
           validate: bool = True) -> list[Point]:
    """The runs of ``spec`` under ``preset``, in spec order, each config validated.

    ``overrides`` (config fields) apply to every run last; ``out`` is the sweep folder (each
    run's ``out`` is ``out/NAME``); ``threads`` defaults to ``max(1, cpus // workers)``. With
    ``out``, a ``data_dir`` naming a corpus of the spec's ``[data]`` becomes ``out/data/NAME``.
    """
    base, grid, zipt, _ = resolve(spec, preset)
    synth = resolve_data(spec, preset)
    order = varying_keys(grid, zipt)
    over = _overrides(spec, overrides, order)
    if threads is None:
        threads = max(1, cpu_count() // max(1, workers))
    points: list[Point] = []
    seen: dict[str, str] = {}
    names: set[str] = set()
    for combo, fixed in _combos(grid):
        for zrow in _zip_rows(zipt):
            merged = {**combo, **zrow}
            params = {k: merged[k] for k in order if k in merged}
            ident = json.dumps(params, sort_keys=True, default=str)
            if ident in seen:
                raise SpecError(f"{spec.source}: run {seen[ident]} appears twice in the grid (runs "
                                "must differ in a varied value: write a grid table's single "
                                "values that tell runs apart as one-element lists)")
            name = run_name(params)
            if name in names:  # two values that look alike once made filesystem-safe
                name = f"{name}-{_digest(params)}"
            names.add(name)
            seen[ident] = name
            cfg: dict[str, Any] = {"quiet": True, **base, **fixed, **params, **over}
            if "dataset" not in cfg and cfg.get("data_dir"):
                cfg["dataset"] = None
            cfg.setdefault("threads", threads)
            if out is not None:
                _place(cfg, name, out, synth)
            if validate:
                _validate(spec, name, preset, cfg)
            points.append(Point(name, params, cfg))
    return points
