"""Truncated back-propagation through time (``--method bptt``).

The stream is cut into ``batch_size`` columns walked in windows of ``bptt`` steps; the state
is carried across windows but detached; the loss of a window is the mean token cross
entropy; gradients of ``update_freq`` windows (all of them with ``full_batch``) are averaged
into one update. On several ranks the columns are shared out in contiguous groups and the
model is wrapped in ``DistributedDataParallel`` (the communication strategy's
``data_parallel``): each rank's loss is the mean over its columns and DDP averages the
gradients, which is the one-process gradient of the same B columns.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from .config import ConfigError
from .data import StreamColumns
from .optim import build_optimizer, set_lr
from .recurrence import RecurrenceSettings, RecurrenceStats, parallel_recur
from .trainer import Trainer


class BPTTTrainer(Trainer):
    """Truncated BPTT over ``batch_size`` stream columns and windows of ``bptt`` steps."""

    def setup(self) -> None:
        cfg, comm = self.cfg, self.comm
        try:
            self.columns = StreamColumns(self.train_data, cfg.batch_size)
        except ValueError as e:
            raise ConfigError(f"--batch-size: {e}") from None
        if self.columns.num_windows(cfg.bptt) < 1:
            raise ConfigError(f"--bptt: each of the {cfg.batch_size} columns holds only "
                              f"{self.columns.length} steps, fewer than one window of {cfg.bptt}")
        self.exact = (RecurrenceSettings.from_config(cfg) if cfg.recurrence != "sequential"
                      else None)
        if self.exact is not None and comm.world > 1:
            raise ConfigError(f"--recurrence {cfg.recurrence}: runs on one process (sharding "
                              "its blocks over ranks is not available yet)")
        self.warm: dict[int, dict[int, torch.Tensor]] = {}  # window -> unit -> solution
        if comm.world > 1:
            self.columns = self._column_group(self.columns)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, cfg.lr)
        self.step_module = comm.data_parallel(self.model)

    def _column_group(self, full: StreamColumns) -> StreamColumns:
        """This rank's contiguous group of B/P columns of the one-process layout."""
        b, p, r = self.cfg.batch_size, self.comm.world, self.comm.rank
        if b % p:
            raise ConfigError(f"--batch-size: {b} stream columns do not split evenly over {p} "
                              f"ranks; use a multiple of {p}")
        per = b // p
        cols = copy.copy(full)
        cols.inputs = full.inputs[:, r * per:(r + 1) * per]
        cols.targets = full.targets[:, r * per:(r + 1) * per]
        cols.batch_size = per
        return cols

    def method_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.warm:  # the exact recurrence's warm starts: resuming continues exactly
            out["warm"] = self.warm
        return out

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.warm = {int(w): {int(u): t.to(self.device) for u, t in sols.items()}
                     for w, sols in state.get("warm", {}).items()}

    def window_loss(self, w: int, x: torch.Tensor, y: torch.Tensor, state: Any,
                    solves: list[Any]) -> tuple[torch.Tensor, Any]:
        """One window's mean token cross entropy (differentiable) and its final state:
        the fused sequential kernel, or the exact parallel recurrence (its solves recorded in
        ``solves``)."""
        if self.exact is None:
            logits, state = self.step_module(x, state)
            return F.cross_entropy(logits.view(-1, self.ntoken), y.reshape(-1)), state
        model, cfg = self.model, self.cfg
        stats = RecurrenceStats()
        guesses = self.warm.get(w) if self.exact.warm_start == "previous" else None
        out, state = parallel_recur(model, x, state, self.exact, cfg.block_size, stats,
                                    model.draw_masks(*x.shape), guesses)
        if self.exact.warm_start == "previous":
            self.warm[w] = stats.solutions
        solves.extend(stats.records)
        logits = model.decode(out)
        return F.cross_entropy(logits.view(-1, self.ntoken), y.reshape(-1)), state

    def train_epoch(self, epoch: int, lr: float) -> dict[str, Any]:
        cfg, model, opt, comm = self.cfg, self.model, self.optimizer, self.comm
        set_lr(opt, lr)
        self.step_module.train()
        params = list(model.parameters())
        nwin = self.columns.num_windows(cfg.bptt)
        accum = nwin if cfg.full_batch else cfg.update_freq
        state = model.init_state(self.columns.batch_size)
        if self.exact is not None:
            state = model.flatten_state(state)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        bar = self.progress(nwin, f"epoch {epoch}")
        t0, done, updates, mean = time.perf_counter(), 0, 0, 0.0
        solves: list[Any] = []
        opt.zero_grad(set_to_none=True)
        for w, (x, y) in enumerate(self.columns.windows(cfg.bptt)):
            group = min(accum, nwin - (w // accum) * accum)  # windows in this update
            sync = (w + 1) % accum == 0 or w + 1 == nwin
            state = model.detach_state(state)
            with nullcontext() if sync else comm.no_sync(self.step_module):
                loss, state = self.window_loss(w, x, y, state, solves)
                (loss / group).backward()
            loss_sum += loss.detach()
            if sync:
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                updates += 1
                if comm.world > 1:  # what DDP all-reduced for this update
                    comm.bytes["theta"] += sum(p.numel() * p.element_size() for p in params)
            if (w + 1) % 50 == 0 or w + 1 == nwin:
                mean = float(comm.sum([float(loss_sum)])[0]) / comm.world / (w + 1)
                self.check_finite(mean, f"epoch {epoch}, window {w + 1}")
                bar.update(w + 1 - done)
                done = w + 1
                tok_s = done * x.numel() * comm.world / (time.perf_counter() - t0)
                extra = {} if not solves else {
                    "it": f"{solves[-1].fwd_iters}/{solves[-1].adj_iters}",
                    "res": f"{solves[-1].fwd_residual:.1e}"}
                bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{tok_s:,.0f}", **extra)
        bar.close()
        out = {"train_loss": mean, "tokens": nwin * cfg.bptt * cfg.batch_size,
               "updates": updates}
        if self.exact is not None:
            out.update(solve_metrics(solves))
        return out

    def epoch_line_extra(self, row: dict[str, Any]) -> str:
        if self.exact is None:
            return ""
        return (f" | iters {row['fwd_iters_mean']:.1f}/{row['adj_iters_mean']:.1f}"
                f" res {row['fwd_residual_max']:.1e}")


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
