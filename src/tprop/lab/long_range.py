"""The report's long-range section: for runs on synthetic corpora (``tprop data synth``: a
``synth.json`` beside the corpus), the share of the memory gap each run closes against the
dependency length over K (a table per task and ``plots/memory_gap.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..fmt import finite, fmt_ppl, fmt_value
from .plots import figure, save, shared_legend, styles
from .runs import Run, sort_key
from .tables import run_label

INTRO = ("Each synthetic corpus (`tprop data synth`, docs/beyond.md) has a dependency length L "
         "and two entropy floors: the perplexity of the optimal predictor with the whole past "
         "(**with memory**) and with only the last L − 1 tokens (**without memory**). The "
         "**share of the memory gap closed** is (log ppl_nomem − log ppl) / (log ppl_nomem − "
         "log ppl_mem) at the test perplexity: 0 = nothing of the long-range dependency "
         "captured, 1 = all of it (negative: worse than a model without long-range memory). "
         "L/K is the dependency length over the BPTT window / block size K.")


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


def _rows(runs: list[Run], keys: list[str], root: Path) -> list[dict[str, Any]]:
    """One row per run on a synthetic corpus with a test perplexity."""
    from ..data.synth import memory_gap_share

    series = [k for k in keys if k != "corpus"]
    rows = []
    for r in runs:
        meta = synth_info(r, root)
        test = r.value("test_ppl")
        if meta is None or not finite(test):
            continue
        dep = int(meta["dependency_min"])
        k = int(r.config.get("bptt", 1))
        rows.append({"run": r, "task": meta["task"], "L": dep, "K": k, "ratio": dep / k,
                     "mem": meta["ppl_mem"], "nomem": meta["ppl_nomem"], "test": test,
                     "share": memory_gap_share(test, meta["ppl_mem"], meta["ppl_nomem"]),
                     "meta": meta, "label": run_label(r, series) if series else r.method})
    return rows


def _all_runs_table(rows: list[dict[str, Any]]) -> list[str]:
    md = ["| corpus | task | L | K | L/K | run | test ppl | floor (memory) | "
          "floor (no memory) | share closed |",
          "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for d in sorted(rows, key=lambda d: (d["task"], d["L"], d["label"])):
        md.append(f"| {d['run'].param('corpus')} | {d['task']} | {d['L']} | {d['K']} | "
                  f"{d['ratio']:g} | {d['label']} | {fmt_ppl(d['test'])} | {d['mem']:.3f} | "
                  f"{d['nomem']:.3f} | {d['share']:.3f} |")
    return md


def _task_table(rows: list[dict[str, Any]], task: str, labels: list[str]) -> list[str]:
    ratios = sorted({d["ratio"] for d in rows if d["task"] == task})
    md = ["", f"**Share of the memory gap closed**, {task} (rows: run; columns: L/K):", "",
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
    return md


def long_range_section(runs: list[Run], keys: list[str], root: Path,
                       plots_dir: Path) -> list[str]:
    """Runs on synthetic long-range corpora: the share of the memory gap each closes, against
    the dependency length over K (a table per task, and a plot). [] when there are none."""
    rows = _rows(runs, keys, root)
    if not rows:
        return []
    series = [k for k in keys if k != "corpus"]
    md = ["## Long-range dependencies", "", INTRO, ""] + _all_runs_table(rows)
    tasks = sorted({d["task"] for d in rows})
    labels = list(dict.fromkeys(d["label"] for d in sorted(rows, key=lambda d: (
        tuple(sort_key(d["run"].param(k)) for k in series), d["label"]))))
    for task in tasks:
        md += _task_table(rows, task, labels)
    drawn = [d for d in rows if d["run"].plottable]
    path = plot_memory_gap(drawn, tasks, labels, plots_dir / "memory_gap.png") if drawn else None
    if path is not None:
        rel = path.relative_to(root).as_posix()
        t = "Share of the memory gap closed against dependency length / K"
        md += ["", f"### {t}", "", f"![{t}]({rel})"]
    return md + [""]


def plot_memory_gap(rows: list[dict[str, Any]], tasks: list[str], labels: list[str],
                    path: Path) -> Path | None:
    """The share of the memory gap closed against L/K, a panel per task, a line per label."""
    fig, axes = figure(len(tasks), width=5.5)
    style = dict(zip(labels, styles(len(labels), markersize=5.0)))
    for ax, task in zip(axes, tasks):
        xs_all: set[float] = set()
        for lab in labels:
            pts = sorted((d["ratio"], d["share"]) for d in rows
                         if d["task"] == task and d["label"] == lab)
            if pts:
                ax.plot(*zip(*pts), label=lab, **style[lab])
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
    shared_legend(fig, axes)
    fig.suptitle("Long-range credit assignment: 0 = no long-range memory, 1 = the floor")
    return save(fig, path)
