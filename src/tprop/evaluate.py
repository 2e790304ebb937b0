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
    parallel recurrence instead: the same value to the solver's tolerance; on several ranks
    each stretch's blocks are then sharded along time.
    """
    cols = StreamColumns(data, batch_size)
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    chunk = eval_chunk_len(batch_size, model.ntoken)
    with eval_mode(model):
        if recurrence is not None:
            total += _exact_total(model, cols, chunk, comm, recurrence, block_size)
        else:
            c0, c1 = split(batch_size, comm.world)[comm.rank]
            if c1 > c0:
                state = model.init_state(c1 - c0)
                for x, y in cols.windows(chunk, drop_last=False):
                    logits, state = model(x[:, c0:c1], state)
                    total += _summed_ce(logits, y[:, c0:c1])
    return float(comm.sum([float(total)], kind="eval")[0]) / cols.num_tokens, cols.num_tokens


def _summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="sum").double()


def _exact_total(model: RNNLM, cols: StreamColumns, chunk: int, comm: LocalComm,
                 recurrence: Any, k: int) -> torch.Tensor:
    """This rank's summed cross entropy with the exact recurrence: every column, this rank's
    blocks of each stretch (a stretch with fewer blocks than ranks: rank 0 alone counts it)."""
    from .recurrence import RecurrenceStats, parallel_recur, time_shard

    total = torch.zeros((), dtype=torch.float64, device=cols.inputs.device)
    state = model.flatten_state(model.init_state(cols.batch_size))
    for x, y in cols.windows(chunk, drop_last=False):
        blocks = math.ceil(x.shape[0] / k)
        shard, a, e = None, 0, x.shape[0]
        if comm.world > 1 and blocks >= comm.world:
            shard = time_shard(comm, blocks)
            a, e = shard.first * k, min(x.shape[0], (shard.first + shard.count) * k)
        out, state = parallel_recur(model, x[a:e], state, recurrence, k, RecurrenceStats(),
                                    shard=shard)
        if shard is not None or comm.is_main:
            total += _summed_ce(model.decode(out), y[a:e])
    return total


def perplexity(loss: float) -> float:
    """exp(loss), inf on overflow or NaN."""
    if not math.isfinite(loss):
        return math.inf if loss > 0 else math.nan
    return math.exp(loss) if loss < 700 else math.inf
