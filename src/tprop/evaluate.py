"""Perplexity over a whole split, the state carried through it and nothing truncated."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .comm import LOCAL, LocalComm, split
from .data.layout import StreamColumns
from .models import RNNLM, eval_mode


def eval_chunk_len(batch_size: int, vocab_size: int, budget: int = 1 << 24) -> int:
    """Steps per recurrent call so that one call's logits hold about ``budget`` floats."""
    return max(1, min(512, budget // max(1, batch_size * vocab_size)))


@torch.no_grad()
def evaluate(model: RNNLM, data: torch.Tensor, batch_size: int = 10,
             comm: LocalComm = LOCAL, recurrence: Any = None,
             block_size: int | None = None) -> tuple[float, int]:
    """Mean token cross entropy (nats) over ``data`` and the number of predictions scored.

    The split is cut into ``batch_size`` columns (see ``StreamColumns``; at most
    ``batch_size - 1`` trailing predictions are left out) and each column is run from the
    zero state to its end with the state carried, in eval mode (no dropout). With several
    ranks, each runs a contiguous group of the columns and the summed cross entropy is
    all-reduced: every rank gets the same value. ``recurrence`` (``RecurrenceSettings``, not
    sequential) solves each stretch of the columns in blocks of ``block_size`` with the exact
    parallel recurrence instead: the same value to the solver's tolerance.
    """
    cols = StreamColumns(data, batch_size)
    c0, c1 = split(batch_size, comm.world)[comm.rank]
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    step = _stepper(model, recurrence, block_size)
    if c1 > c0:
        with eval_mode(model):
            state = model.init_state(c1 - c0)
            if recurrence is not None:
                state = model.flatten_state(state)
            for x, y in cols.windows(eval_chunk_len(batch_size, model.ntoken), drop_last=False):
                logits, state = step(x[:, c0:c1], state)
                total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         y[:, c0:c1].reshape(-1), reduction="sum").double()
    return float(comm.sum([float(total)], kind="eval")[0]) / cols.num_tokens, cols.num_tokens


def _stepper(model: RNNLM, recurrence: Any, block_size: int | None) -> Any:
    """``(inputs, state) -> (logits, state)``: the model, or the exact parallel recurrence."""
    if recurrence is None:
        return model
    from .recurrence import RecurrenceStats, parallel_recur

    def step(x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, state = parallel_recur(model, x, state, recurrence, block_size, RecurrenceStats())
        return model.decode(out), state

    return step


def perplexity(loss: float) -> float:
    """exp(loss), inf on overflow or NaN."""
    if not math.isfinite(loss):
        return math.inf if loss > 0 else math.nan
    return math.exp(loss) if loss < 700 else math.inf
