"""The experiment specs in experiments/: they parse, every preset validates, and the smoke
preset of each runs end to end (sweep, then report) on Penn Treebank cut tiny."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tprop.cli import main
from tprop.lab.expand import expand
from tprop.lab.experiments import PRESETS, experiments_dir, find_spec, list_specs, reproduce
from tprop.lab.runner import DONE
from tprop.lab.spec import SpecError, load_spec

EXPECTED = ["batch_vs_minibatch", "block_size", "hidden_size", "minibatch_size",
            "regularisation"]
BEYOND = ["hidden_size_kl", "long_range"]  # beyond the paper: tests/test_beyond_specs.py
# the exact parallel recurrence and the diagonal cells: tests/lab/test_parallel_specs.py
PARALLEL = ["credit_horizon", "diag_cells", "free_states", "parallel_iterations"]
CELLS_LONG_RANGE = ["long_range_cells"]  # synthetic corpora by cell: test_parallel_specs.py
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_five_specs_are_shipped() -> None:
    assert experiments_dir().is_dir()
    assert list_specs() == sorted(EXPECTED + BEYOND + PARALLEL + CELLS_LONG_RANGE)
    assert (experiments_dir() / "README.md").is_file()


@pytest.mark.parametrize("name", EXPECTED)
def test_spec_parses_and_every_preset_validates(name: str) -> None:
    spec = load_spec(find_spec(name))
    assert set(PRESETS) <= set(spec.presets)
    assert spec.title and spec.description
    for preset in PRESETS:
        points = expand(spec, preset, validate=True)  # make_config on every run
        assert len({p.name for p in points}) == len(points) >= 2
        for p in points:
            assert p.config.get("dataset") == "ptb"
    for p in expand(spec, "smoke"):  # the smoke preset stays tiny
        c = p.config
        assert c["train_tokens"] <= 3000 and c["eval_tokens"] <= 1000
        assert c.get("nhid", 100) <= 16 and c.get("emsize", 100) <= 16
        assert c.get("epochs", 10) <= 2
        assert c.get("h_steps", 10) <= 2 or c.get("method", "bptt") == "bptt"
        assert c.get("theta_steps", 5) <= 2 or c.get("method", "bptt") == "bptt"
    for p in expand(spec, "cpu"):  # the cpu study names its PTB subset
        assert p.config["train_tokens"] and p.config["eval_tokens"]


def test_find_spec_errors(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SpecError, match="unknown experiment 'nosuch'; known: batch_vs_minibatch"):
        find_spec("nosuch")
    assert find_spec("block_size.toml") == find_spec("block_size")
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "nosuch"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown experiment" in err
    with pytest.raises(SystemExit) as e:
        main(["reproduce", "block_size", "--preset", "gpu", "--dry-run"])
    assert e.value.code == 2 and "unknown preset 'gpu'" in capsys.readouterr().err


def test_reproduce_dry_run_lists_the_cpu_runs(capsys: pytest.CaptureFixture,
                                              tmp_path: Path) -> None:
    assert main(["reproduce", "block_size", "--dry-run", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "27 runs" in out and "method=admm,bptt=20,h_steps=10" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", EXPECTED)
def test_smoke_preset_runs_end_to_end(name: str, shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / name
    result, report = reproduce(name, preset="smoke", out=out, threads=1,
                               overrides={"data_dir": str(shared_data)}, echo=lambda _: None)
    md = report.read_text()
    # a table row per run, and every linked plot a readable PNG
    body = md.split("## Results", 1)[1].split("\n\n", 2)[1].splitlines()
    assert len([ln for ln in body if ln.startswith("|")]) == 2 + len(result.runs)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images and images[0].startswith("plots/valid_curves")
    import matplotlib.image as mpimg

    for rel in images:
        data = (out / rel).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert mpimg.imread(out / rel).shape[0] > 100
    for r in result.runs:
        assert (out / r["name"] / "config.json").is_file() or r["status"] == "failed"
    assert all(r["status"] in DONE for r in result.runs), [(r["name"], r.get("error"))
                                                          for r in result.runs]
