"""The specs of the exact parallel recurrence and the diagonal cells (experiments/
credit_horizon, diag_cells, free_states, parallel_iterations): they parse, every preset
validates and runs what its description says, and the smoke preset runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_experiments import PARALLEL

from tprop.lab.expand import expand
from tprop.lab.experiments import PRESETS, find_spec, reproduce
from tprop.lab.spec import load_spec


@pytest.mark.parametrize("name", PARALLEL)
def test_spec_parses_and_every_preset_validates(name: str) -> None:
    spec = load_spec(find_spec(name))
    assert set(PRESETS) <= set(spec.presets) and spec.title and spec.description
    for preset in PRESETS:
        points = expand(spec, preset, validate=True)
        assert len({p.name for p in points}) == len(points) >= 2
    for p in expand(spec, "smoke"):
        c = p.config
        assert c["train_tokens"] <= 3000 and c["eval_tokens"] <= 1000
        assert c.get("nhid", 100) <= 16 and c.get("epochs", 10) <= 2


def test_what_the_specs_compare() -> None:
    cpu = {name: [p.config for p in expand(load_spec(find_spec(name)), "cpu")]
           for name in PARALLEL}
    credit = sorted(str(c["credit_blocks"]) for c in cpu["credit_horizon"])
    assert credit == sorted(["-1", "0", "1", "3", "7", "all"])
    assert {c["recurrence"] for c in cpu["credit_horizon"]} == {"jacobi"}
    free = {(c["method"], c.get("recurrence", "sequential"), c["bptt"]) for c in
            cpu["free_states"]}
    assert free == {("bptt", "jacobi", 320), ("bptt", "sequential", 320), ("bptt",
                    "sequential", 10), ("pm", "sequential", 10), ("alm", "sequential", 10)}
    cells = {(c["dataset"], c["model"], c["nhid"]) for c in cpu["diag_cells"]}
    assert len(cells) == 12 and {m for _, m, _ in cells} == {"lstm", "gru", "diag-lstm",
                                                            "diag-gru"}
    for c in cpu["diag_cells"]:
        assert (c.get("recurrence") == "newton") == c["model"].startswith("diag-")
    ks = {(c["nhid"], c["nlayers"], c["block_size"]) for c in cpu["parallel_iterations"]}
    assert len(ks) == 9


@pytest.mark.parametrize("name", PARALLEL)
def test_smoke_preset_runs_end_to_end(name: str, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / name
    result, report = reproduce(name, preset="smoke", out=out, threads=1,
                               overrides={"data_dir": str(shared_data)}, echo=lambda _: None)
    assert not result.failed, result.failed
    md = report.read_text()
    assert "## Results" in md and all(r["name"] in md for r in result.runs)


def test_long_range_cells_compares_every_cell_with_the_dependency_inside_the_window() -> None:
    spec = load_spec(find_spec("long_range_cells"))
    for preset in PRESETS:
        assert len(expand(spec, preset, validate=True)) == 12
    cpu = [p.config for p in expand(spec, "cpu")]
    assert {(c["model"], c["data_dir"]) for c in cpu} == {
        (m, d) for m in ("lstm", "gru", "diag-lstm", "diag-gru")
        for d in ("copy-20", "brackets-20", "adding-20")}
    for preset in PRESETS:  # every dependency of length L lies inside one BPTT window
        data = {k: {**v, **spec.presets[preset]["data"].get(k, {})}
                for k, v in spec.data.items()}
        lengths = [e["length"] for e in data.values()]
        assert all(L < c["bptt"] for c in (p.config for p in expand(spec, preset))
                   for L in lengths)


def test_long_range_cells_smoke_writes_the_memory_gap_section(tmp_path: Path) -> None:
    out = tmp_path / "cells"
    result, report = reproduce("long_range_cells", preset="smoke", out=out, threads=1,
                               echo=lambda _: None)
    assert not result.failed and len(result.runs) == 12
    md = report.read_text()
    assert "## Long-range dependencies" in md and "share closed" in md
    for model in ("lstm", "gru", "diag-lstm", "diag-gru"):
        assert f"model={model}" in md
