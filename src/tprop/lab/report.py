"""``tprop report DIR``: tables and plots of every run directory under DIR.

Writes ``DIR/report.md`` and ``DIR/plots/*.png`` (matplotlib, Agg, no display needed):

* a results table, one row per run: the parameters that vary across the runs (method,
  block size, h-steps, ...; a setting that does not apply to a run's method shows as "–"),
  then the training perplexity of the best epoch, the best validation perplexity, the test
  perplexity of the best checkpoint, best epoch, epochs run, wall time and status;
* optional pivot tables (e.g. rows method x h-steps, one column per block size);
* validation perplexity against epoch for each run (one figure, or one per value of a
  field); log scale when the range is wide;
* training and test perplexity against the hidden size when ``nhid`` varies, against the
  minibatch size (BPTT: columns x ``update_freq``, or "all" for ``full_batch``; BTPROP:
  ``blocks_per_update``) when that varies, and against any field named in ``x``;
* for runs on synthetic corpora (``tprop data synth``: a ``synth.json`` beside the corpus),
  the share of the memory gap each run closes against the dependency length over K (a
  table per task and ``plots/memory_gap.png``; ``kind = "long_range"`` names this section).

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
import math
import os
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import BTPROP_METHODS, METHODS, TrainConfig

IGNORE = {"out", "data_dir", "threads", "quiet", "device", "preset", "dist_timeout"}
BTPROP_ONLY = {"blocks_per_update", "h_steps", "h_lr", "h_tol", "h_clip", "h_optim", "h_init",
               "theta_steps", "lam", "lambda_mult", "u_lr", "u_clip", "u_start",
               "alm_max_steps", "alm_grad_tol", "arctanh", "positional_ppl", "chunk_blocks",
               "penalty", "kl_direction", "kl_weight", "state_constraint", "l1_weight"}
BPTT_ONLY = {"batch_size", "update_freq", "full_batch"}
MINIBATCH_KEYS = {"batch_size", "update_freq", "full_batch", "blocks_per_update"}
NOT_FOR = {  # method -> fields that do not apply to it
    "bptt": BTPROP_ONLY,
    "pm": BPTT_ONLY | {"u_lr", "u_clip", "u_start", "alm_max_steps", "alm_grad_tol"},
    "admm": BPTT_ONLY | {"alm_max_steps", "alm_grad_tol"},
    "alm": BPTT_ONLY | {"h_steps", "theta_steps", "h_tol"},
}
HEADERS = {
    "method": "method", "bptt": "K", "h_steps": "h-steps", "theta_steps": "θ-steps",
    "lam": "λ", "nhid": "hidden", "emsize": "emb", "batch_size": "B",
    "blocks_per_update": "M", "minibatch": "minibatch", "full_batch": "full batch",
    "update_freq": "update freq", "h_init": "h-init", "h_lr": "h-lr", "lr": "lr",
    "penalty": "penalty", "kl_direction": "KL direction", "kl_weight": "KL weight",
    "state_constraint": "states", "l1_weight": "l1 weight", "corpus": "corpus",
}
AXIS = {"nhid": "hidden size (units)", "minibatch": "minibatch size (sequences of K tokens "
        "per update)", "lam": "penalty weight λ", "bptt": "block size / window K",
        "h_steps": "h-steps per update"}
ALIASES = {"lambda": "lam", "block_size": "bptt"}
KINDS = {"hidden_size": "nhid", "minibatch": "minibatch", "minibatch_size": "minibatch",
         "batch_size": "minibatch", "block_size": "bptt", "h_steps": "h_steps",
         "lambda": "lam"}
SHOWN = ("dataset", "format", "train_tokens", "eval_tokens", "model", "emsize", "nhid",
         "nlayers", "bptt", "batch_size", "blocks_per_update", "h_steps", "theta_steps", "lam",
         "optim", "lr", "clip", "epochs", "seed")
VALUES = {"train_ppl": "train ppl", "train_eval_ppl": "train ppl (eval)",
          "valid_ppl": "valid ppl", "test_ppl": "test ppl"}


def _canon(key: str) -> str:
    k = key.replace("-", "_")
    return ALIASES.get(k, k)


@dataclass
class Run:
    """What a run directory holds, and the numbers the report shows."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    error: str | None = None

    @property
    def method(self) -> str:
        return self.config.get("method", "bptt")

    def param(self, key: str) -> Any:
        """The effective value of ``key``: None where it does not apply to the method."""
        if key == "minibatch":
            return minibatch_size(self.config)
        if key == "corpus":  # the corpus folder's name (e.g. a sweep's synthetic corpus)
            d = self.config.get("data_dir")
            return Path(d).name if d else self.config.get("dataset")
        if key in NOT_FOR.get(self.method, set()):
            return None
        return self.config.get(key)

    @property
    def status(self) -> str:
        if self.summary is not None:
            return str(self.summary.get("status"))
        if self.error is not None:
            return "failed"
        return "incomplete" if self.metrics else "not started"

    def _best_row(self) -> dict[str, Any]:
        e = self.best_epoch
        return next((r for r in self.metrics if r.get("epoch") == e), {})

    @property
    def best_epoch(self) -> int | None:
        if self.summary is not None and self.summary.get("best_epoch") is not None:
            return self.summary["best_epoch"]
        rows = [r for r in self.metrics if _finite(r.get("valid_ppl"))]
        return min(rows, key=lambda r: r["valid_ppl"])["epoch"] if rows else None

    def value(self, key: str) -> float | None:
        """``train_ppl``, ``train_eval_ppl``, ``valid_ppl`` (best epoch's) or ``test_ppl``."""
        s = self.summary or {}
        if key == "valid_ppl":
            v = s.get("best_valid_ppl")
            return v if v is not None else self._best_row().get("valid_ppl")
        if key == "test_ppl":
            return s.get("test_ppl")
        if key == "train_ppl":
            v = s.get("train_ppl_at_best")
            return v if v is not None else self._best_row().get("train_ppl")
        if key == "train_eval_ppl":
            return self._best_row().get("train_eval_ppl")
        raise KeyError(key)

    @property
    def epochs_run(self) -> int | None:
        if self.summary is not None and self.summary.get("epochs_run") is not None:
            return self.summary["epochs_run"]
        return len(self.metrics) if self.metrics else None

    @property
    def wall_s(self) -> float | None:
        if self.summary is not None and self.summary.get("wall_s") is not None:
            return self.summary["wall_s"]
        return self.metrics[-1].get("wall_s") if self.metrics else None


def minibatch_size(cfg: dict[str, Any]) -> int | str | None:
    """Sequences of K tokens per update: BPTT columns x update_freq (or 'all'), BTPROP M."""
    method = cfg.get("method", "bptt")
    if method == "bptt":
        if cfg.get("full_batch"):
            return "all"
        return int(cfg.get("batch_size", 32)) * int(cfg.get("update_freq", 1))
    if method in BTPROP_METHODS:
        return cfg.get("blocks_per_update")
    return None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return rows


def load_runs(root: str | os.PathLike) -> list[Run]:
    """Every run directory under ``root`` (recursively; ``root`` itself included)."""
    root = Path(root)
    defaults = TrainConfig().to_dict()
    dirs: set[Path] = set()
    for marker in ("config.json", "summary.json", "point.json"):
        dirs.update(p.parent for p in root.rglob(marker))
    runs = []
    for d in sorted(dirs):
        cfg = _read_json(d / "config.json")
        if not isinstance(cfg, dict):
            point = _read_json(d / "point.json")
            cfg = point.get("config") if isinstance(point, dict) else None
        if not isinstance(cfg, dict):
            continue
        summary = _read_json(d / "summary.json")
        err = None
        if (d / "error.txt").is_file():
            lines = [ln for ln in (d / "error.txt").read_text().splitlines() if ln.strip()]
            err = lines[-1].strip() if lines else "failed"
        name = str(d.relative_to(root)) if d != root else d.name
        runs.append(Run(d, name, {**defaults, **cfg}, _read_metrics(d / "metrics.jsonl"),
                        summary if isinstance(summary, dict) else None, err))
    return runs


# ----------------------------------------------------------------------------- analysis
def _sort_key(v: Any) -> tuple:
    if v is None:
        return (0, 0, "")
    if isinstance(v, str) and v in METHODS:
        return (1, METHODS.index(v), v)
    if isinstance(v, (int, float)):
        return (2, float(v), "")
    return (3, 0, str(v))


def _distinct(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return sorted(out, key=_sort_key)


def varying_keys(runs: list[Run], preferred: list[str] = ()) -> list[str]:
    """Config fields with more than one (applicable) value across ``runs``, in a useful order.

    ``minibatch`` replaces the BPTT/BTPROP minibatch fields (batch_size, update_freq,
    full_batch, blocks_per_update) when it varies.
    """
    names = [f.name for f in fields(TrainConfig) if f.name not in IGNORE]
    vary = [k for k in names if len(_distinct([r.param(k) for r in runs])) > 1]
    preferred = list(preferred)
    if len(_distinct([r.param("minibatch") for r in runs])) > 1:
        vary = [k for k in vary if k not in MINIBATCH_KEYS] + ["minibatch"]
        first = next((i for i, k in enumerate(preferred) if k in MINIBATCH_KEYS), None)
        if first is not None and "minibatch" not in preferred:
            preferred.insert(first, "minibatch")
    if len(_distinct([r.param("corpus") for r in runs])) > 1:  # runs on several corpora
        vary = ["corpus"] + vary
        preferred = ["corpus" if k == "data_dir" else k for k in preferred]
    order = [k for k in preferred if k in vary or k == "method"]
    order = list(dict.fromkeys(order))
    return order + [k for k in vary if k not in order]


def fmt_value(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def fmt_ppl(v: Any) -> str:
    return f"{v:.2f}" if _finite(v) else "–"


def fmt_seconds(s: Any) -> str:
    if not _finite(s):
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _label(run: Run, keys: list[str]) -> str:
    parts = []
    for k in keys:
        v = run.param(k)
        if v is None:
            continue
        parts.append(str(v) if k == "method" else f"{HEADERS.get(k, k)}={fmt_value(v)}")
    return ", ".join(parts) or run.name


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+\-]", "_", s)


# ----------------------------------------------------------------------------- tables
def results_table(runs: list[Run], keys: list[str]) -> list[str]:
    has_eval = any(r.value("train_eval_ppl") is not None for r in runs)
    head = [HEADERS.get(k, k) for k in keys] + ["train ppl"]
    head += ["train ppl (eval)"] if has_eval else []
    head += ["valid ppl", "test ppl", "best epoch", "epochs", "wall", "status"]
    tests = [r.value("test_ppl") for r in runs if _finite(r.value("test_ppl"))]
    best_test = min(tests) if len(tests) > 1 else None
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < len(keys) else "---:" for i in range(len(head))) + "|"]
    for r in runs:
        test = fmt_ppl(r.value("test_ppl"))
        if best_test is not None and r.value("test_ppl") == best_test:
            test = f"**{test}**"
        cells = [fmt_value(r.param(k)) for k in keys] + [fmt_ppl(r.value("train_ppl"))]
        cells += [fmt_ppl(r.value("train_eval_ppl"))] if has_eval else []
        cells += [fmt_ppl(r.value("valid_ppl")), test, fmt_value(r.best_epoch),
                  fmt_value(r.epochs_run), fmt_seconds(r.wall_s), r.status]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pivot_tables(runs: list[Run], spec: dict[str, Any]) -> list[str]:
    rows = [_canon(k) for k in spec.get("rows", ["method"])]
    col = _canon(spec.get("columns", "bptt"))
    values = spec.get("values", ["test_ppl"])
    if isinstance(values, str):
        values = [values]
    cols = _distinct([r.param(col) for r in runs])
    row_keys: list[tuple] = []
    for r in runs:
        key = tuple(r.param(k) for k in rows)
        if key not in row_keys:
            row_keys.append(key)
    row_keys.sort(key=lambda t: tuple(_sort_key(v) for v in t))
    out: list[str] = []
    for value in values:
        if value not in VALUES:
            continue
        out += ["", f"**{VALUES[value]}** by {', '.join(HEADERS.get(k, k) for k in rows)} "
                f"(rows) and {HEADERS.get(col, col)} (columns):", ""]
        out.append("| " + " | ".join([HEADERS.get(k, k) for k in rows]
                                     + [f"{HEADERS.get(col, col)}={fmt_value(c)}" for c in cols])
                   + " |")
        out.append("|" + "|".join(["---"] * len(rows) + ["---:"] * len(cols)) + "|")
        for key in row_keys:
            cells = []
            for c in cols:
                match = [r for r in runs if r.param(col) == c
                         and tuple(r.param(k) for k in rows) == key]
                cells.append(fmt_ppl(match[0].value(value)) if match else " ")
            if any(c != " " for c in cells):  # rows without this column field are left out
                out.append("| " + " | ".join([fmt_value(v) for v in key] + cells) + " |")
    return out


# ----------------------------------------------------------------------------- plots
def _figure(ncols: int = 1, width: float = 7.5, height: float = 4.8):
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


def _use_log(values: list[float], setting: Any) -> bool:
    if isinstance(setting, bool):
        return setting
    vals = [v for v in values if _finite(v) and v > 0]
    return bool(vals) and max(vals) / min(vals) > 3


def _legend(ax: Any, n: int) -> None:
    if n == 0:
        return
    if n > 8:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8)


def _log_y(ax: Any) -> None:
    """A log y axis labelled in plain numbers (1, 2, 5 per decade)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _shared_legend(fig: Any, axes: Any) -> None:
    """One legend for all panels, under them (labels of every panel, once each)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper center", fontsize=8,
                   bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(seen)), frameon=False)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_curves(runs: list[Run], keys: list[str], path: Path, title: str,
                train: bool = False, log_y: Any = "auto") -> Path | None:
    runs = [r for r in runs if any(_finite(m.get("valid_ppl")) for m in r.metrics)]
    if not runs:
        return None
    fig, (ax,) = _figure()
    values: list[float] = []
    for r, color in zip(runs, _colors(len(runs))):
        rows = [m for m in r.metrics if _finite(m.get("valid_ppl"))]
        ep = [m["epoch"] for m in rows]
        vp = [m["valid_ppl"] for m in rows]
        values += vp
        ax.plot(ep, vp, "-o", color=color, markersize=3, label=_label(r, keys))
        if train:
            tkey = "train_eval_ppl" if any("train_eval_ppl" in m for m in r.metrics) \
                else "train_ppl"
            tr = [(m["epoch"], m[tkey]) for m in r.metrics if _finite(m.get(tkey))]
            if tr:
                ax.plot(*zip(*tr), "--", color=color, linewidth=1)
                values += [t for _, t in tr]
    if _use_log(values, log_y):
        _log_y(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity" if train else "validation perplexity")
    ax.set_title(title + ("\n(solid: validation, dashed: training)" if train else ""))
    ax.grid(True, which="both", alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax, len(runs))
    return _save(fig, path)


def _series_keys(runs: list[Run], keys: list[str], x: str) -> list[str]:
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


def plot_against(runs: list[Run], x: str, series: list[str], path: Path, title: str,
                 log_y: Any = "auto") -> Path | None:
    """Training and test perplexity against field ``x``, one line per series."""
    has_eval = any(r.value("train_eval_ppl") is not None for r in runs)
    tkey = "train_eval_ppl" if has_eval else "train_ppl"
    xs = _distinct([r.param(x) for r in runs])
    if len(xs) < 2:
        return None
    categorical = any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in xs)
    pos = {repr(v): (i if categorical else v) for i, v in enumerate(xs)}
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(_label(r, series) if series else "all runs", []).append(r)
    fig, axes = _figure(2, width=6.0)
    colors = _colors(len(groups))
    for ax, key, what in ((axes[0], tkey, "training"), (axes[1], "test_ppl", "test")):
        values: list[float] = []
        for (label, rs), color in zip(groups.items(), colors):
            pts = sorted(((pos[repr(r.param(x))], r.value(key)) for r in rs
                          if r.param(x) is not None and _finite(r.value(key))),
                         key=lambda t: t[0])
            refs = [r.value(key) for r in rs if r.param(x) is None and _finite(r.value(key))]
            if pts:
                ax.plot(*zip(*pts), "-o", color=color, label=label)
                values += [p[1] for p in pts]
            for v in refs[:1]:  # a run without this setting (e.g. BPTT without λ)
                ax.axhline(v, color=color, linestyle=":", label=f"{label} (no {HEADERS.get(x, x)})")
                values.append(v)
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
        if _use_log(values, log_y):
            _log_y(ax)
        ax.set_xlabel(AXIS.get(x, HEADERS.get(x, x)))
        ax.set_ylabel(f"{what} perplexity" + (" (evaluated)" if key == "train_eval_ppl" else
                                              " (best epoch)" if what == "training" else ""))
        ax.set_title(f"{what.capitalize()} perplexity")
        ax.grid(True, which="both", alpha=0.3)
    _shared_legend(fig, axes)
    fig.suptitle(title)
    return _save(fig, path)


# ----------------------------------------------------------------------------- long range
def synth_info(run: Run, root: Path) -> dict[str, Any] | None:
    """The ``synth.json`` of the run's corpus (tprop.data.synth), looked up where the run read
    it, then in ``root/data/<name>`` (a sweep folder moved elsewhere); None for other corpora."""
    from ..data.synth import read_info

    d = run.config.get("data_dir")
    if not d:
        return None
    for place in (Path(d), root / "data" / Path(d).name):
        meta = read_info(place)
        if meta is not None:
            return meta
    return None


def long_range_section(runs: list[Run], keys: list[str], root: Path,
                       plots_dir: Path) -> list[str]:
    """Runs on synthetic long-range corpora: the share of the memory gap each closes, against
    the dependency length over K (a table per task, and a plot). [] when there are none."""
    from ..data.synth import memory_gap_share

    rows = []
    for r in runs:
        meta = synth_info(r, root)
        test = r.value("test_ppl")
        if meta is None or not _finite(test):
            continue
        dep = int(meta["dependency_min"])
        k = int(r.config.get("bptt", 1))
        rows.append({"run": r, "task": meta["task"], "L": dep, "K": k, "ratio": dep / k,
                     "mem": meta["ppl_mem"], "nomem": meta["ppl_nomem"], "test": test,
                     "share": memory_gap_share(test, meta["ppl_mem"], meta["ppl_nomem"]),
                     "meta": meta})
    if not rows:
        return []
    series = [k for k in keys if k != "corpus"]
    for row in rows:
        row["label"] = _label(row["run"], series) if series else row["run"].method
    md = ["## Long-range dependencies", "",
          "Each synthetic corpus (`tprop data synth`, docs/beyond.md) has a dependency length L "
          "and two entropy floors: the perplexity of the optimal predictor with the whole past "
          "(**with memory**) and with only the last L − 1 tokens (**without memory**). The "
          "**share of the memory gap closed** is (log ppl_nomem − log ppl) / (log ppl_nomem − "
          "log ppl_mem) at the test perplexity: 0 = nothing of the long-range dependency "
          "captured, 1 = all of it (negative: worse than a model without long-range memory). "
          "L/K is the dependency length over the BPTT window / block size K.", ""]
    md += ["| corpus | task | L | K | L/K | run | test ppl | floor (memory) | "
           "floor (no memory) | share closed |",
           "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    order = sorted(rows, key=lambda d: (d["task"], d["L"], d["label"]))
    for d in order:
        md.append(f"| {d['run'].param('corpus')} | {d['task']} | {d['L']} | {d['K']} | "
                  f"{d['ratio']:g} | {d['label']} | {fmt_ppl(d['test'])} | {d['mem']:.3f} | "
                  f"{d['nomem']:.3f} | {d['share']:.3f} |")
    tasks = sorted({d["task"] for d in rows})
    labels = list(dict.fromkeys(d["label"] for d in sorted(rows, key=lambda d: (
        tuple(_sort_key(d["run"].param(k)) for k in series), d["label"]))))
    for task in tasks:
        ratios = sorted({d["ratio"] for d in rows if d["task"] == task})
        md += ["", f"**Share of the memory gap closed**, {task} (rows: run; columns: L/K):", "",
               "| run | " + " | ".join(f"L/K={x:g}" for x in ratios) + " |",
               "|---|" + "---:|" * len(ratios)]
        for lab in labels:
            cells = []
            for x in ratios:
                m = [d["share"] for d in rows if d["task"] == task and d["label"] == lab
                     and d["ratio"] == x]
                cells.append(f"{sum(m) / len(m):.3f}" if m else " ")
            if any(c != " " for c in cells):
                md.append(f"| {lab} | " + " | ".join(cells) + " |")
    path = plot_memory_gap(rows, tasks, labels, plots_dir / "memory_gap.png")
    if path is not None:
        rel = path.relative_to(root).as_posix()
        t = "Share of the memory gap closed against dependency length / K"
        md += ["", f"### {t}", "", f"![{t}]({rel})"]
    return md + [""]


def plot_memory_gap(rows: list[dict[str, Any]], tasks: list[str], labels: list[str],
                    path: Path) -> Path | None:
    fig, axes = _figure(len(tasks), width=5.5)
    colors = dict(zip(labels, _colors(len(labels))))
    for ax, task in zip(axes, tasks):
        xs_all: set[float] = set()
        for lab in labels:
            pts = sorted((d["ratio"], d["share"]) for d in rows
                         if d["task"] == task and d["label"] == lab)
            if pts:
                ax.plot(*zip(*pts), "-o", color=colors[lab], label=lab, markersize=4)
                xs_all.update(x for x, _ in pts)
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        xs = sorted(xs_all)
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        if xs and len(xs) <= 12:
            ax.set_xticks(xs)
            ax.set_xticklabels([fmt_value(x) for x in xs])
        ax.set_xlabel("dependency length / K")
        ax.set_ylabel("share of the memory gap closed (test)")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
    _shared_legend(fig, axes)
    fig.suptitle("Long-range credit assignment: 0 = no long-range memory, 1 = the floor")
    return _save(fig, path)


# ----------------------------------------------------------------------------- report
def write_report(root: str | os.PathLike, title: str | None = None) -> Path:
    """Write ``root/report.md`` and ``root/plots/``; return the report's path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"{root}: no run directories (config.json) under it")
    index = _read_json(root / "sweep.json") or {}
    settings: dict[str, Any] = dict(index.get("report") or {})
    order = {name: i for i, name in enumerate(r.get("name") for r in index.get("runs", []))}
    preferred = [_canon(k) for k in settings.get("rows", [])]
    preferred += [_canon(k) for k in index.get("keys", []) if _canon(k) not in preferred]
    keys = varying_keys(runs, preferred)
    runs.sort(key=lambda r: tuple(_sort_key(r.param(k)) for k in keys)
              + (order.get(r.name, len(order)), r.name))
    title = title or settings.get("title") or index.get("title") or f"Runs in {root.name}"
    plots_dir = root / "plots"
    if plots_dir.is_dir():
        for old in plots_dir.glob("*.png"):
            old.unlink()
    wanted = settings.get("plots")
    want = (lambda k: True) if wanted is None else (lambda k: k in wanted)  # noqa: E731
    log_y = settings.get("log_y", "auto")

    md = [f"# {title}", ""]
    if index.get("description"):
        md += [index["description"].strip(), ""]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    src = f"spec `{index['spec']}`" if index.get("spec") else f"`{root}`"
    if index.get("preset"):
        src += f", preset `{index['preset']}`"
    md += [f"{len(runs)} runs from {src} ({', '.join(f'{v} {k}' for k, v in counts.items())});"
           f" generated {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    common = []
    for k in SHOWN:
        if k in keys:
            continue
        vals = _distinct([r.param(k) for r in runs])
        if len(vals) == 1:
            v = vals[0]
            common.append(f"{k} {v:,}" if isinstance(v, int) and not isinstance(v, bool)
                          and v >= 10_000 else f"{k} {fmt_value(v)}")
    if common:
        md += ["Common settings: " + ", ".join(common) + ".", ""]

    md += ["## Results", ""]
    md += results_table(runs, keys)
    md += ["", "train ppl: mean training loss of the best epoch (as logged while training); "
           "train ppl (eval): the training split evaluated like valid, at the best epoch; valid "
           "ppl: the best epoch's; test ppl: the best checkpoint's (bold: the lowest). "
           "\"–\": not applicable to the method, or not measured.", ""]
    if settings.get("pivot"):
        pivots = settings["pivot"] if isinstance(settings["pivot"], list) else [settings["pivot"]]
        md += ["## Tables", ""]
        for p in pivots:
            md += pivot_tables(runs, p)
        md.append("")

    images: list[tuple[str, Path]] = []
    if want("curves"):
        by = _canon(settings["curves_by"]) if settings.get("curves_by") else None
        curve_keys = [k for k in keys if k != by]
        groups: dict[Any, list[Run]] = {}
        for r in runs:
            groups.setdefault(r.param(by) if by else None, []).append(r)
        for gval, rs in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
            suffix = f"_{_slug(f'{by}={fmt_value(gval)}')}" if by and len(groups) > 1 else ""
            t = "Validation perplexity by epoch" + (
                f" ({HEADERS.get(by, by)} = {fmt_value(gval)})" if suffix else "")
            p = plot_curves(rs, curve_keys, plots_dir / f"valid_curves{suffix}.png", t,
                            train=bool(settings.get("train_curves")), log_y=log_y)
            if p:
                images.append((t, p))
    xs: list[tuple[str, str]] = []
    if want("hidden_size") and "nhid" in keys:
        xs.append(("nhid", "Perplexity against hidden size"))
    if want("minibatch") and "minibatch" in keys:
        xs.append(("minibatch", "Perplexity against minibatch size"))
    extra = settings.get("x", [])
    extra = [extra] if isinstance(extra, str) else list(extra)
    if settings.get("kind") and settings["kind"] != "long_range":  # the finding's plot, first
        extra.insert(0, KINDS.get(settings["kind"], settings["kind"]))
    for x in extra:
        x = _canon(x)
        if want("x") and x not in [a for a, _ in xs]:
            xs.append((x, f"Perplexity against {HEADERS.get(x, x)}"))
    for x, t in xs:
        series = [_canon(k) for k in settings["series"]] if settings.get("series") else \
            _series_keys(runs, keys, x)
        p = plot_against(runs, x, series, plots_dir / f"ppl_vs_{_slug(x)}.png", t, log_y=log_y)
        if p:
            images.append((t, p))
    md += long_range_section(runs, keys, root, plots_dir)  # runs on synthetic corpora
    if images:
        md += ["## Plots", ""]
        for t, p in images:
            rel = p.relative_to(root).as_posix()
            md += [f"### {t}", "", f"![{t}]({rel})", ""]
    failed = [r for r in runs if r.status == "failed" and r.error]
    if failed:
        md += ["## Failed runs", ""]
        md += [f"- `{r.name}`: {r.error} (see `{r.name}/error.txt`)" for r in failed]
        md.append("")
    out = root / "report.md"
    out.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    return out
