"""evaluate(): perplexity over a split, the state carried, against a token-by-token reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tprop.evaluate as ev
from tprop.evaluate import evaluate, perplexity
from tprop.models import RNNLM

V = 11


def make(cell: str = "lstm", nlayers: int = 2, dropout: float = 0.0) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(V, 6, 5, nlayers, cell, dropout=dropout, init_range=0.5).double()


def stream(T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(seed))


def _cells(model: RNNLM) -> list[nn.Module]:
    cls = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[model.cell]
    out = []
    for l in range(model.nlayers):
        c = cls(model.emsize if l == 0 else model.nhid, model.nhid).double()
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(c, name).copy_(getattr(model.rnn, f"{name}_l{l}"))
        out.append(c)
    return out


@torch.no_grad()
def reference_losses(model: RNNLM, tokens: torch.Tensor) -> list[float]:
    """Cross entropy of every next-token prediction of ``tokens``, feeding one token at a
    time from the zero state with the state carried (float64, no dropout)."""
    cells = _cells(model)
    lstm = model.cell == "lstm"
    h = [torch.zeros(1, model.nhid, dtype=torch.float64) for _ in cells]
    c = [torch.zeros(1, model.nhid, dtype=torch.float64) for _ in cells]
    losses = []
    for t in range(tokens.numel() - 1):
        x = model.encoder.weight[tokens[t : t + 1]]
        for l, cell in enumerate(cells):
            if lstm:
                h[l], c[l] = cell(x, (h[l], c[l]))
            else:
                h[l] = cell(x, h[l])
            x = h[l]
        logits = x @ model.decoder.weight.t() + model.decoder.bias
        losses.append(F.cross_entropy(logits, tokens[t + 1 : t + 2]).item())
    return losses


@pytest.mark.parametrize("cell,nlayers", [("lstm", 2), ("gru", 1), ("rnn", 2)])
def test_one_column_equals_token_by_token(cell: str, nlayers: int) -> None:
    m = make(cell, nlayers)
    data = stream(60)
    ref = reference_losses(m, data)
    assert len(ref) == 59
    loss, n = evaluate(m, data, 1)
    assert n == 59
    assert loss == pytest.approx(sum(ref) / len(ref), rel=1e-12)


def test_columns_are_contiguous_chunks_from_zero_state() -> None:
    m = make()
    T, B = 203, 4  # n = 50 predictions per column, (T-1) mod B = 2 dropped
    data = stream(T, seed=2)
    n = (T - 1) // B
    per_col = []
    for b in range(B):
        chunk = data[b * n : (b + 1) * n + 1]  # n inputs and their n targets
        per_col.append(sum(reference_losses(m, chunk)) / n)
    loss, scored = evaluate(m, data, B)
    assert scored == B * n
    assert loss == pytest.approx(sum(per_col) / B, rel=1e-12)
    # and it is not the one-column value (the columns really restart from zero)
    assert loss != pytest.approx(evaluate(m, data, 1)[0], rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("B", [1, 3])
def test_independent_of_chunk_length(monkeypatch: pytest.MonkeyPatch, chunk: int, B: int) -> None:
    m = make()
    data = stream(100, seed=3)
    n = (data.numel() - 1) // B
    ref = sum(sum(reference_losses(m, data[b * n : (b + 1) * n + 1])) for b in range(B)) / (B * n)
    calls = []

    def fixed(*args, **kwargs) -> int:
        calls.append(args)
        return chunk

    monkeypatch.setattr(ev, "eval_chunk_len", fixed)
    loss, scored = evaluate(m, data, B)
    assert calls, "evaluate did not ask eval_chunk_len for its chunk length"
    assert scored == B * n
    assert loss == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_restores_mode_and_ignores_dropout(training: bool) -> None:
    m = make(dropout=0.5)
    m.train(training)
    data = stream(80, seed=4)
    ref = reference_losses(m, data)  # no dropout anywhere
    torch.manual_seed(123)
    a, _ = evaluate(m, data, 1)
    assert m.training is training
    torch.manual_seed(456)
    b, _ = evaluate(m, data, 1)
    assert m.training is training
    assert a == b == pytest.approx(sum(ref) / len(ref), rel=1e-12)


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(50.0)) == pytest.approx(50.0, rel=1e-12)
    assert perplexity(1e4) == math.inf
    assert perplexity(math.inf) == math.inf
    assert math.isnan(perplexity(math.nan))
