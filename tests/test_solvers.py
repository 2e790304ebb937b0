"""The solvers (PM, ADMM, ALM) against docs/method.md: identities E0 and E1, the dual step, the
order of an update's pieces, stopping rules and state.

References are independent of the code under test: the hand-written cell loop and explicit J
of ``test_objective`` (plain autograd, float64).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_objective import make_data, make_model, params_of, ref_block, ref_J, ref_sequential

from tprop.models import RNNLM
from tprop.objective import BlockProblem, forward_states
from tprop.solvers import ADMM, ALM, SOLVERS, PenaltyMethod, SolverSettings, UpdateStats


@pytest.fixture(autouse=True)
def _float64(float64):
    """Every test of this module runs in float64."""


CASES = [(cell, L) for cell in ("rnn", "gru", "lstm") for L in (1, 2)]


def record_theta_grads(solver: PenaltyMethod) -> list[list[torch.Tensor]]:
    """Spy on the θ optimiser: the gradients it steps on (after the solver's scaling and
    clipping), one list per step."""
    rec: list[list[torch.Tensor]] = []
    orig = solver.theta_optimizer.step

    def step(*a, **kw):
        rec.append([p.grad.detach().clone() for p in solver.params])
        return orig(*a, **kw)

    solver.theta_optimizer.step = step
    return rec


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def forward_problem(model: RNNLM, K: int, M: int, lam: float, seed: int = 1,
                    dual: bool = False) -> tuple[BlockProblem, torch.Tensor]:
    x, y, z0, _, U = make_data(K, M, model.state_dim, seed=seed)
    z = forward_states(model, x, z0)
    return BlockProblem(model, x, y, z0, z, lam, U.clone() if dual else None), z


# --------------------------------------------------------------------------- E0
def ref_tbptt_grad(model: RNNLM, x: torch.Tensor, y: torch.Tensor, z0: torch.Tensor):
    """Truncated BPTT over the span with window K: one column from z0, the state detached at
    each block boundary, the mean token cross entropy over the span's M·K tokens."""
    P = params_of(model)
    K, M = x.shape
    state, loss = z0, 0.0
    for j in range(M):
        Lj, state = ref_block(P, model, x[:, j], y[:, j], state.detach())
        loss = loss + Lj
    return torch.autograd.grad(loss / (M * K), list(P.values()))


@pytest.mark.parametrize("cell,nlayers", CASES)
def test_E0_theta_gradient_is_truncated_bptt(cell: str, nlayers: int) -> None:
    model = make_model(cell, nlayers)
    K, M = 3, 4
    prob, _ = forward_problem(model, K, M, lam=2.5)
    expect = flat(ref_tbptt_grad(model, prob.inputs, prob.targets, prob.z_fixed))
    work = copy.deepcopy(model)
    prob.model = work
    before = flat(p.detach().clone() for p in work.parameters())
    solver = PenaltyMethod(work, torch.optim.SGD(work.parameters(), lr=1.0),
                           SolverSettings(h_steps=0, theta_steps=1, clip=0.0, lam=2.5))
    rec = record_theta_grads(solver)
    stats = solver.step(prob, epoch=1)
    assert stats.h_steps == 0 and stats.theta_steps == 1 and len(rec) == 1
    got = flat(rec[0])
    assert rel(got, expect) < 1e-10
    # SGD with lr 1: the step taken is exactly -grad
    after = flat(p.detach() for p in work.parameters())
    assert rel(before - after, expect) < 1e-10
    # the reported terms are those of the forward-initialised point
    assert stats.penalty <= 1e-20 and stats.residual <= 1e-10
    with torch.no_grad():
        _, ce, *_ = ref_J(params_of(model), model, prob.inputs, prob.targets, prob.z_fixed,
                          prob.z, 2.5)
    assert abs(stats.ce - float(ce)) <= 1e-10 * float(ce)


# --------------------------------------------------------------------------- E1
def e1_limit(model: RNNLM, x, y, z0, zf) -> torch.Tensor:
    """E0 + Σ_j (∂F_j/∂θ)ᵀ (g_{j+1} − A_j g_j), unnormalised (the θ-gradient of
    (1/K) Σ_j L_j, not divided by M), at the forward-initialised point zf."""
    P = params_of(model)
    names = list(P)
    K, M = x.shape
    D = model.state_dim
    entering = [z0] + [zf[j - 1:j] for j in range(1, M)]
    # g_j = (1/K) ∂L_j/∂z_j, zero for the fixed z_0 and for z_M
    g = [torch.zeros(1, D)]
    for j in range(1, M):
        e = entering[j].clone().requires_grad_(True)
        Lj, _ = ref_block(P, model, x[:, j], y[:, j], e)
        g.append(torch.autograd.grad(Lj / K, e)[0])
    g.append(torch.zeros(1, D))
    total = 0.0
    for j in range(M):
        e = entering[j]
        _, Aj_gj = torch.autograd.functional.jvp(
            lambda z, j=j: ref_block(P, model, x[:, j], y[:, j], z)[1], e, g[j])
        v = (g[j + 1] - Aj_gj).detach()
        Lj, Fj = ref_block(P, model, x[:, j], y[:, j], e)
        total = total + Lj / K + (Fj * v).sum()
    return flat(torch.autograd.grad(total, [P[n] for n in names]))


def e1_grad(model: RNNLM, K: int, M: int, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PM, forward init, one plain GD h-step of size η with λ = 1/η, then the θ-gradient
    (unnormalised: the solver's divided by M, times M). Returns it and the E1 limit."""
    work = copy.deepcopy(model)
    prob, zf = forward_problem(work, K, M, lam=1.0 / eta, seed=3)
    limit = e1_limit(model, prob.inputs, prob.targets, prob.z_fixed, zf)
    solver = PenaltyMethod(work, torch.optim.SGD(work.parameters(), lr=1.0),
                           SolverSettings(h_steps=1, h_lr=eta, h_optim="sgd", h_clip=0.0,
                                          theta_steps=1, clip=0.0, lam=1.0 / eta))
    rec = record_theta_grads(solver)
    stats = solver.step(prob, epoch=1)
    assert stats.h_steps == 1 and len(rec) == 1
    return flat(rec[0]) * M, limit


@pytest.mark.parametrize("cell,nlayers", [("lstm", 1), ("gru", 1), ("lstm", 2)])
def test_E1_one_h_step_tends_to_bptt_plus_entering_state_term(cell: str, nlayers: int) -> None:
    model = make_model(cell, nlayers)
    K, M = 3, 4
    errs = []
    for eta in (1e-2, 1e-3, 1e-4):
        got, limit = e1_grad(model, K, M, eta)
        errs.append(rel(got, limit))
    print(f"E1 {cell} x{nlayers}: relative errors at eta 1e-2, 1e-3, 1e-4: {errs}")
    for a, b in zip(errs, errs[1:]):
        assert 5 < a / b < 20, errs  # linear in η
    assert errs[-1] < 1e-2
    # the second term matters: the limit is not E0 alone
    x, y, z0, _, _ = make_data(K, M, model.state_dim, seed=3)
    e0 = flat(ref_tbptt_grad(model, x, y, z0)) * M
    zf = ref_sequential(params_of(model), model, x, z0).detach()
    assert rel(e1_limit(model, x, y, z0, zf), e0) > 1e-3


# --------------------------------------------------------------------------- dual step
@pytest.mark.parametrize("u_clip", [0.0, 0.05, 1e6])
def test_dual_step_formula(u_clip: float) -> None:
    model = make_model("lstm", 2)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=5)
    dual = U.clone()
    prob = BlockProblem(model, x, y, z0, Z, 1.0, dual)
    solver = ADMM(model, torch.optim.SGD(model.parameters(), lr=0.1),
                  SolverSettings(u_lr=0.7, u_clip=u_clip))
    solver.dual_step(prob)
    with torch.no_grad():
        _, _, _, F_, _ = ref_J(params_of(model), model, x, y, z0, Z, 1.0)
    r = F_ - Z
    n = float(r.norm())
    assert n > 0.05  # the 0.05 clip is active
    if 0 < u_clip < n:
        r = r * (u_clip / n)
    assert torch.allclose(dual, U + 0.7 * r, rtol=1e-12, atol=1e-13)  # in place
    assert prob.dual is dual


def test_dual_step_leaves_duals_without_autograd_history() -> None:
    model = make_model("lstm", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=5)
    store = U.clone()  # the trainer's persistent duals; the problem gets a view
    prob = BlockProblem(model, x, y, z0, Z, 1.0, store)
    ADMM(model, torch.optim.SGD(model.parameters(), lr=0.1), SolverSettings()).dual_step(prob)
    assert not store.requires_grad and store.grad_fn is None


@pytest.mark.parametrize("method", ["admm", "alm"])
def test_update_after_a_dual_step_runs(method: str) -> None:
    model = make_model("lstm", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=5)
    solver = SOLVERS[method](model, torch.optim.SGD(model.parameters(), lr=0.1),
                             SolverSettings(h_steps=2, theta_steps=2, alm_max_steps=2,
                                            u_start=1, h_init="zero"))
    store = U.clone()  # the trainer's persistent duals; each problem gets a view U[a:b]
    for _ in range(2):  # two updates of the same span, as in batch mode
        solver.step(BlockProblem(model, x, y, z0, Z, 1.0, store[0:4]), epoch=1)
    assert torch.isfinite(store).all() and not store.equal(U)


def test_dual_step_needs_duals() -> None:
    model = make_model("gru", 1)
    prob, _ = forward_problem(model, 3, 2, 1.0)
    with pytest.raises(ValueError):
        PenaltyMethod(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      SolverSettings()).dual_step(prob)


def spy_order(solver: PenaltyMethod, calls: list[str]) -> None:
    for name in ("dual_step", "h_steps", "theta_steps"):
        orig = getattr(solver, name)

        def wrapped(*a, _orig=orig, _name=name, **kw):
            calls.append(_name)
            return _orig(*a, **kw)

        setattr(solver, name, wrapped)


@pytest.mark.parametrize("forward_init,epoch,expect", [
    (True, 3, ["h_steps", "dual_step", "theta_steps"]),
    (False, 3, ["dual_step", "h_steps", "theta_steps"]),
    (False, 4, ["dual_step", "h_steps", "theta_steps"]),
    (True, 2, ["h_steps", "theta_steps"]),
    (False, 1, ["h_steps", "theta_steps"]),
])
def test_admm_order_and_u_start(forward_init: bool, epoch: int, expect: list[str]) -> None:
    model = make_model("lstm", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=6)
    dual = U.clone()
    prob = BlockProblem(model, x, y, z0, Z, 1.0, dual)
    solver = ADMM(model, torch.optim.SGD(model.parameters(), lr=0.1),
                  SolverSettings(h_steps=2, theta_steps=1, u_start=3, h_optim="sgd", h_lr=0.1,
                                 h_init="forward" if forward_init else "zero"))
    calls: list[str] = []
    spy_order(solver, calls)
    stats = solver.step(prob, epoch)
    assert calls == expect
    assert stats.h_steps == 2
    assert torch.equal(dual, U) == ("dual_step" not in expect)


def test_admm_dual_after_forward_init_h_steps_uses_moved_states() -> None:
    """With forward init the dual step comes after the h-steps: the increment is the
    residual at the moved states (non-zero), not the zero residual of the initialisation."""
    model = make_model("gru", 1)
    prob, zf = forward_problem(model, 3, 4, lam=1.0, dual=True)
    u0 = prob.dual.clone()
    solver = ADMM(model, torch.optim.SGD(model.parameters(), lr=0.1),
                  SolverSettings(h_steps=1, h_optim="sgd", h_lr=0.5, theta_steps=1, u_start=1,
                                 u_lr=1.0, h_init="forward", clip=0.0))
    seen = {}
    orig = solver.theta_steps

    def theta_steps(problem, stats):  # before the θ-step: θ still as in the dual step
        seen["dual"] = problem.dual.detach().clone()
        seen["z"] = problem.z.detach().clone()
        with torch.no_grad():
            seen["F"] = ref_J(params_of(model), model, problem.inputs, problem.targets,
                              problem.z_fixed, seen["z"], 1.0)[3]
        return orig(problem, stats)

    solver.theta_steps = theta_steps
    solver.step(prob, epoch=1)
    assert not torch.allclose(seen["z"], zf)
    assert torch.allclose(seen["dual"], u0 + (seen["F"] - seen["z"]), rtol=1e-12, atol=1e-13)
    assert float((seen["dual"] - u0).norm()) > 1e-4


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_admm_forward_init_update_reusing_the_dual_pass(dropout: float) -> None:
    """ADMM with forward initialisation: its θ-steps reuse the dual step's pass; the update is
    the one of a dual step and θ-steps that each run the recurrence themselves (with dropout,
    the first θ-step sees the dual pass's masks)."""
    torch.manual_seed(0)
    model = RNNLM(11, 4, 5, 2, "lstm", dropout=dropout, init_range=0.4).double().train()
    settings = SolverSettings(h_steps=1, h_optim="sgd", h_lr=0.5, theta_steps=3, u_start=1,
                              u_lr=0.7, h_init="forward", clip=0.0)
    out = []
    for reuse in (True, False):
        work = copy.deepcopy(model)
        prob, _ = forward_problem(work, 3, 4, lam=1.2, dual=True)
        solver = ADMM(work, torch.optim.SGD(work.parameters(), lr=0.3), settings)
        if not reuse:  # the same pieces, each running its own pass
            solver.dual_step = lambda problem, before_theta=False, _f=solver.dual_step: _f(
                problem)
        torch.manual_seed(1)
        solver.step(prob, epoch=1)
        out.append((flat(work.parameters()).detach(), prob.dual.clone(), prob.z))
    (pa, ua, za), (pb, ub, zb) = out
    assert torch.equal(za, zb)
    if dropout == 0:
        assert rel(pa, pb) < 1e-12 and rel(ua, ub) < 1e-12
    else:  # other masks in the reference's extra pass: the updates differ, both finite
        assert torch.isfinite(pa).all() and not torch.equal(pa, pb)


def test_alm_dual_step_from_u_start_after_joint_steps() -> None:
    model = make_model("lstm", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=7)
    for epoch, u_start, dual_expected in ((1, 2, False), (2, 2, True)):
        work = copy.deepcopy(model)
        dual = U.clone()
        prob = BlockProblem(work, x, y, z0, Z, 1.0, dual)
        solver = ALM(work, torch.optim.SGD(work.parameters(), lr=0.1),
                     SolverSettings(alm_max_steps=2, h_optim="sgd", h_lr=0.1, u_start=u_start,
                                    u_lr=0.5))
        calls: list[str] = []
        spy_order(solver, calls)
        stats = solver.step(prob, epoch)
        assert stats.h_steps == stats.theta_steps == 2
        assert calls == (["dual_step"] if dual_expected else [])
        if dual_expected:
            with torch.no_grad():
                _, _, _, F_, _ = ref_J(params_of(work), work, x, y, z0, prob.z, 1.0)
            assert torch.allclose(dual, U + 0.5 * (F_ - prob.z), rtol=1e-12, atol=1e-13)
        else:
            assert torch.equal(dual, U)


# --------------------------------------------------------------------------- h-steps
@pytest.mark.parametrize("cell,nlayers", [("rnn", 1), ("gru", 2), ("lstm", 1)])
def test_small_h_steps_decrease_J_monotonically(cell: str, nlayers: int) -> None:
    model = make_model(cell, nlayers)
    x, y, z0, Z, U = make_data(3, 5, model.state_dim, seed=8)
    lam = 1.5
    prob = BlockProblem(model, x, y, z0, Z, lam, U.clone())
    solver = PenaltyMethod(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           SolverSettings(h_steps=1, h_optim="sgd", h_lr=0.05, lam=lam))
    P = params_of(model)
    theta = flat(p.detach().clone() for p in model.parameters())
    with torch.no_grad():
        Js = [float(ref_J(P, model, x, y, z0, prob.z, lam, U)[0])]
    for _ in range(8):
        assert solver.h_steps(prob) == 1
        with torch.no_grad():
            Js.append(float(ref_J(P, model, x, y, z0, prob.z, lam, U)[0]))
    assert all(b < a for a, b in zip(Js, Js[1:])), Js
    assert Js[-1] < Js[0] - 1e-3
    assert torch.equal(flat(p.detach() for p in model.parameters()), theta)  # θ fixed
    assert prob.w.grad is None and all(p.grad is None for p in model.parameters())


def test_h_step_is_plain_gradient_descent_on_J() -> None:
    model = make_model("lstm", 2)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=9)
    lam, eta = 0.8, 0.03
    prob = BlockProblem(model, x, y, z0, Z, lam, U.clone())
    Zl = Z.clone().requires_grad_(True)
    gZ = torch.autograd.grad(ref_J(params_of(model), model, x, y, z0, Zl, lam, U)[0], Zl)[0]
    solver = PenaltyMethod(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           SolverSettings(h_steps=1, h_optim="sgd", h_lr=eta, lam=lam))
    solver.h_steps(prob)
    assert torch.allclose(prob.z, Z - eta * gZ, rtol=1e-12, atol=1e-13)


def test_h_clip_bounds_the_h_step() -> None:
    model = make_model("gru", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=10)
    prob = BlockProblem(model, x, y, z0, Z, 3.0, U.clone())
    solver = PenaltyMethod(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           SolverSettings(h_steps=1, h_optim="sgd", h_lr=1.0, h_clip=0.01,
                                          lam=3.0))
    solver.h_steps(prob)
    step = float((prob.z - Z).norm())
    assert abs(step - 0.01) < 1e-6 * 0.01 + 1e-14


def test_z_optimiser_state_is_reset_every_update() -> None:
    """Adagrad's first step moves every coordinate by exactly h_lr (|g|/sqrt(g²)): so two
    successive single-step updates each move by h_lr only if the optimiser starts afresh."""
    model = make_model("lstm", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=11)
    prob = BlockProblem(model, x, y, z0, Z, 1.0, U.clone())
    solver = PenaltyMethod(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           SolverSettings(h_steps=1, h_optim="adagrad", h_lr=0.01))
    for _ in range(2):
        before = prob.z.clone()
        solver.h_steps(prob)
        step = (prob.z - before).abs()
        assert torch.allclose(step, torch.full_like(step, 0.01), rtol=1e-6)


def test_h_tol_stops_early() -> None:
    model = make_model("gru", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=12)
    prob = BlockProblem(model, x, y, z0, Z, 1.0, U.clone())
    solver = PenaltyMethod(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           SolverSettings(h_steps=5, h_tol=1e9, h_optim="sgd", h_lr=0.1))
    assert solver.h_steps(prob) == 0
    assert torch.equal(prob.z, Z) and prob.w.grad is None
    # a tolerance between the gradient norms of the first and a later step stops in between
    Zl = Z.clone().requires_grad_(True)
    g0 = torch.autograd.grad(ref_J(params_of(model), model, x, y, z0, Zl, 1.0, U)[0], Zl)[0]
    solver.settings.h_tol = 0.0
    norms = []
    orig = prob.evaluate

    def evaluate(**kw):
        out = orig(**kw)
        norms.append(float(prob.w.grad.norm()))
        return out

    prob.evaluate = evaluate
    assert solver.h_steps(prob) == 5
    assert abs(norms[0] - float(g0.norm())) < 1e-10 * norms[0]
    k = next(i for i in range(1, 5) if norms[i] < min(norms[:i]))
    solver.settings.h_tol = 0.5 * (norms[k] + min(norms[:k]))
    prob2 = BlockProblem(model, x, y, z0, Z, 1.0, U.clone())
    assert solver.h_steps(prob2) == k


def test_zero_h_steps_leave_states_alone() -> None:
    model = make_model("rnn", 1)
    x, y, z0, Z, _ = make_data(3, 4, model.state_dim, seed=13)
    prob = BlockProblem(model, x, y, z0, Z, 1.0)
    solver = PenaltyMethod(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           SolverSettings(h_steps=0))
    assert solver.h_steps(prob) == 0 and torch.equal(prob.z, Z)


# --------------------------------------------------------------------------- θ-steps
def test_theta_steps_normalise_by_blocks_and_clip() -> None:
    model = make_model("lstm", 1)
    K, M, lam = 3, 4, 0.9
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=14)
    P = params_of(model)
    gP = flat(torch.autograd.grad(ref_J(P, model, x, y, z0, Z, lam, U)[0], list(P.values())))
    for clip in (0.0, 0.1):
        work = copy.deepcopy(model)
        prob = BlockProblem(work, x, y, z0, Z, lam, U.clone())
        solver = PenaltyMethod(work, torch.optim.SGD(work.parameters(), lr=0.5),
                               SolverSettings(theta_steps=3, clip=clip, lam=lam))
        rec = record_theta_grads(solver)
        stats = UpdateStats()
        solver.theta_steps(prob, stats)
        assert stats.theta_steps == 3 and len(rec) == 3
        expect = gP / M
        if clip and float(expect.norm()) > clip:
            # torch's clip_grad_norm_ scales by clip / (norm + 1e-6)
            expect = expect * (clip / (float(expect.norm()) + 1e-6))
        assert rel(flat(rec[0]), expect) < 1e-10
        assert not torch.allclose(flat(rec[1]), flat(rec[0]))  # re-evaluated after each step
    assert float((gP / M).norm()) > 0.1  # the clip was active


def test_theta_steps_record_the_terms_of_their_first_evaluation() -> None:
    """Only the first θ-step's evaluation is measured: the terms at θ before any step."""
    model = make_model("gru", 2)
    K, M, lam = 3, 4, 0.7
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=15)
    with torch.no_grad():
        _, ce, pen, _, resid = ref_J(params_of(model), model, x, y, z0, Z, lam, U)
    prob = BlockProblem(model, x, y, z0, Z, lam, U.clone())
    solver = PenaltyMethod(model, torch.optim.SGD(model.parameters(), lr=0.5),
                           SolverSettings(theta_steps=3, lam=lam))
    stats = UpdateStats()
    solver.theta_steps(prob, stats)
    assert stats.theta_steps == 3
    assert stats.ce == pytest.approx(float(ce), rel=1e-10)
    assert stats.penalty == pytest.approx(float(pen), rel=1e-10)
    assert stats.residual == pytest.approx(float(resid), rel=1e-10) and float(resid) > 1e-3
    after = prob.evaluate()  # the steps moved θ: the terms now differ
    assert abs(after.penalty - float(pen)) > 1e-6 * float(pen)


@pytest.mark.parametrize("method", ["pm", "admm"])
def test_large_lambda_drives_residuals_towards_zero(method: str) -> None:
    """From zero initialisation, a few PM updates (h-steps then θ-steps) leave residuals
    far smaller with λ = 1e3 than with λ = 1."""
    model = make_model("gru", 1)
    K, M = 3, 5
    x, y, z0, _, _ = make_data(K, M, model.state_dim, seed=15)
    means = {}
    for lam in (1.0, 1e3):
        work = copy.deepcopy(model)
        prob = BlockProblem(work, x, y, z0, torch.zeros(M, model.state_dim), lam,
                            torch.zeros(M, model.state_dim) if method == "admm" else None)
        solver = SOLVERS[method](work, torch.optim.SGD(work.parameters(), lr=0.5 / lam),
                                 SolverSettings(h_steps=10, h_optim="sgd", h_lr=0.3 / lam,
                                                theta_steps=2, clip=0.0, lam=lam, u_start=99,
                                                h_init="zero"))
        for _ in range(3):
            solver.step(prob, epoch=1)
        with torch.no_grad():
            *_, resid = ref_J(params_of(work), work, x, y, z0, prob.z, lam)
        means[lam] = float(resid) / M
    assert means[1e3] < 0.02 * means[1.0], means


# --------------------------------------------------------------------------- ALM
def test_alm_joint_step_uses_one_gradient_evaluation() -> None:
    model = make_model("lstm", 1)
    K, M, lam = 3, 4, 1.3
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=16)
    P = params_of(model)
    Zl = Z.clone().requires_grad_(True)
    grads = torch.autograd.grad(ref_J(P, model, x, y, z0, Zl, lam, U)[0], list(P.values()) + [Zl])
    gP, gZ = flat(grads[:-1]), grads[-1]
    work = copy.deepcopy(model)
    prob = BlockProblem(work, x, y, z0, Z, lam, U.clone())
    solver = ALM(work, torch.optim.SGD(work.parameters(), lr=0.2),
                 SolverSettings(alm_max_steps=1, h_optim="sgd", h_lr=0.05, clip=0.0,
                                h_clip=0.0, lam=lam, u_start=5))
    stats = solver.step(prob, epoch=1)
    assert stats.theta_steps == stats.h_steps == 1
    theta0 = flat(p.detach() for p in model.parameters())
    assert rel(theta0 - flat(p.detach() for p in work.parameters()), 0.2 * gP / M) < 1e-10
    assert torch.allclose(prob.z, Z - 0.05 * gZ, rtol=1e-12, atol=1e-13)
    with torch.no_grad():
        J0 = float(ref_J(P, model, x, y, z0, Z, lam, U)[0])
    assert abs(stats.ce + stats.penalty - J0) <= 1e-10 * J0


def test_alm_reports_the_terms_of_its_last_joint_evaluation() -> None:
    """Two joint steps: the reported cross entropy and penalty are J's parts at the point the
    first step moved θ and Z to (not the starting point, whose residuals forward
    initialisation makes zero)."""
    model = make_model("lstm", 1)
    K, M, lam, lr, h_lr = 3, 4, 1.3, 0.2, 0.05
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=17)
    P = params_of(model)
    Zl = Z.clone().requires_grad_(True)
    grads = torch.autograd.grad(ref_J(P, model, x, y, z0, Zl, lam, U)[0], list(P.values()) + [Zl])
    P1 = {n: (p - lr * g / M).detach() for (n, p), g in zip(P.items(), grads[:-1], strict=True)}
    Z1 = (Z - h_lr * grads[-1]).detach()
    with torch.no_grad():
        _, ce1, pen1, _, resid1 = ref_J(P1, model, x, y, z0, Z1, lam, U)
    work = copy.deepcopy(model)
    prob = BlockProblem(work, x, y, z0, Z, lam, U.clone())
    solver = ALM(work, torch.optim.SGD(work.parameters(), lr=lr),
                 SolverSettings(alm_max_steps=2, h_optim="sgd", h_lr=h_lr, clip=0.0,
                                h_clip=0.0, lam=lam, u_start=5))
    stats = solver.step(prob, epoch=1)
    assert stats.theta_steps == stats.h_steps == 2
    assert stats.ce == pytest.approx(float(ce1), rel=1e-10)
    assert stats.penalty == pytest.approx(float(pen1), rel=1e-10)
    assert stats.residual == pytest.approx(float(resid1), rel=1e-10) and float(resid1) > 1e-3


def test_alm_stops_below_grad_tol() -> None:
    model = make_model("gru", 1)
    K, M, lam = 3, 4, 1.0
    x, y, z0, Z, U = make_data(K, M, model.state_dim, seed=17)
    settings = SolverSettings(alm_max_steps=6, h_optim="sgd", h_lr=0.1, clip=0.0, lam=lam,
                              u_start=99)

    def run(tol: float) -> tuple[UpdateStats, list[float], RNNLM]:
        work = copy.deepcopy(model)
        prob = BlockProblem(work, x, y, z0, Z, lam, U.clone())
        solver = ALM(work, torch.optim.SGD(work.parameters(), lr=0.1),
                     SolverSettings(**{**settings.__dict__, "alm_grad_tol": tol}))
        norms: list[float] = []
        orig = prob.evaluate

        def evaluate(**kw):
            out = orig(**kw)
            gt = sum(float(p.grad.pow(2).sum()) for p in work.parameters()) / M ** 2
            norms.append(math.sqrt(gt + float(prob.w.grad.pow(2).sum())))
            return out

        prob.evaluate = evaluate
        return solver.step(prob, epoch=1), norms, work

    stats, norms, _ = run(0.0)
    assert stats.theta_steps == stats.h_steps == 6 and len(norms) == 6
    stats, _, work = run(1e9)
    assert stats.theta_steps == stats.h_steps == 0
    assert torch.equal(flat(p.detach() for p in work.parameters()),
                       flat(p.detach() for p in model.parameters()))
    k = next(i for i in range(1, 6) if norms[i] < min(norms[:i]))
    stats, norms2, _ = run(0.5 * (norms[k] + min(norms[:k])))
    assert stats.theta_steps == stats.h_steps == k and len(norms2) == k + 1


# --------------------------------------------------------------------------- λ and state
def test_end_epoch_multiplies_lambda() -> None:
    model = make_model("rnn", 1)
    solver = PenaltyMethod(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           SolverSettings(lam=0.5, lambda_mult=3.0))
    assert solver.lam == 0.5
    solver.end_epoch()
    assert solver.lam == 1.5
    solver.end_epoch()
    assert solver.lam == pytest.approx(4.5, rel=1e-15)


@pytest.mark.parametrize("method", ["pm", "admm", "alm"])
def test_state_dict_round_trip(method: str) -> None:
    model = make_model("lstm", 1)
    x, y, z0, Z, U = make_data(3, 4, model.state_dim, seed=18)
    settings = SolverSettings(h_steps=2, theta_steps=2, alm_max_steps=2, lam=0.7,
                              lambda_mult=2.0, u_start=1, h_init="zero")

    def solver_for(m: RNNLM) -> PenaltyMethod:
        return SOLVERS[method](m, torch.optim.Adagrad(m.parameters(), lr=0.05), settings)

    a = solver_for(model)
    a.step(BlockProblem(model, x, y, z0, Z, a.lam, U.clone()), epoch=1)
    a.end_epoch()
    sd = copy.deepcopy(a.state_dict())  # as through a checkpoint (no shared tensors)
    b_model = copy.deepcopy(model)
    b = solver_for(b_model)
    b.load_state_dict(sd)
    assert b.lam == a.lam == 1.4 and b.state["updates"] == 1
    a.step(BlockProblem(model, x, y, z0, Z, a.lam, U.clone()), epoch=2)
    b.step(BlockProblem(b_model, x, y, z0, Z, b.lam, U.clone()), epoch=2)
    assert torch.equal(flat(p.detach() for p in model.parameters()),
                       flat(p.detach() for p in b_model.parameters()))
    # without the optimiser state (Adagrad's sums) the trajectories differ: the check can fail
    c_model = copy.deepcopy(b_model)
    c = solver_for(c_model)
    c.step(BlockProblem(c_model, x, y, z0, Z, a.lam, U.clone()), epoch=3)
    a.step(BlockProblem(model, x, y, z0, Z, a.lam, U.clone()), epoch=3)
    assert not torch.equal(flat(p.detach() for p in model.parameters()),
                           flat(p.detach() for p in c_model.parameters()))
    # the state dict's solver state is a copy
    a.state_dict()["state"]["lam"] = 123.0
    assert a.lam != 123.0


def test_settings_from_config() -> None:
    from tprop.config import TrainConfig

    cfg = TrainConfig(h_init="forward-parallel", positional_ppl=True, lam=3.0, h_steps=4)
    s = SolverSettings.from_config(cfg)
    assert not s.forward_init and s.positional and s.lam == 3.0 and s.h_steps == 4
    assert SolverSettings.from_config(TrainConfig(h_init="forward")).forward_init
