"""Perplexity over a whole split, the state carried through it and nothing truncated."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data.layout import StreamColumns
from .models import RNNLM


def eval_chunk_len(batch_size: int, vocab_size: int, budget: int = 1 << 24) -> int:
    """Steps per recurrent call so that one call's logits hold about ``budget`` floats."""
    return max(1, min(512, budget // max(1, batch_size * vocab_size)))


@torch.no_grad()
def evaluate(model: RNNLM, data: torch.Tensor, batch_size: int = 10) -> tuple[float, int]:
    """Mean token cross entropy (nats) over ``data`` and the number of predictions scored.

    The split is cut into ``batch_size`` columns (see ``StreamColumns``; at most
    ``batch_size - 1`` trailing predictions are left out) and each column is run from the
    zero state to its end with the state carried, in eval mode (no dropout).
    """
    was_training = model.training
    model.eval()
    cols = StreamColumns(data, batch_size)
    state = model.init_state(batch_size)
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    chunk = eval_chunk_len(batch_size, model.ntoken)
    for x, y in cols.windows(chunk, drop_last=False):
        logits, state = model(x, state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="sum").double()
    model.train(was_training)
    return total.item() / cols.num_tokens, cols.num_tokens


def perplexity(loss: float) -> float:
    """exp(loss), inf on overflow or NaN."""
    if not math.isfinite(loss):
        return math.inf if loss > 0 else math.nan
    return math.exp(loss) if loss < 700 else math.inf
