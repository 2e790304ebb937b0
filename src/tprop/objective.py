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

A problem may be one rank's shard of an update (``shard``, with the run's communication
strategy ``comm``): its first block then enters from the previous rank's last free state,
received at every evaluation, and the gradient on that state is sent back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import _VF

from .comm import LOCAL, LocalComm, SpanShard
from .constraints import StateParam, StateTerms, extra_terms, make_state_param
from .models import RNNLM, eval_mode, frozen

__all__ = ["BlockProblem", "StateParam", "Terms", "block_terms", "default_chunk",
           "forward_states", "frozen", "objective", "run_blocks"]


@dataclass
class Terms:
    """The terms of J over some blocks: tensors (differentiable where their inputs require
    grad) as :func:`block_terms` returns them, or floats once measured. Records add."""

    ce: torch.Tensor | float = 0.0  # Σ_j L_j / K
    penalty: torch.Tensor | float = 0.0  # (λ/2) Σ_j ‖F_j − z_{j+1} + u_j‖²
    residual: torch.Tensor | float = 0.0  # Σ_j ‖F_j − z_{j+1}‖ (without the duals; not in J)
    kl: torch.Tensor | float | None = None  # kl_weight · Σ_j KL (tprop.constraints); None: off
    l1: torch.Tensor | float | None = None  # l1_weight · Σ_j ‖z_{j+1}‖₁; None: off
    token_ce: torch.Tensor | None = None  # cross entropy by position in the block, detached

    SCALARS = ("ce", "penalty", "residual", "kl", "l1")

    @property
    def total(self) -> torch.Tensor | float:
        """J itself: every term but the residual."""
        out = self.ce + self.penalty
        for extra in (self.kl, self.l1):
            if extra is not None:
                out = out + extra
        return out

    def __add__(self, other: Terms) -> Terms:
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = b if a is None else a if b is None else a + b
        return type(self)(**out)

    def measured(self) -> Terms:
        """The terms as floats; ``token_ce`` summed over blocks to one value per position."""
        tok = self.token_ce
        if tok is not None and tok.dim() > 1:
            tok = tok.sum(1)
        return Terms(*(self._float(k) for k in self.SCALARS), token_ce=tok)

    def _float(self, key: str) -> float:
        v = getattr(self, key)
        return 0.0 if v is None else float(v.detach() if isinstance(v, torch.Tensor) else v)

    def vector(self) -> list[float]:
        """The scalars, then the positional values: what crosses ranks to be summed."""
        tok = [] if self.token_ce is None else self.token_ce.double().cpu().tolist()
        return [self._float(k) for k in self.SCALARS] + tok

    @classmethod
    def from_vector(cls, v: torch.Tensor, positional: bool) -> Terms:
        n = len(cls.SCALARS)
        return cls(*(float(x) for x in v[:n]), token_ce=v[n:].clone() if positional else None)


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
    residual: bool = True,
    recurrence: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Terms, torch.Tensor]:
    """J's terms for blocks given time-major ``(K, M)`` inputs/targets, entering states
    ``(M, D)``, the free states they should reach ``(M, D)`` and duals; and the blocks' final
    states ``F_j`` ``(M, D)``. ``token_ce`` is ``(K, M)`` with ``keep_token_ce``.

    ``skip_loss`` leaves the first blocks' cross entropy out (their decoder is not run): an
    h-step does this for a block whose entering state is fixed, its loss being constant.
    ``terms`` (``tprop.constraints``) adds the KL and l1 terms and may drop the squared
    distance (``penalty="kl"``: then ``penalty`` is 0 and the duals are not read). Without
    ``residual`` the residual is not computed (0). ``recurrence``: the blocks' top-layer
    outputs and final states ``(out, F)`` when the recurrence has already been run (by
    :func:`run_blocks`).
    """
    k = inputs.shape[0]
    out, final = recurrence if recurrence is not None else run_blocks(model, inputs, entering)
    hidden = out[:, skip_loss:].reshape(-1, out.shape[-1])  # 2-D: one matmul, not a bmm
    logits = model.decode(hidden)
    tok = F.cross_entropy(logits, targets[:, skip_loss:].reshape(-1), reduction="none")
    t = Terms(ce=tok.sum() / k, token_ce=tok.detach().view(k, -1) if keep_token_ce else None)
    if residual:
        t.residual = (final.detach() - next_states.detach()).norm(dim=1).sum()
    if terms is None or terms.l2:
        r = final - next_states
        if dual is not None:
            r = r + dual
        t.penalty = 0.5 * lam * r.pow(2).sum()
    if terms is not None:
        t.kl, t.l1 = extra_terms(model, final, next_states, terms)
    return t, final


def run_blocks(model: RNNLM, inputs: torch.Tensor, entering: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks' recurrence (one call, the block index as the batch dimension) from their
    entering states ``(M, D)``: top-layer outputs ``(K, M, H)`` (dropout applied) and final
    states ``F_j`` ``(M, D)``."""
    out, state = model.recur(inputs, model.unflatten_state(entering))
    return out, model.flatten_state(state)


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
    return block_terms(model, inputs, targets, entering, z, lam, dual, terms=terms)[0].total


class BlockProblem:
    """One update's blocks (or this rank's shard of them): data, the entering state, free
    states, duals and λ.

    The free states live in ``w`` (a leaf tensor; ``z = param.to_z(w)``); ``dual`` may be a
    view into the trainer's persistent duals, updated in place. ``last_final`` is the final
    state of the update's last block as the last evaluation of J computed it.
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
        comm: LocalComm = LOCAL,
        shard: SpanShard | None = None,
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
        self.last_final: torch.Tensor | None = None
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None  # see residuals(keep=)
        self.comm = comm
        self.total_blocks = shard.total if shard is not None else self.num_blocks
        nonempty = shard.nonempty if shard is not None else 1
        self.has_left = 0 < comm.rank < nonempty
        self.has_right = comm.rank + 1 < nonempty
        self.is_last = comm.rank == nonempty - 1
        self.last_rank = nonempty - 1
        # the first block's loss is constant in Z (skipped by h-steps) unless it enters from
        # another rank's free state
        self.entering_fixed = not self.has_left

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

    # ------------------------------------------------------------------ neighbours
    def _receive_entering(self, requires_grad: bool) -> None:
        """The previous rank's last free state becomes this shard's entering state."""
        if not (self.has_left or self.has_right):
            return
        r = self.comm.rank
        with torch.no_grad():  # the last free state (the same op as the one-process pass)
            send = self.param.to_z(self.w.detach()[-1:]) if self.has_right else None
        got = self.comm.shift(send, r + 1 if self.has_right else None,
                              r - 1 if self.has_left else None, self.z_fixed)
        if got is not None:
            self.z_fixed = got.requires_grad_(requires_grad)

    def _return_gradient(self) -> None:
        """The gradient on the entering state goes back to the rank that owns that state."""
        if not (self.has_left or self.has_right):
            return
        r = self.comm.rank
        send = None
        if self.has_left:
            g = self.z_fixed.grad
            send = g if g is not None else torch.zeros_like(self.z_fixed)
        got = self.comm.shift(send, r - 1 if self.has_left else None,
                              r + 1 if self.has_right else None, self.z_fixed.detach())
        if got is not None:
            with torch.enable_grad():
                self.param.to_z(self.w[-1:]).backward(got)

    # ------------------------------------------------------------------ passes
    def evaluate(self, *, theta: bool = False, states: bool = False,
                 token_ce: bool = False, measure: bool = True) -> Terms:
        """Evaluate J over all blocks, accumulating ``.grad`` of the parameters (``theta``) and/or
        of ``w`` (``states``); nothing is normalised here. Without ``theta`` the first block's
        cross entropy (constant in Z) is not computed and not included in ``ce``. Returns the
        terms measured (floats); without ``measure``, for a pass wanted for its gradients
        only, an empty record (and the residual is not computed)."""
        kept, self._kept = self._kept, None
        self._receive_entering(states)
        w = self.w if states else self.w.detach()
        total = Terms()
        grad_ctx = torch.enable_grad() if (theta or states) else torch.no_grad()
        freeze = frozen(self.model) if not theta else nullcontext()
        with grad_ctx, freeze:
            for c0, c1 in self._chunks():
                entering, nxt = self._entering(w, c0, c1)
                dual = self.dual[c0:c1] if self.dual is not None else None
                skip = 1 if (c0 == 0 and not theta and self.entering_fixed) else 0
                rec = kept if theta and not states else None  # (one chunk: see residuals)
                t, final = block_terms(self.model, self.inputs[:, c0:c1],
                                       self.targets[:, c0:c1], entering, nxt, self.lam, dual,
                                       skip_loss=skip, keep_token_ce=token_ce and measure,
                                       terms=self.terms, residual=measure, recurrence=rec)
                if theta or states:
                    t.total.backward()
                if measure:
                    total = total + t.measured()
                if c1 == self.num_blocks:
                    self.last_final = final[-1:].detach()
        if states:
            self._return_gradient()
        return total

    @torch.no_grad()
    def final_states(self) -> torch.Tensor:
        """``F_j`` for every block at the current θ and Z (recurrence only, no decoder)."""
        return self._finals(self.z)

    def residuals(self, keep: bool = False) -> torch.Tensor:
        """``r_j = F_j(θ, z_j) − z_{j+1}`` for every block at the current θ and Z (no autograd
        history). With ``keep`` the pass is differentiable in θ and kept for the next
        evaluation, which then does not run the recurrence again: only for an evaluation in θ
        alone at the same θ and Z, e.g. ADMM's θ-steps right after its dual step (one chunk
        of blocks only; otherwise nothing is kept). Any other evaluation discards it."""
        z = self.z
        if not (keep and 0 < self.num_blocks <= self.chunk):
            with torch.no_grad():
                return self._finals(z).sub_(z)
        self._receive_entering(False)
        entering = torch.cat([self.z_fixed, z[:-1]], 0)
        with torch.enable_grad():
            self._kept = run_blocks(self.model, self.inputs, entering)
        return self._kept[1].detach() - z

    def _finals(self, z: torch.Tensor) -> torch.Tensor:
        self._receive_entering(False)
        if self.num_blocks == 0:
            return self.w.new_zeros(0, self.w.shape[1])
        entering = torch.cat([self.z_fixed, z[:-1]], 0)
        outs = [self.model.final_state_flat(self.inputs[:, c0:c1], entering[c0:c1])
                for c0, c1 in self._chunks()]
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def carried_out(self) -> torch.Tensor:
        """The update's last final state (on the last rank holding blocks), on every rank."""
        if self.comm.world == 1:
            return self.last_final
        buf = (self.last_final.detach().clone() if self.is_last
               else self.z_fixed.detach().new_zeros(self.z_fixed.shape))
        return self.comm.broadcast_(buf, src=self.last_rank, kind="carried")


def default_chunk(block_size: int, vocab_size: int, budget: int = 1 << 24) -> int:
    """Blocks per recurrent call so that a call's logits hold about ``budget`` floats."""
    return max(1, budget // max(1, block_size * vocab_size))


@torch.no_grad()
def forward_states(model: RNNLM, inputs: torch.Tensor, z_start: torch.Tensor,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """States after each block when the recurrence runs through the blocks in sequence from
    ``z_start`` (1, D): row j is the state after block j (only the blocks ``rows``, in that
    order, when given). The recurrence runs as in eval mode (no dropout)."""
    if rows is not None and len(rows) == 0:
        return z_start.new_empty(0, z_start.shape[1])
    last = inputs.shape[1] if rows is None else int(rows.max()) + 1
    if last == 0:
        return z_start.new_empty(0, z_start.shape[1])
    # torch's fused kernels are called without dropout; other cells run in eval mode
    fused = _fused_stack(model.rnn)
    run = _span_states if fused else _block_states
    per_pass = max(1, _SPAN_STEPS // max(1, inputs.shape[0]))  # blocks
    with nullcontext() if fused else eval_mode(model):
        if last <= per_pass:  # one pass
            states = run(model, inputs[:, :last], z_start)
            return states if rows is None else states[rows.to(states.device)]
        keep = torch.arange(last) if rows is None else rows.cpu()
        where = torch.full((last,), -1, dtype=torch.long)
        where[keep] = torch.arange(len(keep))
        out = z_start.new_empty(len(keep), z_start.shape[1])
        state = z_start
        for c0 in range(0, last, per_pass):  # several passes, to bound memory
            c1 = min(c0 + per_pass, last)
            states = run(model, inputs[:, c0:c1], state)
            state = states[-1:]
            pick = where[c0:c1]
            sel = pick >= 0
            out[pick[sel].to(out.device)] = states[sel.to(out.device)]
    return out


_SPAN_STEPS = 1 << 15  # steps that forward_states runs through in one pass (memory)


def _fused_stack(rnn: torch.nn.Module) -> bool:
    """Whether ``rnn`` is a plain stack of torch's fused kernels, which forward_states runs
    one layer at a time over a whole span."""
    return (isinstance(rnn, torch.nn.RNNBase) and rnn.mode in _VF_CALLS
            and not rnn.bidirectional and not rnn.batch_first
            and getattr(rnn, "proj_size", 0) == 0)


_VF_CALLS = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh,
             "RNN_RELU": _VF.rnn_relu}


def _span_states(model: RNNLM, inputs: torch.Tensor, z_start: torch.Tensor) -> torch.Tensor:
    """The states after each of the blocks ``inputs`` (K, n), run in sequence from
    ``z_start`` (1, D): one recurrent call per layer over all n·K steps (a fused stack)."""
    rnn, (k, n) = model.rnn, inputs.shape
    L, H = model.nlayers, model.nhid
    lstm = rnn.mode == "LSTM"
    x = model.encoder(inputs.t().reshape(-1, 1))  # (n·K, 1, E): the blocks one after another
    native = z_start.reshape(-1, H).unsqueeze(1)  # (L or 2L, 1, H): [h_0 … h_{L−1}, c_0 …]
    hs, cs = [], []
    for layer in range(L):
        weights = rnn.all_weights[layer]  # [w_ih, w_hh(, b_ih, b_hh)]
        h0 = native[layer:layer + 1].contiguous()
        if lstm:
            c0 = native[L + layer:L + layer + 1].contiguous()
            y = _VF.lstm(x, (h0, c0), weights, rnn.bias, 1, 0.0, False, False, False)[0]
            cs.append(_lstm_cells(x[:, 0], y[:, 0], h0[0], c0[0], weights, k))
        else:
            y = _VF_CALLS[rnn.mode](x, h0, weights, rnn.bias, 1, 0.0, False, False, False)[0]
        hs.append(y.view(n, k, H)[:, -1])
        x = y
    return torch.cat(hs + cs, 1)


def _lstm_cells(x: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                weights: list[torch.Tensor], k: int) -> torch.Tensor:
    """An LSTM layer's cell states after each block of ``k`` steps ``(n, H)``, given the
    layer's inputs ``x`` (n·k, E) and outputs ``y`` (n·k, H) from ``h0``, ``c0`` (1, H): the
    input, forget and cell gates of every step by matmuls over all steps at once, then the
    elementwise linear recurrence c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t, composed within every
    block (all blocks at once), then scanned across the blocks."""
    hid = h0.shape[-1]
    w_ih, w_hh = weights[0][:3 * hid], weights[1][:3 * hid]  # gates i, f, g (not o)
    if len(weights) > 2:
        gates = torch.addmm(weights[2][:3 * hid] + weights[3][:3 * hid], x, w_ih.t())
    else:
        gates = x @ w_ih.t()
    gates[1:].addmm_(y[:-1], w_hh.t())  # the previous step's h
    gates[:1].addmm_(h0, w_hh.t())
    act = torch.sigmoid(gates[:, :2 * hid])  # (activations of 2-D views: the fast kernels)
    b = (act[:, :hid] * torch.tanh(gates[:, 2 * hid:])).view(-1, k, hid)  # i ⊙ g (n, k, H)
    f = act[:, hid:].view(-1, k, hid)
    # block j maps c ↦ coef_j ⊙ c + val_j, composed step by step
    fs, bs = f.unbind(1), b.unbind(1)
    val = bs[0]
    for t in range(1, k):
        val = torch.addcmul(bs[t], fs[t], val)
    return _compose_blocks(f.prod(1), val, c0[0])


def _compose_blocks(coef: torch.Tensor, val: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """``c_j = coef_j ⊙ c_{j−1} + val_j`` for every j (dim 0) from ``c_{−1} = c0``: an
    inclusive scan by doubling, in place on copies."""
    p, q = coef.clone(), val.clone()
    q[0].addcmul_(p[0], c0)
    n, shift = q.shape[0], 1
    while shift < n:
        q[shift:] = torch.addcmul(q[shift:], p[shift:], q[:-shift])  # (right side first)
        if 2 * shift < n:
            p[shift:] = p[shift:] * p[:-shift]
        shift *= 2
    return q


def _block_states(model: RNNLM, inputs: torch.Tensor, z_start: torch.Tensor) -> torch.Tensor:
    """As :func:`_span_states` by one recurrent call per block (any recurrent module)."""
    emb = model.encoder(inputs)  # (K, n, E)
    state = model.unflatten_state(z_start)
    out = []
    for j in range(inputs.shape[1]):
        _, state = model.rnn(emb[:, j:j + 1], state)
        out.append(model.flatten_state(state))
    return torch.cat(out, 0)
