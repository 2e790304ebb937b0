"""The Block TPROP objective J(θ, Z, U) and ``BlockProblem``, against explicit references.

Every reference here is written from docs/method.md's formulas with plain autograd: a hand-written
per-step cell loop (tanh RNN, GRU, LSTM, several layers) run block by block from each block's
entering state, summed token cross entropy, explicit squared norms; nothing of the code under
test is used to compute a reference except the parameter tensors themselves.
"""

from __future__ import annotations

import pytest
import torch

import tprop.objective as objective_module
from tprop.models import RNNLM
from tprop.objective import (
    BlockProblem,
    StateParam,
    block_terms,
    forward_states,
    objective,
)
from tprop.solvers import PenaltyMethod, SolverSettings

V, E, H = 11, 4, 5
CASES = [(cell, L) for cell in ("rnn", "gru", "lstm") for L in (1, 2)]


@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test of this module runs in float64."""


# --------------------------------------------------------------------------- references
def make_model(cell: str, nlayers: int, seed: int = 0, init_range: float = 0.4) -> RNNLM:
    torch.manual_seed(seed)
    return RNNLM(V, E, H, nlayers, cell, init_range=init_range).double()


def make_data(K: int, M: int, D: int, seed: int = 1, scale: float = 0.5):
    """Time-major (K, M) inputs/targets, a fixed entering state (1, D), free states (M, D)
    (row j = z_{j+1}) and duals (M, D)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, V, (K, M), generator=g)
    targets = torch.randint(0, V, (K, M), generator=g)
    z0 = scale * (2 * torch.rand(1, D, generator=g, dtype=torch.float64) - 1)
    Z = scale * (2 * torch.rand(M, D, generator=g, dtype=torch.float64) - 1)
    U = 0.3 * (2 * torch.rand(M, D, generator=g, dtype=torch.float64) - 1)
    return inputs, targets, z0, Z, U


def params_of(model: RNNLM) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def ref_cell(P: dict[str, torch.Tensor], cell: str, L: int, Hd: int, x: torch.Tensor,
             state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step of an L-layer cell from the flat state [h_0..h_{L-1}, c_0..c_{L-1}]
    (B, D); returns the top layer's h and the new flat state. PyTorch's gate conventions."""
    hs = [state[:, l * Hd:(l + 1) * Hd] for l in range(L)]
    cs = [state[:, (L + l) * Hd:(L + l + 1) * Hd] for l in range(L)]
    new_h, new_c = [], []
    inp = x
    for l in range(L):
        Wi, Wh = P[f"rnn.weight_ih_l{l}"], P[f"rnn.weight_hh_l{l}"]
        bi, bh = P[f"rnn.bias_ih_l{l}"], P[f"rnn.bias_hh_l{l}"]
        h = hs[l]
        gi = inp @ Wi.t() + bi
        gh = h @ Wh.t() + bh
        if cell == "rnn":
            h2 = torch.tanh(gi + gh)
        elif cell == "gru":
            ir, iz, in_ = gi.chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r = torch.sigmoid(ir + hr)
            z = torch.sigmoid(iz + hz)
            n = torch.tanh(in_ + r * hn)
            h2 = (1 - z) * n + z * h
        else:
            i, f, g, o = (gi + gh).chunk(4, 1)
            c2 = torch.sigmoid(f) * cs[l] + torch.sigmoid(i) * torch.tanh(g)
            h2 = torch.sigmoid(o) * torch.tanh(c2)
            new_c.append(c2)
        new_h.append(h2)
        inp = h2
    return inp, torch.cat(new_h + new_c, 1)


def ref_block(P: dict[str, torch.Tensor], model: RNNLM, tokens: torch.Tensor,
              targets: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block run step by step from its entering state z (1, D): the SUM of its token
    cross entropies and the state after its last step (1, D)."""
    state = z
    loss = z.new_zeros(())
    for t in range(tokens.shape[0]):
        x = P["encoder.weight"][tokens[t]].unsqueeze(0)
        top, state = ref_cell(P, model.cell, model.nlayers, model.nhid, x, state)
        logits = top @ P["decoder.weight"].t() + P["decoder.bias"]
        loss = loss - torch.log_softmax(logits, -1)[0, targets[t]]
    return loss, state


def ref_J(P: dict[str, torch.Tensor], model: RNNLM, inputs: torch.Tensor, targets: torch.Tensor,
          z0: torch.Tensor, Z: torch.Tensor, lam: float, U: torch.Tensor | None = None):
    """J = (1/K) Σ_j L_j(θ, z_j) + (λ/2) Σ_j ‖F_j(θ, z_j) − z_{j+1} + u_j‖², block by block.
    Returns (J, ce part, penalty part, finals (M, D), Σ_j ‖F_j − z_{j+1}‖)."""
    K, M = inputs.shape
    ce = z0.new_zeros(())
    pen = z0.new_zeros(())
    res = z0.new_zeros(())
    finals = []
    for j in range(M):
        enter = z0 if j == 0 else Z[j - 1:j]
        Lj, Fj = ref_block(P, model, inputs[:, j], targets[:, j], enter)
        r = Fj - Z[j:j + 1]
        res = res + r.detach().pow(2).sum().sqrt()
        if U is not None:
            r = r + U[j:j + 1]
        ce = ce + Lj / K
        pen = pen + 0.5 * lam * (r * r).sum()
        finals.append(Fj)
    return ce + pen, ce, pen, torch.cat(finals, 0), res


def ref_sequential(P: dict[str, torch.Tensor], model: RNNLM, inputs: torch.Tensor,
                   z0: torch.Tensor) -> torch.Tensor:
    """States after each block when the recurrence runs through the blocks in sequence."""
    out, state = [], z0
    for j in range(inputs.shape[1]):
        _, state = ref_block(P, model, inputs[:, j], inputs[:, j], state)
        out.append(state)
    return torch.cat(out, 0)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-12) -> bool:
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol))


# --------------------------------------------------------------------------- J's value
@pytest.mark.parametrize("cell,nlayers", CASES)
def test_objective_and_block_terms_equal_explicit_formula(cell: str, nlayers: int) -> None:
    model = make_model(cell, nlayers)
    K, M, lam = 3, 4, 0.7
    x, y, z0, Z, U = make_data(K, M, model.state_dim)
    P = params_of(model)
    with torch.no_grad():
        J, ce, pen, finals, _ = ref_J(P, model, x, y, z0, Z, lam, U)
        J0, _, pen0, _, _ = ref_J(P, model, x, y, z0, Z, lam, None)
        got = objective(model, x, y, z0, Z, lam, U)
        got0 = objective(model, x, y, z0, Z, lam)
        t, final = block_terms(model, x, y, torch.cat([z0, Z[:-1]]), Z, lam, U,
                               keep_token_ce=True)
    assert close(got, J) and close(got0, J0)
    assert close(t.ce, ce) and close(t.penalty, pen) and close(t.total, J)
    assert close(final, finals)
    assert not close(pen, pen0)  # the duals matter: the test can tell them apart
    # per-token cross entropies: (K, M), summing to K · ce
    assert t.token_ce.shape == (K, M)
    assert close(t.token_ce.sum() / K, ce)


@pytest.mark.parametrize("cell,nlayers", [("gru", 1), ("lstm", 2)])
def test_batched_blocks_equal_a_per_block_loop(cell: str, nlayers: int) -> None:
    """One recurrent call over all blocks (the block index as the batch dimension) equals
    calling block_terms block by block."""
    model = make_model(cell, nlayers)
    K, M, lam = 4, 5, 1.3
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=4)
    entering = torch.cat([z0, Z[:-1]])
    with torch.no_grad():
        whole, whole_final = block_terms(model, x, y, entering, Z, lam, U)
        pairs = [block_terms(model, x[:, j:j + 1], y[:, j:j + 1], entering[j:j + 1],
                             Z[j:j + 1], lam, U[j:j + 1]) for j in range(M)]
    parts = [p for p, _ in pairs]
    assert close(whole.ce, sum(p.ce for p in parts))
    assert close(whole.penalty, sum(p.penalty for p in parts))
    assert close(whole_final, torch.cat([f for _, f in pairs]))


def test_skip_loss_leaves_out_the_first_blocks_cross_entropy() -> None:
    model = make_model("lstm", 1)
    K, M, lam = 3, 4, 0.5
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=5)
    P = params_of(model)
    entering = torch.cat([z0, Z[:-1]])
    with torch.no_grad():
        t, _ = block_terms(model, x, y, entering, Z, lam, U, skip_loss=1)
        _, ce, pen, _, _ = ref_J(P, model, x, y, z0, Z, lam, U)
        L0, _ = ref_block(P, model, x[:, 0], y[:, 0], z0)
    assert close(t.ce, ce - L0 / K)
    assert close(t.penalty, pen)


# --------------------------------------------------------------------------- chunking
def reference_grads(model: RNNLM, x, y, z0, Z, lam, U):
    P = params_of(model)
    Zl = Z.clone().requires_grad_(True)
    J, *_ = ref_J(P, model, x, y, z0, Zl, lam, U)
    names = list(P)
    grads = torch.autograd.grad(J, [P[n] for n in names] + [Zl])
    return J.detach(), dict(zip(names, grads[:-1])), grads[-1]


@pytest.mark.parametrize("cell,nlayers", [("rnn", 2), ("gru", 1), ("lstm", 2)])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunking_changes_neither_J_nor_gradients(cell: str, nlayers: int, chunk: int) -> None:
    model = make_model(cell, nlayers)
    K, M, lam = 3, 5, 0.9
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=6)
    J, gP, gZ = reference_grads(model, x, y, z0, Z, lam, U)

    model.zero_grad(set_to_none=True)
    prob = BlockProblem(model, x, y, z0, Z, lam, U.clone(), chunk_blocks=chunk)
    res = prob.evaluate(theta=True, states=True)
    assert prob.chunk == chunk
    assert abs(res.ce + res.penalty - float(J)) <= 1e-10 * abs(float(J))
    for n, p in model.named_parameters():
        assert close(p.grad, gP[n]), n
    assert close(prob.w.grad, gZ)

    # states only (the h-step's evaluation): the same Z-gradient, chunked or not
    model.zero_grad(set_to_none=True)
    prob2 = BlockProblem(model, x, y, z0, Z, lam, U.clone(), chunk_blocks=chunk)
    prob2.evaluate(states=True)
    assert close(prob2.w.grad, gZ)


# --------------------------------------------------------------------------- finite differences
def _fd(f, t: torch.Tensor, idx: tuple[int, ...], eps: float = 1e-6) -> float:
    with torch.no_grad():
        old = t[idx].item()
        t[idx] = old + eps
        fp = float(f())
        t[idx] = old - eps
        fm = float(f())
        t[idx] = old
    return (fp - fm) / (2 * eps)


@pytest.mark.parametrize("cell,nlayers", [("gru", 1), ("lstm", 2)])
def test_gradients_match_central_finite_differences(cell: str, nlayers: int) -> None:
    model = make_model(cell, nlayers)
    K, M, lam = 3, 3, 1.1
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=7)
    Z, U = Z.clone().requires_grad_(True), U.clone().requires_grad_(True)
    params = list(model.parameters())
    J = objective(model, x, y, z0, Z, lam, U)
    grads = torch.autograd.grad(J, params + [Z, U])

    def f() -> torch.Tensor:
        with torch.no_grad():
            return objective(model, x, y, z0, Z, lam, U)

    g = torch.Generator().manual_seed(0)
    checked = 0
    for t, gt in zip(params + [Z, U], grads):
        for _ in range(3):
            idx = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in t.shape)
            fd = _fd(f, t.data if t.requires_grad else t, idx)
            assert abs(gt[idx].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (idx, gt[idx], fd)
            checked += 1
    assert checked == 3 * (len(params) + 2)


def test_gradcheck_in_states_and_duals() -> None:
    model = make_model("lstm", 1)
    K, M, lam = 2, 3, 0.8
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=8)
    Z, U = Z.clone().requires_grad_(True), U.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: objective(model, x, y, z0, a, lam, b), (Z, U),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------- evaluate
@pytest.mark.parametrize("cell,nlayers", [("rnn", 1), ("gru", 2), ("lstm", 1), ("lstm", 2)])
def test_evaluate_states_fills_only_w_grad(cell: str, nlayers: int) -> None:
    model = make_model(cell, nlayers)
    K, M, lam = 3, 4, 1.7
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=9)
    J, _, gZ = reference_grads(model, x, y, z0, Z, lam, U)
    model.zero_grad(set_to_none=True)
    prob = BlockProblem(model, x, y, z0, Z, lam, U.clone(), chunk_blocks=2)
    res = prob.evaluate(states=True)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored after the h-pass
    assert close(prob.w.grad, gZ)
    with torch.no_grad():
        _, _, pen, _, resid = ref_J(params_of(model), model, x, y, z0, Z, lam, U)
    assert abs(res.penalty - float(pen)) <= 1e-10 * float(pen)
    assert abs(res.residual - float(resid)) <= 1e-10 * float(resid)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_evaluate_states_with_arctanh_is_the_chain_rule(cell: str) -> None:
    """With z = tanh(w) on the bounded part, ∂J/∂w = ∂J/∂z · (1 − z²) there, ∂J/∂z elsewhere."""
    model = make_model(cell, 2)
    K, M, lam = 3, 3, 1.2
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=10)
    _, _, gZ = reference_grads(model, x, y, z0, Z, lam, U)
    prob = BlockProblem(model, x, y, z0, Z, lam, U.clone(), arctanh=True)
    assert close(prob.z, Z)
    prob.evaluate(states=True)
    b = model.nlayers * model.nhid if cell == "lstm" else model.state_dim
    expect = gZ.clone()
    expect[:, :b] *= 1 - Z[:, :b] ** 2
    assert close(prob.w.grad, expect)


@pytest.mark.parametrize("cell,nlayers", [("rnn", 2), ("gru", 1), ("lstm", 2)])
def test_evaluate_theta_fills_only_parameter_grads(cell: str, nlayers: int) -> None:
    model = make_model(cell, nlayers)
    K, M, lam = 3, 4, 0.6
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=11)
    J, gP, _ = reference_grads(model, x, y, z0, Z, lam, U)
    with torch.no_grad():
        _, ce, pen, _, resid = ref_J(params_of(model), model, x, y, z0, Z, lam, U)
    model.zero_grad(set_to_none=True)
    prob = BlockProblem(model, x, y, z0, Z, lam, U.clone(), chunk_blocks=3)
    res = prob.evaluate(theta=True, token_ce=True)
    assert prob.w.grad is None
    for n, p in model.named_parameters():
        assert close(p.grad, gP[n]), n  # unnormalised: J itself
    assert abs(res.ce - float(ce)) <= 1e-10 * float(ce)
    assert abs(res.penalty - float(pen)) <= 1e-10 * float(pen)
    assert abs(res.residual - float(resid)) <= 1e-10 * float(resid)
    assert res.token_ce.shape == (K,)
    assert abs(float(res.token_ce.sum()) / K - float(ce)) <= 1e-10 * float(ce)


def test_evaluate_without_gradients_accumulates_nothing() -> None:
    model = make_model("lstm", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=12)
    prob = BlockProblem(model, x, y, z0, Z, 1.0, U.clone())
    res = prob.evaluate()
    assert prob.w.grad is None and all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        _, _, pen, _, resid = ref_J(params_of(model), model, x, y, z0, Z, 1.0, U)
    # (ce is not compared: without theta=True the first block's loss, constant in Z, is
    # skipped, as PassResult.ce documents)
    assert abs(res.penalty - float(pen)) <= 1e-10 * float(pen)
    assert abs(res.residual - float(resid)) <= 1e-10 * float(resid)


@pytest.mark.parametrize("theta,states", [(True, False), (False, True), (True, True)])
def test_evaluate_without_measuring_gives_the_same_gradients(theta: bool, states: bool) -> None:
    """A pass wanted for its gradients only (``measure=False``) accumulates the very same
    gradients and returns an empty record."""
    model = make_model("lstm", 2)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=16)
    grads = []
    for measure in (True, False):
        model.zero_grad(set_to_none=True)
        prob = BlockProblem(model, x, y, z0, Z, 0.9, U.clone(), chunk_blocks=3)
        res = prob.evaluate(theta=theta, states=states, measure=measure)
        grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()]
                     + [prob.w.grad])
        if measure:
            assert res.ce > 0 and res.penalty > 0 and res.residual > 0
        else:
            assert (res.ce, res.penalty, res.residual, res.token_ce) == (0.0, 0.0, 0.0, None)
    for a, b in zip(*grads):
        assert (a is None and b is None) or torch.equal(a, b)


def test_residuals_are_final_states_minus_free_states() -> None:
    model = make_model("gru", 2)
    x, y, z0, Z, _ = make_data(3, 5, model.state_dim, seed=17)
    prob = BlockProblem(model, x, y, z0, Z, 1.0, chunk_blocks=2)
    with torch.no_grad():
        _, _, _, finals, _ = ref_J(params_of(model), model, x, y, z0, Z, 1.0)
    assert close(prob.residuals(), finals - Z)
    assert close(prob.residuals(), prob.final_states() - prob.z)


@pytest.mark.parametrize("cell,nlayers", [("rnn", 1), ("lstm", 2)])
def test_a_kept_pass_gives_the_same_evaluation(cell: str, nlayers: int) -> None:
    """``residuals(keep=True)``: the same residuals, and the next evaluation in θ, reusing the
    pass, gives the same terms and gradients as one that runs the recurrence itself."""
    model = make_model(cell, nlayers)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=18)
    got = []
    for keep in (False, True):
        model.zero_grad(set_to_none=True)
        prob = BlockProblem(model, x, y, z0, Z, 0.8, U.clone())
        r = prob.residuals(keep=keep)
        assert not r.requires_grad and (prob._kept is not None) == keep
        res = prob.evaluate(theta=True)
        assert prob._kept is None  # used once
        got.append((r, res, [p.grad.clone() for p in model.parameters()], prob.last_final))
    (r0, t0, g0, f0), (r1, t1, g1, f1) = got
    assert close(r1, r0) and close(f1, f0)
    assert t1.ce == pytest.approx(t0.ce, rel=1e-12)
    assert t1.penalty == pytest.approx(t0.penalty, rel=1e-12)
    for a, b in zip(g0, g1):
        assert close(a, b)


def test_a_kept_pass_is_only_for_one_chunk_and_the_next_evaluation() -> None:
    model = make_model("gru", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=19)
    chunked = BlockProblem(model, x, y, z0, Z, 1.0, U.clone(), chunk_blocks=2)
    assert close(chunked.residuals(keep=True), chunked.residuals())
    assert chunked._kept is None
    prob = BlockProblem(model, x, y, z0, Z, 1.0, U.clone())
    prob.residuals(keep=True)
    model.zero_grad(set_to_none=True)
    prob.evaluate(states=True)  # not an evaluation in θ alone: the pass is dropped
    assert prob._kept is None and all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- forward init
@pytest.mark.parametrize("cell,nlayers", CASES)
def test_forward_init_gives_zero_residuals(cell: str, nlayers: int) -> None:
    model = make_model(cell, nlayers)
    K, M = 3, 5
    x, y, z0, _, _ = make_data(K, M, model.state_dim, seed=13)
    model.train()
    z = forward_states(model, x, z0)
    assert model.training  # mode restored
    with torch.no_grad():
        assert close(z, ref_sequential(params_of(model), model, x, z0))
    prob = BlockProblem(model, x, y, z0, z, 2.0, chunk_blocks=2)
    F_ = prob.final_states()
    assert (F_ - prob.z).abs().max() <= 1e-12
    res = prob.evaluate()
    assert close(prob.last_final, F_[-1:])  # the last evaluation's final state
    assert res.residual <= 1e-11 and res.penalty <= 1e-22
    # and a non-forward initialisation has non-zero residuals (the check can fail)
    prob0 = BlockProblem(model, x, y, z0, torch.zeros_like(z), 2.0)
    assert (prob0.final_states() - prob0.z).abs().max() > 1e-3


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("cell,nlayers", CASES)
def test_forward_states_equal_a_step_by_step_pass(cell: str, nlayers: int, K: int) -> None:
    """The forward initialisation is the sequential pass, step by step, block after block:
    every row, and a span's partial use of rows (a rank's rows: its blocks of the span)."""
    model = make_model(cell, nlayers, seed=3, init_range=0.8)  # large cell states too
    M = 9
    x, _, z0, _, _ = make_data(K, M, model.state_dim, seed=21, scale=0.9)
    with torch.no_grad():
        ref = ref_sequential(params_of(model), model, x, z0)
    z = forward_states(model, x, z0)
    assert z.shape == (M, model.state_dim) and not z.requires_grad
    assert close(z, ref)
    for rows in ([3, 4, 5], [0], [M - 1], [6, 2, 7]):
        got = forward_states(model, x, z0, rows=torch.tensor(rows))
        assert close(got, ref[rows]), rows
    assert forward_states(model, x, z0, rows=torch.zeros(0, dtype=torch.long)).shape == (
        0, model.state_dim)


@pytest.mark.parametrize("cell,nlayers", [("gru", 2), ("lstm", 1), ("lstm", 2)])
def test_forward_states_in_several_passes(monkeypatch: pytest.MonkeyPatch, cell: str,
                                          nlayers: int) -> None:
    """A span longer than one pass is run in several, each from the last one's final state."""
    model = make_model(cell, nlayers, seed=4)
    K, M = 3, 11
    x, _, z0, _, _ = make_data(K, M, model.state_dim, seed=22)
    with torch.no_grad():
        ref = ref_sequential(params_of(model), model, x, z0)
    assert close(forward_states(model, x, z0), ref)  # one pass
    monkeypatch.setattr(objective_module, "_SPAN_STEPS", 4 * K)  # passes of 4 blocks
    assert close(forward_states(model, x, z0), ref)
    rows = torch.tensor([2, 5, 6, 9])
    assert close(forward_states(model, x, z0, rows=rows), ref[rows])


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13])
def test_cell_states_composed_across_blocks_are_the_recurrence(n: int) -> None:
    """c_j = coef_j ⊙ c_{j−1} + val_j, j = 0 … n−1 from c0, against the loop."""
    g = torch.Generator().manual_seed(n)
    coef, val, c0 = torch.rand(n, 6, generator=g), torch.randn(n, 6, generator=g), \
        torch.randn(6, generator=g)
    ref, c = [], c0
    for j in range(n):
        c = coef[j] * c + val[j]
        ref.append(c)
    before = (coef.clone(), val.clone())
    assert close(objective_module._compose_blocks(coef, val, c0), torch.stack(ref))
    assert torch.equal(coef, before[0]) and torch.equal(val, before[1])  # inputs untouched


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_forward_states_run_without_dropout(cell: str) -> None:
    """In training mode with dropout (embedding and between layers) the pass is still the
    no-dropout recurrence, and the model stays in training mode."""
    torch.manual_seed(5)
    model = RNNLM(V, E, H, 2, cell, dropout=0.5, init_range=0.4).double().train()
    x, _, z0, _, _ = make_data(4, 6, model.state_dim, seed=23)
    with torch.no_grad():
        ref = ref_sequential(params_of(model), model, x, z0)
    assert close(forward_states(model, x, z0), ref)
    assert model.training


@pytest.mark.parametrize("cell", ["diag-gru", "diag-lstm"])
@pytest.mark.parametrize("nlayers", [1, 2])
def test_forward_states_of_diagonal_cells(cell: str, nlayers: int) -> None:
    """Cells that are not torch's fused kernels: the state after block j is that of the
    module run over blocks 0 … j as one sequence."""
    model = make_model(cell, nlayers, seed=6)
    K, M = 3, 5
    x, _, z0, _, _ = make_data(K, M, model.state_dim, seed=24)
    with torch.no_grad():
        seq = x.t().reshape(-1, 1)  # the blocks one after another, one column
        ref = torch.cat([model.flatten_state(model.rnn(model.encoder(seq[:(j + 1) * K]),
                                                       model.unflatten_state(z0))[1])
                         for j in range(M)])
    assert close(forward_states(model, x, z0), ref)
    assert close(forward_states(model, x, z0, rows=torch.tensor([1, 3])), ref[[1, 3]])


def _check_z_detached(arctanh: bool) -> None:
    """``BlockProblem.z``: "current free states (M, D) (detached)"."""
    model = make_model("lstm", 1)
    x, y, z0, Z, _ = make_data(3, 4, model.state_dim, seed=15)
    prob = BlockProblem(model, x, y, z0, Z, 1.0, arctanh=arctanh)
    z = prob.z
    assert close(z, Z)
    assert z is not prob.w
    assert not z.requires_grad and z.grad_fn is None


def test_problem_z_is_detached_with_arctanh() -> None:
    _check_z_detached(arctanh=True)


def test_problem_z_is_detached_without_arctanh() -> None:
    _check_z_detached(arctanh=False)


# --------------------------------------------------------------------------- arctanh
@pytest.mark.parametrize("cell,nlayers", [("rnn", 2), ("gru", 1), ("lstm", 1), ("lstm", 2)])
def test_state_param_tanh_on_the_bounded_part(cell: str, nlayers: int) -> None:
    model = make_model(cell, nlayers)
    D = model.state_dim
    b = nlayers * H if cell == "lstm" else D
    w = 3 * torch.randn(4, D)
    sp = StateParam(model, arctanh=True)
    z = sp.to_z(w)
    eps = StateParam.EPS  # tanh, kept strictly inside (-1, 1) where it rounds to ±1
    assert close(z[:, :b], torch.tanh(w[:, :b]).clamp(-1 + eps, 1 - eps))
    assert close(z[:, b:], w[:, b:])  # an LSTM's cell states are unbounded
    zin = torch.cat([0.999 * (2 * torch.rand(4, b) - 1), 5 * torch.randn(4, D - b)], 1)
    assert close(sp.to_z(sp.to_w(zin)), zin, rtol=1e-9, atol=1e-12)
    # without arctanh: the identity, and to_w copies
    plain = StateParam(model, arctanh=False)
    assert torch.equal(plain.to_z(w), w)
    w2 = plain.to_w(w)
    assert torch.equal(w2, w) and w2.data_ptr() != w.data_ptr()


def _pushed_problem(cell: str, dtype: torch.dtype, arctanh: bool, lam: float) -> BlockProblem:
    """A problem whose targets and duals push the free h states towards and past ±1."""
    model = make_model(cell, 1).to(dtype)
    K, M = 3, 4
    x, y, z0, _, _ = make_data(K, M, model.state_dim, seed=14)
    b, D = model.nhid, model.state_dim
    g = torch.Generator().manual_seed(0)
    Z = torch.cat([0.95 * torch.sign(torch.randn(M, b, generator=g)),
                   torch.randn(M, D - b, generator=g)], 1)[:, :D]
    U = 2.0 * torch.sign(torch.randn(M, D, generator=g))
    return BlockProblem(model, x, y, z0.to(dtype), Z.to(dtype), lam, U.to(dtype),
                        arctanh=arctanh)


def _h_steps(prob: BlockProblem, n: int, h_optim: str, h_lr: float) -> int:
    solver = PenaltyMethod(prob.model, torch.optim.SGD(prob.model.parameters(), lr=0.1),
                           SolverSettings(h_steps=n, h_lr=h_lr, h_optim=h_optim, lam=prob.lam))
    return solver.h_steps(prob)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_arctanh_keeps_h_strictly_inside_after_many_h_steps(cell: str, dtype: torch.dtype) -> None:
    b = H  # one layer: the h part is the first nhid coordinates (all of a GRU state)
    # without the reparametrisation the same steps push h past the bounds ...
    plain = _pushed_problem(cell, dtype, arctanh=False, lam=20.0)
    assert _h_steps(plain, 60, "adagrad", 1.0) == 60
    assert plain.z[:, :b].abs().max() > 1.0
    # ... with it they stay strictly inside, far into tanh's tail
    prob = _pushed_problem(cell, dtype, arctanh=True, lam=20.0)
    assert _h_steps(prob, 60, "adagrad", 1.0) == 60
    z, w = prob.z, prob.w.detach()
    assert torch.isfinite(z).all()
    assert z[:, :b].abs().max() < 1.0
    assert w[:, :b].abs().max() > 4.0  # the steps were large in w
    assert close(z[:, :b], torch.tanh(w[:, :b]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arctanh_keeps_h_strictly_inside_after_large_h_steps(dtype: torch.dtype) -> None:
    prob = _pushed_problem("gru", dtype, arctanh=True, lam=20.0)
    assert _h_steps(prob, 20, "sgd", 5.0) == 20
    z = prob.z
    assert torch.isfinite(z).all()
    assert z.abs().max() < 1.0  # fails: some coordinates are exactly ±1.0
