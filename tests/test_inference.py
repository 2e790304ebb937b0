"""Sampling from a trained model: one step of the batch-1 path equals the model's forward
pass, and the sampler draws from the softmax distribution."""

from __future__ import annotations

import pytest
import torch

from tprop.data import Vocab
from tprop.inference import LoadedRun, one_step
from tprop.models import RNNLM


@pytest.mark.parametrize("cell,nlayers", [("rnn", 2), ("gru", 1), ("lstm", 2),
                                          ("diag-lstm", 2)])
def test_one_step_equals_the_models_forward(cell: str, nlayers: int, float64) -> None:
    torch.manual_seed(0)
    model = RNNLM(11, 5, 6, nlayers, cell, init_range=0.5).double().eval()
    step = one_step(model)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        want, _ = model(torch.tensor(tokens).view(-1, 1), model.init_state(1))
        state = step.init()
        for t, tok in enumerate(tokens):
            logits, state = step(tok, state)
            assert torch.allclose(logits, want[t, 0], rtol=1e-12, atol=1e-12), t


def test_sampler_draws_from_the_softmax() -> None:
    """A 'model' whose logits are fixed: the frequencies of 40,000 draws match softmax(logits /
    T) within 4 standard errors."""
    vocab = Vocab(["a", "b", "c", "d", "<eos>"])
    model = RNNLM(len(vocab), 2, 2, 1, "rnn")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.decoder.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0, -3.0]))
    run = LoadedRun(None, model.eval(), vocab, "word", torch.device("cpu"))  # type: ignore[arg-type]
    n, temperature = 40_000, 1.5
    with torch.inference_mode():
        draws = run._sample(n, temperature, torch.Generator().manual_seed(1))
    freq = torch.bincount(torch.tensor(draws), minlength=5).double() / n
    p = torch.softmax(model.decoder.bias.double() / temperature, 0)
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 4 * se).all(), (freq, p)
    # threads: generation runs on one by default and leaves torch's setting as it was
    before = torch.get_num_threads()
    text = run.generate(20, seed=3)
    assert torch.get_num_threads() == before and len(text.split()) + text.count("\n") == 20
