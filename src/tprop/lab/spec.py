"""Sweep specs: a grid of training runs described by a TOML file.

The spec format
===============

A spec is a TOML file. Every key of ``[base]``, ``[grid]``, ``[zip]`` and of a preset is a
field of :class:`tprop.config.TrainConfig`: the name of a ``tprop train`` flag with ``-``
written ``_`` (``h_steps``; a field's flag and its aliases name it too: ``lambda`` for
``lam``). TOML has no null: for a field whose default is ``None`` (``train_tokens``,
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

    [report]               # what `tprop report` draws (see tprop.lab.report)
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

A spec names its runs: a ``[base]`` alone is one run, ``[grid]``/``[zip]`` one per point. A
spec that names none (an empty file, an empty ``[base]`` and nothing else, a ``[grid]``
without keys) is refused: it would only train the default configuration.

Synthetic corpora: a ``[data]`` table names corpora of ``tprop.data.synth``
(``copy-2K = { task = "copy", length = 20 }``; a preset's ``[presets.NAME.data]`` entry
updates the one of the same name). A run whose ``data_dir`` is NAME trains on that corpus,
which the sweep writes into ``<sweep folder>/data/NAME`` (see :mod:`tprop.lab.corpora`).
"""

from __future__ import annotations

import copy
import difflib
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import META, ConfigError, field_of, flag_of
from ..config import check_value as check_value_of
from .corpora import DataTableError, check_data, data_table


class SpecError(ConfigError):
    """A sweep spec is malformed; the message names the spec file and the offending key."""


# Fields a spec may not set (the sweep sets them).
RESERVED = ("out",)
TOP_KEYS = ("title", "description", "base", "grid", "zip", "presets", "report", "data")
REPORT_KEYS = ("title", "kind", "rows", "curves_by", "train_curves", "x", "series", "pivot",
               "plots", "log_y")
# The TOML types a field of each plain kind of tprop.config.Meta accepts (bool is never a
# number); the values of other kinds are checked by tprop.config.check_value.
_KIND_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "flag": (bool,), "str": (str,), "choice": (str,),
    "bpu": (int, str),
}
_KIND_WORDS = {"int": "int", "float": "float", "flag": "bool", "str": "str", "choice": "str",
               "bpu": "int or 'all'"}


# ----------------------------------------------------------------------------- the spec
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
    """The keys that grid tables give lists for, then the zip's, in spec order."""
    out: list[str] = []
    for g in grid:
        out += [k for k, v in g.items() if isinstance(v, list) and k not in out]
    return out + [k for k in zipt if k not in out]


def resolve(spec: Spec, preset: str | None = None
            ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[Any]],
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


# ----------------------------------------------------------------------------- keys, values
def field_key(key: str) -> str | None:
    """The config field a spec key names (``h_steps``, ``h-steps``, ``lambda``), or None."""
    if key.startswith("-"):
        return None
    return field_of(key.replace("_", "-"))


def display_key(name: str) -> str:
    """How specs, run names and ``sweep.json`` spell field ``name`` (its flag: ``lambda``)."""
    return flag_of(name).lstrip("-").replace("-", "_")


def _spellings() -> list[str]:
    """Every spelling of a field a spec accepts, for "did you mean" hints."""
    out = list(META)
    for name, meta in META.items():
        out += [f.lstrip("-").replace("-", "_") for f in (flag_of(name), *meta.aliases)]
    return list(dict.fromkeys(out))


def canon_key(key: str, where: str, source: str) -> str:
    """The config field of spec key ``key``; SpecError for an unknown or reserved one."""
    k = field_key(key)
    if k is None:
        close = difflib.get_close_matches(key.replace("-", "_"), _spellings(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"{source}: [{where}] unknown config key {key!r}{hint}")
    if k in RESERVED:
        raise SpecError(f"{source}: [{where}] {key!r} is set by the sweep (one folder per run)")
    return k


def check_value(key: str, value: Any, where: str, source: str) -> Any:
    """The TOML value for field ``key``, checked against the field's metadata; ``"none"`` (or
    ``""``) is None for an optional field.

    For the plain kinds only the type is checked here (ranges and choices are checked per run,
    when the sweep expands); a value of any other kind is checked in full.
    """
    meta = META[key]
    if meta.optional and isinstance(value, str) and value.lower() in ("none", ""):
        return None
    types = _KIND_TYPES.get(meta.kind)
    if types is None:
        problem = check_value_of(meta, value)
        if problem is not None:
            raise SpecError(f"{source}: [{where}] {display_key(key)} = {value!r}: {problem}")
    elif isinstance(value, bool) != (bool in types) or not isinstance(value, types):
        want = _KIND_WORDS[meta.kind] + (" or 'none'" if meta.optional else "")
        raise SpecError(f"{source}: [{where}] {display_key(key)} = {value!r}: expected {want}")
    return value


# ----------------------------------------------------------------------------- tables
def _scalars(table: Any, where: str, source: str, skip: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SpecError(f"{source}: [{where}] must be a table of config fields")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in skip:
            continue
        k = canon_key(key, where, source)
        if isinstance(value, (list, dict)):
            raise SpecError(f"{source}: [{where}] {key} must be a single value (lists go in "
                            "[grid] or [zip])")
        if k in out:
            raise SpecError(f"{source}: [{where}] {key} is given twice")
        out[k] = check_value(k, value, where, source)
    return out


def _lists(table: Any, where: str, source: str) -> dict[str, list[Any]]:
    if not isinstance(table, dict):
        raise SpecError(f"{source}: [{where}] must be a table of lists")
    out: dict[str, list[Any]] = {}
    for key, values in table.items():
        k = canon_key(key, where, source)
        if not isinstance(values, list) or not values:
            raise SpecError(f"{source}: [{where}] {key} must be a non-empty list of values")
        if k in out:
            raise SpecError(f"{source}: [{where}] {key} is given twice")
        out[k] = [check_value(k, v, where, source) for v in values]
    return out


def _grid_table(table: Any, where: str, source: str) -> dict[str, Any]:
    """A grid table: lists (varied) and single values (fixed for the table's runs)."""
    if not isinstance(table, dict):
        raise SpecError(f"{source}: [{where}] must be a table of lists")
    out: dict[str, Any] = {}
    for key, values in table.items():
        k = canon_key(key, where, source)
        if k in out:
            raise SpecError(f"{source}: [{where}] {key} is given twice")
        if isinstance(values, dict):
            raise SpecError(f"{source}: [{where}] {key} must be a list of values or one value")
        if isinstance(values, list):
            if not values:
                raise SpecError(f"{source}: [{where}] {key} must be a non-empty list of values")
            out[k] = [check_value(k, v, where, source) for v in values]
        else:
            out[k] = check_value(k, values, where, source)
    return out


def _check_zip(z: dict[str, list[Any]], where: str, source: str) -> None:
    lengths = {k: len(v) for k, v in z.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{display_key(k)}: {n}" for k, n in lengths.items())
        raise SpecError(f"{source}: [{where}] lists must have one length ({detail})")


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
    try:
        return data_table(table, where, partial=partial)
    except DataTableError as e:
        raise SpecError(f"{source}: {e}") from None


def _check_data(table: dict[str, dict[str, Any]], where: str, source: str) -> None:
    try:
        check_data(table, where)
    except DataTableError as e:
        raise SpecError(f"{source}: {e}") from None


# ----------------------------------------------------------------------------- parsing
def _parse_grid(data: dict[str, Any], source: str) -> list[dict[str, Any]]:
    raw_grid = data.get("grid", [])
    if isinstance(raw_grid, dict):
        raw_grid = [raw_grid]
    if not isinstance(raw_grid, list):
        raise SpecError(f"{source}: [grid] must be a table or an array of tables ([[grid]])")
    grid = [_grid_table(g, "grid", source) for g in raw_grid]
    return [g for g in grid if g]


def _always_varied(grid: list[dict[str, Any]], zipt: dict[str, list[Any]]) -> set[str]:
    """The keys every run takes from the grid or zip (with several [[grid]] tables, [base] may
    give the value of the tables that do not vary a key)."""
    return set(zipt) | ({k for k in grid[0] if all(k in g for g in grid)} if grid else set())


def _check_names_runs(data: dict[str, Any], base: dict[str, Any], grid: list[dict[str, Any]],
                      zipt: dict[str, list[Any]], source: str) -> None:
    """SpecError when the spec names no runs (it would train the defaults)."""
    if grid or zipt:
        return
    if "grid" in data:
        raise SpecError(f"{source}: [grid] names no runs (give its keys lists of values, or "
                        "leave it out for one run of [base])")
    if not base:
        raise SpecError(f"{source}: the spec names no runs (give [base] settings for one run, "
                        "or [grid]/[zip] lists)")


def _parse_preset_grid(ptable: dict[str, Any], grid: list[dict[str, Any]], where: str,
                       source: str) -> dict[str, Any] | list[dict[str, Any]]:
    raw_pgrid = ptable.get("grid", {})
    if isinstance(raw_pgrid, list):  # [[presets.NAME.grid]]: one table per [[grid]] table
        if len(raw_pgrid) != len(grid):
            raise SpecError(f"{source}: [[{where}.grid]] has {len(raw_pgrid)} tables, "
                            f"[[grid]] has {len(grid)}: give one (maybe empty) per table")
        return [_grid_table(g, f"{where}.grid", source) for g in raw_pgrid]
    pgrid = _grid_table(raw_pgrid, f"{where}.grid", source)
    for k, v in pgrid.items():
        if not any(k in g and isinstance(g[k], list) == isinstance(v, list) for g in grid):
            what = "list" if isinstance(v, list) else "single value"
            raise SpecError(f"{source}: [{where}.grid] {display_key(k)} is not a key "
                            f"of [grid] with a {what}")
    return pgrid


def _parse_preset(pname: str, ptable: Any, grid: list[dict[str, Any]],
                  zipt: dict[str, list[Any]], source: str) -> dict[str, Any]:
    where = f"presets.{pname}"
    if not isinstance(ptable, dict):
        raise SpecError(f"{source}: [{where}] must be a table")
    scal = _scalars(ptable, where, source, skip=("grid", "zip", "report", "data"))
    for k in scal:
        if k in _always_varied(grid, zipt):
            raise SpecError(f"{source}: [{where}] {display_key(k)} is set by [grid] or "
                            f"[zip] for every run; set its values in [{where}.grid] or "
                            f"[{where}.zip]")
    pgrid = _parse_preset_grid(ptable, grid, where, source)
    pzip = _lists(ptable.get("zip", {}), f"{where}.zip", source)
    for k in pzip:
        if k not in zipt:
            raise SpecError(f"{source}: [{where}.zip] {display_key(k)} is not a key of [zip]")
    _check_zip({**zipt, **pzip}, f"{where}.zip", source)
    return {"base": scal, "grid": pgrid, "zip": pzip,
            "report": _report_table(ptable.get("report", {}), f"{where}.report", source),
            "data": _data_table(ptable.get("data", {}), f"{where}.data", source, partial=True)}


def _parse_presets(data: dict[str, Any], grid: list[dict[str, Any]],
                   zipt: dict[str, list[Any]], source: str) -> dict[str, dict[str, Any]]:
    raw_presets = data.get("presets", {})
    if not isinstance(raw_presets, dict):
        raise SpecError(f"{source}: [presets] must hold tables such as [presets.smoke]")
    return {str(pname): _parse_preset(str(pname), ptable, grid, zipt, source)
            for pname, ptable in raw_presets.items()}


def _parse_data(data: dict[str, Any], presets: dict[str, dict[str, Any]],
                source: str) -> dict[str, dict[str, Any]]:
    """The ``[data]`` table, checked as it is and as each preset changes it."""
    sdata = _data_table(data.get("data", {}), "data", source)
    for pname, p in presets.items():
        for dname in p["data"]:
            if dname not in sdata and "task" not in p["data"][dname]:
                raise SpecError(f"{source}: [presets.{pname}.data] {dname} is not in [data]; "
                                "a new entry needs its task")
        _check_data({**sdata, **{k: {**sdata.get(k, {}), **v} for k, v in p["data"].items()}},
                    f"presets.{pname}.data", source)
    _check_data(sdata, "data", source)
    return sdata


def parse_spec(data: dict[str, Any], source: str = "<spec>", name: str | None = None,
               text: str | None = None) -> Spec:
    """Check a spec's tables (a dict as ``tomllib`` reads it) and return the :class:`Spec`."""
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise SpecError(f"{source}: unknown table or key {unknown[0]!r} (a spec has "
                        f"{', '.join(TOP_KEYS)})")
    base = _scalars(data.get("base", {}), "base", source)
    grid = _parse_grid(data, source)
    zipt = _lists(data.get("zip", {}), "zip", source)
    _check_zip(zipt, "zip", source)
    for k in zipt:
        if any(k in g for g in grid):
            raise SpecError(f"{source}: {display_key(k)} is in both [grid] and [zip]")
    for k in base:
        if k in _always_varied(grid, zipt):
            raise SpecError(f"{source}: {display_key(k)} is in [base] and also varied by "
                            "[grid]/[zip]; keep it in one place")
    _check_names_runs(data, base, grid, zipt, source)
    presets = _parse_presets(data, grid, zipt, source)
    report = _report_table(data.get("report", {}), "report", source)
    for key in ("title", "description"):
        if key in data and not isinstance(data[key], str):
            raise SpecError(f"{source}: {key} must be a string")
    sdata = _parse_data(data, presets, source)
    return Spec(name=name or "sweep", source=source, base=base, grid=grid, zip=zipt, data=sdata,
                presets=presets, report=report, title=data.get("title"),
                description=data.get("description"), text=text)


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
