"""Sequence parallelism (gloo on 127.0.0.1, 2 and 3 processes, float64): the exact parallel
recurrence with every window's blocks sharded along time gives the one-process run's
parameters and metrics, for Jacobi and Newton, forward and adjoint, with M not divisible by
P and with shards of a single block; every rank logs the same iterations and residuals;
parallel evaluation sharded the same way; the command line under torchrun, resumed on one
process."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_corpus
from test_distributed import env_for, finish, rel_err, start_ranks, torchrun

from tprop.cli import main
from tprop.config import TrainConfig, make_config
from tprop.evaluate import evaluate
from tprop.recurrence import RecurrenceSettings
from tprop.rundir import RunDir
from tprop.train import make_trainer

TOL = 1e-10

# (name, world sizes, overrides): windows of 14 steps (or 12), blocks of 3 or 4.
CASES: list[tuple[str, dict[str, Any]]] = [
    # M = 5 blocks (the last of 2 steps): 3 + 2 on 2 ranks, 2 + 2 + 1 on 3 ranks
    ("jacobi", dict(recurrence="jacobi", block_size=3, bptt=14)),
    # Newton: M = 4 blocks: 2 + 2 on 2 ranks, 2 + 1 + 1 on 3 (single-block shards)
    ("newton", dict(recurrence="newton", block_size=3, bptt=12, model="gru")),
    # two layers with dropout: one unit per layer, masks alike on every rank; update_freq 2
    ("jacobi-dropout", dict(recurrence="jacobi", block_size=4, bptt=14, nlayers=2,
                            dropout=0.3, update_freq=2)),
    # the credit horizon: one sweep back, and a diagonal cell at block size 1 (M = 12)
    ("credit-diag", dict(recurrence="newton", block_size=1, bptt=12, model="diag-lstm",
                         credit_blocks=0)),
]


def cfg_dict(data_dir: Path | str, **kw: Any) -> dict[str, Any]:
    base = dict(data_dir=str(data_dir), dataset=None, quiet=True, device="cpu", model="lstm",
                emsize=4, nhid=5, nlayers=1, batch_size=2, eval_batch_size=2,
                train_tokens=300, eval_tokens=160, epochs=2, seed=3, optim="sgd", lr=0.5,
                clip=0.5, dropout=0.0, tol=10, max_ppl=1e9, method="bptt", rec_tol=1e-12,
                dtype="float64", dist_timeout=30.0)
    base.update(kw)
    return base


def snapshot(trainer: Any) -> dict[str, Any]:
    keys = ("train_loss", "valid_loss", "fwd_iters_mean", "fwd_iters_max", "adj_iters_mean",
            "fwd_residual_max", "adj_residual_max", "solves")
    return {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "rows": [{k: r[k] for k in keys} for r in trainer._rows]}


def _worker(data_dir: str, out: str) -> None:
    """One rank: every case in turn, then a sharded parallel evaluation."""
    import torch.distributed as dist

    from tprop import distributed

    torch.set_num_threads(1)
    distributed.init_process_group(torch.device("cpu"), 60)
    comm = distributed.DistComm(torch.device("cpu"), 60)
    results: dict[str, Any] = {}
    for name, kw in CASES:
        trainer = make_trainer(TrainConfig.from_dict(cfg_dict(data_dir, **kw)).validate(),
                               None, comm=comm)
        trainer.fit()
        results[name] = snapshot(trainer)
        if name == "newton":
            st = RecurrenceSettings(recurrence="newton", rec_tol=1e-12)
            results["eval"] = evaluate(trainer.model, trainer.valid_data, 2, comm, st, 3)[0]
            results["eval_seq"] = evaluate(trainer.model, trainer.valid_data, 2)[0]
    results["bytes"] = dict(comm.bytes)
    torch.save(results, f"{out}.{dist.get_rank()}")
    comm.close()  # a barrier, then the group destroyed
    os._exit(0)  # the results are saved: no gloo teardown at interpreter exit


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("spcorpus") / "tiny", n_train=800,
                        n_eval=200, vocab=12)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def sharded(request: pytest.FixtureRequest, corpus_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    tmp = tmp_path_factory.mktemp(f"sp{world}")
    out = tmp / "results.pt"
    code = f"import test_sequence_parallel as t; t._worker({str(corpus_dir)!r}, {str(out)!r})"
    runs = finish(start_ranks(["-c", code], world, tmp), timeout=600)
    assert [rc for rc, _ in runs] == [0] * world, "\n".join(t[-3000:] for _, t in runs)
    return world, [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def one_process(corpus_dir: Path) -> dict[str, Any]:
    out = {}
    for name, kw in CASES:
        trainer = make_trainer(make_config(**cfg_dict(corpus_dir, **kw)))
        trainer.fit()
        out[name] = snapshot(trainer)
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_p_ranks_equal_one(name: str, sharded: tuple[int, list[dict[str, Any]]],
                           one_process: dict[str, Any]) -> None:
    world, ranks = sharded
    ref = one_process[name]
    for r, got in enumerate(ranks):
        for k, v in ref["model"].items():
            assert v.dtype == torch.float64
            assert rel_err(got[name]["model"][k], v) < TOL, f"{name}, rank {r}/{world}: {k}"
        for gr, rr in zip(got[name]["rows"], ref["rows"]):
            for key in ("train_loss", "valid_loss"):
                assert abs(gr[key] / rr[key] - 1) < TOL, (name, r, key)
            # the same iterations as one process (the convergence test is global)
            assert gr["fwd_iters_mean"] == rr["fwd_iters_mean"], (name, r)
            assert gr["adj_iters_mean"] == rr["adj_iters_mean"], (name, r)
    assert ref["rows"][-1]["fwd_iters_max"] >= 1


def test_every_rank_logs_the_same_iterations_and_residuals(
        sharded: tuple[int, list[dict[str, Any]]]) -> None:
    _, ranks = sharded
    for name, _ in CASES:
        rows0 = ranks[0][name]["rows"]
        for got in ranks[1:]:
            assert got[name]["rows"] == rows0, name  # iterations, residuals, losses: all


def test_sharded_parallel_evaluation(sharded: tuple[int, list[dict[str, Any]]]) -> None:
    _, ranks = sharded
    for got in ranks:
        assert got["eval"] == pytest.approx(got["eval_seq"], rel=1e-10)
    assert ranks[0]["bytes"]["boundary"] > 0 and ranks[0]["bytes"]["scan"] > 0


def _args(corpus_dir: Path, out: Path, epochs: int) -> list[str]:
    return ["train", "--data-dir", str(corpus_dir), "--quiet", "--device", "cpu", "--emsize",
            "4", "--nhid", "5", "--bptt", "14", "--block-size", "3", "--recurrence", "jacobi",
            "--batch-size", "2", "--eval-batch-size", "2", "--train-tokens", "300",
            "--eval-tokens", "160", "--seed", "3", "--optim", "adagrad", "--lr", "0.1",
            "--rec-tol", "1e-12", "--dtype", "float64", "--tol", "10", "--max-ppl", "1e9",
            "--epochs", str(epochs), "--out", str(out)]


def test_torchrun_two_ranks_then_resume_on_one(corpus_dir: Path, tmp_path: Path) -> None:
    """A time-sharded run under torchrun, resumed in one process (the warm starts gathered
    into the checkpoint and cut again), equals the straight one-process run."""
    straight = tmp_path / "straight"
    assert main(_args(corpus_dir, straight, 3)) == 0
    run = tmp_path / "run"
    res = torchrun(_args(corpus_dir, run, 2), tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "distributed: 2 ranks" in (run / "train.log").read_text()
    warm = torch.load(run / "last.pt", weights_only=True)["method_state"]["warm"]
    assert all(t.shape[0] == 5 for sols in warm.values() for t in sols.values())  # all blocks
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    a, b = RunDir(run).read_metrics(), RunDir(straight).read_metrics()
    assert [r["epoch"] for r in a] == [1, 2, 3]
    for x, y in zip(a, b):
        assert abs(x["valid_loss"] / y["valid_loss"] - 1) < TOL
        assert x["fwd_iters_mean"] == y["fwd_iters_mean"]
    pa = torch.load(run / "last.pt", weights_only=True)["model"]
    pb = torch.load(straight / "last.pt", weights_only=True)["model"]
    for k in pa:
        assert rel_err(pa[k], pb[k]) < TOL, k
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"


def test_too_few_blocks_for_the_ranks_is_refused(corpus_dir: Path, tmp_path: Path) -> None:
    args = _args(corpus_dir, tmp_path / "run", 1)
    args[args.index("--block-size") + 1] = "7"  # 2 blocks for 3 ranks
    runs = finish(start_ranks(["-m", "tprop", *args], 3, tmp_path))
    assert [rc for rc, _ in runs] == [2, 2, 2]
    assert "needs at least 3 blocks per window" in runs[0][1]
    assert env_for(tmp_path)["OMP_NUM_THREADS"] == "1"
