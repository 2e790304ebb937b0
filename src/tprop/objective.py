"""The Block TPROP objective (scaled augmented Lagrangian) and one update's problem.

For the blocks ``j = 0 … M-1`` of an update, with entering states ``e_j`` (``e_0`` fixed:
``z_0 = 0`` or the state carried from the previous update; ``e_j = z_j`` free for j ≥ 1),
free states ``z_1 … z_M`` (``z_M``, after the last block, is read by no loss) and duals ``u_j``:

    J(θ, Z, U) = (1/K) Σ_j L_j(θ, e_j) + (λ/2) Σ_j ‖F_j(θ, e_j) − z_{j+1} + u_j‖²

``L_j`` is the summed token cross entropy of block j run from ``e_j`` and ``F_j`` its final
state. All blocks are run by one call of the recurrent layer (the block index is the batch
dimension), in chunks of blocks only to bound memory; the terms are sums over blocks, so
chunking changes nothing but memory. ``tprop.constraints`` (``terms=``) adds a KL penalty
between output distributions and state constraints (docs/beyond.md); without it J is the
paper's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .constraints import StateTerms, extra_terms, make_state_param
from .models import RNNLM


@dataclass
class BlockTerms:
    """The terms of J over some blocks (differentiable where inputs require grad)."""

    ce: torch.Tensor  # Σ_j L_j / K
    penalty: torch.Tensor  # (λ/2) Σ_j ‖F_j − z_{j+1} + u_j‖²
    final: torch.Tensor  # F_j, (M, D)
    token_ce: torch.Tensor | None = None  # (K, M') per-token cross entropy, detached
    kl: torch.Tensor | None = None  # kl_weight · Σ_j KL (tprop.constraints), when on
    l1: torch.Tensor | None = None  # l1_weight · Σ_j ‖z_{j+1}‖₁, when on

    @property
    def total(self) -> torch.Tensor:
        out = self.ce + self.penalty
        for extra in (self.kl, self.l1):
            if extra is not None:
                out = out + extra
        return out


def block_terms(
    model: RNNLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    entering: torch.Tensor,
    next_states: torch.Tensor,
    lam: float,
    dual: torch.Tensor | None = None,
    *,
    skip_loss: int = 0,
    keep_token_ce: bool = False,
    terms: StateTerms | None = None,
) -> BlockTerms:
    """J's terms for blocks given time-major ``(K, M)`` inputs/targets, entering states
    ``(M, D)``, the free states they should reach ``(M, D)`` and duals.

    ``skip_loss`` leaves the first blocks' cross entropy out (their decoder is not run): an
    h-step does this for a block whose entering state is fixed, its loss being constant.
    ``terms`` (``tprop.constraints``) adds the KL and l1 terms and may drop the squared
    distance (``penalty="kl"``: then ``penalty`` is 0 and the duals are not read).
    """
    k = inputs.shape[0]
    out, state = model.recur(inputs, model.unflatten_state(entering))
    final = model.flatten_state(state)
    hidden = out[:, skip_loss:].reshape(-1, out.shape[-1])  # 2-D: one matmul, not a bmm
    logits = model.decode(hidden)
    tok = F.cross_entropy(logits, targets[:, skip_loss:].reshape(-1), reduction="none")
    ce = tok.sum() / k
    token = tok.detach().view(k, -1) if keep_token_ce else None
    if terms is not None and not terms.l2:
        penalty = final.new_zeros(())
    else:
        r = final - next_states
        if dual is not None:
            r = r + dual
        penalty = 0.5 * lam * r.pow(2).sum()
    if terms is None:
        return BlockTerms(ce, penalty, final, token)
    kl, l1 = extra_terms(model, final, next_states, terms)
    return BlockTerms(ce, penalty, final, token, kl, l1)


def objective(
    model: RNNLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    z_fixed: torch.Tensor,
    z: torch.Tensor,
    lam: float,
    dual: torch.Tensor | None = None,
    terms: StateTerms | None = None,
) -> torch.Tensor:
    """J(θ, Z, U) for one update in one call: ``z_fixed`` (1, D) enters block 0, ``z`` (M, D)
    holds z_1 … z_M."""
    entering = torch.cat([z_fixed, z[:-1]], 0)
    return block_terms(model, inputs, targets, entering, z, lam, dual, terms=terms).total


# --------------------------------------------------------------------------- reparametrisation
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


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside (so no parameter gradient is computed)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


@dataclass
class PassResult:
    """What one evaluation of J over an update's blocks measured (floats, detached)."""

    ce: float  # Σ_j L_j / K over the blocks whose loss was computed
    penalty: float
    residual: float  # Σ_j ‖F_j − z_{j+1}‖ (without the duals)
    token_ce: torch.Tensor | None = None  # (K,) cross entropy summed over blocks, per position
    kl: float = 0.0  # the weighted KL term (tprop.constraints), 0 when off
    l1: float = 0.0  # the weighted l1 term, 0 when off


class BlockProblem:
    """One update's blocks: data, the fixed entering state, free states, duals and λ.

    The free states live in ``w`` (a leaf tensor; ``z = param.to_z(w)``); ``dual`` may be a
    view into the trainer's persistent duals, updated in place.
    """

    def __init__(
        self,
        model: RNNLM,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        z_fixed: torch.Tensor,
        z_init: torch.Tensor,
        lam: float,
        dual: torch.Tensor | None = None,
        *,
        arctanh: bool = False,
        chunk_blocks: int | None = None,
        terms: StateTerms | None = None,
    ) -> None:
        self.model = model
        self.inputs, self.targets = inputs, targets
        self.block_size, self.num_blocks = inputs.shape
        self.z_fixed = z_fixed.detach()
        self.terms = terms  # extra terms and state constraints (tprop.constraints), or None
        self.param = (StateParam(model, arctanh) if terms is None
                      else make_state_param(model, arctanh, terms))
        self.w = self.param.to_w(z_init.detach()).requires_grad_(True)
        self.dual = dual
        self.lam = lam
        self.chunk = chunk_blocks or default_chunk(self.block_size, model.ntoken)
        self.last_final: torch.Tensor | None = None  # F of the last block, last pass
        # False when z_fixed is another process's free state (tprop.distributed): the first
        # block's loss then depends on the free states and is not skipped by h-steps
        self.entering_fixed = True

    @property
    def z(self) -> torch.Tensor:
        """Current free states ``(M, D)``: a detached copy."""
        with torch.no_grad():
            return self.param.to_z(self.w.detach()).clone()

    def _chunks(self) -> Iterator[tuple[int, int]]:
        for c0 in range(0, self.num_blocks, self.chunk):
            yield c0, min(c0 + self.chunk, self.num_blocks)

    def _entering(self, w: torch.Tensor, c0: int, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Entering states and free (target) states of blocks c0 … c1-1."""
        zc = self.param.to_z(w[max(c0 - 1, 0):c1])
        if c0 == 0:
            return torch.cat([self.z_fixed, zc[:-1]], 0), zc
        return zc[:-1], zc[1:]

    def evaluate(self, *, theta: bool = False, states: bool = False,
                 token_ce: bool = False) -> PassResult:
        """Evaluate J over all blocks, accumulating ``.grad`` of the parameters (``theta``) and/or
        of ``w`` (``states``); nothing is normalised here. Without ``theta`` the first block's
        cross entropy (constant in Z) is not computed and not included in ``ce``."""
        w = self.w if states else self.w.detach()
        ce = pen = res = kl = l1 = 0.0
        tok = torch.zeros(self.block_size, device=w.device) if token_ce else None
        grad_ctx = torch.enable_grad() if (theta or states) else torch.no_grad()
        freeze = frozen(self.model) if not theta else nullcontext()
        with grad_ctx, freeze:
            for c0, c1 in self._chunks():
                entering, nxt = self._entering(w, c0, c1)
                dual = self.dual[c0:c1] if self.dual is not None else None
                skip = 1 if (c0 == 0 and not theta and self.entering_fixed) else 0
                t = block_terms(self.model, self.inputs[:, c0:c1], self.targets[:, c0:c1],
                                entering, nxt, self.lam, dual, skip_loss=skip,
                                keep_token_ce=token_ce, terms=self.terms)
                if theta or states:
                    t.total.backward()
                with torch.no_grad():
                    ce += float(t.ce)
                    pen += float(t.penalty)
                    res += float((t.final - nxt).norm(dim=1).sum())
                    if tok is not None:
                        tok += t.token_ce.sum(1)
                    kl += float(t.kl) if t.kl is not None else 0.0
                    l1 += float(t.l1) if t.l1 is not None else 0.0
                if c1 == self.num_blocks:
                    self.last_final = t.final[-1:].detach()
        return PassResult(ce, pen, res, tok, kl, l1)

    @torch.no_grad()
    def final_states(self) -> torch.Tensor:
        """``F_j`` for every block at the current θ and Z (recurrence only, no decoder)."""
        z = self.z
        entering = torch.cat([self.z_fixed, z[:-1]], 0)
        outs = [self.model.final_state_flat(self.inputs[:, c0:c1], entering[c0:c1])
                for c0, c1 in self._chunks()]
        final = torch.cat(outs, 0)
        self.last_final = final[-1:].clone()
        return final


def default_chunk(block_size: int, vocab_size: int, budget: int = 1 << 24) -> int:
    """Blocks per recurrent call so that a call's logits hold about ``budget`` floats."""
    return max(1, budget // max(1, block_size * vocab_size))


@torch.no_grad()
def forward_states(model: RNNLM, inputs: torch.Tensor, z_start: torch.Tensor) -> torch.Tensor:
    """States after each block when the recurrence runs through the blocks in sequence from
    ``z_start`` (1, D): row j is the state after block j. Runs in eval mode (no dropout)."""
    was = model.training
    model.eval()
    out = torch.empty(inputs.shape[1], z_start.shape[1], device=z_start.device,
                      dtype=z_start.dtype)
    state = model.unflatten_state(z_start)
    emb = model.encoder(inputs)  # (K, M, E)
    for j in range(inputs.shape[1]):
        _, state = model.rnn(emb[:, j:j + 1], state)
        out[j] = model.flatten_state(state)[0]
    model.train(was)
    return out
