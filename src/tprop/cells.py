"""Recurrent cells whose recurrence is elementwise (ParaRNN-style), in plain PyTorch.

Each layer keeps a dense input projection ``u_t = W x_t + b`` but its recurrent matrices are
replaced by vectors, so that unit k of a layer's state depends, from one step to the next,
on unit k alone: the step Jacobian of a layer is diagonal (GRU) or 2×2-block-diagonal over
the pairs ``(h_k, c_k)`` (LSTM). That is what lets ``tprop.recurrence`` solve a window by
Newton's method with an elementwise scan, down to one step per block.

**DiagGRU** (per layer; ``u = [u_r, u_z, u_n]``, recurrent vectors ``a_r, a_z, a_n``, bias
``b_hn``; σ the logistic function, ⊙ elementwise):

    r  = σ(u_r + a_r ⊙ h)
    z  = σ(u_z + a_z ⊙ h)
    n  = tanh(u_n + r ⊙ (a_n ⊙ h + b_hn))
    h' = (1 − z) ⊙ n + z ⊙ h

    ∂h'/∂h = z + (h − n) z (1 − z) a_z + (1 − z)(1 − n²) r (a_n + (1 − r) a_r (a_n h + b_hn))

(diagonal, a vector ``(B, H)``).

**DiagLSTM** (per layer; ``u = [u_i, u_f, u_g, u_o]``, recurrent vectors ``a_i, a_f, a_g,
a_o``; the full four-gate LSTM, no coupled input/forget gate):

    i  = σ(u_i + a_i ⊙ h)      f = σ(u_f + a_f ⊙ h)
    g  = tanh(u_g + a_g ⊙ h)   o = σ(u_o + a_o ⊙ h)
    c' = f ⊙ c + i ⊙ g
    h' = o ⊙ tanh(c')

    ∂c'/∂h = c f (1 − f) a_f + g i (1 − i) a_i + i (1 − g²) a_g       ∂c'/∂c = f
    ∂h'/∂h = o (1 − o) a_o tanh c' + o (1 − tanh² c') ∂c'/∂h         ∂h'/∂c = o (1 − tanh² c') f

per unit a 2×2 matrix ``[[∂h'/∂h, ∂h'/∂c], [∂c'/∂h, ∂c'/∂c]]`` (rows: outputs ``(h', c')``,
columns: inputs ``(h, c)``), ``(B, H, 2, 2)`` for a layer.

Both modules take and return what ``nn.GRU`` / ``nn.LSTM`` do (time-major ``(T, B, E)``
inputs; states ``(L, B, H)``, or a pair of them for the LSTM), with dropout on every layer's
outputs but the last in training mode. Parameters of layer ``l``: ``weight_ih_l{l}``
``(G·H, E_l)``, ``bias_ih_l{l}`` ``(G·H)``, ``weight_hh_l{l}`` ``(G·H)`` (the recurrent
*vectors*, stacked in gate order) and, for the GRU, ``bias_hn_l{l}`` ``(H)``; ``G`` = 3 (GRU)
or 4 (LSTM). ``RNNLM`` sets every parameter uniform in ±init_range: the recurrent vectors are
then small and the step Jacobians contractive (about z, resp. f).

For ``tprop.recurrence`` each layer is one unit (:class:`DiagonalUnit`, structure ``"diag"``
or ``"block2"``, flat state ``h`` or ``[h, c]``) whose Jacobian over a block is the product
of the analytic step Jacobians.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DIAGONAL_CELLS", "DiagGRU", "DiagLSTM", "DiagonalUnit", "gru_step",
           "gru_step_jacobian", "lstm_step", "lstm_step_jacobian"]

LayerState = tuple[torch.Tensor, ...]  # (h,) for the GRU, (h, c) for the LSTM


# ============================================================================ one step
def gru_step(u: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b_hn: torch.Tensor
             ) -> torch.Tensor:
    """One DiagGRU step: the projected input ``u`` ``(…, 3H)``, the state ``h`` ``(…, H)``,
    the recurrent vectors ``a`` ``(3H)`` and ``b_hn`` ``(H)`` -> ``h'`` ``(…, H)``."""
    u_r, u_z, u_n = u.chunk(3, -1)
    a_r, a_z, a_n = a.chunk(3, -1)
    r = torch.sigmoid(u_r + a_r * h)
    z = torch.sigmoid(u_z + a_z * h)
    n = torch.tanh(u_n + r * (a_n * h + b_hn))
    return n + z * (h - n)


def gru_step_jacobian(u: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b_hn: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``h'`` of :func:`gru_step` and its diagonal Jacobian ``∂h'/∂h`` ``(…, H)``."""
    u_r, u_z, u_n = u.chunk(3, -1)
    a_r, a_z, a_n = a.chunk(3, -1)
    r = torch.sigmoid(u_r + a_r * h)
    z = torch.sigmoid(u_z + a_z * h)
    m = a_n * h + b_hn
    n = torch.tanh(u_n + r * m)
    h2 = n + z * (h - n)
    dn = (1 - n * n) * r * (a_n + (1 - r) * a_r * m)
    return h2, z + (h - n) * z * (1 - z) * a_z + (1 - z) * dn


def lstm_step(u: torch.Tensor, h: torch.Tensor, c: torch.Tensor, a: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DiagLSTM step: the projected input ``u`` ``(…, 4H)``, the state ``(h, c)`` and
    the recurrent vectors ``a`` ``(4H)`` -> ``(h', c')``."""
    i, f, g, o = (u + a * torch.cat([h, h, h, h], -1)).chunk(4, -1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c2), c2


def lstm_step_jacobian(u: torch.Tensor, h: torch.Tensor, c: torch.Tensor, a: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h', c')`` of :func:`lstm_step` and the per-unit Jacobians ``(…, H, 2, 2)`` of
    ``(h', c')`` (rows) with respect to ``(h, c)`` (columns)."""
    u_i, u_f, u_g, u_o = u.chunk(4, -1)
    a_i, a_f, a_g, a_o = a.chunk(4, -1)
    i = torch.sigmoid(u_i + a_i * h)
    f = torch.sigmoid(u_f + a_f * h)
    g = torch.tanh(u_g + a_g * h)
    o = torch.sigmoid(u_o + a_o * h)
    c2 = f * c + i * g
    tc = torch.tanh(c2)
    h2 = o * tc
    dc_dh = c * f * (1 - f) * a_f + g * i * (1 - i) * a_i + i * (1 - g * g) * a_g
    dh_dc2 = o * (1 - tc * tc)
    dh_dh = o * (1 - o) * a_o * tc + dh_dc2 * dc_dh
    jac = torch.stack([torch.stack([dh_dh, dh_dc2 * f], -1), torch.stack([dc_dh, f], -1)], -2)
    return h2, c2, jac


# ============================================================================ the modules
class _DiagonalRNN(nn.Module):
    """A stack of layers with elementwise recurrence (see the module docstring)."""

    gates: int = 0
    pair_state: bool = False  # whether a layer's state is (h, c)
    structure: str = "diag"  # of a layer's step Jacobian, as tprop.recurrence names it

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if min(input_size, hidden_size, num_layers) < 1:
            raise ValueError("input_size, hidden_size and num_layers must all be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.dropout = num_layers, float(dropout)
        gh = self.gates * hidden_size
        for layer in range(num_layers):
            n_in = input_size if layer == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(gh, n_in)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(gh)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(gh)))
            if not self.pair_state:
                self.register_parameter(f"bias_hn_l{layer}",
                                        nn.Parameter(torch.empty(hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter uniform in ±1/√hidden_size (torch's recurrent-layer default)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        return s + (f", dropout={self.dropout}" if self.dropout else "")

    # ----------------------------------------------------------------- one layer
    def layer_parameters(self, layer: int) -> list[nn.Parameter]:
        """Layer ``layer``'s parameters: ``[weight_ih, bias_ih, weight_hh(, bias_hn)]``."""
        names = ["weight_ih", "bias_ih", "weight_hh"] + ([] if self.pair_state else ["bias_hn"])
        return [getattr(self, f"{n}_l{layer}") for n in names]

    def project(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The input projections ``W x + b`` ``(…, G·H)`` of inputs ``(…, E_l)`` to a layer."""
        w, b = self.layer_parameters(layer)[:2]
        return F.linear(x, w, b)

    def step(self, layer: int, u: torch.Tensor, state: LayerState) -> LayerState:
        """One step of a layer from its projected input ``u`` ``(N, G·H)``: the next state."""
        raise NotImplementedError

    def step_with_jacobian(self, layer: int, u: torch.Tensor, state: LayerState
                           ) -> tuple[LayerState, torch.Tensor]:
        """:meth:`step` and the step Jacobian (``(N, H)`` or ``(N, H, 2, 2)``)."""
        raise NotImplementedError

    def step_jacobian(self, layer: int, x: torch.Tensor, state: LayerState) -> torch.Tensor:
        """The step Jacobian of a layer at input ``x`` ``(N, E_l)`` and previous state:
        ``∂h'/∂h`` ``(N, H)`` (GRU) or the 2×2 blocks ``(N, H, 2, 2)`` over ``(h, c)`` (LSTM)."""
        return self.step_with_jacobian(layer, self.project(layer, x), state)[1]

    def layer_forward(self, layer: int, x: torch.Tensor, state: LayerState
                      ) -> tuple[torch.Tensor, LayerState]:
        """A layer over inputs ``(T, N, E_l)`` from its state (``(h,)`` or ``(h, c)``, each
        ``(N, H)``), one step at a time: outputs ``h_1 … h_T`` ``(T, N, H)`` and the final
        state. No dropout."""
        u = self.project(layer, x)  # every step's projection in one matmul
        outs = []
        for t in range(u.shape[0]):
            state = self.step(layer, u[t], state)
            outs.append(state[0])
        if not outs:
            return x.new_zeros(0, x.shape[1], self.hidden_size), state
        return torch.stack(outs, 0), state

    def block_jacobian(self, layer: int, x: torch.Tensor, state: LayerState
                       ) -> tuple[LayerState, torch.Tensor]:
        """A layer over inputs ``(K, N, E_l)`` from its state: the final state and the
        Jacobian of the final state with respect to the entering one, the product of the K
        step Jacobians (``(N, H)`` or ``(N, H, 2, 2)``)."""
        u = self.project(layer, x)
        jac = None
        for t in range(u.shape[0]):
            state, j = self.step_with_jacobian(layer, u[t], state)
            jac = j if jac is None else (j * jac if not self.pair_state else j @ jac)
        if jac is None:  # no steps: the identity
            h = state[0]
            if not self.pair_state:
                return state, torch.ones_like(h)
            eye = torch.eye(2, dtype=h.dtype, device=h.device)
            return state, eye.expand(*h.shape, 2, 2).clone()
        return state, jac

    # ----------------------------------------------------------------- the stack
    def _layer_states(self, hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None,
                      batch: int, like: torch.Tensor) -> list[LayerState]:
        shape = (self.num_layers, batch, self.hidden_size)
        if hx is None:
            zero = like.new_zeros(shape)
            hx = (zero, zero) if self.pair_state else zero
        if self.pair_state and not isinstance(hx, tuple | list):
            raise ValueError(f"expected the state as a pair (h, c) of tensors of shape {shape}")
        parts = tuple(hx) if self.pair_state else (hx,)
        if len(parts) != (2 if self.pair_state else 1) or any(
                not isinstance(p, torch.Tensor) or tuple(p.shape) != shape for p in parts):
            got = [tuple(p.shape) for p in parts if isinstance(p, torch.Tensor)]
            raise ValueError(f"expected the state as {'a pair of ' if self.pair_state else ''}"
                             f"tensors of shape {shape}, got {got}")
        return [tuple(p[layer] for p in parts) for layer in range(self.num_layers)]

    def forward(self, input: torch.Tensor,
                hx: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Time-major inputs ``(T, B, E)`` from the state (``(L, B, H)``, or ``(h, c)`` for the
        LSTM; zero when None) -> top-layer outputs ``(T, B, H)`` and the final state, as
        ``nn.GRU`` / ``nn.LSTM`` return them. The sequential reference: layer by layer, step
        by step."""
        if input.dim() != 3 or input.shape[2] != self.input_size:
            raise ValueError(f"expected inputs (T, B, {self.input_size}), got "
                             f"{tuple(input.shape)}")
        states = self._layer_states(hx, input.shape[1], input)
        x, finals = input, []
        for layer in range(self.num_layers):
            x, fin = self.layer_forward(layer, x, states[layer])
            finals.append(fin)
            if layer < self.num_layers - 1 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
        native = tuple(torch.stack([f[i] for f in finals], 0) for i in range(len(finals[0])))
        return x, (native if self.pair_state else native[0])

    def parallel_units(self, per_layer: bool) -> list[DiagonalUnit]:
        """The units of ``tprop.recurrence``: one per layer, whatever ``per_layer`` says (the
        state of a stack is not elementwise across layers)."""
        return [DiagonalUnit(self, layer) for layer in range(self.num_layers)]


class DiagGRU(_DiagonalRNN):
    """The GRU with diagonal recurrence (recurrent vectors instead of matrices): equations in
    the module docstring; a drop-in for ``nn.GRU(input_size, hidden_size, num_layers,
    dropout=dropout)``."""

    gates = 3
    pair_state = False
    structure = "diag"

    def step(self, layer: int, u: torch.Tensor, state: LayerState) -> LayerState:
        _, _, a, b_hn = self.layer_parameters(layer)
        return (gru_step(u, state[0], a, b_hn),)

    def step_with_jacobian(self, layer: int, u: torch.Tensor, state: LayerState
                           ) -> tuple[LayerState, torch.Tensor]:
        _, _, a, b_hn = self.layer_parameters(layer)
        h2, jac = gru_step_jacobian(u, state[0], a, b_hn)
        return (h2,), jac


class DiagLSTM(_DiagonalRNN):
    """The LSTM with diagonal recurrence (recurrent vectors on ``h`` instead of matrices):
    equations in the module docstring; a drop-in for ``nn.LSTM(input_size, hidden_size,
    num_layers, dropout=dropout)``."""

    gates = 4
    pair_state = True
    structure = "block2"

    def step(self, layer: int, u: torch.Tensor, state: LayerState) -> LayerState:
        a = self.layer_parameters(layer)[2]
        return lstm_step(u, state[0], state[1], a)

    def step_with_jacobian(self, layer: int, u: torch.Tensor, state: LayerState
                           ) -> tuple[LayerState, torch.Tensor]:
        a = self.layer_parameters(layer)[2]
        h2, c2, jac = lstm_step_jacobian(u, state[0], state[1], a)
        return (h2, c2), jac


# ============================================================================ the unit
class DiagonalUnit:
    """One layer of a :class:`DiagGRU` / :class:`DiagLSTM` as a unit of
    ``tprop.recurrence`` (the protocol of ``recurrence.FusedUnit``): flat state ``h``
    ``(N, H)`` or ``[h, c]`` ``(N, 2H)``; analytic Jacobians of structure ``"diag"``
    ``(N, H)`` or ``"block2"`` ``(N, H, 2, 2)`` (``recurrence.pairs`` of the flat state)."""

    def __init__(self, cell: _DiagonalRNN, layer: int) -> None:
        self.cell, self.layer = cell, layer
        self.structure = cell.structure
        self.nhid = cell.hidden_size
        self.state_dim = self.nhid * (2 if cell.pair_state else 1)

    def parameters(self) -> list[torch.Tensor]:
        """The layer's parameters."""
        return list(self.cell.layer_parameters(self.layer))

    def _native(self, flat: torch.Tensor) -> LayerState:
        return tuple(flat.chunk(2, -1)) if self.cell.pair_state else (flat,)

    @staticmethod
    def _flat(state: LayerState) -> torch.Tensor:
        return torch.cat(state, -1) if len(state) > 1 else state[0]

    def run(self, inputs: torch.Tensor, entering: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, N, E)`` inputs from flat states ``(N, D)`` -> the layer's outputs
        ``(K, N, H)`` and final flat states ``(N, D)`` (differentiable)."""
        out, state = self.cell.layer_forward(self.layer, inputs, self._native(entering))
        return out, self._flat(state)

    def jacobian(self, inputs: torch.Tensor, entering: torch.Tensor, chunk: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final flat states ``(N, D)`` and the block Jacobians ``∂F/∂s`` (``(N, H)`` or
        ``(N, H, 2, 2)``), analytic and detached; ``chunk`` is not needed."""
        with torch.no_grad():
            state, jac = self.cell.block_jacobian(self.layer, inputs, self._native(entering))
        return self._flat(state), jac.contiguous()


DIAGONAL_CELLS: dict[str, type[_DiagonalRNN]] = {"diag-gru": DiagGRU, "diag-lstm": DiagLSTM}
