"""Constrained h-optimisation (tprop.constraints, docs/beyond.md): the KL penalty between
output distributions, the box and l1 state constraints, and how they meet the solvers,
identity E0, the trainers and sharded runs.

References are written from the formulas with plain autograd (the hand-written cells of
``test_objective``), never with the code under test.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_corpus
from test_objective import _fd, make_data, make_model, params_of, ref_J
from test_solvers import flat, forward_problem, record_theta_grads, ref_tbptt_grad, rel

from tprop.cli import build_parser, main
from tprop.config import ConfigError, make_config
from tprop.constraints import (
    BoxStateParam,
    StateTerms,
    kl_divergence,
    make_state_param,
    producible,
)
from tprop.models import RNNLM
from tprop.objective import BlockProblem, StateParam, block_terms, forward_states, objective
from tprop.solvers import ADMM, ALM, PenaltyMethod, SolverSettings
from tprop.train import make_trainer

CASES = [(cell, L) for cell in ("rnn", "gru", "lstm") for L in (1, 2)]


@pytest.fixture(autouse=True)
def _f64(float64):
    """Every test of this module runs in float64."""


# --------------------------------------------------------------------------- references
def ref_kl(P: dict[str, torch.Tensor], model: RNNLM, final: torch.Tensor, Z: torch.Tensor,
           direction: str) -> torch.Tensor:
    """Σ_j KL between softmax(W h + b) of z_{j+1} (target) and of F_j, written out."""
    top = (model.nlayers - 1) * model.nhid

    def logp(s: torch.Tensor) -> torch.Tensor:
        logits = s[:, top:top + model.nhid] @ P["decoder.weight"].t() + P["decoder.bias"]
        return logits - torch.logsumexp(logits, 1, keepdim=True)

    lt, lp = logp(Z), logp(final)
    if direction == "pred-target":
        lt, lp = lp, lt
    return (lt.exp() * (lt - lp)).sum()


def ref_J_terms(P, model, x, y, z0, Z, lam, U, terms: StateTerms) -> torch.Tensor:
    """J with the extra terms: CE + [l2 with duals] + kl_weight·KL + l1_weight·Σ|z|."""
    _, ce, pen, finals, _ = ref_J(P, model, x, y, z0, Z, lam, U)
    J = ce + (pen if terms.l2 else 0.0)
    if terms.kl:
        J = J + terms.kl_weight * ref_kl(P, model, finals, Z, terms.kl_direction)
    if terms.l1:
        J = J + terms.l1_weight * Z.abs().sum()
    return J


TERMS = {
    "kl": StateTerms(penalty="kl", kl_weight=1.7),
    "l2+kl-pred": StateTerms(penalty="l2+kl", kl_direction="pred-target", kl_weight=0.6),
    "l2+l1": StateTerms(penalty="l2", state_constraint="l1", l1_weight=0.3),
    "kl+l1": StateTerms(penalty="l2+kl", state_constraint="l1", l1_weight=0.2),
}


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("name", list(TERMS))
@pytest.mark.parametrize("cell,nlayers", [("rnn", 1), ("gru", 2), ("lstm", 1), ("lstm", 2)])
def test_terms_equal_the_explicit_formula(name: str, cell: str, nlayers: int) -> None:
    terms = TERMS[name]
    model = make_model(cell, nlayers)
    K, M, lam = 3, 4, 0.7
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=2)
    with torch.no_grad():
        expect = ref_J_terms(params_of(model), model, x, y, z0, Z, lam, U, terms)
        got = objective(model, x, y, z0, Z, lam, U, terms=terms)
        t, _ = block_terms(model, x, y, torch.cat([z0, Z[:-1]]), Z, lam, U, terms=terms)
    assert abs(float(got) / float(expect) - 1) < 1e-12
    assert (t.kl is not None) == terms.kl and (t.l1 is not None) == terms.l1
    if not terms.l2:  # kl alone: no squared distance, the duals unread
        assert float(t.penalty) == 0.0
    if terms.kl:
        assert float(t.kl) > 0


def test_default_terms_change_nothing() -> None:
    """StateTerms() (the paper's objective) and terms=None give bitwise the same J and
    gradients; from_config gives None for the defaults."""
    assert StateTerms.from_config(make_config(dataset="ptb")) is None
    assert StateTerms().is_default
    model = make_model("lstm", 2)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=3)
    out = []
    for terms in (None, StateTerms()):
        model.zero_grad(set_to_none=True)
        prob = BlockProblem(model, x, y, z0, Z, 0.9, U.clone(), terms=terms)
        res = prob.evaluate(theta=True, states=True)
        out.append((res, flat(p.grad for p in model.parameters()), prob.w.grad.clone()))
    (r0, g0, w0), (r1, g1, w1) = out
    assert (r0.ce, r0.penalty, r0.residual) == (r1.ce, r1.penalty, r1.residual)
    assert r0.kl == r1.kl == 0.0 and r0.l1 == r1.l1 == 0.0
    assert torch.equal(g0, g1) and torch.equal(w0, w1)


def frozen_model_and_states(cell: str, nlayers: int, n: int, seed: int):
    """A tiny model with frozen parameters and two random (n, D) state batches."""
    model = make_model(cell, nlayers)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, model.state_dim, generator=g)
    b = torch.randn(n, model.state_dim, generator=g)
    model.requires_grad_(False)
    return model, a, b


def test_kl_direction_matters_and_both_are_nonnegative() -> None:
    model, a, b = frozen_model_and_states("gru", 1, 5, seed=0)
    tp = float(kl_divergence(model, a, b, "target-pred"))
    pt = float(kl_divergence(model, a, b, "pred-target"))
    assert tp > 0 and pt > 0 and abs(tp - pt) > 1e-6
    assert abs(pt - float(kl_divergence(model, b, a, "target-pred"))) < 1e-12
    with pytest.raises(ValueError, match="KL direction"):
        kl_divergence(model, a, b, "sideways")


def test_kl_reads_only_the_top_layer_h() -> None:
    """Changing a lower layer or the LSTM cell of the states leaves the KL alone."""
    model, a, b = frozen_model_and_states("lstm", 2, 3, seed=1)
    base = float(kl_divergence(model, a, b))
    top = slice(model.nhid, 2 * model.nhid)
    a2, b2 = a.clone(), b.clone()
    keep = torch.zeros(model.state_dim, dtype=torch.bool)
    keep[top] = True
    a2[:, ~keep] += 1.0
    b2[:, ~keep] -= 1.0
    assert abs(float(kl_divergence(model, a2, b2)) - base) < 1e-12


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", list(TERMS))
@pytest.mark.parametrize("cell,nlayers", [("gru", 1), ("lstm", 2)])
def test_gradients_match_central_finite_differences(name: str, cell: str, nlayers: int) -> None:
    terms = TERMS[name]
    model = make_model(cell, nlayers)
    K, M, lam = 3, 3, 1.1
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=7)
    Z, U = Z.clone().requires_grad_(True), U.clone().requires_grad_(True)
    params = list(model.parameters())
    J = objective(model, x, y, z0, Z, lam, U, terms=terms)
    grads = torch.autograd.grad(J, params + [Z, U], allow_unused=True)

    def f() -> torch.Tensor:
        with torch.no_grad():
            return objective(model, x, y, z0, Z, lam, U, terms=terms)

    g = torch.Generator().manual_seed(0)
    for t, gt in zip(params + [Z, U], grads):
        gt = torch.zeros_like(t) if gt is None else gt  # U is unread with kl alone
        for _ in range(3):
            idx = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in t.shape)
            fd = _fd(f, t.data if t.requires_grad else t, idx)
            assert abs(gt[idx].item() - fd) <= 1e-6 * max(1.0, abs(fd)), (idx, gt[idx], fd)


def test_gradcheck_kl_in_states_and_decoder() -> None:
    """torch.autograd.gradcheck of the KL term alone, in both states and the decoder."""
    model = make_model("lstm", 1)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, model.state_dim, generator=g, requires_grad=True)
    b = torch.randn(3, model.state_dim, generator=g, requires_grad=True)
    W = model.decoder.weight
    for direction in ("target-pred", "pred-target"):
        assert torch.autograd.gradcheck(
            lambda a_, b_, d=direction: kl_divergence(model, a_, b_, d), (a, b), eps=1e-6,
            atol=1e-8, rtol=1e-6)
    # the decoder's gradient against the explicit formula
    P = params_of(model)
    ref = torch.autograd.grad(ref_kl(P, model, a, b, "target-pred"), [W])[0]
    got = torch.autograd.grad(kl_divergence(model, a, b), [W])[0]
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["kl", "l2+kl-pred", "kl+l1"])
def test_evaluate_gradients_equal_the_reference(name: str) -> None:
    """BlockProblem.evaluate (chunked) with the terms on: θ- and Z-gradients of the reference
    J; the reported kl / l1 are the terms' values."""
    terms = TERMS[name]
    model = make_model("lstm", 2)
    K, M, lam = 3, 5, 0.9
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=6)
    P = params_of(model)
    Zl = Z.clone().requires_grad_(True)
    J = ref_J_terms(P, model, x, y, z0, Zl, lam, U, terms)
    names = list(P)
    grads = torch.autograd.grad(J, [P[n] for n in names] + [Zl])
    model.zero_grad(set_to_none=True)
    prob = BlockProblem(model, x, y, z0, Z, lam, U.clone(), chunk_blocks=2, terms=terms)
    res = prob.evaluate(theta=True, states=True)
    J = float(J.detach())
    assert abs(res.ce + res.penalty + res.kl + res.l1 - J) <= 1e-10 * abs(J)
    for n, gP in zip(names, grads[:-1]):
        assert torch.allclose(dict(model.named_parameters())[n].grad, gP, rtol=1e-9,
                              atol=1e-12), n
    assert torch.allclose(prob.w.grad, grads[-1], rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        _, _, _, finals, _ = ref_J(P, model, x, y, z0, Z, lam, U)
        if terms.kl:
            kl = terms.kl_weight * ref_kl(P, model, finals, Z, terms.kl_direction)
            assert abs(res.kl - float(kl)) <= 1e-10 * float(kl)
        if terms.l1:
            assert abs(res.l1 - terms.l1_weight * float(Z.abs().sum())) < 1e-10


# --------------------------------------------------------------------------- zero residual, E0
@pytest.mark.parametrize("direction", ["target-pred", "pred-target"])
@pytest.mark.parametrize("cell,nlayers", [("rnn", 1), ("gru", 2), ("lstm", 2)])
def test_kl_and_its_gradients_vanish_at_zero_residual(cell: str, nlayers: int,
                                                      direction: str) -> None:
    model = make_model(cell, nlayers)
    K, M = 3, 4
    x, y, z0, _, _ = make_data(K, M, model.state_dim, seed=4)
    z = forward_states(model, x, z0).requires_grad_(True)
    finals = torch.cat([z0, z[:-1].detach()])
    F = model.final_state_flat(x, finals)  # F_j from the forward-initialised entering states
    assert torch.allclose(F, z.detach(), rtol=0, atol=1e-13)
    kl = kl_divergence(model, F, z, direction)
    assert abs(float(kl.detach())) < 1e-14
    params = list(model.parameters())
    grads = torch.autograd.grad(kl, params + [z], allow_unused=True)
    for gr in grads:
        assert gr is None or gr.abs().max() < 1e-12
    # and exactly at equality: KL(p||p) = 0 with a zero gradient in both arguments
    a = z.detach().clone().requires_grad_(True)
    b = z.detach().clone().requires_grad_(True)
    k2 = kl_divergence(model, a, b, direction)
    ga, gb = torch.autograd.grad(k2, [a, b])
    assert abs(float(k2.detach())) < 1e-15
    assert ga.abs().max() < 1e-14 and gb.abs().max() < 1e-14


@pytest.mark.parametrize("penalty", ["kl", "l2+kl"])
@pytest.mark.parametrize("direction", ["target-pred", "pred-target"])
@pytest.mark.parametrize("cell,nlayers", CASES)
def test_E0_holds_with_the_kl_term(cell: str, nlayers: int, penalty: str,
                                   direction: str) -> None:
    """PM, H = 0, forward initialisation: the θ-gradient with the KL term on is the truncated
    BPTT gradient (test_solvers' reference), as without it."""
    model = make_model(cell, nlayers)
    K, M = 3, 4
    prob, _ = forward_problem(model, K, M, lam=2.5)
    expect = flat(ref_tbptt_grad(model, prob.inputs, prob.targets, prob.z_fixed))
    terms = StateTerms(penalty=penalty, kl_direction=direction, kl_weight=3.0)
    work = copy.deepcopy(model)
    kprob = BlockProblem(work, prob.inputs, prob.targets, prob.z_fixed, prob.z, 2.5,
                         terms=terms)
    solver = PenaltyMethod(work, torch.optim.SGD(work.parameters(), lr=1.0),
                           SolverSettings(h_steps=0, theta_steps=1, clip=0.0, lam=2.5))
    rec = record_theta_grads(solver)
    stats = solver.step(kprob, epoch=1)
    assert len(rec) == 1
    assert rel(flat(rec[0]), expect) < 1e-10
    assert abs(stats.kl) < 1e-14 and stats.residual <= 1e-10


def test_E0_holds_with_box_states_on_an_lstm() -> None:
    """Forward-initialised states are producible, so the box reparametrisation reproduces them
    (up to rounding) and E0 still holds."""
    model = make_model("lstm", 2)
    prob, z = forward_problem(model, 3, 4, lam=2.5)
    expect = flat(ref_tbptt_grad(model, prob.inputs, prob.targets, prob.z_fixed))
    work = copy.deepcopy(model)
    bprob = BlockProblem(work, prob.inputs, prob.targets, prob.z_fixed, z, 2.5,
                         terms=StateTerms(state_constraint="box"))
    assert isinstance(bprob.param, BoxStateParam)
    assert torch.allclose(bprob.z, z, rtol=0, atol=1e-12)
    solver = PenaltyMethod(work, torch.optim.SGD(work.parameters(), lr=1.0),
                           SolverSettings(h_steps=0, theta_steps=1, clip=0.0, lam=2.5))
    rec = record_theta_grads(solver)
    solver.step(bprob, epoch=1)
    assert rel(flat(rec[0]), expect) < 1e-9


# --------------------------------------------------------------------------- box
@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_box_on_rnn_and_gru_is_the_arctanh_reparametrisation(cell: str) -> None:
    model = make_model(cell, 2)
    p = make_state_param(model, False, StateTerms(state_constraint="box"))
    ref = StateParam(model, True)
    assert isinstance(p, StateParam) and p.bounded == ref.bounded == model.state_dim
    g = torch.Generator().manual_seed(0)
    w = 3 * torch.randn(4, model.state_dim, generator=g)
    assert torch.equal(p.to_z(w), ref.to_z(w))
    # --arctanh alone keeps working as before
    assert make_state_param(model, True, None).bounded == ref.bounded


@pytest.mark.parametrize("nlayers", [1, 2])
def test_box_lstm_states_are_producible_and_round_trip(nlayers: int) -> None:
    model = make_model("lstm", nlayers)
    p = BoxStateParam(model)
    g = torch.Generator().manual_seed(0)
    w = 4 * torch.randn(6, model.state_dim, generator=g)
    z = p.to_z(w)
    assert producible(model, z)
    b = nlayers * model.nhid
    h, c = z[:, :b], z[:, b:]
    assert torch.equal(c, w[:, b:])  # the cell is left free
    assert torch.allclose(h, torch.sigmoid(w[:, :b]) * torch.tanh(c))
    assert torch.allclose(p.to_w(z), w, rtol=1e-8, atol=1e-8)
    # states of the cell itself round-trip
    x, _, z0, _, _ = make_data(3, 5, model.state_dim, seed=3)
    zs = forward_states(model, x, z0)
    assert producible(model, zs)
    assert torch.allclose(p.to_z(p.to_w(zs)), zs, rtol=0, atol=1e-12)
    # c = 0 (e.g. --h-init zero): h must be 0 and maps to o = 1/2, no NaN
    zero = torch.zeros(2, model.state_dim)
    assert torch.equal(p.to_z(p.to_w(zero)), zero)
    # not producible: h of the wrong sign, or larger than tanh(c)
    bad = zs.clone()
    bad[:, 0] = -torch.sign(torch.tanh(bad[:, b])) * 0.5
    assert not producible(model, bad)


def _pushed(cell: str, terms: StateTerms | None, arctanh: bool = False) -> BlockProblem:
    """A problem whose targets and duals push the free states far out."""
    model = make_model(cell, 1)
    K, M = 3, 4
    x, y, z0, _, _ = make_data(K, M, model.state_dim, seed=14)
    g = torch.Generator().manual_seed(0)
    D = model.state_dim
    Z = forward_states(model, x, z0)
    U = 2.0 * torch.sign(torch.randn(M, D, generator=g))
    return BlockProblem(model, x, y, z0, Z, 20.0, U, arctanh=arctanh, terms=terms)


def _h_steps(prob: BlockProblem, n: int, h_optim: str = "adagrad", h_lr: float = 1.0) -> int:
    solver = PenaltyMethod(prob.model, torch.optim.SGD(prob.model.parameters(), lr=0.1),
                           SolverSettings(h_steps=n, h_lr=h_lr, h_optim=h_optim, lam=prob.lam))
    return solver.h_steps(prob)


def test_box_keeps_lstm_states_producible_where_arctanh_does_not() -> None:
    box = StateTerms(state_constraint="box")
    prob = _pushed("lstm", box)
    assert _h_steps(prob, 40) == 40
    assert torch.isfinite(prob.z).all() and producible(prob.model, prob.z)
    # --arctanh bounds h but lets it take the wrong sign / exceed |tanh c|
    arc = _pushed("lstm", None, arctanh=True)
    assert _h_steps(arc, 40) == 40
    assert arc.z[:, :H1].abs().max() < 1.0
    assert not producible(arc.model, arc.z)


H1 = 5  # nhid of test_objective's models


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_box_matches_arctanh_h_steps_on_rnn_and_gru(cell: str) -> None:
    a = _pushed(cell, StateTerms(state_constraint="box"))
    b = _pushed(cell, None, arctanh=True)
    _h_steps(a, 10)
    _h_steps(b, 10)
    assert torch.equal(a.z, b.z)


# --------------------------------------------------------------------------- l1
def test_l1_h_steps_shrink_the_free_states() -> None:
    """A large l1 weight and plain h-steps drive |z| down (the penalty acts on every
    coordinate of the free states, the entering state excepted)."""
    model = make_model("lstm", 1)
    x, y, z0, _, _ = make_data(3, 4, model.state_dim, seed=14)
    z = forward_states(model, x, z0)
    terms = StateTerms(state_constraint="l1", l1_weight=5.0)
    prob = BlockProblem(model, x, y, z0, z, 0.1, terms=terms)
    plain = BlockProblem(model, x, y, z0, z, 0.1)
    for p in (prob, plain):
        _h_steps(p, 20, "sgd", 0.01)
    assert prob.z.abs().sum() < 0.5 * z.abs().sum()
    assert plain.z.abs().sum() > 0.9 * z.abs().sum()


# --------------------------------------------------------------------------- duals
def test_duals_attach_to_the_squared_distance_only() -> None:
    model = make_model("gru", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=5)
    entering = torch.cat([z0, Z[:-1]])
    terms = StateTerms(penalty="l2+kl")
    with torch.no_grad():
        a, _ = block_terms(model, x, y, entering, Z, 1.3, U, terms=terms)
        b, _ = block_terms(model, x, y, entering, Z, 1.3, None, terms=terms)
        c, _ = block_terms(model, x, y, entering, Z, 1.3, U)
    assert float(a.kl) == float(b.kl)  # the KL does not read u
    assert float(a.penalty) == float(c.penalty)  # the l2 part is the paper's, duals included
    assert float(a.penalty) != float(b.penalty)
    # the dual step is the paper's: u += ρ (F − z), with the KL term on
    prob = BlockProblem(model, x, y, z0, Z, 1.3, U.clone(), terms=terms)
    solver = ADMM(model, torch.optim.SGD(model.parameters(), lr=0.1),
                  SolverSettings(u_lr=0.5, u_start=1))
    before = prob.dual.clone()
    solver.dual_step(prob)
    assert torch.allclose(prob.dual, before + 0.5 * (prob.final_states() - Z))


@pytest.mark.parametrize("method", ["admm", "alm"])
def test_kl_alone_is_refused_with_duals(method: str) -> None:
    with pytest.raises(ConfigError, match="--penalty: 'kl' alone"):
        make_config(dataset="ptb", method=method, penalty="kl")
    make_config(dataset="ptb", method=method, penalty="l2+kl")
    make_config(dataset="ptb", method="pm", penalty="kl")
    # and the solver refuses a dual step on such a problem built by hand
    model = make_model("rnn", 1)
    x, y, z0, Z, U = make_data(3, 3, model.state_dim)
    prob = BlockProblem(model, x, y, z0, Z, 1.0, U.clone(), terms=StateTerms(penalty="kl"))
    solver = (ADMM if method == "admm" else ALM)(
        model, torch.optim.SGD(model.parameters(), lr=0.1), SolverSettings(u_start=1))
    with pytest.raises(ValueError, match="no squared distance"):
        solver.dual_step(prob)


@pytest.mark.parametrize("method", ["pm", "admm", "alm"])
def test_every_solver_steps_with_the_terms(method: str) -> None:
    terms = StateTerms(penalty="l2+kl", state_constraint="l1", l1_weight=0.05)
    model = make_model("lstm", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=9)
    z = forward_states(model, x, z0)
    from tprop.solvers import SOLVERS

    solver = SOLVERS[method](model, torch.optim.SGD(model.parameters(), lr=0.1),
                             SolverSettings(h_steps=2, theta_steps=1, alm_max_steps=2,
                                            u_start=1, h_optim="sgd", h_lr=0.1))
    prob = BlockProblem(model, x, y, z0, z, 1.0, torch.zeros_like(U) if solver.uses_duals
                        else None, terms=terms)
    stats = solver.step(prob, epoch=1)
    assert stats.l1 > 0 and stats.kl >= -1e-12  # zero up to rounding at first
    assert torch.isfinite(prob.z).all()


# --------------------------------------------------------------------------- config and CLI
def test_config_validation() -> None:
    ok = make_config(dataset="ptb", method="pm", penalty="l2+kl", kl_direction="pred-target",
                     kl_weight=0.5, state_constraint="l1", l1_weight=0.01)
    assert StateTerms.from_config(ok) == StateTerms("l2+kl", "pred-target", 0.5, "l1", 0.01)
    for kw, flag in [(dict(penalty="l1"), "--penalty"),
                     (dict(kl_direction="both"), "--kl-direction"),
                     (dict(kl_weight=0.0), "--kl-weight"),
                     (dict(state_constraint="binary"), "--state-constraint"),
                     (dict(state_constraint="l1"), "--l1-weight: must be > 0"),
                     (dict(l1_weight=0.1), "--l1-weight: applies only"),
                     (dict(state_constraint="l1", l1_weight=-1.0), "--l1-weight")]:
        with pytest.raises(ConfigError, match=flag):
            make_config(dataset="ptb", method="pm", **kw)
    # BPTT ignores them, as it ignores every BTPROP flag
    make_config(dataset="ptb", method="bptt", penalty="kl")


def test_cli_flags_reach_the_config() -> None:
    args = build_parser().parse_args(
        ["train", "--method", "pm", "--penalty", "l2+kl", "--kl-direction", "pred-target",
         "--kl-weight", "0.3", "--state-constraint", "box"])
    v = vars(args)
    assert (v["penalty"], v["kl_direction"], v["kl_weight"], v["state_constraint"]) == (
        "l2+kl", "pred-target", 0.3, "box")
    assert "l1_weight" not in v  # unset flags stay unset (presets may fill them)
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ("--penalty", "--kl-direction", "--kl-weight", "--state-constraint",
                 "--l1-weight"):
        assert flag in help_text


# --------------------------------------------------------------------------- trainers
def _cfg(data_dir: Path, **kw: Any) -> dict[str, Any]:
    base = dict(data_dir=str(data_dir), dataset=None, quiet=True, device="cpu", model="lstm",
                emsize=4, nhid=5, bptt=4, batch_size=2, eval_batch_size=2, train_tokens=300,
                eval_tokens=100, epochs=2, seed=3, optim="sgd", lr=0.5, method="pm",
                blocks_per_update=5, h_steps=2, h_optim="sgd", h_lr=0.1, theta_steps=1,
                threads=1, tol=10)
    base.update(kw)
    return base


@pytest.mark.parametrize("kw", [
    dict(method="pm", penalty="kl", state_constraint="box"),
    dict(method="admm", penalty="l2+kl", u_start=1, state_constraint="l1", l1_weight=0.01),
    dict(method="alm", penalty="l2+kl", kl_direction="pred-target", u_start=1,
         alm_max_steps=2, blocks_per_update="all"),
    dict(method="pm", penalty="l2+kl", blocks_per_update="all", state_constraint="box",
         model="gru"),
])
def test_trainers_run_with_the_terms(kw: dict[str, Any], tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "c", n_train=400, n_eval=150, vocab=12)
    out = tmp_path / "run"
    trainer = make_trainer(make_config(**_cfg(data, **kw)), out)
    summary = trainer.fit()
    assert summary["status"] == "finished"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("kl" in r and "l1" in r for r in rows)
    if "kl" in kw.get("penalty", ""):
        assert rows[-1]["kl"] > 0
    if kw.get("state_constraint") == "l1":
        assert rows[-1]["l1"] > 0
    if kw.get("penalty") == "kl":
        assert rows[-1]["penalty"] == 0.0


def test_default_runs_record_no_extra_metrics(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "c", n_train=300, n_eval=150, vocab=12)
    out = tmp_path / "run"
    make_trainer(make_config(**_cfg(data, epochs=1)), out).fit()
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "kl" not in row and "l1" not in row


def test_cli_train_with_kl(tmp_path: Path) -> None:
    data = write_corpus(tmp_path / "c", n_train=300, n_eval=150, vocab=12)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--method", "pm", "--penalty", "l2+kl",
                 "--kl-weight", "0.5", "--state-constraint", "box", "--emsize", "4", "--nhid",
                 "5", "--bptt", "4", "--blocks-per-update", "5", "--h-steps", "1",
                 "--theta-steps", "1", "--epochs", "1", "--train-tokens", "200",
                 "--eval-tokens", "100", "--eval-batch-size", "2", "--threads", "1",
                 "--quiet", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["penalty"], cfg["kl_weight"], cfg["state_constraint"]) == ("l2+kl", 0.5, "box")


# --------------------------------------------------------------------------- sharded
DIST_CASES: list[tuple[str, dict[str, Any]]] = [
    ("pm-kl-box", dict(method="pm", penalty="l2+kl", kl_direction="pred-target",
                       state_constraint="box", blocks_per_update=7, h_steps=2, h_optim="nag",
                       h_lr=0.1, kl_weight=0.7)),
    ("admm-kl-l1-batch", dict(method="admm", blocks_per_update="all", penalty="l2+kl",
                              state_constraint="l1", l1_weight=0.01, u_start=1, h_steps=2,
                              theta_steps=2, h_optim="nag", h_lr=0.05)),
    ("pm-kl-only", dict(method="pm", penalty="kl", blocks_per_update=13, h_steps=2,
                        kl_weight=2.0)),
]


def _dist_worker(data_dir: str, out: str) -> None:
    """One rank: every case of DIST_CASES in turn."""
    import test_distributed as td
    import torch.distributed as dist

    from tprop import distributed
    from tprop.config import TrainConfig

    torch.set_num_threads(1)
    distributed.init_process_group(torch.device("cpu"), 60)
    comm = distributed.DistComm(torch.device("cpu"), 60)
    results = {}
    for name, kw in DIST_CASES:
        cfg = TrainConfig.from_dict(td.cfg_dict(data_dir, **kw)).validate()
        trainer = make_trainer(cfg, None, comm=comm)
        trainer.fit()
        results[name] = td.final_state(trainer)
    torch.save(results, f"{out}.{dist.get_rank()}")
    comm.close()  # a barrier, then the group destroyed
    os._exit(0)  # the results are saved: no gloo teardown at interpreter exit


def test_two_ranks_equal_one_with_the_terms(tmp_path: Path) -> None:
    """Sharded runs with the KL, l1 and box terms give the parameters (and free states, duals)
    of the one-process run: the terms are local to each block."""
    import test_distributed as td

    torch.set_default_dtype(torch.float32)  # as the ranks: float32 init, then --dtype float64
    corpus = write_corpus(tmp_path / "tiny", n_train=800, n_eval=200, vocab=12)
    out = tmp_path / "results.pt"
    code = f"import test_constraints as t; t._dist_worker({str(corpus)!r}, {str(out)!r})"
    runs = td.finish(td.start_ranks(["-c", code], 2, tmp_path), timeout=300)
    assert [rc for rc, _ in runs] == [0, 0], "\n".join(text[-3000:] for _, text in runs)
    got = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for name, kw in DIST_CASES:
        trainer = make_trainer(make_config(**td.cfg_dict(corpus, **kw)))
        trainer.fit()
        ref = td.final_state(trainer)
        td.assert_same(got[0][name], ref, name)
        for k, v in got[0][name]["model"].items():
            assert torch.equal(got[1][name]["model"][k], v), f"{name}: ranks disagree on {k}"
