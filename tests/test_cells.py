"""The diagonal-recurrence cells (tprop.cells) against hand-written float64 references: the
cell equations written out here one step at a time, autograd's Jacobians of them, and
identity E2 (the exact parallel recurrence equals sequential BPTT) for these cells."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from tprop.cells import DIAGONAL_CELLS, DiagGRU, DiagLSTM, DiagonalUnit
from tprop.models import RNNLM
from tprop.objective import block_terms
from tprop.recurrence import (
    RecurrenceSettings,
    RecurrenceStats,
    parallel_recur,
    units_of,
)

V, E, H = 13, 4, 5
TOL = 1e-10
CELLS = ("diag-gru", "diag-lstm")
CASES = [(cell, L) for cell in CELLS for L in (1, 2)]


@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test of this module runs in float64."""


# --------------------------------------------------------------------------- references
def params(rnn: nn.Module, l: int) -> dict[str, torch.Tensor]:
    """Layer l's parameters by role: input weight and bias, recurrent vectors (gate order),
    and the GRU's b_hn."""
    out = dict(W=getattr(rnn, f"weight_ih_l{l}"), b=getattr(rnn, f"bias_ih_l{l}"),
               a=getattr(rnn, f"weight_hh_l{l}"))
    if hasattr(rnn, f"bias_hn_l{l}"):
        out["bhn"] = getattr(rnn, f"bias_hn_l{l}")
    return out


def ref_gru(p: dict[str, torch.Tensor], x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h' of the diagonal GRU, written from its equations."""
    W_r, W_z, W_n = p["W"][:H], p["W"][H:2 * H], p["W"][2 * H:]
    b_r, b_z, b_n = p["b"][:H], p["b"][H:2 * H], p["b"][2 * H:]
    a_r, a_z, a_n = p["a"][:H], p["a"][H:2 * H], p["a"][2 * H:]
    r = torch.sigmoid(x @ W_r.t() + a_r * h + b_r)
    z = torch.sigmoid(x @ W_z.t() + a_z * h + b_z)
    n = torch.tanh(x @ W_n.t() + b_n + r * (a_n * h + p["bhn"]))
    return (1 - z) * n + z * h


def ref_lstm(p: dict[str, torch.Tensor], x: torch.Tensor, h: torch.Tensor, c: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h', c') of the diagonal LSTM, written from its equations."""
    def gate(k: int) -> torch.Tensor:
        s = slice(k * H, (k + 1) * H)
        return x @ p["W"][s].t() + p["a"][s] * h + p["b"][s]

    i, f, g, o = torch.sigmoid(gate(0)), torch.sigmoid(gate(1)), torch.tanh(gate(2)), \
        torch.sigmoid(gate(3))
    c2 = f * c + i * g
    return o * torch.tanh(c2), c2


def ref_layers(rnn: nn.Module, lstm: bool, x: torch.Tensor, hs: list[torch.Tensor],
               cs: list[torch.Tensor], between: list[torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """One time step through every layer (a mask on each layer's output but the last)."""
    hs, cs, inp = list(hs), list(cs), x
    for l in range(len(hs)):
        p = params(rnn, l)
        if lstm:
            hs[l], cs[l] = ref_lstm(p, inp, hs[l], cs[l])
        else:
            hs[l] = ref_gru(p, inp, hs[l])
        inp = hs[l] if between is None or l == len(hs) - 1 else hs[l] * between[l]
    return hs[-1], hs, cs


def split_flat(flat: torch.Tensor, L: int, lstm: bool) -> tuple[list, list]:
    hs = [flat[:, l * H:(l + 1) * H] for l in range(L)]
    cs = [flat[:, (L + l) * H:(L + l + 1) * H] for l in range(L)] if lstm else []
    return hs, cs


def ref_window(model: RNNLM, x: torch.Tensor, y: torch.Tensor, s0: torch.Tensor,
               masks: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential BPTT over the window by the hand-written steps: mean token cross entropy
    and the final flat state ``[h_0 … h_{L−1}, c_0 … c_{L−1}]``."""
    hs, cs = split_flat(s0, model.nlayers, model.is_lstm)
    loss = s0.new_zeros(())
    for t in range(x.shape[0]):
        inp = model.encoder.weight[x[t]]
        if masks is not None:
            inp = inp * masks.emb[t]
        top, hs, cs = ref_layers(model.rnn, model.is_lstm, inp, hs, cs,
                                 None if masks is None else [m[t] for m in masks.between])
        if masks is not None:
            top = top * masks.out[t]
        logits = top @ model.decoder.weight.t() + model.decoder.bias
        loss = loss + F.cross_entropy(logits, y[t], reduction="sum")
    return loss / x.numel(), torch.cat(hs + cs, 1)


def module_window(model: RNNLM, x: torch.Tensor, y: torch.Tensor, s0: torch.Tensor,
                  masks: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential BPTT by the module's own sequential forward: ``RNNLM.forward_flat``, or,
    with fixed dropout masks, its layers' sequential loops with the masks between them."""
    if masks is None:
        logits, fin = model.forward_flat(x, s0)
    else:
        native = model.unflatten_state(s0)
        parts = native if model.is_lstm else (native,)
        inp, finals = model.encoder(x) * masks.emb, []
        for l in range(model.nlayers):
            inp, st = model.rnn.layer_forward(l, inp, tuple(p[l] for p in parts))
            finals.append(st)
            if l < model.nlayers - 1:
                inp = inp * masks.between[l]
        logits = model.decode(inp * masks.out)
        stacked = tuple(torch.stack([f[i] for f in finals], 0) for i in range(len(parts)))
        fin = model.flatten_state(stacked if model.is_lstm else stacked[0])
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)), fin


# --------------------------------------------------------------------------- helpers
def make_model(cell: str, nlayers: int, seed: int = 0, init_range: float = 0.4,
               dropout: float = 0.0) -> RNNLM:
    torch.manual_seed(seed)
    return RNNLM(V, E, H, nlayers, cell, dropout=dropout, init_range=init_range).double()


def make_cell(cell: str, nlayers: int, seed: int = 0, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    rnn = DIAGONAL_CELLS[cell](E, H, nlayers).double()
    with torch.no_grad():
        for p in rnn.parameters():
            p.uniform_(-0.6, 0.6)
        for l in range(nlayers):
            getattr(rnn, f"weight_hh_l{l}").mul_(scale)
    return rnn


def window(T: int, B: int, D: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (T, B), generator=g)
    y = torch.randint(0, V, (T, B), generator=g)
    s0 = 0.5 * (2 * torch.rand(B, D, generator=g, dtype=torch.float64) - 1)
    return x, y, s0


def settings(**kw: Any) -> Any:
    base = dict(recurrence="jacobi", rec_tol=1e-13)
    base.update(kw)
    return RecurrenceSettings(**base)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def grads(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))


def parallel_loss(model: RNNLM, x, y, s0, k: int, st: Any, masks: Any = None
                  ) -> tuple[torch.Tensor, torch.Tensor, RecurrenceStats]:
    stats = RecurrenceStats()
    out, fin = parallel_recur(model, x, s0, st, k, stats, masks)
    loss = F.cross_entropy(model.decode(out).reshape(-1, V), y.reshape(-1))
    return loss, fin, stats


def assert_e2(model: RNNLM, x, y, s0, k: int, st: Any, masks: Any = None) -> RecurrenceStats:
    """The parallel recurrence's loss, θ-gradient and final state equal the module's
    sequential BPTT, which equals the hand-written loop."""
    hand_loss, hand_fin = ref_window(model, x, y, s0, masks)
    hand = grads(hand_loss, model)
    want_loss, want_fin = module_window(model, x, y, s0, masks)
    want = grads(want_loss, model)
    assert abs(float(want_loss.detach()) / float(hand_loss.detach()) - 1) < 1e-13
    assert rel(want_fin.detach(), hand_fin.detach()) < 1e-13
    for (name, _), a, b in zip(model.named_parameters(), want, hand):
        assert rel(a, b) < 1e-12, name
    got_loss, got_fin, stats = parallel_loss(model, x, y, s0, k, st, masks)
    got = grads(got_loss, model)
    assert abs(float(got_loss.detach()) / float(want_loss.detach()) - 1) < TOL
    assert rel(got_fin.detach(), want_fin.detach()) < TOL
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert rel(a, b) < TOL, name
    return stats


# --------------------------------------------------------------------------- the modules
@pytest.mark.parametrize("cell,nlayers", CASES)
def test_sequential_forward_equals_hand_written_loop(cell: str, nlayers: int) -> None:
    """Outputs and final state of the module (one call over the window, from a carried
    state) equal the equations stepped by hand; no state means the zero state."""
    rnn = make_cell(cell, nlayers)
    lstm = cell == "diag-lstm"
    T, B = 6, 3
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, E, generator=g)
    h0 = 0.5 * torch.randn(nlayers, B, H, generator=g)
    c0 = 0.5 * torch.randn(nlayers, B, H, generator=g)
    out, state = rnn(x, (h0, c0) if lstm else h0)
    hs, cs, want = list(h0), list(c0) if lstm else [], []
    for t in range(T):
        top, hs, cs = ref_layers(rnn, lstm, x[t], hs, cs)
        want.append(top)
    assert out.shape == (T, B, H)
    assert rel(out, torch.stack(want)) < 1e-14
    if lstm:
        assert rel(state[0], torch.stack(hs)) < 1e-14 and rel(state[1], torch.stack(cs)) < 1e-14
    else:
        assert rel(state, torch.stack(hs)) < 1e-14
    zero = torch.zeros(nlayers, B, H)
    out0, _ = rnn(x, (zero, zero.clone()) if lstm else zero)
    assert torch.equal(rnn(x)[0], out0)


@pytest.mark.parametrize("cell", CELLS)
def test_module_interface_is_torchs(cell: str) -> None:
    """Attributes, parameters, and the shapes of inputs and states are those of
    ``nn.GRU`` / ``nn.LSTM``; RNNLM's ±init_range leaves the recurrent vectors small."""
    L, T, B = 2, 4, 3
    rnn = DIAGONAL_CELLS[cell](E, H, L, dropout=0.25)
    torch_rnn = (nn.LSTM if cell == "diag-lstm" else nn.GRU)(E, H, L, dropout=0.25)
    assert (rnn.num_layers, rnn.hidden_size, rnn.dropout) == (L, H, 0.25)
    gates = 4 if cell == "diag-lstm" else 3
    shapes = {n: tuple(p.shape) for n, p in rnn.named_parameters()}
    want = {}
    for l in range(L):
        want.update({f"weight_ih_l{l}": (gates * H, E if l == 0 else H),
                     f"bias_ih_l{l}": (gates * H,), f"weight_hh_l{l}": (gates * H,)})
        if cell == "diag-gru":
            want[f"bias_hn_l{l}"] = (H,)
    assert shapes == want
    assert all(isinstance(p, nn.Parameter) for p in rnn.parameters())
    x = torch.randn(T, B, E)
    out, state = rnn(x)
    t_out, t_state = torch_rnn(x)
    assert out.shape == t_out.shape
    if cell == "diag-lstm":
        assert isinstance(state, tuple) and [s.shape for s in state] == [s.shape for s in t_state]
    else:
        assert isinstance(state, torch.Tensor) and state.shape == t_state.shape
    out.sum().backward()
    assert all(p.grad is not None for p in rnn.parameters())
    with pytest.raises(ValueError, match="state"):
        rnn(x, torch.zeros(L, B + 1, H))
    model = RNNLM(V, E, H, L, cell, init_range=0.1)
    assert isinstance(model.rnn, DiagLSTM if cell == "diag-lstm" else DiagGRU)
    assert all(float(p.detach().abs().max()) <= 0.1 for p in model.rnn.parameters())


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_between_layers_in_training_mode(cell: str) -> None:
    """In training mode each layer's outputs but the last's are dropped (as torch does), with
    masks drawn from torch's generator; none in eval mode."""
    rnn = make_cell(cell, 3)
    rnn.dropout = 0.5
    x = torch.randn(5, 2, E)
    rnn.eval()
    plain, _ = rnn(x)
    rnn.train()
    torch.manual_seed(11)
    out, _ = rnn(x)
    torch.manual_seed(11)
    masks = [F.dropout(torch.ones(5, 2, H), 0.5, training=True) for _ in range(2)]
    inp = x
    state = (torch.zeros(2, H),) * (2 if cell == "diag-lstm" else 1)
    for l in range(3):
        inp, _ = rnn.layer_forward(l, inp, state)
        if l < 2:
            inp = inp * masks[l]
    assert rel(out, inp) < 1e-14 and rel(out, plain) > 1e-3


# --------------------------------------------------------------------------- Jacobians
def blocks_of(full: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """Autograd's ``(N, D, N, D)`` Jacobian of a batch of states -> per column ``(N, D, D)``,
    after checking the columns do not interact."""
    full = full.reshape(n, d, n, d)
    per = torch.stack([full[i, :, i] for i in range(n)])
    mask = torch.eye(n, dtype=torch.bool)[:, None, :, None].expand(n, d, n, d)
    assert float(full[~mask].abs().max()) == 0.0
    return per


def expand(jac: torch.Tensor) -> torch.Tensor:
    """Structured Jacobians (``(N, H)`` diagonal, or ``(N, H, 2, 2)`` over ``[h, c]``) as
    dense ``(N, D, D)`` matrices."""
    if jac.dim() == 2:
        return torch.diag_embed(jac)
    n = jac.shape[0]
    out = jac.new_zeros(n, 2 * H, 2 * H)
    idx = torch.arange(H)
    for i in range(2):
        for j in range(2):
            out[:, i * H + idx, j * H + idx] = jac[:, :, i, j]
    return out


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layer", [0, 1])
def test_step_jacobian_equals_autograd(cell: str, layer: int) -> None:
    """The analytic step Jacobian (diagonal, or 2×2 per unit over (h, c)) at (x_t, state) is
    autograd's Jacobian of the hand-written step, which has no other entries."""
    rnn = make_cell(cell, 2, scale=3.0)
    lstm = cell == "diag-lstm"
    N = 4
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, E if layer == 0 else H, generator=g)
    h, c = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    p = {k: v.detach() for k, v in params(rnn, layer).items()}
    if lstm:
        got = rnn.step_jacobian(layer, x, (h, c))
        assert got.shape == (N, H, 2, 2)

        def f(s: torch.Tensor) -> torch.Tensor:
            return torch.cat(ref_lstm(p, x, s[:, :H], s[:, H:]), 1)

        full = jacobian(f, torch.cat([h, c], 1))
        assert rel(expand(got), blocks_of(full, N, 2 * H)) < 1e-13
    else:
        got = rnn.step_jacobian(layer, x, (h,))
        assert got.shape == (N, H)
        full = jacobian(lambda s: ref_gru(p, x, s), h)
        assert rel(expand(got), blocks_of(full, N, H)) < 1e-13


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("K", [1, 4])
def test_block_jacobian_equals_autograd(cell: str, K: int) -> None:
    """A unit's ``jacobian`` over K steps gives the final states of ``run`` and autograd's
    Jacobian of the hand-written K-step loop (the product of the step Jacobians)."""
    rnn = make_cell(cell, 2, scale=2.0)
    lstm = cell == "diag-lstm"
    N, layer = 3, 1
    unit = rnn.parallel_units(False)[layer]
    g = torch.Generator().manual_seed(6)
    x = torch.randn(K, N, H, generator=g)
    s = torch.randn(N, unit.state_dim, generator=g)
    p = {k: v.detach() for k, v in params(rnn, layer).items()}

    def loop(s: torch.Tensor) -> torch.Tensor:
        h, c = (s[:, :H], s[:, H:]) if lstm else (s, None)
        for t in range(K):
            h, c = ref_lstm(p, x[t], h, c) if lstm else (ref_gru(p, x[t], h), None)
        return torch.cat([h, c], 1) if lstm else h

    fin, jac = unit.jacobian(x, s, chunk=2)
    assert jac.shape == ((N, H, 2, 2) if lstm else (N, H)) and not jac.requires_grad
    assert rel(fin, loop(s)) < 1e-14 and rel(fin, unit.run(x, s)[1].detach()) < 1e-14
    assert rel(expand(jac), blocks_of(jacobian(loop, s), N, unit.state_dim)) < 1e-13


@pytest.mark.parametrize("cell,nlayers", CASES)
def test_parallel_units_protocol(cell: str, nlayers: int) -> None:
    """One unit per layer (per_layer or not), with the layer's parameters, the structure the
    engine expects, and ``run`` from flat states equal to the hand-written steps."""
    model = make_model(cell, nlayers)
    lstm = cell == "diag-lstm"
    for per_layer in (False, True):
        units = units_of(model.rnn, per_layer)
        assert len(units) == nlayers and all(isinstance(u, DiagonalUnit) for u in units)
    for l, unit in enumerate(units):
        assert unit.structure == ("block2" if lstm else "diag")
        assert (unit.nhid, unit.state_dim) == (H, 2 * H if lstm else H)
        assert [id(p) for p in unit.parameters()] == [id(p) for p in params(model.rnn, l)
                                                      .values()]
    x = torch.randn(1, 6, E)
    s = torch.randn(6, units[0].state_dim)
    out, fin = units[0].run(x, s)
    p = params(model.rnn, 0)
    want = torch.cat(ref_lstm(p, x[0], s[:, :H], s[:, H:]), 1) if lstm else ref_gru(p, x[0], s)
    assert out.shape == (1, 6, H) and rel(fin, want) < 1e-14 and rel(out[0], want[:, :H]) < 1e-14


# --------------------------------------------------------------------------- E2
BLOCKINGS = [(1, 1, False), (1, 2, False), (1, 5, False), (3, 1, False), (3, 2, False),
             (3, 5, False), (3, 5, True)]


@pytest.mark.parametrize("recurrence", ["jacobi", "newton", "quasi-newton"])
@pytest.mark.parametrize("cell,nlayers", CASES)
@pytest.mark.parametrize("K,M,partial", BLOCKINGS)
def test_e2_equals_sequential_bptt(recurrence: str, cell: str, nlayers: int, K: int, M: int,
                                   partial: bool) -> None:
    """Loss, θ-gradient and final state of ``parallel_recur`` equal sequential BPTT over
    M blocks of K steps (the last shorter with ``partial``), B = 3 columns."""
    B = 3
    model = make_model(cell, nlayers)
    T = M * K - (2 if partial else 0)
    x, y, s0 = window(T, B, model.state_dim, seed=M + K)
    stats = assert_e2(model, x, y, s0, K, settings(recurrence=recurrence))
    assert len(stats.records) == nlayers
    assert all(r.blocks == M and not r.fwd_fallback and not r.adj_fallback
               for r in stats.records)


@pytest.mark.parametrize("cell,nlayers", [("diag-gru", 2), ("diag-lstm", 2), ("diag-lstm", 1)])
@pytest.mark.parametrize("recurrence", ["jacobi", "newton", "quasi-newton"])
@pytest.mark.parametrize("K", [1, 3])
def test_e2_with_dropout_masks_drawn_once(cell: str, nlayers: int, recurrence: str,
                                          K: int) -> None:
    """With the window's dropout masks (embedding, between layers, output) drawn once, the
    parallel recurrence is sequential BPTT with those masks."""
    model = make_model(cell, nlayers, dropout=0.4)
    model.train()
    T, B = 11, 2
    x, y, s0 = window(T, B, model.state_dim, seed=7)
    masks = model.draw_masks(T, B)
    assert masks is not None and (masks.emb == 0).any() and (masks.out == 0).any()
    assert len(masks.between) == nlayers - 1
    assert_e2(model, x, y, s0, K, settings(recurrence=recurrence), masks)


# --------------------------------------------------------------------------- Newton, K = 1
@pytest.mark.parametrize("cell", CELLS)
def test_step_level_newton_converges_in_a_few_iterations(cell: str) -> None:
    """Newton at block size 1 (one unknown per step, the elementwise scan) on an untrained
    cell: a few iterations for a window of 40 steps, one adjoint scan, E2 exact."""
    model = make_model(cell, 1, init_range=0.1)
    T, B = 40, 2
    x, y, s0 = window(T, B, model.state_dim, seed=12)
    stats = assert_e2(model, x, y, s0, 1, settings(recurrence="newton"))
    rec = stats.records[0]
    assert rec.blocks == T and rec.fwd_iters <= 6 and rec.adj_iters == 1, rec


@pytest.mark.parametrize("cell", CELLS)
def test_step_level_newton_is_exact_in_t_minus_1_on_an_expansive_cell(cell: str) -> None:
    """Far from contraction (large recurrent vectors) Newton at block size 1 is exact after
    T − 1 iterations (the first i unknowns are exact after i); T − 2 are not enough here."""
    model = make_model(cell, 1, init_range=1.0)
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(30.0 if cell == "diag-gru" else 15.0)
    T, B = 12, 2
    x, y, s0 = window(T, B, model.state_dim, seed=4)
    st = settings(recurrence="newton", rec_tol=0.0, rec_max_iters=T - 1,
                  on_unconverged="continue")
    stats = assert_e2(model, x, y, s0, 1, st)
    rec = stats.records[0]
    assert rec.fwd_iters == T - 1 and rec.fwd_residual < 1e-12 and not rec.fwd_fallback
    short = settings(recurrence="newton", rec_tol=0.0, rec_max_iters=T - 2,
                     on_unconverged="continue")
    with torch.no_grad():
        _, _, stats = parallel_loss(model, x, y, s0, 1, short)
    assert stats.records[0].fwd_residual > 1e-8  # one iteration fewer is not exact here


# --------------------------------------------------------------------------- flat state API
@pytest.mark.parametrize("cell,nlayers", CASES)
def test_flat_state_api(cell: str, nlayers: int) -> None:
    """``state_dim``, flatten/unflatten, ``forward_flat`` and ``final_state_flat`` work on the
    cell with the layout ``[h_0 … h_{L−1}, c_0 … c_{L−1}]``."""
    model = make_model(cell, nlayers).eval()
    lstm = cell == "diag-lstm"
    assert model.is_lstm == lstm and model.state_dim == nlayers * H * (2 if lstm else 1)
    x, y, s0 = window(5, 3, model.state_dim, seed=2)
    assert torch.equal(model.flatten_state(model.unflatten_state(s0)), s0)
    logits, fin = model.forward_flat(x, s0)
    hs, cs = split_flat(s0, nlayers, lstm)
    for t in range(x.shape[0]):
        top, hs, cs = ref_layers(model.rnn, lstm, model.encoder.weight[x[t]], hs, cs)
        assert rel(logits[t], model.decode(top)) < 1e-14
    assert rel(fin, torch.cat(hs + cs, 1)) < 1e-14
    assert torch.equal(model.final_state_flat(x, s0), fin)


@pytest.mark.parametrize("cell,nlayers", [("diag-gru", 2), ("diag-lstm", 1)])
def test_block_terms_equal_a_loop_over_blocks(cell: str, nlayers: int) -> None:
    """``block_terms`` (all blocks in one batched call) equals the sequential module run
    block by block: cross entropy, penalty, residual, final states and their gradients."""
    model = make_model(cell, nlayers).eval()
    K, M, D, lam = 3, 4, model.state_dim, 0.7
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, V, (K, M), generator=g)
    y = torch.randint(0, V, (K, M), generator=g)
    enter = (0.5 * torch.randn(M, D, generator=g)).requires_grad_(True)
    nxt = 0.5 * torch.randn(M, D, generator=g)
    dual = 0.1 * torch.randn(M, D, generator=g)
    t, final = block_terms(model, x, y, enter, nxt, lam, dual)
    wrt = list(model.parameters()) + [enter]
    got = torch.autograd.grad(t.total, wrt, allow_unused=True)
    ce = pen = res = enter.new_zeros(())
    finals = []
    for j in range(M):
        logits, fin = model.forward_flat(x[:, j:j + 1], enter[j:j + 1])
        ce = ce + F.cross_entropy(logits.reshape(-1, V), y[:, j], reduction="sum") / K
        pen = pen + 0.5 * lam * (fin - nxt[j] + dual[j]).pow(2).sum()
        res = res + (fin - nxt[j]).norm()
        finals.append(fin)
    want = torch.autograd.grad(ce + pen, wrt, allow_unused=True)
    assert rel(t.ce, ce) < 1e-13 and rel(t.penalty, pen) < 1e-13
    assert rel(t.residual, res.detach()) < 1e-13
    assert rel(final, torch.cat(finals, 0)) < 1e-13
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-12
