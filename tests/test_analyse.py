"""The largest Lyapunov exponent: against the spectral radius of a linear recurrence, against
products of autograd step Jacobians of an LSTM, and through the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_corpus
from test_objective import ref_cell

from tprop.analyse import lyapunov, sweeps_needed
from tprop.cli import main
from tprop.models import RNNLM


def test_linear_recurrence_gives_log_spectral_radius() -> None:
    """A tanh RNN whose inputs and biases are zero stays at h = 0, where its step Jacobian is
    the recurrent matrix W: the exponent is log ρ(W)."""
    torch.manual_seed(0)
    model = RNNLM(5, 3, 6, 1, "rnn")
    q, _ = torch.linalg.qr(torch.randn(6, 6))
    radius = 0.7
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "rnn.weight_hh_l0":
                p.zero_()
        model.rnn.weight_hh_l0.copy_(q @ torch.diag(torch.tensor(
            [radius, -0.5, 0.4, 0.3, -0.2, 0.1])) @ q.t())
    data = torch.randint(0, 5, (4000,))
    out = lyapunov(model, data, columns=2, steps=300, burn_in=120)  # v aligns in the burn-in
    assert out["lyapunov"] == pytest.approx(math.log(radius), abs=1e-6)
    assert next(model.parameters()).dtype == torch.float32  # the model is left as it was


def test_lstm_exponent_equals_autograd_jacobian_products() -> None:
    """QR-free power iteration with autograd's step Jacobians of the written-out cell."""
    torch.manual_seed(1)
    model = RNNLM(7, 3, 4, 1, "lstm", init_range=0.8).double()
    data = torch.randint(0, 7, (2000,))
    steps, burn = 150, 20
    got = lyapunov(model, data, columns=1, steps=steps, burn_in=burn)["lyapunov"]
    P = dict(model.named_parameters())
    s = torch.zeros(1, model.state_dim, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, model.state_dim, generator=g, dtype=torch.float64)
    v = v / v.norm()
    total = 0.0
    with torch.no_grad():
        for t in range(burn + steps):
            x = P["encoder.weight"][data[t]].unsqueeze(0)

            def step(state: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
                return ref_cell(P, "lstm", 1, 4, x, state)[1]

            J = torch.autograd.functional.jacobian(step, s)[0, :, 0, :]
            s = step(s)
            jv = v @ J.t()
            if t >= burn:
                total += math.log(float(jv.norm()))
            v = jv / jv.norm()
    assert got == pytest.approx(total / steps, abs=1e-6)


def test_sweeps_needed() -> None:
    assert sweeps_needed(0.1, 10, 7) == 6  # expanding: every sweep of the window
    assert sweeps_needed(-1.0, 10, 7, tol=1e-5) == 2  # e^-10 per block: ceil(11.5 / 10)
    assert sweeps_needed(-10.0, 10, 7) == 1


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_corpus(tmp_path / "c", n_train=1500, n_eval=600)
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(corpus), "--out", str(run), "--quiet", "--device",
                 "cpu", "--emsize", "6", "--nhid", "6", "--epochs", "1", "--bptt", "8"]) == 0
    capsys.readouterr()
    assert main(["analyse", "lyapunov", str(run), "--steps", "100", "--burn-in", "20",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert math.isfinite(out["lyapunov"]) and out["steps"] == 100
    assert out["per_block"] == pytest.approx(out["lyapunov"] * 8)
    assert main(["analyse", "lyapunov", str(run), "--steps", "100", "--burn-in", "20",
                 "--json", "--untrained"]) == 0
    init = json.loads(capsys.readouterr().out)
    assert init["checkpoint"] == "init" and init["lyapunov"] != out["lyapunov"]
    # --untrained is the run's own starting point: the trainer's model before any update
    from tprop.cli import _initial_state
    from tprop.config import TrainConfig
    from tprop.inference import load_run
    from tprop.train import make_trainer

    start = make_trainer(TrainConfig.load(run / "config.json").replace(out=None)).model
    for k, v in _initial_state(load_run(run, need_data=False)).items():
        assert torch.equal(v, start.state_dict()[k]), k
    with pytest.raises(SystemExit) as e:
        main(["analyse", "lyapunov", str(run), "--steps", "100000"])
    assert e.value.code == 2
    assert "--steps" in capsys.readouterr().err
