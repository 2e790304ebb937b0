"""The report's figures (matplotlib, Agg: no display needed): validation curves by epoch and
perplexity against a setting, and the helpers they share.

Every series gets its own colour, dash pattern and (hollow) marker, so that series with the
same numbers -- PM and ADMM with 0 h-steps, say -- stay visible on top of each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fmt import finite, fmt_value
from .runs import MINIBATCH_KEYS, Run, distinct
from .tables import header_of, run_label

AXIS = {"nhid": "hidden size (units)", "minibatch": "minibatch size (sequences of K tokens "
        "per update)", "lam": "penalty weight λ", "bptt": "block size / window K",
        "h_steps": "h-steps per update"}
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def figure(ncols: int = 1, width: float = 7.5, height: float = 4.8) -> tuple[Any, list[Any]]:
    """A figure of ``ncols`` panels side by side, and their axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def styles(n: int, markersize: float = 5.0) -> list[dict[str, Any]]:
    """Keyword arguments of ``ax.plot`` for ``n`` series, no two alike: colours, dash
    patterns and hollow markers cycle side by side, and lines and markers narrow from the
    first series (drawn first, beneath) to the last, so that identical series nest."""
    out = []
    for i, c in enumerate(_colors(n)):
        t = i / (n - 1) if n > 1 else 1.0  # 0: the first series, 1: the last
        out.append({"color": c, "linestyle": LINESTYLES[i % len(LINESTYLES)],
                    "linewidth": 2.6 - 1.4 * t, "marker": MARKERS[i % len(MARKERS)],
                    "markersize": markersize * (1.7 - 0.7 * t), "markerfacecolor": "none",
                    "markeredgewidth": 1.2})
    return out


def use_log(values: list[float], setting: Any) -> bool:
    """Whether the y axis is logarithmic: ``setting`` if a bool, else when max/min > 3."""
    if isinstance(setting, bool):
        return setting
    vals = [v for v in values if finite(v) and v > 0]
    return bool(vals) and max(vals) / min(vals) > 3


def _legend(ax: Any, n: int) -> None:
    if n == 0:
        return
    if n > 8:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8)


def log_axis(ax: Any) -> None:
    """A log y axis labelled in plain numbers (1, 2, 5 per decade)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def shared_legend(fig: Any, axes: Any) -> None:
    """One legend for all panels, under them (labels of every panel, once each)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper center", fontsize=8,
                   bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(seen)), frameon=False)


def save(fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` (its folder created); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _curve(ax: Any, r: Run, keys: list[str], style: dict[str, Any], train: bool) -> list[float]:
    """Draw one run's validation (and training) curve; the values drawn."""
    rows = [m for m in r.metrics if finite(m.get("valid_ppl"))]
    vp = [m["valid_ppl"] for m in rows]
    solid = {**style, "linestyle": "-"} if train else style  # train: dashed means training
    ax.plot([m["epoch"] for m in rows], vp, label=run_label(r, keys), **solid)
    if not train:
        return vp
    tkey = "train_eval_ppl" if any("train_eval_ppl" in m for m in r.metrics) else "train_ppl"
    tr = [(m["epoch"], m[tkey]) for m in r.metrics if finite(m.get(tkey))]
    if tr:
        ax.plot(*zip(*tr), "--", color=style["color"], linewidth=1)
    return vp + [t for _, t in tr]


def plot_curves(runs: list[Run], keys: list[str], path: Path, title: str,
                train: bool = False, log_y: Any = "auto") -> Path | None:
    """Validation perplexity against epoch, one line per run (labelled by ``keys``); with
    ``train`` the training perplexity too, dashed. None when no run has a curve."""
    runs = [r for r in runs if r.plottable and any(finite(m.get("valid_ppl")) for m in r.metrics)]
    if not runs:
        return None
    fig, (ax,) = figure()
    values: list[float] = []
    for r, style in zip(runs, styles(len(runs), markersize=4.0)):
        values += _curve(ax, r, keys, style, train)
    if use_log(values, log_y):
        log_axis(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity" if train else "validation perplexity")
    ax.set_title(title + ("\n(solid: validation, dashed: training)" if train else ""))
    ax.grid(True, which="both", alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax, len(runs))
    return save(fig, path)


def series_keys(runs: list[Run], keys: list[str], x: str) -> list[str]:
    """The varying keys that tell a plot's lines apart: not x, nor functions of x."""
    skip = {x} | (MINIBATCH_KEYS if x == "minibatch" else set())
    on_axis = [r for r in runs if r.param(x) is not None]
    out = []
    for k in keys:
        if k in skip:
            continue
        mapping: dict[str, set] = {}
        for r in on_axis:
            mapping.setdefault(repr(r.param(x)), set()).add(repr(r.param(k)))
        values = set().union(*mapping.values()) if mapping else set()
        if len(values) > 1 and all(len(v) == 1 for v in mapping.values()):
            continue  # moves with x (e.g. emsize zipped with nhid): not a line of its own
        out.append(k)
    return out


def _x_axis(ax: Any, x: str, xs: list[Any], categorical: bool) -> None:
    if categorical:
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([fmt_value(v) for v in xs])
    else:
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log")
            ax.minorticks_off()
        if len(xs) <= 12:
            ax.set_xticks(xs)
            ax.set_xticklabels([fmt_value(v) for v in xs])
    ax.set_xlabel(AXIS.get(x, header_of(x)))


def _against_panel(ax: Any, groups: dict[str, list[Run]], x: str, key: str,
                   pos: dict[str, Any]) -> list[float]:
    """One panel of :func:`plot_against`: ``key`` against ``x``, a line per group; the values
    drawn."""
    values: list[float] = []
    for (label, rs), style in zip(groups.items(), styles(len(groups), markersize=6.0)):
        pts = sorted(((pos[repr(r.param(x))], r.value(key)) for r in rs
                      if r.param(x) is not None and finite(r.value(key))), key=lambda t: t[0])
        refs = [r.value(key) for r in rs if r.param(x) is None and finite(r.value(key))]
        if pts:
            ax.plot(*zip(*pts), label=label, **style)
            values += [p[1] for p in pts]
        for v in refs[:1]:  # a run without this setting (e.g. BPTT without λ)
            ax.axhline(v, color=style["color"], linestyle=":",
                       label=f"{label} (no {header_of(x)})")
            values.append(v)
    return values


def plot_against(runs: list[Run], x: str, series: list[str], path: Path, title: str,
                 log_y: Any = "auto") -> Path | None:
    """Training and test perplexity against field ``x``, one line per series."""
    runs = [r for r in runs if r.plottable]
    has_eval = any(r.value("train_eval_ppl") is not None for r in runs)
    tkey = "train_eval_ppl" if has_eval else "train_ppl"
    xs = distinct([r.param(x) for r in runs])
    if len(xs) < 2:
        return None
    categorical = any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in xs)
    pos = {repr(v): (i if categorical else v) for i, v in enumerate(xs)}
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(run_label(r, series) if series else "all runs", []).append(r)
    fig, axes = figure(2, width=6.0)
    for ax, key, what in ((axes[0], tkey, "training"), (axes[1], "test_ppl", "test")):
        values = _against_panel(ax, groups, x, key, pos)
        _x_axis(ax, x, xs, categorical)
        if use_log(values, log_y):
            log_axis(ax)
        ax.set_ylabel(f"{what} perplexity" + (" (evaluated)" if key == "train_eval_ppl" else
                                              " (best epoch)" if what == "training" else ""))
        ax.set_title(f"{what.capitalize()} perplexity")
        ax.grid(True, which="both", alpha=0.3)
    shared_legend(fig, axes)
    fig.suptitle(title)
    return save(fig, path)
