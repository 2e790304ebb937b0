"""Solvers of the Block TPROP problem: penalty method, ADMM, augmented Lagrangian.

Each is a small class in the shape of ``torch.optim``: its state lives in ``self.state``
(a dict, with ``state_dict``/``load_state_dict``) and ``step(problem, epoch)`` performs one
update on a ``BlockProblem``. Normalisation (as the reference): the θ-gradient of an update
is divided by its number of blocks M (so the cross-entropy part is the mean token cross
entropy); the gradient on the free states is that of J itself, undivided (so that one
plain h-step of size η with λη = 1 is the step of identity E1, docs/method.md).

The problem's communication strategy (``problem.comm``) makes the same code serve a shard of
an update on one rank of several: θ-gradients are summed over the ranks before the division
by the update's global M, and the norms that decide clipping and early stopping are global.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import view_class
from .objective import BlockProblem, Terms
from .optim import build_optimizer


class _SolverView:
    @property
    def forward_init(self) -> bool:
        """The free states start each update at the forward pass (``h_init = forward``)."""
        return self.h_init == "forward"

    @property
    def positional(self) -> bool:
        return bool(self.positional_ppl)


SolverSettings = view_class(
    "solver", "SolverSettings", "The knobs the solvers read (the ``solver`` view of "
    "``TrainConfig``, with its defaults).",
    forward_init=_SolverView.forward_init, positional=_SolverView.positional)


@dataclass
class UpdateStats(Terms):
    """What one update measured: the objective's terms where θ was first evaluated after the
    h-steps (PM, ADMM) or at the last joint step's evaluation (ALM), and the steps taken."""

    h_steps: int = 0
    theta_steps: int = 0

    def record(self, terms: Terms) -> None:
        for k in (*Terms.SCALARS, "token_ce"):
            setattr(self, k, getattr(terms, k))


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradient norm when ``max_norm`` > 0; return the norm before clipping (the
    reduced gradients are the same on every rank, so this norm is global)."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


class PenaltyMethod:
    """PM: up to ``h_steps`` steps on Z with θ fixed (stopping when ‖∇_Z J‖ < ``h_tol``), then
    ``theta_steps`` steps on θ with Z fixed. The duals stay zero."""

    uses_duals = False

    def __init__(self, model: torch.nn.Module, theta_optimizer: torch.optim.Optimizer,
                 settings: Any) -> None:
        self.model = model
        self.theta_optimizer = theta_optimizer
        self.settings = settings
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state: dict[str, Any] = {"lam": settings.lam, "updates": 0}

    # ------------------------------------------------------------ torch.optim-like API
    def state_dict(self) -> dict[str, Any]:
        return {"state": dict(self.state), "theta_optimizer": self.theta_optimizer.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.state.update(sd["state"])
        self.theta_optimizer.load_state_dict(sd["theta_optimizer"])

    @property
    def lam(self) -> float:
        return self.state["lam"]

    def end_epoch(self) -> None:
        """λ ← λ · lambda_mult."""
        self.state["lam"] = self.state["lam"] * self.settings.lambda_mult

    def step(self, problem: BlockProblem, epoch: int) -> UpdateStats:
        stats = UpdateStats()
        stats.h_steps = self.h_steps(problem)
        self.theta_steps(problem, stats)
        self.state["updates"] += 1
        return stats

    # ------------------------------------------------------------ the pieces
    def h_steps(self, problem: BlockProblem) -> int:
        """Steps on the free states with θ fixed; the Z optimiser starts afresh. Returns the
        number of steps taken."""
        s = self.settings
        if s.h_steps <= 0:
            return 0
        opt = build_optimizer([problem.w], s.h_optim, s.h_lr)
        taken = 0
        for _ in range(s.h_steps):
            problem.w.grad = None
            problem.evaluate(states=True, measure=False)
            norm = self._clip_states(problem, s.h_clip)
            if norm < s.h_tol:
                break
            opt.step()
            taken += 1
        problem.w.grad = None
        return taken

    def theta_steps(self, problem: BlockProblem, stats: UpdateStats) -> None:
        """Steps on θ with Z fixed; the first evaluation's terms go to ``stats``."""
        s = self.settings
        for i in range(s.theta_steps):
            self.theta_optimizer.zero_grad(set_to_none=True)
            res = problem.evaluate(theta=True, token_ce=s.positional and i == 0,
                                   measure=i == 0)
            self._reduce_theta_grads(problem)
            if s.clip > 0:  # (the norm itself is not needed here)
                torch.nn.utils.clip_grad_norm_(self.params, s.clip)
            self.theta_optimizer.step()
            if i == 0:
                stats.record(res)
            stats.theta_steps += 1

    def dual_step(self, problem: BlockProblem, before_theta: bool = False) -> None:
        """u_j ← u_j + ρ_u r_j with r_j = F_j(θ, z_j) − z_{j+1} (the dual gradient), the norm of
        r over the update's blocks first clipped to ``u_clip``. ``before_theta``: the θ-steps
        follow at once (θ and Z as here), and their first evaluation reuses this pass."""
        s = self.settings
        if problem.dual is None:
            raise ValueError("this problem has no duals")
        if problem.terms is not None and not problem.terms.l2:
            raise ValueError("penalty 'kl' has no squared distance for the duals to attach to "
                             "(use 'l2+kl', or the penalty method)")
        r = problem.residuals(keep=before_theta)
        if s.u_clip > 0:
            n = problem.comm.norm(r)
            if n > s.u_clip:
                r.mul_(s.u_clip / n)
        problem.dual.add_(r, alpha=s.u_lr)

    def _clip_states(self, problem: BlockProblem, max_norm: float,
                     norm: float | None = None) -> float:
        """Clip the free states' gradient norm when ``max_norm`` > 0 (as ``clip_grad_norm_``);
        return the norm before clipping."""
        g = problem.w.grad
        total = problem.comm.norm(g) if norm is None else norm
        if max_norm > 0 and g is not None:
            coef = max_norm / (total + 1e-6)
            if coef < 1:
                g.mul_(coef)
        return total

    def _reduce_theta_grads(self, problem: BlockProblem) -> None:
        problem.comm.reduce_grads_(self.params, problem.total_blocks)


class ADMM(PenaltyMethod):
    """PM plus one dual step per update from epoch ``u_start`` on. As the reference: the dual
    step comes before the h-steps, except with forward initialisation (zero residuals, so a
    dual step would be void), where it comes after them."""

    uses_duals = True

    def step(self, problem: BlockProblem, epoch: int) -> UpdateStats:
        s = self.settings
        dual_on = epoch >= s.u_start
        stats = UpdateStats()
        if dual_on and not s.forward_init:
            self.dual_step(problem)
        stats.h_steps = self.h_steps(problem)
        if dual_on and s.forward_init:
            self.dual_step(problem, before_theta=True)
        self.theta_steps(problem, stats)
        self.state["updates"] += 1
        return stats


class ALM(PenaltyMethod):
    """Augmented Lagrangian: up to ``alm_max_steps`` joint steps moving θ and Z on the same
    gradient evaluation (stopping when the joint gradient norm is below ``alm_grad_tol``),
    then a dual step (from epoch ``u_start`` on)."""

    uses_duals = True

    def step(self, problem: BlockProblem, epoch: int) -> UpdateStats:
        s = self.settings
        stats = UpdateStats()
        z_opt = build_optimizer([problem.w], s.h_optim, s.h_lr)
        for _ in range(s.alm_max_steps):
            self.theta_optimizer.zero_grad(set_to_none=True)
            problem.w.grad = None
            res = problem.evaluate(theta=True, states=True, token_ce=s.positional)
            self._reduce_theta_grads(problem)
            stats.record(res)  # the last evaluation's terms: where the states moved to
            gt = _clip(self.params, 0.0)
            gz = problem.comm.norm(problem.w.grad)
            if (gt * gt + gz * gz) ** 0.5 < s.alm_grad_tol:
                break
            _clip(self.params, s.clip)
            self._clip_states(problem, s.h_clip, norm=gz)
            self.theta_optimizer.step()
            z_opt.step()
            stats.theta_steps += 1
            stats.h_steps += 1
        problem.w.grad = None
        if epoch >= s.u_start:
            self.dual_step(problem)
        self.state["updates"] += 1
        return stats


SOLVERS: dict[str, type[PenaltyMethod]] = {"pm": PenaltyMethod, "admm": ADMM, "alm": ALM}
