"""Recurrent language models, with the state API that target propagation needs.

The carried state of a model is everything its recurrence passes from one step to the
next: ``h`` for a tanh RNN or GRU, ``(h, c)`` for an LSTM, for every layer. tprop handles it
in two forms:

* native: what torch's ``nn.RNN``/``nn.GRU`` (a ``(nlayers, B, nhid)`` tensor) or ``nn.LSTM``
  (a pair of them) take and return;
* flat: one ``(B, state_dim)`` tensor, ``state_dim = nlayers * nhid`` (RNN, GRU) or
  ``2 * nlayers * nhid`` (LSTM), laid out as ``[h_0, …, h_{L-1}, c_0, …, c_{L-1}]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

CELLS = ("rnn", "gru", "lstm", "diag-gru", "diag-lstm")


def make_recurrent(cell: str, emsize: int, nhid: int, nlayers: int, dropout: float
                   ) -> nn.Module:
    """The recurrent stack of a cell: torch's fused ``nn.RNN``/``nn.GRU``/``nn.LSTM``, or a
    diagonal-recurrence cell of ``tprop.cells`` (same call signature and state layout)."""
    if cell.startswith("diag-"):
        from .cells import DIAGONAL_CELLS

        return DIAGONAL_CELLS[cell](emsize, nhid, nlayers, dropout=dropout)
    if cell == "lstm":
        return nn.LSTM(emsize, nhid, nlayers, dropout=dropout)
    if cell == "gru":
        return nn.GRU(emsize, nhid, nlayers, dropout=dropout)
    return nn.RNN(emsize, nhid, nlayers, nonlinearity="tanh", dropout=dropout)
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class WindowMasks:
    """The dropout masks of one window, drawn once (scaled by 1/(1−p)): on the embeddings
    ``(T, B, E)``, between layers ``[(T, B, H)] * (L−1)``, and on the top layer's outputs."""

    emb: torch.Tensor
    between: list[torch.Tensor]
    out: torch.Tensor


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) inside; its previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@contextmanager
def frozen(params: nn.Module | list[torch.Tensor]) -> Iterator[None]:
    """Parameters (of a module, or a list) do not require grad inside (so no parameter
    gradient is computed)."""
    params = list(params.parameters() if isinstance(params, nn.Module) else params)
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


class RNNLM(nn.Module):
    """Embedding -> tanh RNN | GRU | LSTM -> linear decoder over the vocabulary."""

    def __init__(
        self,
        ntoken: int,
        emsize: int = 200,
        nhid: int = 200,
        nlayers: int = 1,
        cell: str = "lstm",
        dropout: float = 0.0,
        tied: bool = False,
        init_range: float = 0.1,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(CELLS)}")
        if tied and emsize != nhid:
            raise ValueError(f"weight tying needs emsize == nhid (got {emsize} and {nhid})")
        if min(ntoken, emsize, nhid, nlayers) < 1:
            raise ValueError("ntoken, emsize, nhid and nlayers must all be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.ntoken, self.emsize, self.nhid, self.nlayers = ntoken, emsize, nhid, nlayers
        self.cell, self.tied, self.init_range = cell, tied, init_range
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, emsize)
        self.rnn = make_recurrent(cell, emsize, nhid, nlayers, dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, ntoken)
        if tied:
            self.decoder.weight = self.encoder.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter uniform in ±init_range (the reference's initialisation)."""
        for p in self.parameters():
            nn.init.uniform_(p, -self.init_range, self.init_range)

    # ----------------------------------------------------------------- state API
    @property
    def is_lstm(self) -> bool:
        """Whether the state of a layer is the pair (h, c)."""
        return self.cell.endswith("lstm")

    @property
    def state_dim(self) -> int:
        """Width of the flat carried state."""
        return self.nlayers * self.nhid * (2 if self.is_lstm else 1)

    def init_state(self, batch_size: int) -> State:
        """The zero state, native form, on the model's device and dtype."""
        w = self.decoder.weight
        z = w.new_zeros(self.nlayers, batch_size, self.nhid)
        return (z, z.clone()) if self.is_lstm else z

    def flatten_state(self, state: State) -> torch.Tensor:
        """Native state -> ``(B, state_dim)``."""
        if self.is_lstm:
            state = torch.cat(state, 0)  # (2L, B, H)
        return state.transpose(0, 1).reshape(state.shape[1], -1)

    def unflatten_state(self, flat: torch.Tensor) -> State:
        """``(B, state_dim)`` -> native state (contiguous, as the fused kernels need)."""
        b = flat.shape[0]
        layers = self.nlayers * (2 if self.is_lstm else 1)
        native = flat.reshape(b, layers, self.nhid).transpose(0, 1).contiguous()
        if self.is_lstm:
            return native[: self.nlayers], native[self.nlayers :]
        return native

    def output_hidden(self, flat: torch.Tensor) -> torch.Tensor:
        """The top layer's ``h`` part of flat states ``(…, state_dim)``: what the decoder reads."""
        top = (self.nlayers - 1) * self.nhid
        return flat[..., top : top + self.nhid]

    @staticmethod
    def detach_state(state: State) -> State:
        if isinstance(state, tuple):
            return tuple(s.detach() for s in state)
        return state.detach()

    # ----------------------------------------------------------------- forward
    def recur(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """Run the recurrence: ``(T, B)`` tokens from ``state`` -> top-layer outputs ``(T, B, H)``
        (dropout applied) and the final native state. One fused call for all columns."""
        emb = self.encoder(inputs)
        if self.drop.p == 0:  # no dropout module calls on the hot path
            return self.rnn(emb, state)
        out, state = self.rnn(self.drop(emb), state)
        return self.drop(out), state

    def decode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary for top-layer hidden vectors ``(…, H)``."""
        return self.decoder(hidden)

    def forward(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """``(T, B)`` tokens from native ``state`` -> logits ``(T, B, V)`` and the final state."""
        out, state = self.recur(inputs, state)
        return self.decode(out), state

    def forward_flat(
        self, inputs: torch.Tensor, flat_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``forward`` but from and to flat states ``(B, state_dim)``."""
        logits, state = self.forward(inputs, self.unflatten_state(flat_state))
        return logits, self.flatten_state(state)

    def final_state_flat(self, inputs: torch.Tensor, flat_state: torch.Tensor) -> torch.Tensor:
        """The flat state after running ``(T, B)`` tokens from flat states ``(B, state_dim)``;
        the decoder is not run."""
        emb = self.drop(self.encoder(inputs))
        _, state = self.rnn(emb, self.unflatten_state(flat_state))
        return self.flatten_state(state)

    def draw_masks(self, steps: int, batch: int) -> WindowMasks | None:
        """Dropout masks for a window of ``steps`` x ``batch`` tokens (None when the model is
        in eval mode or has no dropout): the exact parallel recurrence draws them once per
        window and reuses them in every sweep."""
        p = self.drop.p
        if not self.training or p == 0:
            return None
        w = self.decoder.weight

        def mask(width: int) -> torch.Tensor:
            keep = torch.empty(steps, batch, width, device=w.device, dtype=w.dtype)
            return keep.bernoulli_(1 - p).div_(1 - p)

        return WindowMasks(mask(self.emsize), [mask(self.nhid) for _ in range(self.nlayers - 1)],
                           mask(self.nhid))

    def config(self) -> dict:
        """Constructor arguments (plain data) that rebuild this model."""
        return dict(ntoken=self.ntoken, emsize=self.emsize, nhid=self.nhid,
                    nlayers=self.nlayers, cell=self.cell, dropout=self.drop.p,
                    tied=self.tied, init_range=self.init_range)
