"""Mixed precision (--precision) and TensorBoard logging (--tensorboard)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_corpus

from tprop.cli import main
from tprop.config import ConfigError, make_config
from tprop.precision import Precision
from tprop.rundir import RunDir
from tprop.train import resume_trainer, train

SMALL = ["--quiet", "--device", "cpu", "--emsize", "8", "--nhid", "8", "--bptt", "5",
         "--batch-size", "4", "--eval-batch-size", "4", "--optim", "sgd", "--lr", "1"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny")


def cfg(corpus_dir: Path, **kw):
    base = dict(data_dir=str(corpus_dir), dataset=None, quiet=True, device="cpu", emsize=8,
                nhid=8, bptt=5, batch_size=4, eval_batch_size=4, epochs=2, optim="sgd", lr=1.0)
    base.update(kw)
    return make_config(**base)


def test_bf16_trains_and_keeps_float32_state(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    summary = train(cfg(corpus_dir, precision="bf16"), out)
    assert summary["status"] == "finished"
    rows = RunDir(out).read_metrics()
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] + 0.5
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
    # and it differs from the float32 run (autocast did run in bf16)
    ref = train(cfg(corpus_dir), tmp_path / "fp32")
    assert summary["best_valid_ppl"] != ref["best_valid_ppl"]
    tr = resume_trainer(out, epochs=3)
    assert tr.precision.name == "bf16"
    tr.fit()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_on_this_cpu_is_refused_before_the_run(corpus_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--data-dir", str(corpus_dir), "--out", str(tmp_path / "r"),
              "--precision", "fp16", *SMALL])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--precision fp16" in err
    assert not (tmp_path / "r").exists()


def test_combinations_are_checked(corpus_dir: Path) -> None:
    with pytest.raises(ConfigError, match="--precision: fp16 needs loss scaling"):
        cfg(corpus_dir, precision="fp16", method="pm")
    with pytest.raises(ConfigError, match="--rec-tol"):
        cfg(corpus_dir, precision="bf16", recurrence="jacobi", block_size=2, bptt=6)
    cfg(corpus_dir, precision="bf16", recurrence="jacobi", block_size=2, bptt=6, rec_tol=1e-2)
    with pytest.raises(ConfigError, match="--precision"):
        cfg(corpus_dir, precision="bf16", dtype="float64")


def test_gradient_scaler_scales_and_skips() -> None:
    """fp16's scaler: the loss is scaled up for the backward pass and the gradients scaled
    back before the step; a step with a non-finite gradient is skipped."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([w], lr=0.1)
    prec = Precision("fp16", torch.device("cpu"))
    before = w.detach().clone()
    loss = (w * torch.tensor([1.0, 2.0, 3.0])).sum()
    prec.backward(loss)
    assert torch.allclose(w.grad, torch.tensor([1.0, 2.0, 3.0]) * prec.scaler.get_scale())
    prec.unscale_(opt)
    assert torch.allclose(w.grad, torch.tensor([1.0, 2.0, 3.0]))
    prec.step(opt)
    assert torch.allclose(w.detach(), before - 0.1 * torch.tensor([1.0, 2.0, 3.0]))
    opt.zero_grad()
    prec.backward(w.sum() * float("inf"))
    prec.unscale_(opt)
    moved = w.detach().clone()
    prec.step(opt)
    assert torch.equal(w.detach(), moved)  # skipped
    assert "scaler" in prec.state_dict()


def test_tensorboard_events_hold_the_metrics(corpus_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, events = tmp_path / "run", tmp_path / "tb"
    assert main(["train", "--data-dir", str(corpus_dir), "--out", str(out), "--epochs", "2",
                 "--tensorboard", str(events), *SMALL]) == 0
    acc = EventAccumulator(str(events))
    acc.Reload()
    rows = RunDir(out).read_metrics()
    for key in ("train_loss", "valid_ppl", "lr", "tokens_per_s"):
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in rows], key
    assert json.loads((out / "config.json").read_text())["tensorboard"] == str(events)


@pytest.mark.parametrize("method", ["pm", "admm", "alm"])
def test_bf16_block_tprop_keeps_its_states_in_float32(corpus_dir: Path, tmp_path: Path,
                                                      method: str) -> None:
    from tprop.train import make_trainer

    tr = make_trainer(cfg(corpus_dir, method=method, precision="bf16", blocks_per_update="all",
                          h_steps=1, theta_steps=1, h_optim="sgd", h_lr=0.01, u_start=1,
                          epochs=1))
    tr.fit()
    assert tr.Z.dtype == torch.float32 and tr.Z.abs().sum() > 0
    assert tr.U is None or tr.U.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    row = tr._rows[-1]
    assert row["penalty"] > 0 and row["train_loss"] == row["train_loss"]  # finite, measured
