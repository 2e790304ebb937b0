"""The specs beyond the paper (experiments/long_range.toml, experiments/hidden_size_kl.toml),
the ``[data]`` table of sweep specs (synthetic corpora written by the sweep) and the report's
long-range section."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tprop.data.synth import read_info
from tprop.lab.corpora import resolve_data
from tprop.lab.expand import expand
from tprop.lab.experiments import PRESETS, find_spec, reproduce
from tprop.lab.report import write_report
from tprop.lab.runner import DONE
from tprop.lab.spec import SpecError, load_spec, parse_spec
from tprop.lab.sweep import run_sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_long_range_spec_parses_and_every_preset_validates() -> None:
    spec = load_spec(find_spec("long_range"))
    assert set(PRESETS) <= set(spec.presets) and spec.title and spec.description
    counts = {}
    for preset in PRESETS:
        points = expand(spec, preset, validate=True)
        counts[preset] = len(points)
        data = resolve_data(spec, preset)
        for p in points:
            assert p.config["data_dir"] in data  # every run reads a corpus of [data]
            assert p.config.get("dataset", "x") is None
        methods = {(p.config["method"], p.config.get("penalty")) for p in points}
        assert methods == {("bptt", None), ("pm", "l2"), ("pm", "kl")}
        k = next(p.config["bptt"] for p in points if p.config["method"] == "pm")
        lengths = sorted({data[p.config["data_dir"]]["length"] for p in points})
        assert lengths == [2 * k, 4 * k, 8 * k]  # dependencies of 2K, 4K, 8K
        assert max(p.config["bptt"] for p in points) == 8 * k  # the long-window reference
    assert counts == {"smoke": 12, "cpu": 72, "paper": 90}
    for p in expand(spec, "smoke"):
        c = p.config
        assert c["nhid"] <= 6 and c["emsize"] <= 6 and c["epochs"] <= 2
        assert c.get("h_steps", 0) <= 2 or c["method"] == "bptt"
    for name, entry in resolve_data(spec, "smoke").items():
        if name.startswith("copy"):
            assert entry["train_tokens"] <= 1000 and entry["symbols"] <= 3


def test_hidden_size_kl_spec_extends_hidden_size() -> None:
    spec = load_spec(find_spec("hidden_size_kl"))
    ref = load_spec(find_spec("hidden_size"))
    for preset in PRESETS:
        points = {p.name: p.config for p in expand(spec, preset)}
        base = {p.name: p.config for p in expand(ref, preset)}
        # hidden_size's runs, by name and config, plus one kl run per hidden size
        for name, cfg in base.items():
            assert {k: v for k, v in points[name].items() if k != "penalty"} == cfg
            assert points[name].get("penalty", "l2") == "l2"
        extra = [c for n, c in points.items() if n not in base]
        assert len(extra) == len(base) // 2
        assert all(c["method"] == "pm" and c["penalty"] == "kl" for c in extra)


def test_long_range_smoke_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "lr"
    lines: list[str] = []
    result, report = reproduce("long_range", preset="smoke", out=out, threads=1,
                               echo=lines.append)
    assert all(r["status"] in DONE for r in result.runs), [(r["name"], r.get("error"))
                                                          for r in result.runs]
    # the corpora were written first, into the sweep folder
    assert sum(ln.startswith("data copy-") for ln in lines) == 3
    for name in ("copy-2K", "copy-4K", "copy-8K"):
        meta = read_info(out / "data" / name)
        assert meta is not None and meta["task"] == "copy"
    assert not (out / "data" / "adding-2K").exists()  # only the corpora the preset's runs read
    cfg = json.loads((out / result.runs[0]["name"] / "config.json").read_text())
    assert Path(cfg["data_dir"]) == out / "data" / "copy-2K"
    md = report.read_text()
    assert "## Long-range dependencies" in md
    section = md.split("## Long-range dependencies", 1)[1]
    rows = [ln for ln in section.split("**Share", 1)[0].splitlines() if ln.startswith("| copy")]
    assert len(rows) == len(result.runs) == 12
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert "plots/memory_gap.png" in images
    for rel in images:
        assert (out / rel).read_bytes()[:8] == PNG_MAGIC
    # the results table tells the corpora apart
    assert "| corpus | method |" in md
    # resumable: everything is kept the second time
    lines.clear()
    result2, _ = reproduce("long_range", preset="smoke", out=out, threads=1, echo=lines.append)
    assert all(r["action"] == "skip" for r in result2.runs)
    assert not any(ln.startswith("data ") for ln in lines)


def test_report_finds_a_moved_sweeps_corpora(tmp_path: Path) -> None:
    """A sweep folder moved elsewhere: synth.json is found under <folder>/data/<name>."""
    spec = parse_spec({
        "data": {"c": {"task": "copy", "length": 4, "symbols": 2, "train_tokens": 400,
                       "eval_tokens": 150}},
        "base": {"data_dir": "c", "emsize": 4, "nhid": 4, "bptt": 2, "batch_size": 4,
                 "eval_batch_size": 2, "epochs": 1},
        "grid": {"method": ["bptt", "pm"]},
        "presets": {"x": {"h_steps": 1}},
    }, "t.toml", name="t")
    old = tmp_path / "old"
    run_sweep(spec, old, preset="x", threads=1, echo=lambda _: None)
    new = tmp_path / "new"
    old.rename(new)
    md = write_report(new).read_text()
    assert "## Long-range dependencies" in md and "memory_gap.png" in md


@pytest.mark.parametrize("data,match", [
    ({"c": {"length": 4}}, "must be a table such as"),
    ({"c": {"task": "copy", "size": 4}}, "unknown parameter 'size'"),
    ({"c": {"task": "nosuch"}}, "unknown synthetic task"),
    ({"c": {"task": "copy", "length": 3, "span": 3}}, "--span"),
    ({"c d": {"task": "copy"}}, "a corpus name uses"),
    ("copy", "must be a table of corpora"),
])
def test_data_table_errors(data, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec({"data": data, "grid": {"method": ["bptt", "pm"]}}, "t.toml")


def test_preset_data_entries() -> None:
    spec = parse_spec({"data": {"c": {"task": "copy", "length": 20}},
                       "grid": {"method": ["bptt", "pm"]},
                       "presets": {"s": {"data": {"c": {"length": 4}}}}}, "t.toml")
    assert resolve_data(spec, "s") == {"c": {"task": "copy", "length": 4}}
    assert resolve_data(spec, None) == {"c": {"task": "copy", "length": 20}}
    with pytest.raises(SpecError, match=r"\[presets.s.data\] d is not in \[data\]"):
        parse_spec({"data": {"c": {"task": "copy"}}, "grid": {"method": ["bptt", "pm"]},
                    "presets": {"s": {"data": {"d": {"length": 4}}}}}, "t.toml")
    with pytest.raises(SpecError, match="--span"):  # checked after the preset's changes
        parse_spec({"data": {"c": {"task": "copy", "length": 20}},
                    "grid": {"method": ["bptt", "pm"]},
                    "presets": {"s": {"data": {"c": {"length": 4, "span": 4}}}}}, "t.toml")


def test_hidden_size_kl_smoke_runs_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "hk"
    result, report = reproduce("hidden_size_kl", preset="smoke", out=out, threads=1,
                               overrides={"data_dir": str(shared_data)}, echo=lambda _: None)
    assert all(r["status"] in DONE for r in result.runs)
    assert len(result.runs) == 6
    md = report.read_text()
    assert "| pm | kl |" in md and "| pm | l2 |" in md and "| bptt | – |" in md
    assert "## Long-range dependencies" not in md
