"""Sweeps: a grid of training runs described by a TOML spec, run by worker processes.

The spec format
===============

A spec is a TOML file. Every key of ``[base]``, ``[grid]``, ``[zip]`` and of a preset is a
field of :class:`tprop.config.TrainConfig`: the name of a ``tprop train`` flag with ``-``
written ``_`` (``h_steps``; ``lambda`` and ``block_size`` are accepted for ``lam`` and
``bptt``). TOML has no null: for a field whose default is ``None`` (``train_tokens``,
``format``, ``dataset``...) the string ``"none"`` means None; when no table names a
``dataset`` but one gives a ``data_dir``, the corpus is the bare directory (dataset None).

.. code-block:: toml

    title = "Block size and h-steps"          # optional, shown by the report
    description = "What this sweep shows."     # optional, shown by the report

    [base]                 # settings shared by every run
    dataset = "ptb"
    nhid = 100
    epochs = 5

    [grid]                 # product: 2 x 3 = 6 runs
    method = ["bptt", "pm"]
    bptt = [5, 10, 20]

    [zip]                  # parallel lists (equal lengths), crossed with the grid
    h_steps = [0, 5]
    lam = [1.0, 0.1]

    [presets.smoke]        # `--preset smoke`: scalars override [base] ...
    train_tokens = 2000
    nhid = 8
    [presets.smoke.grid]   # ... and lists replace a [grid] key's values
    bptt = [5]
    [presets.smoke.zip]    # ... or a [zip] key's (all zip lists keep one length)
    h_steps = [0, 1]

    [report]               # what `tprop report` draws (see tprop.report)
    rows = ["method", "bptt"]

``grid`` may instead be an array of tables (``[[grid]]``): the runs are the union of the
products of each table, e.g. BPTT over K alone beside PM over K x h-steps. A single value
(not a list) in a grid table sets that field for the table's runs without varying it (it is
not part of the run names), e.g. ``epochs = 100`` for the batch-mode table only. In a
preset's grid, a list replaces that key's list in every table that varies it, a single value
the key's single value in every table that fixes it; an array of tables
(``[[presets.NAME.grid]]``, one per ``[[grid]]`` table, maybe empty) changes or adds keys
table by table instead. A key that every run takes from the grid or zip may not also be in
``[base]`` or be a preset's scalar (set it in the preset's grid or zip); one that only some
``[[grid]]`` tables set may: it is the value of the other tables' runs.

Runs and their directories
==========================

Every point of the grid is one run directory under the sweep's output folder, named by the
point's grid and zip values in spec order, e.g. ``method=pm,bptt=5,h_steps=10``: readable,
filesystem-safe and deterministic. The folder also holds ``spec.toml`` (a copy of the spec)
and ``sweep.json`` (the index: every run's parameters, status, key numbers and error).

A sweep is resumable. A run whose ``summary.json`` says finished, early-stopped or diverged
is skipped, with or without checkpoints (committed results have none) -- unless it finished
all its epochs, the spec now asks for more, and ``last.pt`` is there: then it is continued.
A run with ``config.json`` but no such summary (interrupted, or failed in a previous sweep)
is continued from ``last.pt`` (restarted in place when there is none). A run that raises is
recorded as failed (its traceback in ``error.txt``, its status in ``sweep.json``) and the
sweep goes on; the next sweep tries it again.

Synthetic corpora: a ``[data]`` table names corpora of ``tprop.data.synth``
(``copy-2K = { task = "copy", length = 20 }``; a preset's ``[presets.NAME.data]`` entry
updates the one of the same name). Before the runs, the sweep writes each corpus a run reads
into ``<sweep folder>/data/NAME`` (kept when already there with the same parameters), and a
run whose ``data_dir`` is NAME trains on it.

Workers: with ``workers > 1`` the runs go to that many processes (multiprocessing, 'spawn'),
each with ``threads = max(1, cpus // workers)`` torch threads unless the spec or an override
sets ``threads``. With one worker the runs happen in this process.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import hashlib
import io
import itertools
import json
import os
import re
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, TrainConfig, make_config

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]


class SpecError(ConfigError):
    """A sweep spec is malformed; the message names the spec file and the offending key."""


# Statuses of a summary.json that make a run done (never rerun).
DONE = ("finished", "early-stopped", "diverged")
# Config fields that may differ between a run directory and the spec without making the
# run another one (where it lies, how it is computed, how long it goes on).
NOT_IDENTITY = ("out", "data_dir", "threads", "quiet", "device", "epochs", "patience",
                "dist_timeout")
# Fields a spec may not set (the sweep sets them).
RESERVED = ("out",)
ALIASES = {"lambda": "lam", "block_size": "bptt"}
DISPLAY = {"lam": "lambda"}
TOP_KEYS = ("title", "description", "base", "grid", "zip", "presets", "report", "data")
REPORT_KEYS = ("title", "kind", "rows", "curves_by", "train_curves", "x", "series", "pivot",
               "plots", "log_y")
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_SAFE = re.compile(r"[^A-Za-z0-9._+\-]")


# ----------------------------------------------------------------------------- spec
@dataclass
class Spec:
    """A parsed sweep spec (see the module docstring for the format)."""

    name: str
    source: str
    base: dict[str, Any] = field(default_factory=dict)
    grid: list[dict[str, Any]] = field(default_factory=list)  # list: varied; else: fixed
    zip: dict[str, list[Any]] = field(default_factory=dict)
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    # synthetic corpora written into <sweep folder>/data/NAME before the runs (tprop.data.synth)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    title: str | None = None
    description: str | None = None
    text: str | None = None  # the TOML source, when read from a file

    def keys(self, preset: str | None = None) -> list[str]:
        """The varying keys under ``preset``, in spec order (grid tables first, then zip)."""
        _, grid, zipt, _ = resolve(self, preset)
        return varying_keys(grid, zipt)


def varying_keys(grid: list[dict[str, Any]], zipt: dict[str, list[Any]]) -> list[str]:
    out: list[str] = []
    for g in grid:
        out += [k for k, v in g.items() if isinstance(v, list) and k not in out]
    return out + [k for k in zipt if k not in out]


@dataclass
class Point:
    """One run of a sweep: its directory name, varying parameters and full config."""

    name: str
    params: dict[str, Any]
    config: dict[str, Any]


def _canon_key(key: str, where: str, source: str) -> str:
    k = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
    if k not in _FIELDS:
        close = difflib.get_close_matches(k, list(_FIELDS) + list(ALIASES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"{source}: [{where}] unknown config key {key!r}{hint}")
    if k in RESERVED:
        raise SpecError(f"{source}: [{where}] {key!r} is set by the sweep (one folder per run)")
    return k


def _check_value(key: str, value: Any, where: str, source: str) -> Any:
    """The TOML value for field ``key``, type-checked; 'none' -> None for optional fields."""
    ann = str(_FIELDS[key].type).replace(" ", "")
    kinds = set(ann.split("|"))
    if "None" in kinds and isinstance(value, str) and value.lower() in ("none", ""):
        return None
    ok = (
        (isinstance(value, bool) and "bool" in kinds)
        or (isinstance(value, int) and not isinstance(value, bool)
            and ("int" in kinds or "float" in kinds))
        or (isinstance(value, float) and "float" in kinds)
        or (isinstance(value, str) and "str" in kinds)
    )
    if not ok:
        want = " or ".join(sorted(kinds - {"None"})) + (" or 'none'" if "None" in kinds else "")
        raise SpecError(f"{source}: [{where}] {DISPLAY.get(key, key)} = {value!r}: expected "
                        f"{want}")
    return value


def _scalars(table: Any, where: str, source: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SpecError(f"{source}: [{where}] must be a table of config fields")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        k = _canon_key(key, where, source)
        if isinstance(value, (list, dict)):
            raise SpecError(f"{source}: [{where}] {key} must be a single value (lists go in "
                            "[grid] or [zip])")
        if k in out:
            raise SpecError(f"{source}: [{where}] {key} is given twice")
        out[k] = _check_value(k, value, where, source)
    return out


def _lists(table: Any, where: str, source: str) -> dict[str, list[Any]]:
    if not isinstance(table, dict):
        raise SpecError(f"{source}: [{where}] must be a table of lists")
    out: dict[str, list[Any]] = {}
    for key, values in table.items():
        k = _canon_key(key, where, source)
        if not isinstance(values, list) or not values:
            raise SpecError(f"{source}: [{where}] {key} must be a non-empty list of values")
        if k in out:
            raise SpecError(f"{source}: [{where}] {key} is given twice")
        out[k] = [_check_value(k, v, where, source) for v in values]
    return out


def _grid_table(table: Any, where: str, source: str) -> dict[str, Any]:
    """A grid table: lists (varied) and single values (fixed for the table's runs)."""
    if not isinstance(table, dict):
        raise SpecError(f"{source}: [{where}] must be a table of lists")
    out: dict[str, Any] = {}
    for key, values in table.items():
        k = _canon_key(key, where, source)
        if k in out:
            raise SpecError(f"{source}: [{where}] {key} is given twice")
        if isinstance(values, dict):
            raise SpecError(f"{source}: [{where}] {key} must be a list of values or one value")
        if isinstance(values, list):
            if not values:
                raise SpecError(f"{source}: [{where}] {key} must be a non-empty list of values")
            out[k] = [_check_value(k, v, where, source) for v in values]
        else:
            out[k] = _check_value(k, values, where, source)
    return out


def _check_zip(z: dict[str, list[Any]], where: str, source: str) -> None:
    lengths = {k: len(v) for k, v in z.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{DISPLAY.get(k, k)}: {n}" for k, n in lengths.items())
        raise SpecError(f"{source}: [{where}] lists must have one length ({detail})")


def parse_spec(data: dict[str, Any], source: str = "<spec>", name: str | None = None,
               text: str | None = None) -> Spec:
    """Check a spec's tables (a dict as ``tomllib`` reads it) and return the :class:`Spec`."""
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise SpecError(f"{source}: unknown table or key {unknown[0]!r} (a spec has "
                        f"{', '.join(TOP_KEYS)})")
    base = _scalars(data.get("base", {}), "base", source)
    raw_grid = data.get("grid", [])
    if isinstance(raw_grid, dict):
        raw_grid = [raw_grid]
    if not isinstance(raw_grid, list):
        raise SpecError(f"{source}: [grid] must be a table or an array of tables ([[grid]])")
    grid = [_grid_table(g, "grid", source) for g in raw_grid]
    grid = [g for g in grid if g]
    zipt = _lists(data.get("zip", {}), "zip", source)
    _check_zip(zipt, "zip", source)
    for k in zipt:
        if any(k in g for g in grid):
            raise SpecError(f"{source}: {DISPLAY.get(k, k)} is in both [grid] and [zip]")
    # keys every run takes from the grid or zip: [base] may not set them (with several
    # [[grid]] tables, [base] may give the value of the tables that do not vary a key)
    varying = set(zipt) | ({k for k in grid[0] if all(k in g for g in grid)} if grid else set())
    for k in base:
        if k in varying:
            raise SpecError(f"{source}: {DISPLAY.get(k, k)} is in [base] and also varied by "
                            "[grid]/[zip]; keep it in one place")
    presets: dict[str, dict[str, Any]] = {}
    raw_presets = data.get("presets", {})
    if not isinstance(raw_presets, dict):
        raise SpecError(f"{source}: [presets] must hold tables such as [presets.smoke]")
    for pname, ptable in raw_presets.items():
        where = f"presets.{pname}"
        if not isinstance(ptable, dict):
            raise SpecError(f"{source}: [{where}] must be a table")
        scal = _scalars(ptable, where, source, skip=("grid", "zip", "report", "data"))
        for k in scal:
            if k in varying:
                raise SpecError(f"{source}: [{where}] {DISPLAY.get(k, k)} is set by [grid] or "
                                f"[zip] for every run; set its values in [{where}.grid] or "
                                f"[{where}.zip]")
        raw_pgrid = ptable.get("grid", {})
        pgrid: dict[str, Any] | list[dict[str, Any]]
        if isinstance(raw_pgrid, list):  # [[presets.NAME.grid]]: one table per [[grid]] table
            if len(raw_pgrid) != len(grid):
                raise SpecError(f"{source}: [[{where}.grid]] has {len(raw_pgrid)} tables, "
                                f"[[grid]] has {len(grid)}: give one (maybe empty) per table")
            pgrid = [_grid_table(g, f"{where}.grid", source) for g in raw_pgrid]
        else:
            pgrid = _grid_table(raw_pgrid, f"{where}.grid", source)
            for k, v in pgrid.items():
                if not any(k in g and isinstance(g[k], list) == isinstance(v, list)
                           for g in grid):
                    what = "list" if isinstance(v, list) else "single value"
                    raise SpecError(f"{source}: [{where}.grid] {DISPLAY.get(k, k)} is not a key "
                                    f"of [grid] with a {what}")
        pzip = _lists(ptable.get("zip", {}), f"{where}.zip", source)
        for k in pzip:
            if k not in zipt:
                raise SpecError(f"{source}: [{where}.zip] {DISPLAY.get(k, k)} is not a key of "
                                "[zip]")
        _check_zip({**zipt, **pzip}, f"{where}.zip", source)
        prep = _report_table(ptable.get("report", {}), f"{where}.report", source)
        presets[str(pname)] = {"base": scal, "grid": pgrid, "zip": pzip, "report": prep,
                               "data": _data_table(ptable.get("data", {}), f"{where}.data",
                                                   source, partial=True)}
    report = _report_table(data.get("report", {}), "report", source)
    for key in ("title", "description"):
        if key in data and not isinstance(data[key], str):
            raise SpecError(f"{source}: {key} must be a string")
    sdata = _data_table(data.get("data", {}), "data", source)
    for pname, p in presets.items():
        for dname in p["data"]:
            if dname not in sdata and "task" not in p["data"][dname]:
                raise SpecError(f"{source}: [presets.{pname}.data] {dname} is not in [data]; "
                                "a new entry needs its task")
        _check_data({**sdata, **{k: {**sdata.get(k, {}), **v} for k, v in p["data"].items()}},
                    f"presets.{pname}.data", source)
    _check_data(sdata, "data", source)
    return Spec(name=name or "sweep", source=source, base=base, grid=grid, zip=zipt, data=sdata,
                presets=presets, report=report, title=data.get("title"),
                description=data.get("description"), text=text)


def _report_table(table: Any, where: str, source: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SpecError(f"{source}: [{where}] must be a table")
    for k in table:
        if k not in REPORT_KEYS:
            raise SpecError(f"{source}: [{where}] unknown key {k!r} (known: "
                            f"{', '.join(REPORT_KEYS)})")
    return dict(table)


def _data_table(table: Any, where: str, source: str,
                partial: bool = False) -> dict[str, dict[str, Any]]:
    """``[data]``: NAME = { task = "copy", length = 20, ... } (tprop.data.synth parameters);
    a run whose ``data_dir`` is NAME trains on ``<sweep folder>/data/NAME``."""
    if not isinstance(table, dict):
        raise SpecError(f"{source}: [{where}] must be a table of corpora")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in table.items():
        if not isinstance(entry, dict) or (not partial and "task" not in entry):
            raise SpecError(f"{source}: [{where}] {name} must be a table such as "
                            "{ task = \"copy\", length = 20 }")
        if _SAFE.search(name):
            raise SpecError(f"{source}: [{where}] {name!r}: a corpus name uses letters, digits "
                            "and ._+- only")
        out[str(name)] = dict(entry)
    return out


def _check_data(table: dict[str, dict[str, Any]], where: str, source: str) -> None:
    from ..data.synth import SynthError, params_from

    for name, entry in table.items():
        values = dict(entry)
        task = values.pop("task", None)
        try:
            params_from(str(task), values, f"{source}: [{where}] {name}")
        except SynthError as e:
            raise SpecError(str(e) if str(e).startswith(source) else
                            f"{source}: [{where}] {name}: {e}") from None


def resolve_data(spec: Spec, preset: str | None = None) -> dict[str, dict[str, Any]]:
    """The spec's synthetic corpora under ``preset`` (a preset's entry updates the one of the
    same name, or adds one)."""
    out = {k: dict(v) for k, v in spec.data.items()}
    if preset is not None and preset in spec.presets:
        for k, v in spec.presets[preset].get("data", {}).items():
            out[k] = {**out.get(k, {}), **v}
    return out


def prepare_data(spec: Spec, out: Path, preset: str | None = None,
                 echo: Callable[[str], None] | None = None,
                 names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Write the spec's synthetic corpora (those of ``names``, default all) into
    ``out/data/NAME``, keeping one already there with the same parameters; returns each
    corpus's synth.json."""
    from ..data.synth import ensure_corpus, params_from

    metas = {}
    for name, entry in resolve_data(spec, preset).items():
        if names is not None and name not in names:
            continue
        values = dict(entry)
        params = params_from(values.pop("task"), values, name)
        meta, wrote = ensure_corpus(params, out / "data" / name)
        if wrote and echo is not None:
            echo(f"data {name}: wrote {params.task} (dependency {meta['dependency_min']} "
                 f"tokens; floors: ppl {meta['ppl_mem']:.3f} with memory, "
                 f"{meta['ppl_nomem']:.3f} without) in {out / 'data' / name}")
        metas[name] = meta
    return metas


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and check a spec file; :class:`SpecError` for a missing file or bad TOML."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such spec file")
    text = p.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{p}: invalid TOML: {e}") from None
    return parse_spec(data, str(p), name=p.stem, text=text)


# ----------------------------------------------------------------------------- expansion
def resolve(spec: Spec, preset: str | None = None
            ) -> tuple[dict[str, Any], list[dict[str, list[Any]]], dict[str, list[Any]],
                       dict[str, Any]]:
    """``(base, grid, zip, report)`` of ``spec`` with ``preset`` applied."""
    base, grid = dict(spec.base), copy.deepcopy(spec.grid)
    zipt, report = dict(spec.zip), dict(spec.report)
    if preset is not None:
        if preset not in spec.presets:
            known = ", ".join(spec.presets) or "none"
            raise SpecError(f"{spec.source}: unknown preset {preset!r} (the spec defines: "
                            f"{known})")
        p = spec.presets[preset]
        base.update(p["base"])
        if isinstance(p["grid"], list):  # one table of changes per grid table
            for g, changes in zip(grid, p["grid"]):
                g.update(copy.deepcopy(changes))
        else:
            for k, vals in p["grid"].items():  # a list replaces lists, a value values
                for g in grid:
                    if k in g and isinstance(g[k], list) == isinstance(vals, list):
                        g[k] = copy.deepcopy(vals)
        zipt.update(p["zip"])
        report.update(p["report"])
    return base, grid, zipt, report


def format_value(v: Any) -> str:
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
    parts = [f"{DISPLAY.get(k, k)}={_SAFE.sub('_', format_value(v))}" for k, v in params.items()]
    name = ",".join(parts)
    if len(name) > 180:
        name = name[:160] + "-" + _digest(params)
    return name


def _digest(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:8]


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


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
    over = {}
    for key, value in (overrides or {}).items():
        k = _canon_key(key, "overrides", spec.source)
        if k in order:
            raise SpecError(f"{spec.source}: cannot override {DISPLAY.get(k, k)}: the spec varies "
                            "it")
        over[k] = value
    combos: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (varied, fixed) per run
    for g in grid or [{}]:
        keys = [k for k, v in g.items() if isinstance(v, list)]
        fixed = {k: v for k, v in g.items() if not isinstance(v, list)}
        combos += [(dict(zip(keys, vals)), fixed)
                   for vals in itertools.product(*(g[k] for k in keys))]
    zkeys = list(zipt)
    zrows = [dict(zip(zkeys, vals)) for vals in zip(*(zipt[k] for k in zkeys))] or [{}]
    if threads is None:
        threads = max(1, cpu_count() // max(1, workers))
    points: list[Point] = []
    seen: dict[str, str] = {}
    names: set[str] = set()
    for combo, fixed in combos:
        for zrow in zrows:
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
                cfg["out"] = str(Path(out) / name)
                if cfg.get("data_dir") in synth:  # a corpus of the spec's [data] table
                    cfg["data_dir"] = str(Path(out) / "data" / cfg["data_dir"])
            if validate:
                try:
                    make_config(**cfg)
                except ConfigError as e:
                    raise SpecError(f"{spec.source}: run {name}"
                                    f"{f' (preset {preset})' if preset else ''}: {e}") from None
                except TypeError as e:
                    raise SpecError(f"{spec.source}: run {name}: {e}") from None
            points.append(Point(name, params, cfg))
    return points


# ----------------------------------------------------------------------------- one run
def _config_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The identity fields on which a run directory's config and the spec's disagree."""
    want = make_config(**wanted).to_dict()
    diffs = []
    for k, v in want.items():
        if k in NOT_IDENTITY or k == "preset":
            continue
        if k in stored and stored[k] != v:
            diffs.append(f"{DISPLAY.get(k, k)} {stored[k]!r} here, {v!r} in the spec")
    return diffs


def plan(point: Point, run_dir: Path) -> tuple[str, str]:
    """What to do with ``point`` in ``run_dir``: ``(action, note)``.

    Actions: ``skip`` (done), ``resume`` (continue the run there), ``new`` (start it),
    ``conflict`` (the directory holds another run: fail without touching it).
    """
    summary_file, config_file = run_dir / "summary.json", run_dir / "config.json"
    stored = None
    if config_file.is_file():
        try:
            stored = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError):
            stored = None
    diffs = _config_diff(stored, point.config) if stored is not None else []
    summary = None
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, json.JSONDecodeError):
            summary = None
    if summary is not None and summary.get("status") in DONE:
        if diffs:
            return "skip", "kept, but its config differs from the spec: " + "; ".join(diffs)
        epochs = int(point.config.get("epochs", TrainConfig.epochs))
        if (summary["status"] == "finished" and (summary.get("epochs_run") or 0) < epochs
                and (run_dir / "last.pt").is_file()):
            return "resume", f"continued to {epochs} epochs"
        return "skip", ""
    if stored is not None:
        if diffs:
            return "conflict", (f"{run_dir} holds a run with another config ("
                                + "; ".join(diffs) + "); delete it to start this one afresh")
        if (run_dir / "last.pt").is_file():
            return "resume", "continued from last.pt"
        return "resume", "restarted (no checkpoint)"
    return "new", ""


def _result_from_summary(summary: dict[str, Any] | None) -> dict[str, Any]:
    s = summary or {}
    return {k: s.get(k) for k in ("status", "best_valid_ppl", "best_epoch", "test_ppl",
                                  "train_ppl_at_best", "epochs_run", "wall_s")}


_CORPUS: dict[tuple, Any] = {}  # the last corpus a run of this process loaded


def _corpus(cfg: TrainConfig) -> Any:
    """The run's corpus, reused from the previous run of this process when it is the same."""
    from ..data import load_corpus

    key = (cfg.dataset, str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None, cfg.format)
    if key not in _CORPUS:
        _CORPUS.clear()
        _CORPUS[key] = load_corpus(cfg.dataset, cfg.data_dir, fmt=cfg.format)
    return _CORPUS[key]


def run_point(task: dict[str, Any]) -> dict[str, Any]:
    """Run, resume or continue one point (a worker's job); never raises but on Ctrl-C.

    ``task``: ``dir``, ``config`` (make_config fields), ``action`` (``new``/``resume``),
    ``verbose`` (let the trainer's epoch lines through to stdout).
    """
    import torch

    from ..train import make_trainer, resume_trainer

    run_dir = Path(task["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    err_file = run_dir / "error.txt"
    err_file.unlink(missing_ok=True)
    threads_before = torch.get_num_threads()
    sink = contextlib.nullcontext() if task.get("verbose") else contextlib.redirect_stdout(
        io.StringIO())
    t0 = time.perf_counter()
    try:
        with sink:
            cfg = make_config(**task["config"])
            corpus = _corpus(cfg)
            if task["action"] == "resume":
                trainer = resume_trainer(run_dir, corpus=corpus, epochs=cfg.epochs,
                                         threads=cfg.threads, quiet=cfg.quiet,
                                         device=cfg.device, patience=cfg.patience)
            else:
                trainer = make_trainer(cfg, run_dir, corpus=corpus)
            summary = trainer.fit()
        result = _result_from_summary(summary)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of one run is recorded, never fatal
        err_file.write_text(traceback.format_exc())
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if len(msg) > 200:
            msg = msg[:197] + "..."
        result = {"status": "failed", "error": f"{type(e).__name__}: {msg}".rstrip(": ")}
    finally:
        torch.set_num_threads(threads_before)
    result["session_s"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- the sweep
def _fmt_ppl(x: Any) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _numbers(r: dict[str, Any]) -> str:
    if r.get("status") == "failed":
        return r.get("error") or "failed"
    out = (f"{r.get('status')}: valid {_fmt_ppl(r.get('best_valid_ppl'))}"
           f" @{r.get('best_epoch')}, test {_fmt_ppl(r.get('test_ppl'))}")
    if r.get("epochs_run") is not None:
        out += f", {r['epochs_run']} epochs"
    if r.get("wall_s") is not None:
        out += f", {fmt_seconds(r['wall_s'])}"
    return out


@dataclass
class SweepResult:
    """What a sweep did: one record per run, in spec order (also in ``sweep.json``)."""

    out: Path
    runs: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r.get("status") == "failed"]


def _write_index(out: Path, spec: Spec, preset: str | None, report: dict[str, Any],
                 runs: list[dict[str, Any]]) -> None:
    from ..rundir import write_json_atomic

    write_json_atomic(out / "sweep.json", {
        "spec": spec.name, "source": spec.source, "preset": preset, "title": spec.title,
        "description": spec.description,
        "keys": [DISPLAY.get(k, k) for k in spec.keys(preset)],
        "report": report, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs,
    })


def run_sweep(spec: Spec | str | os.PathLike, out: str | os.PathLike,
              preset: str | None = None, workers: int = 1,
              overrides: dict[str, Any] | None = None, threads: int | None = None,
              echo: Callable[[str], None] | None = None, verbose: bool = False,
              dry_run: bool = False) -> SweepResult:
    """Run every point of ``spec`` (a :class:`Spec` or a path) into ``out/NAME``.

    Skips done runs, continues interrupted ones, records failures and goes on; writes
    ``out/sweep.json`` after every run. ``echo`` receives one line per event (default:
    print). ``dry_run`` only plans (prints what would happen) and writes nothing.
    """
    if echo is None:
        def echo(line: str) -> None:
            print(line, flush=True)
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    if workers < 1:
        raise SpecError("--workers: must be >= 1")
    out = Path(out)
    points = expand(spec, preset, overrides, out=out, workers=workers, threads=threads)
    _, _, _, report = resolve(spec, preset)
    n = len(points)
    width = len(str(n))
    tag = lambda i: f"[{i + 1:>{width}}/{n}]"  # noqa: E731
    plans = [plan(p, out / p.name) for p in points]
    thr = points[0].config.get("threads") if points else None
    echo(f"sweep {spec.name}{f' (preset {preset})' if preset else ''}: {n} runs, "
         f"{workers} worker{'s' if workers > 1 else ''} x {thr} thread{'s' if thr != 1 else ''}"
         f", in {out}")
    runs: list[dict[str, Any]] = []
    for p, (action, note) in zip(points, plans):
        rec: dict[str, Any] = {"name": p.name, "dir": p.name,
                               "params": {DISPLAY.get(k, k): v for k, v in p.params.items()},
                               "action": action}
        if action == "skip":
            try:
                rec.update(_result_from_summary(
                    json.loads((out / p.name / "summary.json").read_text())))
            except (OSError, json.JSONDecodeError):
                pass
        if note:
            rec["note"] = note
        runs.append(rec)
    if dry_run:
        for i, rec in enumerate(runs):
            echo(f"{tag(i)} {rec['action']:<8} {rec['name']}"
                 + (f"  ({rec['note']})" if rec.get("note") else ""))
        return SweepResult(out, runs)

    out.mkdir(parents=True, exist_ok=True)
    if spec.data:  # the spec's synthetic corpora the runs read, before any run needs them
        used = {Path(p.config["data_dir"]).name for p in points if p.config.get("data_dir")
                and Path(p.config["data_dir"]).parent == out / "data"}
        prepare_data(spec, out, preset, echo, names=sorted(used))
    if spec.text is not None:
        (out / "spec.toml").write_text(spec.text, encoding="utf-8")
    _write_index(out, spec, preset, report, runs)
    todo: list[int] = []
    for i, rec in enumerate(runs):
        if rec["action"] == "skip":
            echo(f"{tag(i)} skip    {rec['name']}  {_numbers(rec)}"
                 + (f"  ({rec['note']})" if rec.get("note") else ""))
        elif rec["action"] == "conflict":
            rec.update(status="failed", error=rec.pop("note"))
            echo(f"{tag(i)} FAILED  {rec['name']}  {rec['error']}")
        else:
            todo.append(i)
    _write_index(out, spec, preset, report, runs)

    def task(i: int) -> dict[str, Any]:
        p = points[i]
        (out / p.name).mkdir(parents=True, exist_ok=True)
        from ..rundir import write_json_atomic

        write_json_atomic(out / p.name / "point.json", {
            "name": p.name, "params": runs[i]["params"], "config": p.config,
            "spec": spec.name, "preset": preset})
        return {"dir": str(out / p.name), "config": p.config, "action": runs[i]["action"],
                "verbose": verbose}

    def started(i: int) -> None:
        note = runs[i].get("note")
        echo(f"{tag(i)} start   {runs[i]['name']}" + (f"  ({note})" if note else ""))

    def finished(i: int, result: dict[str, Any]) -> None:
        runs[i].update(result)
        word = "FAILED " if result.get("status") == "failed" else "done   "
        echo(f"{tag(i)} {word} {runs[i]['name']}  {_numbers(runs[i])}")
        _write_index(out, spec, preset, report, runs)

    t0 = time.perf_counter()
    try:
        if workers == 1 or len(todo) <= 1:
            for i in todo:
                started(i)
                finished(i, run_point(task(i)))
        else:
            _run_parallel(todo, workers, task, started, finished)
    finally:
        _write_index(out, spec, preset, report, runs)
    counts: dict[str, int] = {}
    for r in runs:
        key = "skipped" if r["action"] == "skip" else (r.get("status") or "not run")
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    echo(f"sweep {spec.name} done in {fmt_seconds(time.perf_counter() - t0)}: {summary}"
         f" (index: {out / 'sweep.json'})")
    return SweepResult(out, runs)


def _run_parallel(todo: list[int], workers: int, task: Callable[[int], dict[str, Any]],
                  started: Callable[[int], None],
                  finished: Callable[[int, dict[str, Any]], None]) -> None:
    """Keep ``workers`` spawned processes busy with the points ``todo``, in order."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    queue = list(todo)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    running: dict[Any, int] = {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                i = queue.pop(0)
                started(i)
                running[pool.submit(run_point, task(i))] = i
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                i = running.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool as e:
                    broken = True
                    result = {"status": "failed",
                              "error": f"worker process died ({e or 'killed'})"}
                except Exception as e:  # noqa: BLE001 - e.g. a result that failed to pickle
                    result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                finished(i, result)
            if broken:  # every run in flight died with the pool: record them, start afresh
                for i in list(running.values()):
                    finished(i, {"status": "failed", "error": "worker process died"})
                running.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    finally:
        pool.shutdown(wait=not running, cancel_futures=True)


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--set``) to a dict; values read as TOML, else as strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SpecError(f"--set: expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        k = _canon_key(key, "--set", "--set")
        out[k] = _check_value(k, value, "--set", "--set")
    return out
