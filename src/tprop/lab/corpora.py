"""The ``[data]`` table of a sweep spec: synthetic corpora of :mod:`tprop.data.synth`.

``NAME = { task = "copy", length = 20, ... }`` names a corpus by its task and parameters;
``[presets.P.data]`` entries update (or add) the corpus of the same name. Before its runs, a
sweep writes each corpus that a run reads into ``<sweep folder>/data/NAME`` (kept when already
there with the same parameters), and a run whose ``data_dir`` is NAME trains on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

_UNSAFE = re.compile(r"[^A-Za-z0-9._+\-]")


class Spec(Protocol):
    """What this module reads of a :class:`tprop.lab.spec.Spec` (which imports this module)."""

    data: dict[str, dict[str, Any]]
    presets: dict[str, dict[str, Any]]


class DataTableError(ValueError):
    """A ``[data]`` table is malformed (the message names the table and the corpus, not the
    spec file: :mod:`tprop.lab.spec` adds it)."""


def data_table(table: Any, where: str, partial: bool = False) -> dict[str, dict[str, Any]]:
    """``[data]`` as a dict of corpus name -> parameters, its shape checked (``partial``: a
    preset's entries, which may leave out the task)."""
    if not isinstance(table, dict):
        raise DataTableError(f"[{where}] must be a table of corpora")
    out: dict[str, dict[str, Any]] = {}
    for name, entry in table.items():
        if not isinstance(entry, dict) or (not partial and "task" not in entry):
            raise DataTableError(f"[{where}] {name} must be a table such as "
                                 "{ task = \"copy\", length = 20 }")
        if _UNSAFE.search(name):
            raise DataTableError(f"[{where}] {name!r}: a corpus name uses letters, digits "
                                 "and ._+- only")
        out[str(name)] = dict(entry)
    return out


def check_data(table: dict[str, dict[str, Any]], where: str) -> None:
    """DataTableError unless every corpus of ``table`` has valid synthetic-task parameters."""
    from ..data.synth import SynthError, params_from

    for name, entry in table.items():
        values = dict(entry)
        task = values.pop("task", None)
        context = f"[{where}] {name}"
        try:
            params_from(str(task), values, context)
        except SynthError as e:
            msg = str(e)
            raise DataTableError(msg if msg.startswith(context) else f"{context}: {msg}") \
                from None


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
