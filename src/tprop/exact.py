"""BPTT windows run by the exact parallel recurrence (``--recurrence jacobi|newton|...``).

``ExactWindows`` is the execution mode the BPTT trainer switches to: each window's loss and
gradient are sequential BPTT's (identity E2), computed by ``tprop.recurrence`` in blocks of
``--block-size``. On P ranks the blocks of every window are sharded along time (each rank a
contiguous run of blocks, ``time_shard``): a rank embeds, solves and decodes only its blocks'
tokens, its loss is its part of the window's mean, and the θ-gradients are summed over the
ranks. Every rank draws the window's dropout masks alike (the one-process masks) and takes the
same number of iterations (the convergence test is global). The warm starts (each window's
solution in the previous epoch) are kept per rank and gathered into checkpoints, so that a
run resumes exactly, on any number of ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .comm import split
from .recurrence import RecurrenceSettings, RecurrenceStats, Shard, parallel_recur, time_shard


class ExactWindows:
    """The loss of a BPTT window by the exact parallel recurrence, on this rank's blocks."""

    def __init__(self, cfg: Any, model: Any, comm: Any) -> None:
        self.cfg, self.model, self.comm = cfg, model, comm
        self.settings = RecurrenceSettings.from_config(cfg)
        self.k = cfg.block_size
        self.blocks = math.ceil(cfg.bptt / self.k)
        self.shard: Shard | None = time_shard(comm, self.blocks) if comm.world > 1 else None
        self.warm: dict[int, dict[int, torch.Tensor]] = {}  # window -> unit -> solution
        self.solves: list[Any] = []

    @property
    def steps(self) -> tuple[int, int]:
        """This rank's steps ``[a, e)`` of a window of ``--bptt`` steps."""
        if self.shard is None:
            return 0, self.cfg.bptt
        a = self.shard.first * self.k
        return a, min(self.cfg.bptt, (self.shard.first + self.shard.count) * self.k)

    def loss(self, w: int, x: torch.Tensor, y: torch.Tensor, state: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of window w's mean token cross entropy (differentiable; the parts
        sum to the window's loss) and the window's final flat state."""
        model, st = self.model, self.settings
        a, e = self.steps
        masks = model.draw_masks(*x.shape)  # the whole window's, alike on every rank
        if masks is not None and self.shard is not None:
            masks = type(masks)(masks.emb[a:e], [m[a:e] for m in masks.between], masks.out[a:e])
        stats = RecurrenceStats()
        guesses = self.warm.get(w) if st.warm_start == "previous" else None
        out, state = parallel_recur(model, x[a:e], state, st, self.k, stats, masks, guesses,
                                    self.shard)
        if st.warm_start == "previous":
            self.warm[w] = stats.solutions
        self.solves.extend(stats.records)
        logits = model.decode(out)
        loss = F.cross_entropy(logits.view(-1, model.ntoken), y[a:e].reshape(-1),
                               reduction="sum") / y.numel()
        return loss, state

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        """θ-gradients summed over the time shards (each rank's covers its blocks)."""
        if self.shard is not None:
            self.comm.reduce_grads_(params, 1.0)

    def epoch_metrics(self) -> dict[str, Any]:
        out = solve_metrics(self.solves)
        self.solves = []
        return out

    def progress(self) -> dict[str, str]:
        if not self.solves:
            return {}
        r = self.solves[-1]
        return {"it": f"{r.fwd_iters}/{r.adj_iters}", "res": f"{r.fwd_residual:.1e}"}

    # ------------------------------------------------------------------ warm starts
    def state_dict(self) -> dict[str, Any]:
        """The warm starts, whole (every rank's blocks, gathered to rank 0)."""
        if not self.warm:
            return {}
        if self.shard is None:
            return {"warm": self.warm}
        rows = [torch.arange(s, e) for s, e in split(self.blocks, self.comm.world)]
        windows = sorted(self.warm)
        full: dict[int, dict[int, torch.Tensor]] = {w: {} for w in windows}
        for u in sorted(self.warm[windows[0]]):
            local = torch.stack([self.warm[w][u] for w in windows], 1)  # (count, W, B, D)
            whole = self.comm.gather_rows(local.reshape(local.shape[0], -1), rows,
                                          self.blocks)
            if whole is not None:
                whole = whole.view(self.blocks, *local.shape[1:])
                for i, w in enumerate(windows):
                    full[w][u] = whole[:, i]
        return {"warm": full} if self.comm.is_main else {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        a, e = ((self.shard.first, self.shard.first + self.shard.count) if self.shard
                else (0, self.blocks))
        self.warm = {int(w): {int(u): t[a:e].to(device) for u, t in sols.items()}
                     for w, sols in state.get("warm", {}).items()}


def solve_metrics(solves: list[Any]) -> dict[str, Any]:
    """An epoch's solves of the exact recurrence: iterations (forward / adjoint: mean, max
    and how many solves took each count), the largest final residuals, the fallbacks."""
    n = max(len(solves), 1)
    fwd = [r.fwd_iters for r in solves]
    adj = [r.adj_iters for r in solves]

    def hist(values: list[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in sorted(values):
            out[str(v)] = out.get(str(v), 0) + 1
        return out

    return {
        "solves": len(solves),
        "fwd_iters_mean": sum(fwd) / n, "fwd_iters_max": max(fwd, default=0),
        "fwd_iters_hist": hist(fwd),
        "fwd_residual_max": max((r.fwd_residual for r in solves), default=0.0),
        "adj_iters_mean": sum(adj) / n, "adj_iters_max": max(adj, default=0),
        "adj_iters_hist": hist(adj),
        "adj_residual_max": max((r.adj_residual for r in solves), default=0.0),
        "fwd_fallbacks": sum(r.fwd_fallback for r in solves),
        "adj_fallbacks": sum(r.adj_fallback for r in solves),
        "blocks": max((r.blocks for r in solves), default=0),
    }
