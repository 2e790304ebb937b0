"""Constrained h-optimisation: the extra terms and state constraints beyond the paper.

The paper's "future work" names two ways to constrain the free states of Block TPROP;
``docs/beyond.md`` is the user's guide to both.

**Output-distribution penalty** (``--penalty kl`` or ``l2+kl``). For every block j of an
update, with g the model's own decoder read on the top layer's ``h`` (``model.output_hidden``)
and p = softmax(g(z_{j+1})) the target's output distribution, q = softmax(g(F_j)) the
predicted state's:

    KL_j = KL(p ‖ q)   (``--kl-direction target-pred``, the default)
    KL_j = KL(q ‖ p)   (``--kl-direction pred-target``)

summed over the vocabulary, summed over blocks and multiplied by ``--kl-weight``. The decoder
reads the states without dropout (so that KL_j = 0 exactly when the two states agree). Both
directions are ≥ 0, zero when p = q, and their gradients (in θ and in the states) vanish
there: at a forward-initialised point every KL_j and its gradient is zero, so identity E0
holds with the term on. ``--penalty kl`` drops the squared distance (λ then weighs nothing);
``l2+kl`` keeps both. With duals (ADMM, ALM) u_j attaches to the squared distance only, so
``kl`` alone is refused for those methods (``TrainConfig.validate``).

**State constraints** (``--state-constraint``):

* ``box``: the free states are kept inside the set the cell can produce, by
  reparametrisation (``BoxStateParam``). tanh RNN and GRU: z = tanh(w) on every coordinate
  (the ``--arctanh`` reparametrisation). LSTM: a step outputs h = o ⊙ tanh(c) with the output
  gate o ∈ (0, 1), while c itself is unbounded (it may grow by up to 1 per step), so the
  producible pairs are exactly {(o ⊙ tanh(c), c)}: c = w_c is left free and h = σ(w_o) ⊙
  tanh(w_c) — h has the sign of tanh(c) and a smaller magnitude, layer by layer. This is
  stricter than ``--arctanh`` (which only keeps h inside (−1, 1)).
* ``l1``: a sparsity penalty ``--l1-weight`` · Σ ‖z_{j+1}‖₁ on the free states (every
  coordinate, the LSTM cell included; the fixed entering state is not penalised).

Every term is local to a block (it reads F_j and z_{j+1}, both held by the rank that owns
block j), so sharded runs (``tprop.distributed``) need no extra exchange.

The free states of an update are optimised through a parametrisation ``z = to_z(w)``:
``StateParam`` (identity, or tanh on the bounded coordinates with ``--arctanh``) and
``BoxStateParam`` (``--state-constraint box``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .config import KL_DIRECTIONS, PENALTIES, STATE_CONSTRAINTS, view_class
from .models import RNNLM


class _TermsView:
    """Which of the extra terms and constraints an update's objective uses (the ``terms``
    view of ``TrainConfig``)."""

    @property
    def l2(self) -> bool:
        """The squared-distance penalty (λ/2)‖F_j − z_{j+1} + u_j‖² is on."""
        return self.penalty in ("l2", "l2+kl")

    @property
    def kl(self) -> bool:
        return self.penalty in ("kl", "l2+kl")

    @property
    def box(self) -> bool:
        return self.state_constraint == "box"

    @property
    def l1(self) -> bool:
        return self.state_constraint == "l1" and self.l1_weight > 0

    @property
    def is_default(self) -> bool:
        """Nothing beyond the paper's objective: the code paths of the paper are used."""
        return self.penalty == "l2" and self.state_constraint == "none"

    @classmethod
    def from_config(cls, cfg: Any) -> StateTerms | None:
        """The terms a ``TrainConfig`` asks for; None when it asks for none (the default)."""
        terms = cls.read(cfg)
        return None if terms.is_default else terms


StateTerms = view_class("terms", "StateTerms", _TermsView.__doc__, frozen=True,
                        **{k: v for k, v in vars(_TermsView).items()
                           if isinstance(v, (property, classmethod))})


# ----------------------------------------------------------------------------- the terms
def output_log_probs(model: RNNLM, states: torch.Tensor) -> torch.Tensor:
    """log softmax(g(h)) for flat states ``(M, D)``: the decoder on the top layer's h, without
    dropout. ``(M, V)``."""
    return F.log_softmax(model.decode(model.output_hidden(states)), dim=-1)


def kl_divergence(model: RNNLM, final: torch.Tensor, targets: torch.Tensor,
                  direction: str = "target-pred") -> torch.Tensor:
    """Σ_j KL between the output distributions of the free (target) states ``targets``
    (z_{j+1}) and of the blocks' final states ``final`` (F_j): KL(p_target ‖ q_pred) for
    ``target-pred``, KL(q_pred ‖ p_target) for ``pred-target``. A scalar."""
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"unknown KL direction {direction!r}; one of {', '.join(KL_DIRECTIONS)}")
    log_q = output_log_probs(model, final)
    log_p = output_log_probs(model, targets)
    if direction == "pred-target":
        log_p, log_q = log_q, log_p
    # Σ p (log p − log q); kl_div(input=log q, target=log p, log_target) computes exactly that
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True)


def l1_norm(states: torch.Tensor) -> torch.Tensor:
    """Σ of absolute values of the free states (the sparsity penalty before its weight)."""
    return states.abs().sum()


def extra_terms(model: RNNLM, final: torch.Tensor, next_states: torch.Tensor,
                terms: StateTerms) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weighted KL term or None, weighted l1 term or None) for a chunk of blocks."""
    kl = (terms.kl_weight * kl_divergence(model, final, next_states, terms.kl_direction)
          if terms.kl else None)
    l1 = terms.l1_weight * l1_norm(next_states) if terms.l1 else None
    return kl, l1


# ----------------------------------------------------------------------------- parametrisations
class StateParam:
    """Free states as optimised: ``z = w``, or with ``arctanh`` ``z = tanh(w)`` on the bounded
    coordinates (all of an RNN/GRU state; the ``h`` half of an LSTM state, its cell ``c``
    being unbounded)."""

    EPS = 1e-6

    def __init__(self, model: RNNLM, arctanh: bool) -> None:
        self.arctanh = arctanh
        self.bounded = model.nlayers * model.nhid if arctanh else 0

    def to_z(self, w: torch.Tensor) -> torch.Tensor:
        if not self.bounded:
            return w
        b = self.bounded
        h = torch.tanh(w[:, :b]).clamp(-1 + self.EPS, 1 - self.EPS)  # tanh rounds to ±1
        return torch.cat([h, w[:, b:]], 1)

    def to_w(self, z: torch.Tensor) -> torch.Tensor:
        if not self.bounded:
            return z.clone()
        b = self.bounded
        h = z[:, :b].clamp(-1 + self.EPS, 1 - self.EPS)
        return torch.cat([torch.atanh(h), z[:, b:]], 1)


class BoxStateParam:
    """Free states kept in the set the cell can produce (see the module doc): the same
    interface as ``tprop.objective.StateParam`` (row-wise ``to_z`` / ``to_w``)."""

    EPS = 1e-6

    def __init__(self, model: RNNLM) -> None:
        self.lstm = model.is_lstm
        self.half = model.nlayers * model.nhid  # h coordinates (the c ones follow, for an LSTM)
        self.bounded = self.half  # coordinates kept inside (-1, 1): every h

    def to_z(self, w: torch.Tensor) -> torch.Tensor:
        b = self.half
        if not self.lstm:
            return torch.tanh(w).clamp(-1 + self.EPS, 1 - self.EPS)
        c = w[:, b:]
        return torch.cat([torch.sigmoid(w[:, :b]) * torch.tanh(c), c], 1)

    def to_w(self, z: torch.Tensor) -> torch.Tensor:
        b = self.half
        if not self.lstm:
            return torch.atanh(z.clamp(-1 + self.EPS, 1 - self.EPS))
        h, c = z[:, :b], z[:, b:]
        t = torch.tanh(c)
        tiny = torch.finfo(z.dtype).tiny ** 0.5
        ok = t.abs() > tiny
        o = torch.where(ok, h / torch.where(ok, t, torch.ones_like(t)), torch.full_like(h, 0.5))
        o = o.clamp(self.EPS, 1 - self.EPS)
        return torch.cat([torch.log(o) - torch.log1p(-o), c.clone()], 1)


def make_state_param(model: RNNLM, arctanh: bool, terms: StateTerms | None) -> Any:
    """The reparametrisation of an update's free states: ``BoxStateParam`` for ``box``
    (which supersedes ``--arctanh``), else ``StateParam`` as before."""
    if terms is not None and terms.box:
        if not model.is_lstm:
            return StateParam(model, True)  # the same object as --arctanh: bitwise the same
        return BoxStateParam(model)
    return StateParam(model, arctanh)


def producible(model: RNNLM, z: torch.Tensor, tol: float = 0.0) -> bool:
    """Whether flat states ``z`` lie in the set the cell can produce (up to ``tol``): |h| < 1
    for an RNN / GRU; for an LSTM also h·tanh(c) ≥ 0 and |h| ≤ |tanh(c)|."""
    b = model.nlayers * model.nhid
    h = z[:, :b]
    if h.abs().max() >= 1 + tol:
        return False
    if not model.is_lstm:
        return True
    t = torch.tanh(z[:, b:])
    return bool((h * t >= -tol).all() and (h.abs() <= t.abs() + tol).all())


__all__ = ["KL_DIRECTIONS", "PENALTIES", "STATE_CONSTRAINTS", "BoxStateParam", "StateParam",
           "StateTerms",
           "extra_terms", "kl_divergence", "l1_norm", "make_state_param", "output_log_probs",
           "producible"]
