"""``tprop report DIR``: tables and plots of every run directory under DIR.

Writes ``DIR/report.md`` and ``DIR/plots/*.png`` (matplotlib, Agg, no display needed):

* a results table, one row per run: the run directory's name, the parameters that vary
  across the runs (method, block size, h-steps, ...; a setting that does not apply to a run's
  method shows as "–"), then the training perplexity of the best epoch, the best validation
  perplexity, the test perplexity of the best checkpoint, best epoch, epochs run, wall time
  and status;
* optional pivot tables (e.g. rows method x h-steps, one column per block size);
* validation perplexity against epoch for each run (one figure, or one per value of a
  field); log scale when the range is wide;
* training and test perplexity against the hidden size when ``nhid`` varies, against the
  minibatch size (BPTT: columns x ``update_freq``, or "all" for ``full_batch``; BTPROP:
  ``blocks_per_update``) when that varies, and against any field named in ``x``;
* for runs on synthetic corpora (``tprop data synth``: a ``synth.json`` beside the corpus),
  the share of the memory gap each run closes against the dependency length over K (a
  table per task and ``plots/memory_gap.png``; ``kind = "long_range"`` names this section);
* what is wrong with the runs: those that could not be read (a corrupt ``config.json``),
  those whose files are doubtful (epochs of ``metrics.jsonl`` repeated, as when two processes
  wrote the run: flagged, and left out of the plots), failed runs. Each problem is also
  printed as a ``warning:`` line.

The ``[report]`` table of a sweep spec (kept in the sweep's ``sweep.json``) steers it:

.. code-block:: toml

    [report]
    title = "Block size and h-steps"   # heading (default: the spec's title)
    rows = ["method", "bptt", "h_steps"]  # first columns / sort order of the table
    curves_by = "bptt"     # one validation-curve figure per block size
    train_curves = false   # also draw training perplexity, dashed
    log_y = "auto"         # true / false / "auto" (log when max/min > 3)
    kind = "minibatch"     # the finding's plot: hidden_size, minibatch, block_size, or a field
    x = ["lam"]            # extra "perplexity against FIELD" plots
    series = ["method"]    # lines of those plots (default: the other varying fields)
    pivot = { rows = ["method", "h_steps"], columns = "bptt", values = ["test_ppl"] }
    plots = ["curves", "hidden_size", "minibatch", "x"]  # which plots (default: all that apply;
                           # "x" stands for those of `kind` and `x`)
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fmt import fmt_value
from . import long_range
from .plots import plot_against, plot_curves, series_keys
from .runs import Run, Unreadable, canon, distinct, read_runs, sort_key, varying_keys
from .tables import header_of, pivot_tables, results_table

KINDS = {"hidden_size": "nhid", "minibatch": "minibatch", "minibatch_size": "minibatch",
         "batch_size": "minibatch", "block_size": "bptt", "h_steps": "h_steps",
         "lambda": "lam"}
SHOWN = ("dataset", "format", "train_tokens", "eval_tokens", "model", "emsize", "nhid",
         "nlayers", "bptt", "batch_size", "blocks_per_update", "h_steps", "theta_steps", "lam",
         "optim", "lr", "clip", "epochs", "seed")
NOTES = ("train ppl: mean training loss of the best epoch (as logged while training); "
         "train ppl (eval): the training split evaluated like valid, at the best epoch; valid "
         "ppl: the best epoch's; test ppl: the best checkpoint's (bold: the lowest). "
         "\"–\": not applicable to the method, or not measured.")


@dataclass
class Context:
    """What every section of a report reads: the runs, the sweep's index and settings."""

    root: Path
    runs: list[Run]
    unreadable: list[Unreadable]
    index: dict[str, Any]
    settings: dict[str, Any]  # the sweep's [report] table
    keys: list[str]  # the varying keys, in table order
    title: str

    @property
    def plots_dir(self) -> Path:
        """Where the figures go."""
        return self.root / "plots"

    def want(self, plot: str) -> bool:
        """Whether ``[report] plots`` asks for ``plot`` (all do by default)."""
        wanted = self.settings.get("plots")
        return wanted is None or plot in wanted

    def rel(self, path: Path) -> str:
        """``path`` as the report links it (relative to the report's folder)."""
        return path.relative_to(self.root).as_posix()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+\-]", "_", s)


def _read_index(root: Path) -> dict[str, Any]:
    try:
        index = json.loads((root / "sweep.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return index if isinstance(index, dict) else {}


# ----------------------------------------------------------------------------- sections
def title_section(ctx: Context) -> list[str]:
    """The heading, the sweep's description, and what the report covers."""
    md = [f"# {ctx.title}", ""]
    if ctx.index.get("description"):
        md += [ctx.index["description"].strip(), ""]
    counts: dict[str, int] = {}
    for r in ctx.runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    if ctx.unreadable:
        counts["could not be read"] = len(ctx.unreadable)
    src = f"spec `{ctx.index['spec']}`" if ctx.index.get("spec") else f"`{ctx.root}`"
    if ctx.index.get("preset"):
        src += f", preset `{ctx.index['preset']}`"
    return md + [f"{len(ctx.runs)} runs from {src} "
                 f"({', '.join(f'{v} {k}' for k, v in counts.items())});"
                 f" generated {time.strftime('%Y-%m-%d %H:%M')}.", ""]


def common_section(ctx: Context) -> list[str]:
    """The settings every run shares."""
    common = []
    for k in SHOWN:
        if k in ctx.keys:
            continue
        vals = distinct([r.param(k) for r in ctx.runs])
        if len(vals) == 1:
            v = vals[0]
            common.append(f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                          and v >= 10_000 else f"{k} {fmt_value(v)}")
    return ["Common settings: " + ", ".join(common) + ".", ""] if common else []


def unreadable_section(ctx: Context) -> list[str]:
    """The run directories that could not be read, with the file at fault and why."""
    if not ctx.unreadable:
        return []
    md = ["## Runs that could not be read", ""]
    md += [f"- `{ctx.rel(u.path)}` {u.reason}" for u in ctx.unreadable]
    return md + [""]


def warnings_section(ctx: Context) -> list[str]:
    """The runs whose files are doubtful (⚠ in the results table)."""
    flagged = [r for r in ctx.runs if r.warnings]
    if not flagged:
        return []
    md = ["## Warnings", ""]
    md += [f"- `{r.name}`: {w}" for r in flagged for w in r.warnings]
    return md + [""]


def results_section(ctx: Context) -> list[str]:
    """The results table, one row per run."""
    notes = NOTES + (" ⚠: see Warnings." if any(r.warnings for r in ctx.runs) else "")
    return ["## Results", ""] + results_table(ctx.runs, ctx.keys) + ["", notes, ""]


def pivot_section(ctx: Context) -> list[str]:
    """The ``[report] pivot`` tables."""
    pivot = ctx.settings.get("pivot")
    if not pivot:
        return []
    md = ["## Tables", ""]
    for p in pivot if isinstance(pivot, list) else [pivot]:
        md += pivot_tables(ctx.runs, p)
    return md + [""]


def long_range_section(ctx: Context) -> list[str]:
    """Runs on synthetic long-range corpora (see :mod:`tprop.lab.long_range`)."""
    return long_range.long_range_section(ctx.runs, ctx.keys, ctx.root, ctx.plots_dir)


def _curve_plots(ctx: Context) -> list[tuple[str, Path]]:
    by = canon(ctx.settings["curves_by"]) if ctx.settings.get("curves_by") else None
    curve_keys = [k for k in ctx.keys if k != by]
    groups: dict[Any, list[Run]] = {}
    for r in ctx.runs:
        groups.setdefault(r.param(by) if by else None, []).append(r)
    images = []
    for gval, rs in sorted(groups.items(), key=lambda kv: sort_key(kv[0])):
        suffix = f"_{_slug(f'{by}={fmt_value(gval)}')}" if by and len(groups) > 1 else ""
        t = "Validation perplexity by epoch" + (
            f" ({header_of(by)} = {fmt_value(gval)})" if suffix else "")
        p = plot_curves(rs, curve_keys, ctx.plots_dir / f"valid_curves{suffix}.png", t,
                        train=bool(ctx.settings.get("train_curves")),
                        log_y=ctx.settings.get("log_y", "auto"))
        if p:
            images.append((t, p))
    return images


def _x_plots(ctx: Context) -> list[tuple[str, Path]]:
    xs: list[tuple[str, str]] = []
    if ctx.want("hidden_size") and "nhid" in ctx.keys:
        xs.append(("nhid", "Perplexity against hidden size"))
    if ctx.want("minibatch") and "minibatch" in ctx.keys:
        xs.append(("minibatch", "Perplexity against minibatch size"))
    extra = ctx.settings.get("x", [])
    extra = [extra] if isinstance(extra, str) else list(extra)
    kind = ctx.settings.get("kind")
    if kind and kind != "long_range":  # the finding's plot, first
        extra.insert(0, KINDS.get(kind, kind))
    for x in map(canon, extra):
        if ctx.want("x") and x not in [a for a, _ in xs]:
            xs.append((x, f"Perplexity against {header_of(x)}"))
    images = []
    for x, t in xs:
        series = ([canon(k) for k in ctx.settings["series"]] if ctx.settings.get("series")
                  else series_keys(ctx.runs, ctx.keys, x))
        p = plot_against(ctx.runs, x, series, ctx.plots_dir / f"ppl_vs_{_slug(x)}.png", t,
                         log_y=ctx.settings.get("log_y", "auto"))
        if p:
            images.append((t, p))
    return images


def plots_section(ctx: Context) -> list[str]:
    """The validation curves and the perplexity-against-a-setting plots."""
    images = _curve_plots(ctx) if ctx.want("curves") else []
    images += _x_plots(ctx)
    if not images:
        return []
    md = ["## Plots", ""]
    for t, p in images:
        md += [f"### {t}", "", f"![{t}]({ctx.rel(p)})", ""]
    return md


def failed_section(ctx: Context) -> list[str]:
    """The failed runs and their errors."""
    failed = [r for r in ctx.runs if r.status == "failed" and r.error]
    if not failed:
        return []
    md = ["## Failed runs", ""]
    md += [f"- `{r.name}`: {r.error} (see `{r.name}/error.txt`)" for r in failed]
    return md + [""]


# The report, section by section: each reads the context and returns markdown lines.
SECTIONS: list[Callable[[Context], list[str]]] = [
    title_section, common_section, unreadable_section, warnings_section, results_section,
    pivot_section, long_range_section, plots_section, failed_section,
]


# ----------------------------------------------------------------------------- the report
def _context(root: Path, runs: list[Run], unreadable: list[Unreadable],
             title: str | None) -> Context:
    index = _read_index(root)
    settings: dict[str, Any] = dict(index.get("report") or {})
    order = {name: i for i, name in enumerate(r.get("name") for r in index.get("runs", []))}
    preferred = [canon(k) for k in settings.get("rows", [])]
    preferred += [canon(k) for k in index.get("keys", []) if canon(k) not in preferred]
    keys = varying_keys(runs, preferred)
    runs.sort(key=lambda r: tuple(sort_key(r.param(k)) for k in keys)
              + (order.get(r.name, len(order)), r.name))
    title = title or settings.get("title") or index.get("title") or f"Runs in {root.name}"
    return Context(root, runs, unreadable, index, settings, keys, title)


def _warn(ctx: Context, echo: Callable[[str], None]) -> None:
    for u in ctx.unreadable:
        echo(f"warning: {u.path} {u.reason}; the run is not in the report's tables")
    for r in ctx.runs:
        for w in r.warnings:
            echo(f"warning: {r.path}: {w}")


def write_report(root: str | os.PathLike, title: str | None = None,
                 echo: Callable[[str], None] | None = None) -> Path:
    """Write ``root/report.md`` and ``root/plots/``; return the report's path. ``echo``
    receives a ``warning:`` line per problem found (default: print)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    runs, unreadable = read_runs(root)
    if not runs and not unreadable:
        raise FileNotFoundError(f"{root}: no run directories (config.json) under it")
    ctx = _context(root, runs, unreadable, title)
    _warn(ctx, echo or print)
    if ctx.plots_dir.is_dir():
        for old in ctx.plots_dir.glob("*.png"):
            old.unlink()
    md: list[str] = []
    for section in SECTIONS:
        md += section(ctx)
    out = root / "report.md"
    out.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    return out
