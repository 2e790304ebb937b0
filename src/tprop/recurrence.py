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

from .config import view_class
from .models import frozen
from .scan import linear_scan

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


# ============================================================================ forward solve
def _limit(settings: Any, blocks: int) -> int:
    """Forward evaluations allowed: as set, else enough to be exact (M−1 sweeps; Newton's
    M−1 steps and the evaluation that confirms them)."""
    if settings.rec_max_iters is not None:
        return settings.rec_max_iters
    return max(1, blocks - 1) + (1 if settings.recurrence != "jacobi" else 0)


def _coefficients(jac: torch.Tensor, settings: Any, structure: str) -> torch.Tensor:
    quasi = settings.recurrence == "quasi-newton" and structure == "dense"
    c = jac.diagonal(dim1=-2, dim2=-1) if quasi else jac
    return c / (1.0 + settings.rec_lm) if settings.rec_lm > 0 else c


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


def solve_states(unit: Any, head: torch.Tensor, s0: torch.Tensor, guess: torch.Tensor,
                 lay: Layout, settings: Any) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The unknown entering states ``(M−1, B, D)`` by Jacobi or Newton from ``guess``: the
    states, the evaluations made, and the Jacobians at the returned states (Newton, when the
    last evaluation was at them; else None)."""
    m1, b = lay.blocks - 1, lay.batch
    inp = head[:, : m1 * b]  # blocks 0 … M−2 (all full: only the last block may be short)
    s = guess.clone()
    omega, tol = settings.rec_damping, settings.rec_tol
    newton = settings.recurrence != "jacobi"
    chunk = settings.jacobian_chunk or default_jacobian_chunk(unit, lay.k)
    jac = None
    limit = _limit(settings, lay.blocks)
    for it in range(1, limit + 1):
        enter = torch.cat([s0.unsqueeze(0), s[:-1]], 0).reshape(m1 * b, -1)
        if newton:
            fin, jac = unit.jacobian(inp, enter, chunk)
            jac = jac.view(m1, b, *jac.shape[1:])
        else:
            fin = unit.run(inp, enter)[1]
        r = fin.view(m1, b, -1) - s
        if float(r.abs().max()) <= tol:
            if not newton:
                s = s + r if omega == 1 else s + omega * r
            return s, it, jac
        if newton:
            step = solve_linear(_coefficients(jac, settings, unit.structure), r,
                                "diag" if settings.recurrence == "quasi-newton"
                                and unit.structure == "dense" else unit.structure)
            s = s + (step if omega == 1 else omega * step)
            jac = None  # the states moved: the Jacobians are no longer theirs
        else:
            s = s + r if omega == 1 else s + omega * r
    return s, limit, jac


@torch.no_grad()
def sequential_states(unit: Any, head: torch.Tensor, s0: torch.Tensor, lay: Layout
                      ) -> torch.Tensor:
    """The entering states by running the blocks one after another (the exact fallback)."""
    b, out, s = lay.batch, [], s0
    for j in range(lay.blocks - 1):
        s = unit.run(head[:, j * b:(j + 1) * b], s)[1]
        out.append(s)
    return torch.stack(out, 0)


# ============================================================================ the function
class _Window:
    """Everything one solve shares between its forward and backward passes."""

    def __init__(self, unit: Any, lay: Layout, settings: Any, record: SolveRecord) -> None:
        self.unit, self.lay, self.settings, self.record = unit, lay, settings, record
        self.jac: torch.Tensor | None = None  # Newton's Jacobians at the solution, if made
        self.head: torch.Tensor | None = None  # the inputs' full blocks (detached)
        self.states: torch.Tensor | None = None  # the solved entering states (M−1, B, D)

    def final_pass(self, inputs: torch.Tensor, s0: torch.Tensor, states: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All blocks from their entering states (as leaves): ``(outputs (T, B, H), finals
        (M, B, D), entering leaf (M, B, D), inputs leaf)``, with autograd history when grad
        is enabled."""
        lay, b = self.lay, self.lay.batch
        grad = torch.is_grad_enabled()
        enter = torch.cat([s0.unsqueeze(0), states], 0).detach().requires_grad_(grad)
        x = inputs.detach().requires_grad_(grad and inputs.requires_grad)
        head, tail = lay.split(x)
        out_h, fin_h = self.unit.run(head, enter[: lay.full].reshape(lay.full * b, -1))
        finals = fin_h.view(lay.full, b, -1)
        out_t = None
        if tail is not None:
            out_t, fin_t = self.unit.run(tail, enter[lay.full])
            finals = torch.cat([finals, fin_t.unsqueeze(0)], 0)
        return lay.join(out_h, out_t), finals, enter, x

    def solve(self, inputs: torch.Tensor, s0: torch.Tensor, guess: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Solve for the entering states, then the final pass (see :meth:`final_pass`); a
        window whose final residual exceeds the tolerance is handled as ``on_unconverged``
        says."""
        lay, st, rec = self.lay, self.settings, self.record
        self.head = lay.split(inputs.detach())[0]
        with torch.no_grad():
            states, rec.fwd_iters, self.jac = solve_states(self.unit, self.head, s0.detach(),
                                                           guess, lay, st)
        out, finals, enter, x = self.final_pass(inputs, s0, states)
        rec.fwd_residual = float((finals[:-1].detach() - states).abs().max())
        if rec.fwd_residual > st.rec_tol and st.on_unconverged != "continue":
            if st.on_unconverged == "error":
                raise Unconverged(_unconverged("forward", rec, st))
            states = sequential_states(self.unit, self.head, s0.detach(), lay)
            rec.fwd_fallback, self.jac = True, None
            out, finals, enter, x = self.final_pass(inputs, s0, states)
        self.states = states
        return out, finals, enter, x


class ExactRecurrence(torch.autograd.Function):
    """``(inputs (T, B, E), s0 (B, D), *params) -> (outputs (T, B, H), final (B, D))`` of one
    unit over one window, solved in parallel; the backward solves the adjoint."""

    @staticmethod
    def forward(ctx: Any, window: _Window, guess: torch.Tensor, inputs: torch.Tensor,
                s0: torch.Tensor, *params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            out, finals, enter, x = window.solve(inputs, s0, guess)
        ctx.window, ctx.graph = window, (out, finals, enter, x, params)
        return out.detach(), finals[-1].detach()

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
def _vjp_finals(finals: torch.Tensor, enter: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``A_jᵀ a_{j+1}`` for j = 1 … M−2: the cotangent a_{j+1} on block j's final state,
    pulled back to its entering state (zero for the last unknown)."""
    m = finals.shape[0]
    if m < 3:
        return torch.zeros_like(a)
    (v,) = torch.autograd.grad(finals[1:m - 1], enter, a[1:], retain_graph=True)
    return torch.cat([v[1:m - 1], torch.zeros_like(a[-1:])], 0)


def adjoint_backward(window: _Window, out: torch.Tensor, finals: torch.Tensor,
                     enter: torch.Tensor, x: torch.Tensor, params: tuple[torch.Tensor, ...],
                     d_out: torch.Tensor) -> tuple[Any, ...]:
    """Gradients of ``<d_out, outputs>`` (through the exact recurrence) with respect to the
    inputs, the carried state (None: detached) and the parameters."""
    m = finals.shape[0]
    if m > 1:
        (g_all,) = torch.autograd.grad(out, enter, d_out, retain_graph=True)
        a = solve_adjoint(window, finals, enter, g_all[1:])
        cot_f = torch.cat([a, torch.zeros_like(a[:1])], 0)  # a_{j+1} on F_j; none on F_{M−1}
        tensors, cots = [out, finals], [d_out, cot_f]
    else:
        tensors, cots = [out], [d_out]
    wrt = ([x] if x.requires_grad else []) + [p for p in params if p.requires_grad]
    got = list(torch.autograd.grad(tensors, wrt, cots, allow_unused=True))
    d_x = got.pop(0) if x.requires_grad else None
    d_params = [got.pop(0) if p.requires_grad else None for p in params]
    return (d_x, None, *d_params)


def solve_adjoint(window: _Window, finals: torch.Tensor, enter: torch.Tensor,
                  g: torch.Tensor) -> torch.Tensor:
    """``a_j = g_j + A_jᵀ a_{j+1}`` for the unknowns j = 1 … M−1 (``g`` ``(M−1, B, D)``)."""
    st, rec = window.settings, window.record
    credit = st.credit_blocks
    if credit != "all":
        a = torch.zeros_like(g) if credit < 0 else g
        for _ in range(max(0, credit)):
            a = g + _vjp_finals(finals, enter, a)
        rec.adj_iters = max(0, credit)
        return a
    exact_jacobians = st.recurrence == "newton" or (
        st.recurrence == "quasi-newton" and window.unit.structure != "dense")
    if exact_jacobians:
        return _adjoint_scan(window, finals, enter, g)
    return _adjoint_sweeps(window, finals, enter, g)


def _adjoint_sweeps(window: _Window, finals: torch.Tensor, enter: torch.Tensor,
                    g: torch.Tensor) -> torch.Tensor:
    st, rec = window.settings, window.record
    m1 = g.shape[0]
    limit = st.rec_max_iters if st.rec_max_iters is not None else max(0, m1 - 1)
    a, change, sweeps = g, 0.0, 0
    while sweeps < limit:
        new = g + _vjp_finals(finals, enter, a)
        change = _relative_change(new, a)
        a, sweeps = new, sweeps + 1
        if change <= st.rec_tol:
            break
    rec.adj_iters, rec.adj_residual = sweeps, change
    if limit < m1 - 1 and change > st.rec_tol:
        if st.on_unconverged == "error":
            raise Unconverged(_unconverged("adjoint", rec, st))
        if st.on_unconverged == "sequential":
            rec.adj_fallback = True
            return _adjoint_sequential(finals, enter, g)
    return a


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    scale = float(new.abs().max())
    return float((new - old).abs().max()) / scale if scale > 0 else 0.0


def _adjoint_sequential(finals: torch.Tensor, enter: torch.Tensor, g: torch.Tensor
                        ) -> torch.Tensor:
    """The adjoint recurrence run backwards one block at a time (exact)."""
    m1 = g.shape[0]
    a = [None] * m1
    a[-1] = g[-1]
    for j in range(m1 - 2, -1, -1):  # unknown j+1 (0-based j): a = g + A_{j+1}ᵀ a_next
        (v,) = torch.autograd.grad(finals[j + 1], enter, a[j + 1], retain_graph=True)
        a[j] = g[j] + v[j + 1]
    return torch.stack(a, 0)


def _adjoint_scan(window: _Window, finals: torch.Tensor, enter: torch.Tensor,
                  g: torch.Tensor) -> torch.Tensor:
    """The adjoint by one reverse scan with the block Jacobians ``A_jᵀ`` (Newton)."""
    rec, lay, unit = window.record, window.lay, window.unit
    m1, b = g.shape[0], lay.batch
    jac = window.jac
    if jac is None:  # the last Newton step moved the states: Jacobians at the solution
        enter_head = enter.detach()[:m1].reshape(m1 * b, -1)
        chunk = window.settings.jacobian_chunk or default_jacobian_chunk(unit, lay.k)
        with torch.no_grad():
            jac = unit.jacobian(window.head[:, : m1 * b], enter_head, chunk)[1]
        jac = jac.view(m1, b, *jac.shape[1:])
    coeff = torch.cat([jac[1:], torch.zeros_like(jac[:1])], 0)  # A_j for j = 1 … M−1
    a = solve_linear(coeff, g, unit.structure, reverse=True, transpose=True)
    check = g + _vjp_finals(finals, enter, a)
    rec.adj_iters, rec.adj_residual = 1, _relative_change(check, a)
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
             record: SolveRecord, guess: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One unit over one window: ``(outputs (T, B, H), final state (B, D), the solved entering
    states (M−1, B, D) or None)``, differentiable when grad is enabled."""
    lay = Layout(inputs.shape[0], inputs.shape[1], min(k, inputs.shape[0]))
    record.blocks = lay.blocks
    if lay.blocks == 1:  # nothing to solve: one block is the sequential pass
        out, fin = unit.run(inputs, s0)
        return out, fin, None
    if guess is None or guess.shape != (lay.blocks - 1, lay.batch, unit.state_dim):
        guess = s0.detach().new_zeros(lay.blocks - 1, lay.batch, unit.state_dim)
    window = _Window(unit, lay, settings, record)
    if not torch.is_grad_enabled():
        out, finals, _, _ = window.solve(inputs, s0, guess)
        return out, finals[-1], window.states
    out, fin = ExactRecurrence.apply(window, guess, inputs, s0, *unit.parameters())
    return out, fin, window.states


def parallel_recur(model: Any, inputs: torch.Tensor, state: torch.Tensor, settings: Any,
                   k: int, stats: RecurrenceStats, masks: Any = None,
                   guesses: dict[int, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's recurrence over a window of ``(T, B)`` tokens from its flat state, solved
    in blocks of ``k``: ``(top outputs (T, B, H), final flat state (B, D))`` — what
    ``model.recur`` computes (with the window's fixed dropout ``masks``, from
    ``model.draw_masks``), differentiable. Every unit's solve is recorded in ``stats``, its
    solution kept in ``stats.solutions`` (the next epoch's warm start, passed as ``guesses``)."""
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
        x, fin, solved = run_unit(unit, x, s0, k, settings, record, guess)
        stats.records.append(record)
        if solved is not None:
            stats.solutions[i] = solved
        if masks is not None and per_layer and i < len(units) - 1:
            x = x * masks.between[i]
        finals.append(fin)
    if masks is not None:
        x = x * masks.out
    return x, join_state(finals, model.nlayers, model.nhid, lstm)
