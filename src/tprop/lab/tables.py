"""The report's tables (markdown): the results table, one row per run, and pivot tables."""

from __future__ import annotations

from typing import Any

from ..config import META, flag_of, label_of
from ..fmt import finite, fmt_ppl, fmt_seconds, fmt_value
from .runs import EXTRA_KEYS, Run, canon, distinct, sort_key

# column headers: each field's label (tprop.config), and the report's keys beyond fields
HEADERS: dict[str, str] = {**{name: label_of(name) for name in META},
                           **{k: k for k in EXTRA_KEYS}}
VALUES = {"train_ppl": "train ppl", "train_eval_ppl": "train ppl (eval)",
          "valid_ppl": "valid ppl", "test_ppl": "test ppl"}
MISSING = "–"  # a cell of a setting that does not apply, or a number not measured


def header_of(key: str) -> str:
    """The column header of report key ``key`` (a field's label, ``minibatch``...)."""
    return HEADERS.get(key, key)


def unique_headers(headers: list[str], keys: list[str | None]) -> list[str]:
    """``headers`` with none repeated: a field's header that another column shares gains the
    field's flag (``corpus (--dataset)``), and any still repeated a number.

    ``keys``: the report key of each column (None for the fixed columns: ppl, status...).
    """
    out = [f"{h} ({flag_of(k)})" if k in META and headers.count(h) > 1 else h
           for h, k in zip(headers, keys)]
    seen: dict[str, int] = {}
    for i, h in enumerate(out):
        seen[h] = seen.get(h, 0) + 1
        if seen[h] > 1:
            out[i] = f"{h} ({seen[h]})"
    return out


def run_label(run: Run, keys: list[str]) -> str:
    """A run as a legend names it: its values of ``keys`` (``pm, K=5``), else its name."""
    parts = []
    for k in keys:
        v = run.param(k)
        if v is None:
            continue
        parts.append(str(v) if k == "method" else f"{header_of(k)}={fmt_value(v)}")
    return ", ".join(parts) or run.name


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _status(run: Run) -> str:
    return f"{run.status} ⚠" if run.warnings else run.status


def results_table(runs: list[Run], keys: list[str]) -> list[str]:
    """One row per run: its name, its values of ``keys``, its perplexities, best epoch,
    epochs run, wall time and status (the lowest test perplexity in bold)."""
    has_eval = any(r.value("train_eval_ppl") is not None for r in runs)
    fixed = ["train ppl"] + (["train ppl (eval)"] if has_eval else [])
    fixed += ["valid ppl", "test ppl", "best epoch", "epochs", "wall", "status"]
    head = unique_headers(["run"] + [header_of(k) for k in keys] + fixed,
                          [None, *keys] + [None] * len(fixed))
    tests = [r.value("test_ppl") for r in runs if finite(r.value("test_ppl"))]
    best_test = min(tests) if len(tests) > 1 else None
    lines = [_row(head),
             "|" + "|".join("---" if i <= len(keys) else "---:" for i in range(len(head))) + "|"]
    for r in runs:
        test = fmt_ppl(r.value("test_ppl"), MISSING)
        if best_test is not None and r.value("test_ppl") == best_test:
            test = f"**{test}**"
        cells = [f"`{r.name}`"] + [fmt_value(r.param(k)) for k in keys]
        cells += [fmt_ppl(r.value("train_ppl"), MISSING)]
        cells += [fmt_ppl(r.value("train_eval_ppl"), MISSING)] if has_eval else []
        cells += [fmt_ppl(r.value("valid_ppl"), MISSING), test, fmt_value(r.best_epoch),
                  fmt_value(r.epochs_run), fmt_seconds(r.wall_s, MISSING), _status(r)]
        lines.append(_row(cells))
    return lines


def _row_keys(runs: list[Run], rows: list[str]) -> list[tuple]:
    out: list[tuple] = []
    for r in runs:
        key = tuple(r.param(k) for k in rows)
        if key not in out:
            out.append(key)
    return sorted(out, key=lambda t: tuple(sort_key(v) for v in t))


def _pivot(runs: list[Run], rows: list[str], col: str, value: str) -> list[str]:
    cols = distinct([r.param(col) for r in runs])
    head = unique_headers([header_of(k) for k in rows]
                          + [f"{header_of(col)}={fmt_value(c)}" for c in cols],
                          [*rows] + [None] * len(cols))
    out = ["", f"**{VALUES[value]}** by {', '.join(header_of(k) for k in rows)} "
           f"(rows) and {header_of(col)} (columns):", "", _row(head),
           "|" + "|".join(["---"] * len(rows) + ["---:"] * len(cols)) + "|"]
    for key in _row_keys(runs, rows):
        cells = []
        for c in cols:
            match = [r for r in runs if r.param(col) == c
                     and tuple(r.param(k) for k in rows) == key]
            cells.append(fmt_ppl(match[0].value(value), MISSING) if match else " ")
        if any(c != " " for c in cells):  # rows without this column field are left out
            out.append(_row([fmt_value(v) for v in key] + cells))
    return out


def pivot_tables(runs: list[Run], spec: dict[str, Any]) -> list[str]:
    """The tables of one ``pivot`` setting: a value (e.g. test ppl) by ``rows`` x ``columns``."""
    rows = [canon(k) for k in spec.get("rows", ["method"])]
    col = canon(spec.get("columns", "bptt"))
    values = spec.get("values", ["test_ppl"])
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        if value in VALUES:
            out += _pivot(runs, rows, col, value)
    return out
