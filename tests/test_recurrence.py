"""The exact parallel recurrence (identity E2) against hand-written float64 references: a loop
over time steps of the cell equations, the state carried through the whole window; the
truncated and one-block-back credit references; the three ways of handling a window that
does not converge."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_objective import ref_cell

from tprop.models import RNNLM
from tprop.recurrence import (
    RecurrenceSettings,
    RecurrenceStats,
    Unconverged,
    parallel_recur,
)

V, E, H = 13, 4, 5
TOL = 1e-10


@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test of this module runs in float64."""


def make_model(cell: str, nlayers: int, seed: int = 0, init_range: float = 0.4,
               dropout: float = 0.0) -> RNNLM:
    torch.manual_seed(seed)
    return RNNLM(V, E, H, nlayers, cell, dropout=dropout, init_range=init_range).double()


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


def ref_window(model: RNNLM, x: torch.Tensor, y: torch.Tensor, s0: torch.Tensor,
               masks: Any = None, detach_every: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential BPTT over the window, one step at a time: the mean token cross entropy and
    the final flat state. ``masks``: the window's dropout masks; ``detach_every``: cut the
    gradient at block boundaries (truncated BPTT with window K)."""
    P = dict(model.named_parameters())
    L, Hd = model.nlayers, model.nhid
    state, loss = s0, s0.new_zeros(())
    for t in range(x.shape[0]):
        if detach_every and t % detach_every == 0:
            state = state.detach()
        inp = P["encoder.weight"][x[t]]
        if masks is not None:
            inp = inp * masks.emb[t]
        top, state = masked_cell(P, model.cell, L, Hd, inp, state,
                                 None if masks is None else [m[t] for m in masks.between])
        if masks is not None:
            top = top * masks.out[t]
        logits = top @ P["decoder.weight"].t() + P["decoder.bias"]
        loss = loss + F.cross_entropy(logits, y[t], reduction="sum")
    return loss / x.numel(), state


def masked_cell(P: dict[str, torch.Tensor], cell: str, L: int, Hd: int, x: torch.Tensor,
                state: torch.Tensor, between: list[torch.Tensor] | None):
    """One step, layer by layer, with a dropout mask on each layer's output that feeds the
    next layer (``ref_cell`` is one layer at a time here)."""
    hs = [state[:, l * Hd:(l + 1) * Hd] for l in range(L)]
    cs = [state[:, (L + l) * Hd:(L + l + 1) * Hd] for l in range(L)] if cell == "lstm" else []
    new_h, new_c, inp = [], [], x
    for l in range(L):
        P1 = {k.replace(f"_l{l}", "_l0"): v for k, v in P.items() if k.endswith(f"_l{l}")}
        s = torch.cat([hs[l]] + ([cs[l]] if cell == "lstm" else []), 1)
        top, s2 = ref_cell(P1, cell, 1, Hd, inp, s)
        new_h.append(s2[:, :Hd])
        if cell == "lstm":
            new_c.append(s2[:, Hd:])
        inp = top if between is None or l == L - 1 else top * between[l]
    return new_h[-1], torch.cat(new_h + new_c, 1)


def parallel_loss(model: RNNLM, x: torch.Tensor, y: torch.Tensor, s0: torch.Tensor, k: int,
                  st: Any, masks: Any = None) -> tuple[torch.Tensor, torch.Tensor,
                                                        RecurrenceStats]:
    stats = RecurrenceStats()
    out, fin = parallel_recur(model, x, s0, st, k, stats, masks)
    logits = model.decode(out)
    loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
    return loss, fin, stats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def grads(loss: torch.Tensor, model: RNNLM) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))


def assert_e2(model: RNNLM, x, y, s0, k: int, st: Any, masks: Any = None) -> RecurrenceStats:
    want_loss, want_fin = ref_window(model, x, y, s0, masks)
    want = grads(want_loss, model)
    got_loss, got_fin, stats = parallel_loss(model, x, y, s0, k, st, masks)
    got = grads(got_loss, model)
    assert abs(float(got_loss.detach()) / float(want_loss.detach()) - 1) < TOL
    assert rel(got_fin.detach(), want_fin.detach()) < TOL
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert rel(a, b) < TOL, name
    return stats


# --------------------------------------------------------------------------- E2
@pytest.mark.parametrize("recurrence", ["jacobi", "newton", "quasi-newton"])
@pytest.mark.parametrize("cell,nlayers", [("rnn", 1), ("gru", 1), ("lstm", 1), ("rnn", 2),
                                          ("gru", 2), ("lstm", 2)])
@pytest.mark.parametrize("M,partial", [(1, False), (2, False), (5, False), (5, True)])
def test_e2_equals_sequential_bptt(recurrence: str, cell: str, nlayers: int, M: int,
                                   partial: bool) -> None:
    """Loss, θ-gradient and carried state equal sequential BPTT over the window of M·K steps
    (the last block shorter with ``partial``), B = 3 columns."""
    K, B = 3, 3
    model = make_model(cell, nlayers)
    T = M * K - (2 if partial else 0)
    x, y, s0 = window(T, B, model.state_dim, seed=M)
    stats = assert_e2(model, x, y, s0, K, settings(recurrence=recurrence))
    assert all(not r.fwd_fallback and not r.adj_fallback for r in stats.records)
    assert stats.records[0].blocks == M


@pytest.mark.parametrize("cell,nlayers", [("gru", 2), ("lstm", 2), ("lstm", 1)])
@pytest.mark.parametrize("recurrence", ["jacobi", "newton"])
def test_e2_with_dropout_masks_drawn_once(cell: str, nlayers: int, recurrence: str) -> None:
    """With dropout the window's masks (embedding, between layers, output) are drawn once and
    reused by every sweep: the result is sequential BPTT with those masks."""
    model = make_model(cell, nlayers, dropout=0.4)
    model.train()
    K, M, B = 3, 4, 2
    x, y, s0 = window(K * M - 1, B, model.state_dim, seed=7)
    masks = model.draw_masks(K * M - 1, B)
    assert masks is not None and (masks.emb == 0).any() and (masks.out == 0).any()
    assert len(masks.between) == nlayers - 1
    assert_e2(model, x, y, s0, K, settings(recurrence=recurrence), masks)


# --------------------------------------------------------------------------- convergence
def expansive(cell: str = "rnn") -> RNNLM:
    """A cell far from contractive: large recurrent weights."""
    model = make_model(cell, 1, init_range=0.4)
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(8.0)
    return model


def test_jacobi_is_exact_after_m_minus_1_sweeps_on_an_expansive_cell() -> None:
    model = expansive()
    K, M, B = 2, 6, 2
    x, y, s0 = window(K * M, B, model.state_dim, seed=3)
    st = settings(rec_tol=0.0, rec_max_iters=M - 1, on_unconverged="continue")
    stats = assert_e2(model, x, y, s0, K, st)
    rec = stats.records[0]
    assert rec.fwd_iters == M - 1 and rec.fwd_residual < 1e-12 and not rec.fwd_fallback
    # one sweep fewer is not enough on this cell: the count is what makes it exact
    short = settings(rec_tol=0.0, rec_max_iters=M - 2, on_unconverged="continue")
    _, _, stats = parallel_loss(model, x, y, s0, K, short)
    assert stats.records[0].fwd_residual > 1e-3


def test_newton_is_exact_within_m_minus_1_steps_on_an_expansive_cell() -> None:
    model = expansive("gru")
    K, M, B = 2, 6, 2
    x, y, s0 = window(K * M, B, model.state_dim, seed=4)
    st = settings(recurrence="newton", rec_tol=0.0, rec_max_iters=M,
                  on_unconverged="continue")
    stats = assert_e2(model, x, y, s0, K, st)
    assert stats.records[0].fwd_iters <= M


def test_newton_converges_quadratically_on_a_contractive_cell() -> None:
    model = make_model("lstm", 1, init_range=0.3)
    K, M, B = 4, 12, 2
    x, y, s0 = window(K * M, B, model.state_dim, seed=5)
    hist = residual_history(model, x, s0, K, "newton", M)
    assert len(hist) >= 3
    # each residual below about the square of the one before, once they are small
    small = [r for r in hist if 0 < r < 1e-1]
    assert len(small) >= 2
    for a, b in zip(small, small[1:]):
        assert b < 10 * a * a or b < 1e-14, hist
    jac = residual_history(model, x, s0, K, "jacobi", M)
    assert len(jac) > len(hist)  # Newton needs fewer evaluations than Jacobi


def residual_history(model: RNNLM, x: torch.Tensor, s0: torch.Tensor, K: int,
                     recurrence: str, M: int) -> list[float]:
    """The residual max|F − s| before each iteration, from a zero guess (limits 1, 2, …)."""
    out = []
    for n in range(1, M + 1):
        st = settings(recurrence=recurrence, rec_tol=0.0, rec_max_iters=n,
                      on_unconverged="continue")
        with torch.no_grad():
            stats = RecurrenceStats()
            parallel_recur(model, x, s0, st, K, stats)
        out.append(stats.records[0].fwd_residual)
        if out[-1] < 1e-14:
            break
    return out


# --------------------------------------------------------------------------- credit horizon
def test_credit_minus_one_is_truncated_bptt_with_window_k() -> None:
    model = make_model("lstm", 2)
    K, M, B = 3, 5, 2
    x, y, s0 = window(K * M, B, model.state_dim, seed=8)
    want_loss, _ = ref_window(model, x, y, s0, detach_every=K)
    want = grads(want_loss, model)
    got_loss, _, _ = parallel_loss(model, x, y, s0, K, settings(credit_blocks=-1))
    for a, b in zip(grads(got_loss, model), want):
        assert rel(a, b) < TOL
    full_loss, _ = ref_window(model, x, y, s0)
    assert rel(grads(full_loss, model)[2], want[2]) > 1e-3  # truncation matters here


def ref_one_block_back(model: RNNLM, x, y, s0, K: int) -> torch.Tensor:
    """Σ_j L_j with block j entered from F_{j−1} run from the exact, detached state entering
    block j−1: each block's loss reaches one block back, no further."""
    T, B = x.shape
    _, states = exact_entering_states(model, x, s0, K)
    total = s0.new_zeros(())
    for j in range(T // K):
        a = max(j - 1, 0)
        loss, _ = ref_window(model, x[a * K:(j + 1) * K], y[a * K:(j + 1) * K],
                             states[a].detach())
        n_tok = (j + 1 - a) * K * B
        if j > 0:  # only block j's tokens: subtract block j−1's own part
            own, _ = ref_window(model, x[a * K:j * K], y[a * K:j * K], states[a].detach())
            total = total + loss * n_tok - own * K * B
        else:
            total = total + loss * n_tok
    return total / x.numel()


def exact_entering_states(model: RNNLM, x, s0, K: int):
    states, s = [s0], s0
    with torch.no_grad():
        for j in range(x.shape[0] // K - 1):
            _, s = ref_window(model, x[j * K:(j + 1) * K], x[j * K:(j + 1) * K], s)
            states.append(s)
    return None, states


def test_credit_zero_reaches_one_block_back() -> None:
    model = make_model("gru", 1)
    K, M, B = 2, 5, 2
    x, y, s0 = window(K * M, B, model.state_dim, seed=9)
    want = grads(ref_one_block_back(model, x, y, s0, K), model)
    got_loss, _, _ = parallel_loss(model, x, y, s0, K, settings(credit_blocks=0))
    for a, b in zip(grads(got_loss, model), want):
        assert rel(a, b) < TOL
    trunc, _, _ = parallel_loss(model, x, y, s0, K, settings(credit_blocks=-1))
    assert rel(grads(trunc, model)[1], want[1]) > 1e-4  # c = 0 is not c = −1


# --------------------------------------------------------------------------- not converging
@pytest.mark.parametrize("recurrence", ["jacobi", "newton"])
def test_unconverged_window_handling(recurrence: str) -> None:
    """A window that needs more iterations than allowed: finished sequentially (exact), the
    reached states kept, or a clear error."""
    model = expansive()
    K, M, B = 2, 6, 2
    x, y, s0 = window(K * M, B, model.state_dim, seed=3)
    limited = dict(recurrence=recurrence, rec_tol=1e-12, rec_max_iters=1)
    stats = assert_e2(model, x, y, s0, K, settings(**limited, on_unconverged="sequential"))
    assert stats.records[0].fwd_fallback
    loss, _, stats = parallel_loss(model, x, y, s0, K,
                                   settings(**limited, on_unconverged="continue"))
    want, _ = ref_window(model, x, y, s0)
    assert not stats.records[0].fwd_fallback and stats.records[0].fwd_residual > 1e-6
    assert abs(float(loss.detach()) / float(want.detach()) - 1) > 1e-8  # not exact
    with pytest.raises(Unconverged, match="did not converge"):
        parallel_loss(model, x, y, s0, K, settings(**limited, on_unconverged="error"))


def test_unconverged_adjoint_handling() -> None:
    model = expansive("gru")
    K, M, B = 2, 6, 2
    x, y, s0 = window(K * M, B, model.state_dim, seed=2)
    # the forward solve may take all it needs; the adjoint sweeps are limited to 1
    st = settings(rec_tol=1e-12, rec_max_iters=M - 1, on_unconverged="sequential")
    st_adj = settings(rec_tol=1e-12, rec_max_iters=M - 1, on_unconverged="error")
    stats = assert_e2(model, x, y, s0, K, st)
    assert stats.records[0].adj_iters >= 1
    loss, _, _ = parallel_loss(model, x, y, s0, K, st_adj)
    grads(loss, model)  # enough sweeps: no error
