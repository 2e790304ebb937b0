"""``tprop report``: tables and plots from run directories written by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tprop.cli import main
from tprop.lab.report import load_runs, minibatch_size, write_report

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


def table_rows(md: str) -> list[list[str]]:
    """The cells of the results table's body rows."""
    section = md.split("## Results", 1)[1].split("\n\n", 2)[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")][2:]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def header(md: str) -> list[str]:
    section = md.split("## Results", 1)[1].split("\n\n", 2)[1]
    return [c.strip() for c in section.splitlines()[0].strip("|").split("|")]


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
