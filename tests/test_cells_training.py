"""The diagonal cells with every method: BPTT (sequential and exact), the BTPROP solvers,
resume; E0 for Block TPROP on a diagonal cell (PM with one block per update walks BPTT's
trajectory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_corpus

from tprop.config import make_config
from tprop.rundir import RunDir
from tprop.train import resume_trainer, train


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny", n_train=800, n_eval=200,
                        vocab=12)


def cfg(corpus_dir: Path, **kw: Any):
    base = dict(data_dir=str(corpus_dir), dataset=None, quiet=True, device="cpu",
                model="diag-lstm", emsize=4, nhid=5, bptt=4, batch_size=1, eval_batch_size=2,
                train_tokens=161, eval_tokens=120, epochs=2, seed=3, optim="sgd", lr=0.5,
                clip=0.5, tol=10, max_ppl=1e9, dtype="float64", blocks_per_update=5,
                h_steps=2, h_optim="sgd", h_lr=0.1, theta_steps=1, u_start=1)
    base.update(kw)
    return make_config(**base)


def rows(run: Path) -> list[dict[str, Any]]:
    return RunDir(run).read_metrics()


@pytest.mark.parametrize("model", ["diag-gru", "diag-lstm"])
def test_pm_one_block_per_update_walks_the_bptt_trajectory(corpus_dir: Path, tmp_path: Path,
                                                           model: str) -> None:
    train(cfg(corpus_dir, model=model, method="bptt"), tmp_path / "bptt")
    train(cfg(corpus_dir, model=model, method="pm", blocks_per_update=1, h_steps=0,
              h_init="forward"), tmp_path / "pm")
    for a, b in zip(rows(tmp_path / "bptt"), rows(tmp_path / "pm")):
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-9)
        assert b["residual"] < 1e-12


@pytest.mark.parametrize("method", ["pm", "admm", "alm"])
def test_btprop_solvers_train_the_diagonal_cells(corpus_dir: Path, tmp_path: Path,
                                                 method: str) -> None:
    summary = train(cfg(corpus_dir, method=method, model="diag-gru", nlayers=2), tmp_path / "r")
    assert summary["status"] == "finished"
    r = rows(tmp_path / "r")
    assert r[-1]["penalty"] > 0 and r[-1]["residual"] > 0


def test_exact_run_resumes_exactly(corpus_dir: Path, tmp_path: Path) -> None:
    kw = dict(method="bptt", recurrence="newton", block_size=1, bptt=8, rec_tol=1e-12)
    train(cfg(corpus_dir, **kw, epochs=3), tmp_path / "straight")
    train(cfg(corpus_dir, **kw, epochs=1), tmp_path / "split")
    resume_trainer(tmp_path / "split", epochs=3).fit()
    for a, b in zip(rows(tmp_path / "straight"), rows(tmp_path / "split")):
        assert a["valid_loss"] == b["valid_loss"] and a["fwd_iters_mean"] == b["fwd_iters_mean"]
    pa = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["model"]
    pb = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
