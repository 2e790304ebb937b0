"""RNNLM: the flat state API and the recurrence, against torch's single-step cells."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tprop.models import RNNLM

V, E, H = 13, 5, 4
CASES = [(cell, L) for cell in ("rnn", "gru", "lstm") for L in (1, 2)]


def make(cell: str, nlayers: int, **kw) -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(V, E, H, nlayers, cell, **kw).double()


def reference_cells(model: RNNLM) -> list[nn.Module]:
    """One torch single-step cell per layer, holding that layer's weights."""
    cls = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}[model.cell]
    cells = []
    for l in range(model.nlayers):
        n_in = model.emsize if l == 0 else model.nhid
        kw = {"nonlinearity": "tanh"} if model.cell == "rnn" else {}
        c = cls(n_in, model.nhid, **kw).double()
        with torch.no_grad():
            c.weight_ih.copy_(getattr(model.rnn, f"weight_ih_l{l}"))
            c.weight_hh.copy_(getattr(model.rnn, f"weight_hh_l{l}"))
            c.bias_ih.copy_(getattr(model.rnn, f"bias_ih_l{l}"))
            c.bias_hh.copy_(getattr(model.rnn, f"bias_hh_l{l}"))
        cells.append(c)
    return cells


def reference_forward(model: RNNLM, inputs: torch.Tensor, flat: torch.Tensor):
    """Step-by-step run from a flat state laid out as [h_0..h_{L-1}, c_0..c_{L-1}]."""
    L, Hd = model.nlayers, model.nhid
    lstm = model.cell == "lstm"
    h = [flat[:, l * Hd:(l + 1) * Hd] for l in range(L)]
    c = [flat[:, (L + l) * Hd:(L + l + 1) * Hd] for l in range(L)] if lstm else None
    cells = reference_cells(model)
    logits = []
    for t in range(inputs.shape[0]):
        x = model.encoder.weight[inputs[t]]
        for l, cell in enumerate(cells):
            if lstm:
                h[l], c[l] = cell(x, (h[l], c[l]))
            else:
                h[l] = cell(x, h[l])
            x = h[l]
        logits.append(x @ model.decoder.weight.t() + model.decoder.bias)
    final = torch.cat(h + (c if lstm else []), dim=1)
    return torch.stack(logits), final


@pytest.mark.parametrize("cell,nlayers", CASES)
def test_state_dim(cell: str, nlayers: int) -> None:
    m = make(cell, nlayers)
    assert m.state_dim == nlayers * H * (2 if cell == "lstm" else 1)
    flat = m.flatten_state(m.init_state(3))
    assert flat.shape == (3, m.state_dim)
    assert flat.dtype == torch.float64 and not flat.any()


@pytest.mark.parametrize("cell,nlayers", CASES)
def test_flat_layout_and_round_trip(cell: str, nlayers: int) -> None:
    m = make(cell, nlayers)
    B = 3
    gen = torch.Generator().manual_seed(1)
    hs = torch.randn(nlayers, B, H, generator=gen, dtype=torch.float64)
    cs = torch.randn(nlayers, B, H, generator=gen, dtype=torch.float64)
    native = (hs, cs) if cell == "lstm" else hs
    flat = m.flatten_state(native)
    # the documented layout, per row: [h_0, ..., h_{L-1}, c_0, ..., c_{L-1}]
    parts = [hs[l] for l in range(nlayers)] + ([cs[l] for l in range(nlayers)]
                                               if cell == "lstm" else [])
    expected = torch.cat(parts, dim=1)
    assert flat.shape == (B, m.state_dim)
    assert torch.equal(flat, expected)
    back = m.unflatten_state(flat)
    if cell == "lstm":
        assert isinstance(back, tuple) and len(back) == 2
        assert torch.equal(back[0], hs) and torch.equal(back[1], cs)
        assert back[0].is_contiguous() and back[1].is_contiguous()
    else:
        assert torch.equal(back, hs) and back.is_contiguous()
    # and flat -> native -> flat
    z = torch.randn(B, m.state_dim, generator=gen, dtype=torch.float64)
    assert torch.equal(m.flatten_state(m.unflatten_state(z)), z)


@pytest.mark.parametrize("cell,nlayers", CASES)
def test_forward_flat_matches_single_step_cells(cell: str, nlayers: int) -> None:
    m = make(cell, nlayers)
    m.eval()
    gen = torch.Generator().manual_seed(2)
    T, B = 6, 3
    inputs = torch.randint(0, V, (T, B), generator=gen)
    flat = torch.randn(B, m.state_dim, generator=gen, dtype=torch.float64)
    logits, final = m.forward_flat(inputs, flat)
    with torch.no_grad():
        ref_logits, ref_final = reference_forward(m, inputs, flat)
    assert logits.shape == (T, B, V) and final.shape == (B, m.state_dim)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, ref_final, rtol=1e-10, atol=1e-10)
    # the decoder reads the top layer's h of the state after each step
    torch.testing.assert_close(m.decode(m.output_hidden(final)), logits[-1],
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cell,nlayers", CASES)
def test_output_hidden_is_top_layer_h(cell: str, nlayers: int) -> None:
    m = make(cell, nlayers)
    z = torch.arange(2 * 5 * m.state_dim, dtype=torch.float64).reshape(2, 5, m.state_dim)
    top = (nlayers - 1) * H
    out = m.output_hidden(z)
    assert out.shape == (2, 5, H)
    assert torch.equal(out, z[..., top:top + H])
    # equals the top layer of the native h
    native = m.unflatten_state(z[0])
    h = native[0] if cell == "lstm" else native
    assert torch.equal(m.output_hidden(z[0]), h[-1])


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_init_uniform_within_range(cell: str) -> None:
    r = 0.05
    torch.manual_seed(3)
    m = RNNLM(50, 16, 16, 2, cell, init_range=r)
    allp = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert allp.abs().max() <= r
    # uniform over the whole interval, not a narrower one (and not all zero)
    assert allp.max() > 0.9 * r and allp.min() < -0.9 * r
    assert abs(allp.mean().item()) < 0.1 * r
    # variance of U(-r, r) is r^2 / 3
    assert allp.var().item() == pytest.approx(r * r / 3, rel=0.1)
    for p in m.parameters():  # every tensor, biases included
        assert p.abs().max() <= r and p.abs().max() > 0.5 * r


def test_tied_weights_share_storage() -> None:
    m = RNNLM(V, 8, 8, 1, "lstm", tied=True)
    assert m.decoder.weight is m.encoder.weight
    assert m.decoder.weight.data_ptr() == m.encoder.weight.data_ptr()
    with torch.no_grad():
        m.encoder.weight[0, 0] = 7.0
    assert m.decoder.weight[0, 0].item() == 7.0
    names = [n for n, _ in m.named_parameters()]
    assert "decoder.weight" not in names  # counted once
    untied = RNNLM(V, 8, 8, 1, "lstm")
    assert untied.decoder.weight.data_ptr() != untied.encoder.weight.data_ptr()


def test_tied_needs_emsize_equal_nhid() -> None:
    with pytest.raises(ValueError, match="emsize"):
        RNNLM(V, 8, 16, 1, "lstm", tied=True)


def test_bad_cell_raises() -> None:
    with pytest.raises(ValueError, match="cell"):
        RNNLM(V, 8, 8, 1, "transformer")
