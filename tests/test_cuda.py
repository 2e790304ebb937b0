"""CUDA: the identities and trajectories hold on a GPU, and runs move between devices.

Skipped without a GPU (CI has none); run on one with ``pytest tests/test_cuda.py``. The
references are computed on the CPU, independently of the code under test on the GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_btprop import cfg_for, last_ckpt, metrics
from test_objective import make_model
from test_solvers import flat, forward_problem, record_theta_grads, ref_tbptt_grad, rel

from tprop.objective import BlockProblem
from tprop.solvers import PenaltyMethod, SolverSettings
from tprop.train import resume_trainer, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny", n_train=800, n_eval=200,
                        vocab=12)


@pytest.mark.parametrize("cell,nlayers", [("rnn", 1), ("gru", 2), ("lstm", 1), ("lstm", 2)])
def test_E0_on_cuda_matches_the_cpu_reference(float64, cell: str, nlayers: int) -> None:
    """E0 with the fused (cuDNN) recurrence on the GPU, against plain autograd on the CPU."""
    model = make_model(cell, nlayers)
    K, M = 3, 4
    prob, _ = forward_problem(model, K, M, lam=2.5)
    expect = flat(ref_tbptt_grad(model, prob.inputs, prob.targets, prob.z_fixed))
    work = copy.deepcopy(model).cuda()
    dev = BlockProblem(work, prob.inputs.cuda(), prob.targets.cuda(), prob.z_fixed.cuda(),
                       prob.z.detach().clone().cuda(), 2.5, None)
    solver = PenaltyMethod(work, torch.optim.SGD(work.parameters(), lr=1.0),
                           SolverSettings(h_steps=0, theta_steps=1, clip=0.0, lam=2.5))
    rec = record_theta_grads(solver)
    solver.step(dev, epoch=1)
    got = flat(rec[0]).cpu()
    assert rel(got, expect) < 1e-10


def test_pm_walks_the_bptt_trajectory_on_cuda(corpus_dir: Path, tmp_path: Path,
                                              float64) -> None:
    common = dict(model="lstm", epochs=2, lr=0.7, clip=0.3, device="cuda")
    train(cfg_for(corpus_dir, method="bptt", batch_size=1, **common), tmp_path / "bptt")
    train(cfg_for(corpus_dir, method="pm", blocks_per_update=1, h_steps=0, theta_steps=1,
                  **common), tmp_path / "pm")
    for rb, rp in zip(metrics(tmp_path / "bptt"), metrics(tmp_path / "pm"), strict=True):
        assert rp["valid_ppl"] == pytest.approx(rb["valid_ppl"], rel=1e-9, abs=0)


@pytest.mark.parametrize("method", ["bptt", "pm", "admm", "alm"])
def test_cuda_and_cpu_runs_agree(corpus_dir: Path, tmp_path: Path, float64,
                                 method: str) -> None:
    """The same run on either device: the same validation perplexities (float64)."""
    kw = dict(method=method, epochs=2, u_start=1)
    train(cfg_for(corpus_dir, device="cpu", **kw), tmp_path / "cpu")
    train(cfg_for(corpus_dir, device="cuda", **kw), tmp_path / "cuda")
    mc, mg = metrics(tmp_path / "cpu"), metrics(tmp_path / "cuda")
    assert len(mc) == len(mg) == 2
    for a, b in zip(mc, mg, strict=True):
        assert b["valid_ppl"] == pytest.approx(a["valid_ppl"], rel=1e-8, abs=0)


def test_a_cuda_run_resumes_on_the_cpu(corpus_dir: Path, tmp_path: Path, float64) -> None:
    """Checkpoints written on the GPU (Z, U, solver state) load on the CPU and continue the
    same trajectory as an uninterrupted GPU run."""
    kw = dict(method="admm", u_start=1)
    train(cfg_for(corpus_dir, device="cuda", epochs=3, **kw), tmp_path / "whole")
    train(cfg_for(corpus_dir, device="cuda", epochs=1, **kw), tmp_path / "split")
    assert last_ckpt(tmp_path / "split")["model"]
    tr = resume_trainer(tmp_path / "split", epochs=3, device="cpu")
    tr.fit()
    mw, ms = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [r["epoch"] for r in ms] == [1, 2, 3]
    for a, b in zip(mw, ms, strict=True):
        assert b["valid_ppl"] == pytest.approx(a["valid_ppl"], rel=1e-8, abs=0)


# --------------------------------------------------------------------------- the exact recurrence
@pytest.mark.parametrize("cell,nlayers,recurrence", [("lstm", 2, "jacobi"), ("gru", 1, "newton"),
                                                     ("diag-lstm", 1, "newton"),
                                                     ("diag-gru", 2, "quasi-newton")])
def test_e2_on_cuda_matches_the_cpu_reference(float64, cell: str, nlayers: int,
                                              recurrence: str) -> None:
    """The exact parallel recurrence on the GPU (cuDNN units, the scans) equals sequential
    BPTT on the CPU (the model's own sequential pass, which the CPU tests tie to written-out
    step-by-step loops)."""
    import torch.nn.functional as F
    from test_recurrence import grads, parallel_loss, settings
    from test_recurrence import make_model as make_rec_model

    model = make_rec_model(cell, nlayers)
    K, M, B = 1 if cell.startswith("diag") else 3, 5, 3
    T = K * M - (1 if K > 1 else 0)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 13, (T, B), generator=g)
    y = torch.randint(0, 13, (T, B), generator=g)
    s0 = 0.4 * torch.rand(B, model.state_dim, generator=g, dtype=torch.float64)
    logits, _ = model(x, model.unflatten_state(s0))
    want_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    want = grads(want_loss, model)
    work = copy.deepcopy(model).cuda()
    loss, _, _ = parallel_loss(work, x.cuda(), y.cuda(), s0.cuda(), K,
                               settings(recurrence=recurrence))
    got = grads(loss, work)
    assert abs(float(loss.detach()) / float(want_loss.detach()) - 1) < 1e-10
    for a, b in zip(got, want):
        assert rel(a.cpu(), b) < 1e-10


def test_exact_run_on_cuda_equals_the_cpu(corpus_dir: Path, tmp_path: Path) -> None:
    kw = dict(method="bptt", recurrence="jacobi", bptt=12, block_size=3, batch_size=2,
              rec_tol=1e-12, dtype="float64", epochs=2)
    train(cfg_for(corpus_dir, device="cpu", **kw), tmp_path / "cpu")
    train(cfg_for(corpus_dir, device="cuda", **kw), tmp_path / "cuda")
    for a, b in zip(metrics(tmp_path / "cpu"), metrics(tmp_path / "cuda")):
        assert b["valid_loss"] == pytest.approx(a["valid_loss"], rel=1e-9)
        assert b["fwd_iters_mean"] == a["fwd_iters_mean"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cuda(corpus_dir: Path, tmp_path: Path,
                                        precision: str) -> None:
    """bf16 and fp16 (with the gradient scaler) train BPTT on the GPU; the parameters and the
    checkpoint stay float32; the run resumes."""
    kw = dict(method="bptt", precision=precision, epochs=2, batch_size=2, optim="sgd", lr=1.0,
              dtype=None)
    summary = train(cfg_for(corpus_dir, device="cuda", **kw), tmp_path / "run")
    assert summary["status"] == "finished"
    ckpt = last_ckpt(tmp_path / "run")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
    if precision == "fp16":
        assert "scaler" in ckpt["method_state"]
    tr = resume_trainer(tmp_path / "run", epochs=3)
    tr.fit()
    assert metrics(tmp_path / "run")[-1]["epoch"] == 3
