"""Solvers of the Block TPROP problem: penalty method, ADMM, augmented Lagrangian.

Each is a small class in the shape of ``torch.optim``: its state lives in ``self.state``
(a dict, with ``state_dict``/``load_state_dict``) and ``step(problem, epoch)`` performs one
update on a ``BlockProblem``. Normalisation (as the reference): the θ-gradient of an update
is divided by its number of blocks M (so the cross-entropy part is the mean token cross
entropy); the gradient on the free states is that of J itself, undivided (so that one
plain h-step of size η with λη = 1 is the step of METHOD.md's identity E1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .objective import BlockProblem, PassResult
from .optim import build_optimizer


@dataclass
class SolverSettings:
    """The knobs the solvers read (a view of ``TrainConfig``)."""

    h_steps: int = 10
    h_lr: float = 1.0
    h_tol: float = 0.0
    h_clip: float = 0.0
    h_optim: str = "adagrad"
    theta_steps: int = 5
    clip: float = 0.5
    lam: float = 1.0
    lambda_mult: float = 1.0
    u_lr: float = 1.0
    u_clip: float = 0.0
    u_start: int = 3
    alm_max_steps: int = 10
    alm_grad_tol: float = 0.0
    forward_init: bool = True
    positional: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> SolverSettings:
        names = cls.__dataclass_fields__
        values = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
        values["forward_init"] = getattr(cfg, "h_init", "forward") == "forward"
        values["positional"] = bool(getattr(cfg, "positional_ppl", False))
        return cls(**values)


@dataclass
class UpdateStats:
    """What one update measured: steps taken, and the objective's terms where θ was first
    evaluated after the h-steps (PM, ADMM) or at the last joint step's evaluation (ALM)."""

    ce: float = 0.0
    penalty: float = 0.0
    residual: float = 0.0
    h_steps: int = 0
    theta_steps: int = 0
    token_ce: torch.Tensor | None = None
    kl: float = 0.0  # the extra terms of tprop.constraints (0 when off)
    l1: float = 0.0


def _clip(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip the gradient norm when ``max_norm`` > 0; return the norm before clipping."""
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


class PenaltyMethod:
    """PM: up to ``h_steps`` steps on Z with θ fixed (stopping when ‖∇_Z J‖ < ``h_tol``), then
    ``theta_steps`` steps on θ with Z fixed. The duals stay zero."""

    uses_duals = False

    def __init__(self, model: torch.nn.Module, theta_optimizer: torch.optim.Optimizer,
                 settings: SolverSettings) -> None:
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
            problem.evaluate(states=True)
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
            res = problem.evaluate(theta=True, token_ce=s.positional and i == 0)
            self._scale_theta_grads(problem)
            _clip(self.params, s.clip)
            self.theta_optimizer.step()
            if i == 0:
                self._record(stats, res)
            stats.theta_steps += 1

    def dual_step(self, problem: BlockProblem) -> None:
        """u_j ← u_j + ρ_u r_j with r_j = F_j(θ, z_j) − z_{j+1} (the dual gradient), the norm of
        r over the update's blocks first clipped to ``u_clip``."""
        s = self.settings
        if problem.dual is None:
            raise ValueError("this problem has no duals")
        if problem.terms is not None and not problem.terms.l2:
            raise ValueError("penalty 'kl' has no squared distance for the duals to attach to "
                             "(use 'l2+kl', or the penalty method)")
        r = problem.final_states() - problem.z
        if s.u_clip > 0:
            n = self._state_norm(r)
            if n > s.u_clip:
                r.mul_(s.u_clip / n)
        problem.dual.add_(r, alpha=s.u_lr)

    def _state_norm(self, t: torch.Tensor | None) -> float:
        """Norm of a free-state-shaped tensor (over all shards in a distributed run)."""
        return 0.0 if t is None else float(t.detach().double().norm())

    def _clip_states(self, problem: BlockProblem, max_norm: float,
                     norm: float | None = None) -> float:
        """Clip the free states' gradient norm when ``max_norm`` > 0 (as ``clip_grad_norm_``);
        return the norm before clipping."""
        g = problem.w.grad
        total = self._state_norm(g) if norm is None else norm
        if max_norm > 0 and g is not None:
            coef = max_norm / (total + 1e-6)
            if coef < 1:
                g.mul_(coef)
        return total

    def _scale_theta_grads(self, problem: BlockProblem) -> None:
        for p in self.params:
            if p.grad is not None:
                p.grad.div_(problem.num_blocks)

    @staticmethod
    def _record(stats: UpdateStats, res: PassResult) -> None:
        stats.ce, stats.penalty, stats.residual = res.ce, res.penalty, res.residual
        stats.token_ce = res.token_ce
        stats.kl, stats.l1 = res.kl, res.l1


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
            self.dual_step(problem)
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
            self._scale_theta_grads(problem)
            self._record(stats, res)  # the last evaluation's terms: where the states moved to
            gt = _clip(self.params, 0.0)
            gz = self._state_norm(problem.w.grad)
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
