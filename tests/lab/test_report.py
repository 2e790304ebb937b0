"""``tprop report``: tables and plots from run directories written by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tprop.cli import main
from tprop.lab.report import write_report
from tprop.lab.runs import load_runs, minibatch_size

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(d: Path, config: dict[str, Any], valid: list[float], *, test: float | None = 100.0,
             status: str | None = "finished", train: list[float] | None = None,
             train_eval: list[float] | None = None, error: str | None = None) -> Path:
    """A run directory as the trainer leaves it (no checkpoints), from per-epoch numbers."""
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config))
    train = train or [v * 1.5 for v in valid]
    rows = []
    for i, v in enumerate(valid):
        row = {"epoch": i + 1, "lr": 0.1, "train_loss": math.log(train[i]),
               "train_ppl": train[i], "valid_ppl": v, "tokens_per_s": 1000.0,
               "wall_s": 10.0 * (i + 1), "epoch_s": 10.0}
        if train_eval:
            row["train_eval_ppl"] = train_eval[i]
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        best = min(range(len(valid)), key=lambda i: valid[i])
        (d / "summary.json").write_text(json.dumps({
            "status": status, "method": config.get("method", "bptt"),
            "best_valid_ppl": valid[best], "best_epoch": best + 1, "test_ppl": test,
            "train_ppl_at_best": train[best], "epochs_run": len(valid),
            "wall_s": 10.0 * len(valid), "parameters": 1234}))
    if error is not None:
        (d / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")
    return d


def results(md: str) -> list[list[str]]:
    """The cells of the results table: the header, then the body rows."""
    section = md.split("## Results", 1)[1].split("\n\n", 2)[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[:1] + lines[2:]]


def run_column(md: str) -> list[str]:
    """The results table's first column: the run directory's name, header first."""
    return [cells[0] for cells in results(md)]


def table_rows(md: str) -> list[list[str]]:
    """The cells of the results table's body rows, after the run-name column."""
    return [cells[1:] for cells in results(md)[1:]]


def header(md: str) -> list[str]:
    """The results table's headers, after the run-name column."""
    return results(md)[0][1:]


def check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def linked_images(md: str, root: Path) -> list[Path]:
    import re

    return [root / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)]


BASE = {"dataset": "ptb", "bptt": 10, "nhid": 100, "batch_size": 32, "epochs": 3}


def test_block_size_table_has_a_row_per_run_with_its_numbers(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    make_run(root / "method=bptt,bptt=5", {**BASE, "method": "bptt", "bptt": 5},
             [300.0, 250.5, 260.0], test=240.25)
    make_run(root / "method=pm,bptt=5,h_steps=0", {**BASE, "method": "pm", "bptt": 5,
                                                  "h_steps": 0}, [320.0, 280.0, 270.125],
             test=265.0)
    make_run(root / "method=pm,bptt=5,h_steps=5", {**BASE, "method": "pm", "bptt": 5,
                                                  "h_steps": 5}, [5000.0, 9000.0], test=4800.0,
             status="diverged")
    make_run(root / "method=bptt,bptt=10", {**BASE, "method": "bptt"}, [290.0, 200.0],
             status=None)  # interrupted: no summary yet
    make_run(root / "method=pm,bptt=10,h_steps=1", {**BASE, "method": "pm", "h_steps": 1},
             [], status=None, error="RuntimeError: boom")
    (root / "sweep.json").write_text(json.dumps({
        "spec": "block_size", "preset": "smoke", "title": "Block size", "keys": ["method",
                                                                                 "bptt", "h_steps"],
        "report": {"rows": ["method", "h_steps", "bptt"], "curves_by": "bptt",
                   "pivot": {"rows": ["method", "h_steps"], "columns": "bptt",
                             "values": ["test_ppl"]}},
        "runs": []}))
    path = write_report(root)
    md = path.read_text()
    assert md.startswith("# Block size\n") and "preset `smoke`" in md
    assert header(md)[:3] == ["method", "h-steps", "K"]
    rows = table_rows(md)
    assert len(rows) == 5
    by = {(r[0], r[1], r[2]): r for r in rows}
    bptt5 = by[("bptt", "–", "5")]  # h-steps do not apply to BPTT
    assert bptt5[3:] == ["375.75", "250.50", "**240.25**", "2", "3", "30.0 s", "finished"]
    assert by[("pm", "0", "5")][3:8] == ["405.19", "270.12", "265.00", "3", "3"]
    assert by[("pm", "5", "5")][-1] == "diverged"
    incomplete = by[("bptt", "–", "10")]
    assert incomplete[3:7] == ["300.00", "200.00", "–", "2"] and incomplete[-1] == "incomplete"
    assert by[("pm", "1", "10")][-1] == "failed"
    assert "RuntimeError: boom" in md.split("## Failed runs", 1)[1]
    # rows sorted: method (bptt first), then h-steps, then K
    assert [tuple(r[:3]) for r in rows] == [("bptt", "–", "5"), ("bptt", "–", "10"),
                                          ("pm", "0", "5"), ("pm", "1", "10"), ("pm", "5", "5")]
    # pivot: rows method x h-steps, one column per K
    pivot = md.split("## Tables", 1)[1]
    assert "| method | h-steps | K=5 | K=10 |" in pivot
    assert "| pm | 0 | 265.00 |" in pivot
    # one curve figure per block size; no hidden-size nor minibatch plot
    images = linked_images(md, root)
    assert sorted(p.name for p in images) == ["valid_curves_bptt=10.png", "valid_curves_bptt=5.png"]
    for p in images:
        check_png(p)
    assert sorted(p.name for p in (root / "plots").iterdir()) == sorted(p.name for p in images)


def test_hidden_size_plot_only_when_nhid_varies(tmp_path: Path) -> None:
    root = tmp_path / "h"
    for method in ("bptt", "pm"):
        for n in (25, 50, 100):
            make_run(root / f"method={method},nhid={n},emsize={n}",
                     {**BASE, "method": method, "nhid": n, "emsize": n},
                     [400.0 - n, 350.0 - n], test=300.0 - n + (5 if method == "pm" else 0))
    md = write_report(root).read_text()
    names = [p.name for p in linked_images(md, root)]
    assert names == ["valid_curves.png", "ppl_vs_nhid.png"]
    for p in linked_images(md, root):
        check_png(p)
    assert len(table_rows(md)) == 6 and header(md)[:3] == ["method", "emb", "hidden"]
    assert "Perplexity against hidden size" in md


def test_minibatch_plot_only_when_minibatch_size_varies(tmp_path: Path) -> None:
    root = tmp_path / "b"
    for b in (4, 16, 64):
        make_run(root / f"batch_size={b}", {**BASE, "batch_size": b}, [300.0 + b, 280.0 + b],
                 train_eval=[200.0 + b, 190.0 + b])
    make_run(root / "full", {**BASE, "full_batch": True}, [900.0, 800.0])
    md = write_report(root, title="Minibatch").read_text()
    assert md.startswith("# Minibatch\n")
    names = [p.name for p in linked_images(md, root)]
    assert names == ["valid_curves.png", "ppl_vs_minibatch.png"]
    for p in linked_images(md, root):
        check_png(p)
    assert header(md)[0] == "minibatch" and "train ppl (eval)" in header(md)
    assert [r[0] for r in table_rows(md)] == ["4", "16", "64", "all"]
    assert table_rows(md)[0][2] == "194.00"  # the evaluated training ppl at the best epoch

    # nothing varies but the seed: neither plot
    other = tmp_path / "s"
    for seed in (1, 2):
        make_run(other / f"seed={seed}", {**BASE, "seed": seed}, [300.0, 290.0])
    md = write_report(other).read_text()
    assert [p.name for p in linked_images(md, other)] == ["valid_curves.png"]
    assert header(md)[0] == "seed" and len(table_rows(md)) == 2


def test_minibatch_size_of_each_method() -> None:
    assert minibatch_size({"method": "bptt", "batch_size": 8, "update_freq": 2}) == 16
    assert minibatch_size({"method": "bptt", "batch_size": 8, "full_batch": True}) == "all"
    assert minibatch_size({"method": "pm", "blocks_per_update": "all"}) == "all"
    assert minibatch_size({"method": "admm", "blocks_per_update": 32}) == 32


def test_extra_x_plot_with_reference_lines_and_log_scale(tmp_path: Path) -> None:
    root = tmp_path / "lam"
    make_run(root / "method=bptt", {**BASE, "method": "bptt"}, [300.0, 250.0])
    for h in (0, 5):
        for lam in (0.01, 1.0, 100.0):
            make_run(root / f"method=pm,h_steps={h},lambda={lam}",
                     {**BASE, "method": "pm", "h_steps": h, "lam": lam},
                     [3000.0, 2000.0 / (1 + lam)], test=2000.0 / (1 + lam))
    (root / "sweep.json").write_text(json.dumps({"report": {"x": "lambda",
                                                            "train_curves": True}}))
    md = write_report(root).read_text()
    names = [p.name for p in linked_images(md, root)]
    assert names == ["valid_curves.png", "ppl_vs_lam.png"]
    for p in linked_images(md, root):
        check_png(p)
    assert "| bptt | – | – |" in md


def test_report_cli_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_run(tmp_path / "r" / "a", {**BASE}, [300.0, 200.0])
    assert main(["report", str(tmp_path / "r")]) == 0
    assert "report.md" in capsys.readouterr().out
    assert len(load_runs(tmp_path / "r")) == 1
    (tmp_path / "empty").mkdir()
    for d in ("empty", "missing"):
        with pytest.raises(SystemExit) as e:
            main(["report", str(tmp_path / d)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- unreadable runs
def test_a_corrupt_config_is_listed_and_warned(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "r"
    make_run(root / "good", {**BASE, "nhid": 50}, [300.0, 200.0])
    make_run(root / "other", {**BASE, "nhid": 100}, [310.0, 210.0])
    make_run(root / "broken", {**BASE, "nhid": 200}, [320.0, 220.0])
    (root / "broken" / "config.json").write_text('{"nhid": 20')  # cut short
    (root / "planned").mkdir()
    (root / "planned" / "point.json").write_text("[1, 2]")  # a sweep's point, garbled
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2
    assert str(root / "broken" / "config.json") in warnings[0] and "not valid JSON" in warnings[0]
    assert str(root / "planned" / "point.json") in warnings[1]
    md = (root / "report.md").read_text()
    section = md.split("## Runs that could not be read", 1)[1].split("##", 1)[0]
    assert "`broken/config.json` is not valid JSON" in section
    assert "`planned/point.json`" in section
    assert run_column(md)[1:] == ["`good`", "`other`"]  # the readable runs, in the table
    assert "2 could not be read" in md


def test_two_writers_of_one_run_are_flagged_not_drawn(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "w"
    make_run(root / "method=bptt", {**BASE, "method": "bptt"}, [300.0, 250.0])
    twice = make_run(root / "method=pm", {**BASE, "method": "pm"}, [310.0, 260.0])
    rows = (twice / "metrics.jsonl").read_text().splitlines()
    # two processes appended their epochs, interleaved: 1, 1, 2, 2
    (twice / "metrics.jsonl").write_text("\n".join([rows[0], rows[0], rows[1], rows[1]]) + "\n")
    figures = capture_figures(monkeypatch)
    lines: list[str] = []
    md = write_report(root, echo=lines.append).read_text()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "method=pm" in lines[0]
    assert "epochs 1, 1, 2, 2" in lines[0]
    warned = md.split("## Warnings", 1)[1].split("##", 1)[0]
    assert "`method=pm`" in warned and "two processes" in warned
    by = {r[0]: r for r in table_rows(md)}
    assert by["pm"][-1] == "finished ⚠" and by["bptt"][-1] == "finished"
    (ax,) = figures["valid_curves.png"].axes
    assert [ln.get_label() for ln in ax.get_lines()] == ["bptt"]  # the doubtful run: not drawn
    assert len(load_runs(root)[1].warnings) == 1


# --------------------------------------------------------------------------- plots and headers
def capture_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The figures the report saves, by file name (they are still written)."""
    import tprop.lab.plots as plots

    figures: dict[str, Any] = {}
    real = plots.save

    def save(fig: Any, path: Path) -> Path:
        figures[path.name] = fig
        return real(fig, path)

    monkeypatch.setattr(plots, "save", save)
    return figures


def styles_of(ax: Any) -> list[tuple]:
    return [(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")]


def test_identical_series_stay_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "same"
    for method in ("pm", "admm", "alm"):  # the same numbers for every method
        for n in (25, 50):
            make_run(root / f"method={method},nhid={n}", {**BASE, "method": method, "nhid": n},
                     [400.0 - n, 350.0 - n], test=300.0 - n)
    figures = capture_figures(monkeypatch)
    write_report(root)
    (ax,) = figures["valid_curves.png"].axes
    curves = styles_of(ax)
    assert len(curves) == 6
    assert len({s[1:] for s in curves}) == 6  # dashes and markers differ, not colours alone
    for ax in figures["ppl_vs_nhid.png"].axes[:2]:
        lines = styles_of(ax)
        assert len(lines) == 3 and len({s[1:] for s in lines}) == 3
        assert len({tuple(ln.get_ydata()) for ln in ax.get_lines()}) == 1  # they do overlap


def test_results_table_names_runs_and_no_header_twice(tmp_path: Path) -> None:
    root = tmp_path / "h"
    make_run(root / "a", {**BASE, "dataset": "ptb", "epochs": 2}, [300.0, 200.0])
    make_run(root / "b", {**BASE, "dataset": "ptb-char", "epochs": 3}, [5.0, 4.0, 3.5])
    md = write_report(root).read_text()
    head = results(md)[0]
    assert head[0] == "run" and run_column(md)[1:] == ["`a`", "`b`"]
    assert len(set(head)) == len(head), head
    # corpus (the folder or named corpus) and the dataset field share a label; epochs (the
    # setting) and epochs (those run) a header
    assert "corpus" in head and "corpus (--dataset)" in head
    assert "epochs" in head and "epochs (--epochs)" in head
    assert table_rows(md)[0][:3] == ["ptb", "ptb", "2"]
