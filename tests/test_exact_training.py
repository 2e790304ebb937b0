"""Training and evaluating with the exact parallel recurrence (--recurrence jacobi|newton):
whole runs equal sequential BPTT's (E2 end to end), with dropout too; resume; metrics;
parallel evaluation; the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_corpus

from tprop.cli import main
from tprop.config import ConfigError, TrainConfig, make_config
from tprop.evaluate import evaluate
from tprop.recurrence import RecurrenceSettings
from tprop.rundir import RunDir
from tprop.train import make_trainer, resume_trainer, train


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny", n_train=1200, n_eval=300,
                        vocab=14)


def cfg_for(data_dir: Path, **kw: Any) -> TrainConfig:
    base = dict(data_dir=str(data_dir), dataset=None, quiet=True, device="cpu", model="lstm",
                emsize=6, nhid=7, nlayers=1, bptt=12, batch_size=3, eval_batch_size=2,
                train_tokens=901, eval_tokens=250, epochs=2, seed=5, optim="sgd", lr=1.0,
                clip=0.5, tol=10, dtype="float64", max_ppl=1e9)
    base.update(kw)
    return make_config(**base)


def rows(run: Path) -> list[dict[str, Any]]:
    return RunDir(run).read_metrics()


def params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def assert_same_trajectory(a: Path, b: Path, rel: float = 1e-9) -> None:
    ra, rb = rows(a), rows(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        for key in ("train_loss", "valid_loss"):
            assert x[key] == pytest.approx(y[key], rel=rel, abs=0), key
    pa, pb = params(a), params(b)
    for k in pa:
        assert torch.allclose(pa[k], pb[k], rtol=rel, atol=1e-12), k


@pytest.mark.parametrize("recurrence", ["jacobi", "newton"])
@pytest.mark.parametrize("cell,nlayers", [("lstm", 2), ("gru", 1)])
def test_two_epochs_equal_sequential_bptt(corpus_dir: Path, tmp_path: Path, recurrence: str,
                                          cell: str, nlayers: int) -> None:
    """Windows of 12 steps cut into 4 blocks of 3 (and 3 columns), solved to 1e-12: the run
    walks sequential BPTT's trajectory with window 12."""
    common = dict(model=cell, nlayers=nlayers, update_freq=2)
    train(cfg_for(corpus_dir, **common), tmp_path / "seq")
    train(cfg_for(corpus_dir, recurrence=recurrence, block_size=3, rec_tol=1e-12, **common),
          tmp_path / "par")
    assert_same_trajectory(tmp_path / "par", tmp_path / "seq")
    r = rows(tmp_path / "par")[-1]
    assert r["blocks"] == 4 and r["fwd_iters_max"] >= 1 and r["fwd_residual_max"] <= 1e-12
    assert r["fwd_fallbacks"] == 0 and sum(r["fwd_iters_hist"].values()) == r["solves"]


def test_partial_last_block_run(corpus_dir: Path, tmp_path: Path) -> None:
    """A window of 12 in blocks of 5: the last block has 2 steps."""
    train(cfg_for(corpus_dir), tmp_path / "seq")
    train(cfg_for(corpus_dir, recurrence="jacobi", block_size=5, rec_tol=1e-12),
          tmp_path / "par")
    assert_same_trajectory(tmp_path / "par", tmp_path / "seq")
    assert rows(tmp_path / "par")[0]["blocks"] == 3


def test_dropout_masks_are_the_windows_not_the_sweeps(corpus_dir: Path, tmp_path: Path) -> None:
    """With dropout the masks are drawn once per window: solving in 4 blocks walks the same
    trajectory as the one-block pass over the window with the very same masks (M = 1, no
    unknowns: one fused call), which the float64 unit tests tie to a step-by-step loop."""
    common = dict(model="lstm", nlayers=2, dropout=0.3, recurrence="jacobi", rec_tol=1e-12)
    train(cfg_for(corpus_dir, block_size=3, **common), tmp_path / "blocks")
    train(cfg_for(corpus_dir, block_size=12, **common), tmp_path / "one")
    assert_same_trajectory(tmp_path / "blocks", tmp_path / "one")
    assert rows(tmp_path / "one")[0]["blocks"] == 1
    # and the masks matter: without dropout the trajectory is another one
    train(cfg_for(corpus_dir, block_size=3, **{**common, "dropout": 0.0}), tmp_path / "none")
    assert rows(tmp_path / "none")[0]["train_loss"] != pytest.approx(
        rows(tmp_path / "blocks")[0]["train_loss"], rel=1e-6)


def test_resume_continues_exactly(corpus_dir: Path, tmp_path: Path) -> None:
    """The warm starts are saved with the checkpoint: a run stopped after epoch 1 and resumed
    equals the straight run, iteration counts included."""
    kw = dict(recurrence="newton", block_size=4, rec_tol=1e-9, warm_start="previous")
    train(cfg_for(corpus_dir, **kw), tmp_path / "straight")
    train(cfg_for(corpus_dir, **{**kw, "epochs": 1}), tmp_path / "split")
    tr = resume_trainer(tmp_path / "split", epochs=2)
    assert tr.exact.warm  # the saved solutions came back
    tr.fit()
    a, b = rows(tmp_path / "straight"), rows(tmp_path / "split")
    for x, y in zip(a, b):
        for key in ("train_loss", "valid_loss", "fwd_iters_mean", "adj_iters_mean"):
            assert x[key] == y[key], key


def test_warm_start_saves_iterations(corpus_dir: Path) -> None:
    """The previous epoch's solution of the same window as the first guess: fewer sweeps than
    starting from zero (with a small learning rate the states hardly move)."""
    out = {}
    for warm in ("previous", "zero"):
        tr = make_trainer(cfg_for(corpus_dir, recurrence="jacobi", block_size=2, lr=1e-5,
                                  rec_tol=1e-6, warm_start=warm, epochs=2, bptt=12))
        tr.fit()
        out[warm] = tr._rows[-1]["fwd_iters_mean"]
    assert out["previous"] < out["zero"]


@pytest.mark.parametrize("recurrence", ["jacobi", "newton"])
def test_parallel_evaluation_equals_sequential(corpus_dir: Path, recurrence: str) -> None:
    tr = make_trainer(cfg_for(corpus_dir, epochs=1))
    tr.fit()
    seq = evaluate(tr.model, tr.valid_data, 2)
    st = RecurrenceSettings(recurrence=recurrence, rec_tol=1e-12)
    par = evaluate(tr.model, tr.valid_data, 2, recurrence=st, block_size=7)
    assert par[1] == seq[1]
    assert par[0] == pytest.approx(seq[0], rel=1e-10)


def test_settings_are_checked(corpus_dir: Path) -> None:
    with pytest.raises(ConfigError, match="--block-size"):
        cfg_for(corpus_dir, recurrence="jacobi")
    with pytest.raises(ConfigError, match="--recurrence"):
        cfg_for(corpus_dir, recurrence="newton", block_size=3, method="pm")
    with pytest.raises(ConfigError, match="--block-size: must be at most"):
        cfg_for(corpus_dir, recurrence="jacobi", block_size=20)
    with pytest.raises(ConfigError, match="--credit-blocks"):
        cfg_for(corpus_dir, recurrence="jacobi", block_size=3, credit_blocks=-2)


def test_command_line_train_eval(corpus_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(corpus_dir), "--out", str(out), "--quiet",
                 "--device", "cpu", "--emsize", "6", "--nhid", "7", "--bptt", "12",
                 "--block-size", "4", "--recurrence", "jacobi", "--batch-size", "3",
                 "--train-tokens", "901", "--eval-tokens", "250", "--epochs", "1",
                 "--credit-blocks", "all", "--rec-tol", "1e-6"]) == 0
    log = capsys.readouterr().out
    assert "iters" in log
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recurrence"] == "jacobi" and cfg["block_size"] == 4
    assert main(["eval", str(out), "--split", "valid", "--json"]) == 0
    seq = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--split", "valid", "--json", "--recurrence", "newton",
                 "--block-size", "5", "--rec-tol", "1e-7"]) == 0
    par = json.loads(capsys.readouterr().out)
    assert par["recurrence"] == "newton" and par["tokens"] == seq["tokens"]
    assert par["loss"] == pytest.approx(seq["loss"], rel=1e-5)
