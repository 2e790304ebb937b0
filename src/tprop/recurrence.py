"""Exact parallel-in-time recurrence: a window's block states solved by Jacobi sweeps or
Newton iterations with a parallel scan, giving sequential BPTT's loss and gradient.

A window of T steps in each of B columns is cut into M blocks of K steps (the last may be
shorter). ``s_0`` is the state carried into the window (fixed, detached); the states entering
blocks 1 … M−1 are unknowns, tied by ``s_j = F_{j−1}(s_{j−1})``, ``F_j`` being block j's final
state. All blocks of a sweep run in one fused call of the cell, blocks and columns sharing
the batch dimension (docs/parallel_time.md has the maths; identity E2 says what this must
compute).

* Forward, Jacobi (parallel shooting): ``s_j ← s_j + ω (F_{j−1}(s_{j−1}) − s_j)`` for all j
  at once; with ω = 1 the first i unknowns are exact after i sweeps, all after M−1.
* Forward, Newton: ``s ← s + ω δ`` where ``δ_j = A_{j−1} δ_{j−1} + r_j`` (``A = ∂F/∂s``, the
  dense block Jacobians by batched vector-Jacobian products, ``r`` the residuals) is solved
  by an associative scan (``tprop.scan``); ``quasi-newton`` keeps the diagonal of ``A``.
* Backward: the adjoint ``a_j = g_j + A_jᵀ a_{j+1}`` (``g_j`` = ∂L/∂s_j through block j's own
  losses) by Jacobi sweeps of batched vector-Jacobian products or, with Newton, a reverse
  scan; then one batched backward gives ∇θ and the inputs' gradient. ``credit_blocks = c``
  stops after c sweeps: credit travels c+1 blocks back (−1: truncated BPTT with window K).

The solve is a ``torch.autograd.Function`` around one *unit* of the recurrence: the whole
fused stack of layers (:class:`FusedUnit`), or one layer (:class:`LayerUnit`) when dropout
masks must sit between layers; a model's recurrence is its units applied in turn, so the
decoder, the loss and ``loss.backward()`` are those of sequential BPTT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import _VF

from .comm import LOCAL
from .config import view_class
from .errors import ConfigError
from .models import frozen
from .scan import apply_prefix, linear_scan, prefix_pairs

RecurrenceSettings = view_class(
    "recurrence", "RecurrenceSettings", "How the exact parallel recurrence runs (the "
    "``recurrence`` view of ``TrainConfig``, with its defaults).")


class Unconverged(RuntimeError):
    """A window did not converge within ``--rec-max-iters`` and ``--on-unconverged error``."""


# ============================================================================ statistics
@dataclass
class SolveRecord:
    """What solving one unit of one window took."""

    blocks: int
    fwd_iters: int = 0
    fwd_residual: float = 0.0
    fwd_fallback: bool = False
    adj_iters: int = 0
    adj_residual: float = 0.0
    adj_fallback: bool = False


@dataclass
class RecurrenceStats:
    """The solves of one update (every unit of every window in it)."""

    records: list[SolveRecord] = field(default_factory=list)
    solutions: dict[Any, torch.Tensor] = field(default_factory=dict)  # warm starts, by key


# ============================================================================ units
def _layer_weights(rnn: nn.RNNBase, layer: int) -> list[torch.Tensor]:
    names = [f"weight_ih_l{layer}", f"weight_hh_l{layer}"]
    if rnn.bias:
        names += [f"bias_ih_l{layer}", f"bias_hh_l{layer}"]
    return [getattr(rnn, n) for n in names]


def _vf_call(mode: str, inputs: torch.Tensor, hx: Any, weights: list[torch.Tensor],
             bias: bool, layers: int) -> tuple[torch.Tensor, Any]:
    """One fused call of torch's recurrent kernels (no dropout) over ``weights``."""
    if mode == "LSTM":
        out, h, c = _VF.lstm(inputs, hx, weights, bias, layers, 0.0, False, False, False)
        return out, (h, c)
    fn = {"GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}[mode]
    out, h = fn(inputs, hx, weights, bias, layers, 0.0, False, False, False)
    return out, h


class FusedUnit:
    """The whole stack of an ``nn.RNN``/``nn.GRU``/``nn.LSTM`` as one unit: its flat state is
    every layer's (``[h_0 … h_{L−1}, c_0 … c_{L−1}]``), one fused call per block batch."""

    structure = "dense"

    def __init__(self, rnn: nn.RNNBase, layers: range | None = None) -> None:
        self.rnn = rnn
        self.layers = range(rnn.num_layers) if layers is None else layers
        self.lstm = rnn.mode == "LSTM"
        self.nhid = rnn.hidden_size
        self.state_dim = len(self.layers) * self.nhid * (2 if self.lstm else 1)

    def parameters(self) -> list[torch.Tensor]:
        return [w for layer in self.layers for w in _layer_weights(self.rnn, layer)]

    def _native(self, flat: torch.Tensor) -> Any:
        n, L = flat.shape[0], len(self.layers)
        native = flat.reshape(n, L * (2 if self.lstm else 1), self.nhid).transpose(0, 1)
        native = native.contiguous()
        return (native[:L], native[L:]) if self.lstm else native

    def _flat(self, state: Any) -> torch.Tensor:
        if self.lstm:
            state = torch.cat(state, 0)
        return state.transpose(0, 1).reshape(state.shape[1], -1)

    def run(self, inputs: torch.Tensor, entering: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        """``(K, N, E)`` inputs from flat states ``(N, D)`` -> top outputs ``(K, N, H)`` and
        final flat states ``(N, D)``."""
        out, state = _vf_call(self.rnn.mode, inputs, self._native(entering), self.parameters(),
                              self.rnn.bias, len(self.layers))
        return out, self._flat(state)

    def jacobian(self, inputs: torch.Tensor, entering: torch.Tensor, chunk: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final states ``(N, D)`` and their Jacobians ``∂F/∂s`` ``(N, D, D)`` (rows: outputs),
        by one batched backward over D replicas of the blocks, ``chunk`` blocks at a time."""
        return replicated_jacobian(self, inputs, entering, chunk)


class LayerUnit(FusedUnit):
    """One layer of an ``nn.RNN``/``nn.GRU``/``nn.LSTM`` as a unit (flat state ``h`` or
    ``[h, c]`` of that layer), for dropout masks that must sit between layers."""

    def __init__(self, rnn: nn.RNNBase, layer: int) -> None:
        super().__init__(rnn, range(layer, layer + 1))


def replicated_jacobian(unit: Any, inputs: torch.Tensor, entering: torch.Tensor, chunk: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``F`` and ``∂F/∂s`` of every block: D replicas of the blocks run as one batch, each
    replica's backward seeded with one basis vector (row i of the Jacobian)."""
    n, d = entering.shape
    finals, jacs = [], []
    eye = torch.eye(d, dtype=entering.dtype, device=entering.device)
    with torch.enable_grad(), frozen(unit.parameters()):
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            m = c1 - c0
            rep = entering[c0:c1].detach().unsqueeze(0).expand(d, m, d).reshape(d * m, d)
            rep = rep.clone().requires_grad_(True)
            inp = inputs[:, c0:c1].detach().unsqueeze(1).expand(-1, d, -1, -1)
            _, fin = unit.run(inp.reshape(inputs.shape[0], d * m, -1), rep)
            seed = eye.unsqueeze(1).expand(d, m, d).reshape(d * m, d)
            (g,) = torch.autograd.grad(fin, rep, seed)
            finals.append(fin.detach().view(d, m, d)[0])
            jacs.append(g.view(d, m, d).permute(1, 0, 2))
    return torch.cat(finals, 0), torch.cat(jacs, 0)


def default_jacobian_chunk(unit: Any, k: int, budget: int = 1 << 25) -> int:
    """Blocks per Jacobian computation so that its activations hold about ``budget`` floats."""
    d = unit.state_dim
    return max(1, budget // max(1, d * k * 8 * max(unit.nhid, 1)))


# ============================================================================ block layout
@dataclass(frozen=True)
class Layout:
    """A window of ``steps`` steps and ``batch`` columns cut into blocks of ``k``."""

    steps: int
    batch: int
    k: int

    @property
    def full(self) -> int:
        """Blocks of exactly k steps."""
        return self.steps // self.k

    @property
    def tail(self) -> int:
        """Steps of the last, shorter block (0: none)."""
        return self.steps - self.full * self.k

    @property
    def blocks(self) -> int:
        return self.full + (1 if self.tail else 0)

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(T, B, …)`` -> the full blocks ``(k, full·B, …)`` (block-major batch) and the tail
        ``(tail, B, …)`` or None."""
        b, rest = self.batch, t.shape[2:]
        head = t[: self.full * self.k].reshape(self.full, self.k, b, *rest)
        head = head.transpose(0, 1).reshape(self.k, self.full * b, *rest)
        return head, (t[self.full * self.k:] if self.tail else None)

    def join(self, head: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        b, rest = self.batch, head.shape[2:]
        out = head.reshape(self.k, self.full, b, *rest).transpose(0, 1)
        out = out.reshape(self.full * self.k, b, *rest)
        return out if tail is None else torch.cat([out, tail], 0)


# ============================================================================ time shards
@dataclass(frozen=True)
class Shard:
    """This rank's run of a window's blocks: blocks ``[first, first + count)`` of ``total``,
    every rank holding at least one (``time_shard``); ``comm`` exchanges with the neighbours.
    One process holds them all."""

    comm: Any
    first: int
    count: int
    total: int

    @property
    def is_first(self) -> bool:
        return self.first == 0

    @property
    def is_last(self) -> bool:
        return self.first + self.count == self.total

    @property
    def left(self) -> int | None:
        return None if self.is_first else self.comm.rank - 1

    @property
    def right(self) -> int | None:
        return None if self.is_last else self.comm.rank + 1

    def shift_right(self, send: torch.Tensor | None, like: torch.Tensor,
                    receive: bool = True) -> torch.Tensor | None:
        """Send ``send`` (this shard's last value; None: nothing) right, and receive the left
        neighbour's (a tensor shaped as ``like``) unless ``receive`` is off."""
        return self._shift(send, self.right, self.left if receive else None, like)

    def shift_left(self, send: torch.Tensor | None, like: torch.Tensor,
                   receive: bool = True) -> torch.Tensor | None:
        """Send ``send`` (this shard's first value) left; receive the right neighbour's."""
        return self._shift(send, self.left, self.right if receive else None, like)

    def _shift(self, send: torch.Tensor | None, to: int | None, source: int | None,
               like: torch.Tensor) -> torch.Tensor | None:
        if self.comm.world == 1:
            return None
        to = to if send is not None else None
        return self.comm.shift(send if to is not None else None, to, source, like,
                               kind="boundary")

    def max(self, value: float) -> float:
        return self.comm.max(value) if self.comm.world > 1 else value


def time_shard(comm: Any, blocks: int) -> Shard:
    """The shard of ``blocks`` blocks this rank owns (contiguous, the first ranks one more)."""
    from .comm import split

    if blocks < comm.world:
        raise ConfigError(f"--recurrence on {comm.world} ranks needs at least {comm.world} "
                          f"blocks per window (this one has {blocks}): use a smaller "
                          "--block-size or fewer ranks")
    a, b = split(blocks, comm.world)[comm.rank]
    return Shard(comm, a, b - a, blocks)


def sharded_scan(c: torch.Tensor, b: torch.Tensor, structure: str, shard: Shard,
                 reverse: bool = False, transpose: bool = False) -> torch.Tensor:
    """:func:`solve_linear` along dim 0 of a sequence split over the ranks of ``shard`` (this
    rank's part): a local scan, one all-gather of every rank's composed summary, a local
    finish."""
    if shard.comm.world == 1:
        return solve_linear(c, b, structure, reverse, transpose)
    if structure == "block2":
        b = pairs(b)
    if transpose and c.shape != b.shape:
        c = c.transpose(-1, -2)
    if reverse:
        c, b = c.flip(0), b.flip(0)
    p, q = prefix_pairs(c, b)
    summaries = list(zip(shard.comm.all_gather(p[-1].contiguous(), "scan"),
                         shard.comm.all_gather(q[-1].contiguous(), "scan")))
    order = range(shard.comm.world - 1, shard.comm.rank, -1) if reverse else \
        range(shard.comm.rank)
    x_in = None
    for r in order:  # the ranks before this one, in the scan's direction
        x_in = apply_prefix(summaries[r][0].unsqueeze(0), summaries[r][1].unsqueeze(0),
                            x_in)[0] if x_in is not None else summaries[r][1]
    x = apply_prefix(p, q, x_in)
    if reverse:
        x = x.flip(0)
    return unpairs(x) if structure == "block2" else x


# ============================================================================ forward solve
def _limit(settings: Any, blocks: int) -> int:
    """Forward evaluations allowed: as set, else enough to be exact (M−1 sweeps; Newton's
    M−1 steps and the evaluation that confirms them)."""
    if settings.rec_max_iters is not None:
        return settings.rec_max_iters
    return max(1, blocks - 1) + (1 if settings.recurrence != "jacobi" else 0)


def _coefficients(jac: torch.Tensor, settings: Any, structure: str) -> tuple[torch.Tensor, str]:
    """The coefficients the scan uses and their structure (quasi-Newton: the diagonal of a
    dense Jacobian; Levenberg–Marquardt-style: divided by 1 + μ)."""
    if settings.recurrence == "quasi-newton" and structure == "dense":
        jac, structure = jac.diagonal(dim1=-2, dim2=-1), "diag"
    return (jac / (1.0 + settings.rec_lm) if settings.rec_lm > 0 else jac), structure


def pairs(v: torch.Tensor) -> torch.Tensor:
    """Flat LSTM-layer states ``(…, 2H)`` laid out ``[h, c]`` as ``(…, H, 2)`` pairs (the
    layout of 2×2-block-diagonal Jacobians)."""
    h, c = v.chunk(2, -1)
    return torch.stack([h, c], -1)


def unpairs(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pairs`."""
    return torch.cat([v[..., 0], v[..., 1]], -1)


def solve_linear(c: torch.Tensor, b: torch.Tensor, structure: str, reverse: bool = False,
                 transpose: bool = False) -> torch.Tensor:
    """The linear recurrence of a unit's Jacobians ``c`` (dense ``(…, D, D)``, diagonal
    ``(…, D)``, or ``block2`` ``(…, H, 2, 2)`` over ``[h, c]`` pairs) by one scan."""
    if structure == "block2":
        return unpairs(linear_scan(c, pairs(b), reverse=reverse, transpose=transpose))
    return linear_scan(c, b, reverse=reverse, transpose=transpose)


class _Evaluation:
    """The blocks' final states (and Jacobians) at given entering states, with what arrives
    from the left neighbour: the candidate entering states and the residuals."""

    def __init__(self, unit: Any, head: torch.Tensor, enter: torch.Tensor, s0: torch.Tensor,
                 shard: Shard, jacobians: bool, chunk: int) -> None:
        count, b = enter.shape[:2]
        nf = count - (1 if shard.is_last else 0)  # the global last block's final is unused
        flat = enter[:nf].reshape(nf * b, enter.shape[-1])
        inp = head[:, : nf * b]
        self.jac = None
        if nf == 0:  # the last rank holding one block: nothing to evaluate
            fin = enter.new_zeros(0, enter.shape[-1])
        elif jacobians:
            fin, jac = unit.jacobian(inp, flat, chunk)
            self.jac = jac.view(nf, b, *jac.shape[1:])
        else:
            fin = unit.run(inp, flat)[1]
        self.finals = fin.view(nf, b, enter.shape[-1])
        left = shard.shift_right(self.finals[-1] if nf else None, s0)
        self.left_jac = None
        if jacobians and shard.comm.world > 1:
            like = torch.zeros_like(self.jac[0]) if self.jac is not None else None
            if like is None:  # the last rank with one block evaluates none; shape from unit
                like = _jac_like(unit, s0)
            self.left_jac = shard.shift_right(self.jac[-1] if nf else None, like)
        first = s0 if shard.is_first else left
        self.candidate = torch.cat([first.unsqueeze(0), self.finals[: count - 1]], 0)
        self.residual = self.candidate - enter
        self.max_residual = shard.max(scaled_residual(self.residual, enter))

    def coefficients(self, shard: Shard) -> torch.Tensor:
        """The Jacobian multiplying each local unknown's predecessor (zero for s_0)."""
        count = self.residual.shape[0]
        first = (torch.zeros_like(self.jac[0] if self.jac is not None else self.left_jac)
                 if shard.is_first else self.left_jac)
        rest = self.jac[: count - 1] if self.jac is not None else first.unsqueeze(0)[:0]
        return torch.cat([first.unsqueeze(0), rest], 0)


def scaled_residual(r: torch.Tensor, s: torch.Tensor) -> float:
    """``max |r| / max(1, |s|)`` elementwise: the absolute residual for states of size up to
    1, relative beyond (an LSTM's cell state may be large, and float32 rounds it relatively)."""
    return float((r.abs() / s.abs().clamp_min(1.0)).max()) if r.numel() else 0.0


def _jac_like(unit: Any, s0: torch.Tensor) -> torch.Tensor:
    """A zero Jacobian of one block's batch in the unit's structure."""
    b, d = s0.shape
    if unit.structure == "diag":
        return s0.new_zeros(b, d)
    if unit.structure == "block2":
        return s0.new_zeros(b, d // 2, 2, 2)
    return s0.new_zeros(b, d, d)


def solve_states(unit: Any, head: torch.Tensor, s0: torch.Tensor, guess: torch.Tensor,
                 shard: Shard, settings: Any) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """This shard's entering states ``(count, B, D)`` (the first rank's first is ``s0``) by
    Jacobi or Newton from ``guess``: the states, the evaluations made, and the local blocks'
    Jacobians at (or, after a last step, one converged step from) the states (Newton)."""
    enter = guess.clone()
    if shard.is_first:
        enter[0] = s0
    omega, tol = settings.rec_damping, settings.rec_tol
    newton = settings.recurrence != "jacobi"
    chunk = settings.jacobian_chunk or default_jacobian_chunk(unit, head.shape[0])
    limit = _limit(settings, shard.total)
    jac = None
    for it in range(1, limit + 1):
        ev = _Evaluation(unit, head, enter, s0, shard, newton, chunk)
        if newton:
            coeff, structure = _coefficients(ev.coefficients(shard), settings, unit.structure)
            step = sharded_scan(coeff, ev.residual, structure, shard)
            jac = ev.jac
        else:
            step = ev.residual
        enter = enter + (step if omega == 1 else omega * step)
        if ev.max_residual <= tol:
            return enter, it, jac
    return enter, limit, jac


@torch.no_grad()
def sequential_states(unit: Any, head: torch.Tensor, s0: torch.Tensor, shard: Shard
                      ) -> torch.Tensor:
    """The entering states by running the blocks one after another, rank after rank (the
    exact fallback)."""
    count, b = shard.count, s0.shape[0]
    s = s0 if shard.is_first else shard.shift_right(None, s0)
    out = [s]
    nf = count - (1 if shard.is_last else 0)
    for j in range(nf):
        s = unit.run(head[:, j * b:(j + 1) * b], s)[1]
        if j + 1 < count:
            out.append(s)
    if not shard.is_last:
        shard.shift_right(s, s0, receive=False)
    return torch.stack(out, 0)


# ============================================================================ the function
class _Window:
    """Everything one solve shares between its forward and backward passes."""

    def __init__(self, unit: Any, lay: Layout, settings: Any, record: SolveRecord,
                 shard: Shard) -> None:
        self.unit, self.lay, self.settings, self.record = unit, lay, settings, record
        self.shard = shard
        self.jac: torch.Tensor | None = None  # Newton's Jacobians of the local blocks
        self.head: torch.Tensor | None = None  # the inputs' full blocks (detached)
        self.states: torch.Tensor | None = None  # the solved entering states (count, B, D)

    def final_pass(self, inputs: torch.Tensor, states: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All local blocks from their entering states (as leaves): ``(outputs (T, B, H),
        finals (count, B, D), entering leaf (count, B, D), inputs leaf)``, with autograd
        history when grad is enabled."""
        lay, b = self.lay, self.lay.batch
        grad = torch.is_grad_enabled()
        enter = states.detach().requires_grad_(grad)
        x = inputs.detach().requires_grad_(grad and inputs.requires_grad)
        head, tail = lay.split(x)
        d = enter.shape[-1]
        if lay.full:
            out_h, fin_h = self.unit.run(head, enter[: lay.full].reshape(lay.full * b, d))
            finals = fin_h.view(lay.full, b, d)
        else:  # a shard of the short last block alone
            out_h, finals = head.new_zeros(lay.k, 0, self.unit.nhid), enter[:0]
        out_t = None
        if tail is not None:
            out_t, fin_t = self.unit.run(tail, enter[lay.full])
            finals = torch.cat([finals, fin_t.unsqueeze(0)], 0)
        return lay.join(out_h, out_t), finals, enter, x

    def final_residual(self, finals: torch.Tensor, enter: torch.Tensor, s0: torch.Tensor
                       ) -> float:
        left = self.shard.shift_right(finals[-1].detach(), s0)
        first = s0 if self.shard.is_first else left
        cand = torch.cat([first.unsqueeze(0), finals[:-1].detach()], 0)
        return self.shard.max(scaled_residual(cand - enter.detach(), enter.detach()))

    def solve(self, inputs: torch.Tensor, s0: torch.Tensor, guess: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Solve for the entering states, then the final pass (see :meth:`final_pass`); a
        window whose final residual exceeds the tolerance is handled as ``on_unconverged``
        says."""
        st, rec, shard = self.settings, self.record, self.shard
        self.head = self.lay.split(inputs.detach())[0]
        s0 = s0.detach()
        with torch.no_grad():
            states, rec.fwd_iters, self.jac = solve_states(self.unit, self.head, s0, guess,
                                                           shard, st)
        out, finals, enter, x = self.final_pass(inputs, states)
        rec.fwd_residual = self.final_residual(finals, enter, s0)
        if rec.fwd_residual > st.rec_tol and st.on_unconverged != "continue":
            if st.on_unconverged == "error":
                raise Unconverged(_unconverged("forward", rec, st))
            states = sequential_states(self.unit, self.head, s0, shard)
            rec.fwd_fallback, self.jac = True, None
            out, finals, enter, x = self.final_pass(inputs, states)
        self.states = states
        return out, finals, enter, x

    def carried(self, finals: torch.Tensor) -> torch.Tensor:
        """The state after the window's last block (on the last rank), on every rank."""
        last = finals[-1].detach()
        if self.shard.comm.world == 1:
            return last
        buf = last.clone() if self.shard.is_last else torch.zeros_like(last)
        return self.shard.comm.broadcast_(buf, src=self.shard.comm.world - 1, kind="carried")


class ExactRecurrence(torch.autograd.Function):
    """``(inputs (T, B, E), s0 (B, D), *params) -> (outputs (T, B, H), final (B, D))`` of one
    unit over one window (this rank's blocks of it), solved in parallel; the backward solves
    the adjoint."""

    @staticmethod
    def forward(ctx: Any, window: _Window, guess: torch.Tensor, inputs: torch.Tensor,
                s0: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            out, finals, enter, x = window.solve(inputs, s0, guess)
        ctx.window, ctx.graph = window, (out, finals, enter, x, params)
        return out.detach(), window.carried(finals)

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor, d_final: torch.Tensor) -> tuple[Any, ...]:
        window = ctx.window
        out, finals, enter, x, params = ctx.graph
        ctx.graph = None
        with torch.enable_grad():
            grads = adjoint_backward(window, out, finals, enter, x, params, d_out)
        return (None, None, *grads)


def _unconverged(way: str, rec: SolveRecord, st: Any) -> str:
    limit = st.rec_max_iters if st.rec_max_iters is not None else "the exact limit"
    res = rec.fwd_residual if way == "forward" else rec.adj_residual
    return (f"--recurrence {st.recurrence}: a window of {rec.blocks} blocks did not converge "
            f"({way}) within {limit} iterations (residual {res:.3g} > --rec-tol "
            f"{st.rec_tol:g}); raise --rec-max-iters, or use --on-unconverged sequential")


# ============================================================================ adjoint
class _Adjoint:
    """The adjoint recurrence of one window's shard: ``a_j = g_j + A_jᵀ a_{j+1}`` over the
    local entering states (the right neighbour's first ``a`` arriving for the last)."""

    def __init__(self, window: _Window, finals: torch.Tensor, enter: torch.Tensor,
                 g: torch.Tensor) -> None:
        self.window, self.finals, self.enter, self.g = window, finals, enter, g
        self.shard = window.shard
        self.nf = finals.shape[0] - (1 if self.shard.is_last else 0)

    def cotangents(self, a: torch.Tensor) -> torch.Tensor:
        """The cotangent on each evaluated block's final state: the next state's adjoint."""
        right = self.shard.shift_left(a[0], a[0])
        nxt = a[1:]
        if right is not None:
            nxt = torch.cat([nxt, right.unsqueeze(0)], 0)
        return nxt[: self.nf]

    def pull_back(self, a: torch.Tensor) -> torch.Tensor:
        """``A_jᵀ a_{j+1}`` for every local entering state (zero where no block follows)."""
        cot = self.cotangents(a)
        if self.nf == 0:
            return torch.zeros_like(a)
        (v,) = torch.autograd.grad(self.finals[: self.nf], self.enter, cot, retain_graph=True)
        return v

    def change(self, new: torch.Tensor, old: torch.Tensor) -> float:
        scale = self.shard.max(float(new.abs().max()))
        diff = self.shard.max(float((new - old).abs().max()))
        return diff / scale if scale > 0 else 0.0


def adjoint_backward(window: _Window, out: torch.Tensor, finals: torch.Tensor,
                     enter: torch.Tensor, x: torch.Tensor, params: tuple[torch.Tensor, ...],
                     d_out: torch.Tensor) -> tuple[Any, ...]:
    """Gradients of ``<d_out, outputs>`` (through the exact recurrence) with respect to the
    inputs, the carried state (None: detached) and the parameters."""
    (g,) = torch.autograd.grad(out, enter, d_out, retain_graph=True)
    adj = _Adjoint(window, finals, enter, g)
    tensors, cots = [out], [d_out]
    if window.shard.total > 1:
        a = solve_adjoint(adj)
        cot_f = adj.cotangents(a)
        if adj.nf:
            tensors, cots = [out, finals[: adj.nf]], [d_out, cot_f]
    wrt = ([x] if x.requires_grad else []) + [p for p in params if p.requires_grad]
    got = list(torch.autograd.grad(tensors, wrt, cots, allow_unused=True))
    d_x = got.pop(0) if x.requires_grad else None
    d_params = [got.pop(0) if p.requires_grad else None for p in params]
    return (d_x, None, *d_params)


def solve_adjoint(adj: _Adjoint) -> torch.Tensor:
    """The adjoint of every local entering state, as the credit horizon and the solver say."""
    st, rec = adj.window.settings, adj.window.record
    credit, g = st.credit_blocks, adj.g
    if credit != "all":
        a = torch.zeros_like(g) if credit < 0 else g
        for _ in range(max(0, credit)):
            a = g + adj.pull_back(a)
        rec.adj_iters = max(0, credit)
        return a
    exact_jacobians = st.recurrence == "newton" or (
        st.recurrence == "quasi-newton" and adj.window.unit.structure != "dense")
    return _adjoint_scan(adj) if exact_jacobians else _adjoint_sweeps(adj)


def _adjoint_limit(st: Any, total: int) -> int:
    return st.rec_max_iters if st.rec_max_iters is not None else max(0, total - 2)


def _adjoint_sweeps(adj: _Adjoint) -> torch.Tensor:
    """Jacobi sweeps of batched vector-Jacobian products (exact after M − 2)."""
    st, rec = adj.window.settings, adj.window.record
    limit = _adjoint_limit(st, adj.shard.total)
    a, change, sweeps = adj.g, 0.0, 0
    while sweeps < limit:
        new = adj.g + adj.pull_back(a)
        change = adj.change(new, a)
        a, sweeps = new, sweeps + 1
        if change <= st.rec_tol:
            break
    exact = sweeps >= adj.shard.total - 2  # after M − 2 sweeps the adjoint is exact
    rec.adj_iters, rec.adj_residual = sweeps, 0.0 if exact else change
    if not exact and change > st.rec_tol:
        return _adjoint_unconverged(adj, a)
    return a


def _adjoint_unconverged(adj: _Adjoint, a: torch.Tensor) -> torch.Tensor:
    st, rec = adj.window.settings, adj.window.record
    if st.on_unconverged == "error":
        raise Unconverged(_unconverged("adjoint", rec, st))
    if st.on_unconverged == "sequential":
        rec.adj_fallback = True
        return _adjoint_sequential(adj)
    return a


def _adjoint_sequential(adj: _Adjoint) -> torch.Tensor:
    """The adjoint recurrence run backwards one block at a time, rank after rank (exact)."""
    g, finals, enter, nf = adj.g, adj.finals, adj.enter, adj.nf
    count = g.shape[0]
    a: list[torch.Tensor | None] = [None] * count
    nxt = None if adj.shard.is_last else adj.shard.shift_left(None, g[0])
    for j in range(count - 1, -1, -1):
        if j < nf:
            cot = nxt if j == count - 1 else a[j + 1]
            (v,) = torch.autograd.grad(finals[j], enter, cot, retain_graph=True)
            a[j] = g[j] + v[j]
        else:
            a[j] = g[j]
    if not adj.shard.is_first:
        adj.shard.shift_left(a[0], g[0], receive=False)
    return torch.stack(a, 0)


def _adjoint_scan(adj: _Adjoint) -> torch.Tensor:
    """The adjoint by a reverse scan with the blocks' Jacobians ``A_jᵀ``, refined while its
    residual (one vector-Jacobian sweep) is above the tolerance: exact at the Jacobians of
    the solution, a few refinements when they are one small Newton step old."""
    window, rec, st = adj.window, adj.window.record, adj.window.settings
    unit, lay, b = window.unit, window.lay, window.lay.batch
    jac = window.jac
    if jac is None and adj.nf:  # no Jacobians of this solution: make them
        chunk = st.jacobian_chunk or default_jacobian_chunk(unit, lay.k)
        flat = adj.enter.detach()[: adj.nf].reshape(adj.nf * b, -1)
        with torch.no_grad():
            jac = unit.jacobian(window.head[:, : adj.nf * b], flat, chunk)[1]
        jac = jac.view(adj.nf, b, *jac.shape[1:])
    like = jac[0] if jac is not None else _jac_like(unit, adj.g[0])
    coeff = torch.zeros(adj.g.shape[0], *like.shape, dtype=like.dtype, device=like.device)
    if adj.nf:
        coeff[: adj.nf] = jac
    a = sharded_scan(coeff, adj.g, unit.structure, adj.shard, reverse=True, transpose=True)
    limit, passes = max(1, _adjoint_limit(st, adj.shard.total)), 1
    while True:
        res = adj.g + adj.pull_back(a) - a
        rec.adj_residual = adj.change(a + res, a)
        if rec.adj_residual <= st.rec_tol or passes >= limit:
            break
        a = a + sharded_scan(coeff, res, unit.structure, adj.shard, reverse=True,
                             transpose=True)
        passes += 1
    rec.adj_iters = passes
    return a


# ============================================================================ the model
def units_of(rnn: nn.Module, per_layer: bool) -> list[Any]:
    """The units a recurrent module runs as: one fused stack, or one unit per layer."""
    if hasattr(rnn, "parallel_units"):  # cells that bring their own (tprop.cells)
        return rnn.parallel_units(per_layer)
    if per_layer and rnn.num_layers > 1:
        return [LayerUnit(rnn, layer) for layer in range(rnn.num_layers)]
    return [FusedUnit(rnn)]


def split_state(flat: torch.Tensor, units: list[Any], nlayers: int, nhid: int,
                lstm: bool) -> list[torch.Tensor]:
    """The model's flat state ``[h_0 … h_{L−1}, c_0 … c_{L−1}]`` as each unit's flat state."""
    if len(units) == 1:
        return [flat]
    h = flat[:, : nlayers * nhid]
    c = flat[:, nlayers * nhid:] if lstm else None
    out = []
    for layer in range(nlayers):
        part = h[:, layer * nhid:(layer + 1) * nhid]
        if lstm:
            part = torch.cat([part, c[:, layer * nhid:(layer + 1) * nhid]], 1)
        out.append(part)
    return out


def join_state(parts: list[torch.Tensor], nlayers: int, nhid: int, lstm: bool) -> torch.Tensor:
    """Inverse of :func:`split_state`."""
    if len(parts) == 1:
        return parts[0]
    if not lstm:
        return torch.cat(parts, 1)
    return torch.cat([p[:, :nhid] for p in parts] + [p[:, nhid:] for p in parts], 1)


def run_unit(unit: Any, inputs: torch.Tensor, s0: torch.Tensor, k: int, settings: Any,
             record: SolveRecord, guess: torch.Tensor | None, shard: Shard | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One unit over one window (this rank's blocks of it, when ``shard`` says so):
    ``(outputs (T, B, H), the window's final state (B, D), the solved entering states of the
    local blocks (count, B, D) or None)``, differentiable when grad is enabled."""
    lay = Layout(inputs.shape[0], inputs.shape[1], min(k, inputs.shape[0]))
    shard = shard if shard is not None else Shard(LOCAL, 0, lay.blocks, lay.blocks)
    record.blocks = shard.total
    if shard.total == 1:  # nothing to solve: one block is the sequential pass
        out, fin = unit.run(inputs, s0)
        return out, fin, None
    want = (shard.count, lay.batch, unit.state_dim)
    if guess is None or guess.shape != want:
        guess = s0.detach().new_zeros(want)
    window = _Window(unit, lay, settings, record, shard)
    if not torch.is_grad_enabled():
        out, finals, _, _ = window.solve(inputs, s0, guess)
        return out, window.carried(finals), window.states
    out, fin = ExactRecurrence.apply(window, guess, inputs, s0, *unit.parameters())
    return out, fin, window.states


def parallel_recur(model: Any, inputs: torch.Tensor, state: torch.Tensor, settings: Any,
                   k: int, stats: RecurrenceStats, masks: Any = None,
                   guesses: dict[int, torch.Tensor] | None = None, shard: Shard | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's recurrence over a window of ``(T, B)`` tokens from its flat state, solved
    in blocks of ``k``: ``(top outputs (T, B, H), final flat state (B, D))`` — what
    ``model.recur`` computes (with the window's fixed dropout ``masks``, from
    ``model.draw_masks``), differentiable. Every unit's solve is recorded in ``stats``, its
    solution kept in ``stats.solutions`` (the next epoch's warm start, passed as ``guesses``).
    With a ``shard`` (``time_shard``), ``inputs`` and ``masks`` are this rank's blocks of the
    window, the outputs too; the final state is the window's, on every rank."""
    x = model.encoder(inputs)
    if masks is not None:
        x = x * masks.emb
    per_layer = masks is not None and model.nlayers > 1
    units = units_of(model.rnn, per_layer)
    lstm = model.is_lstm
    parts = split_state(state, units, model.nlayers, model.nhid, lstm)
    finals = []
    for i, (unit, s0) in enumerate(zip(units, parts)):
        record = SolveRecord(0)
        guess = None if guesses is None else guesses.get(i)
        x, fin, solved = run_unit(unit, x, s0, k, settings, record, guess, shard)
        stats.records.append(record)
        if solved is not None:
            stats.solutions[i] = solved
        if masks is not None and per_layer and i < len(units) - 1:
            x = x * masks.between[i]
        finals.append(fin)
    if masks is not None:
        x = x * masks.out
    return x, join_state(finals, model.nlayers, model.nhid, lstm)
