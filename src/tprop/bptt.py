"""Truncated back-propagation through time (``--method bptt``).

The stream is cut into ``batch_size`` columns walked in windows of ``bptt`` steps; the state
is carried across windows but detached; the loss of a window is the mean token cross
entropy; gradients of ``update_freq`` windows (all of them with ``full_batch``) are averaged
into one update. A window runs through the fused sequential kernel, or (``--recurrence``) the
exact parallel recurrence of ``tprop.exact``, which gives the same loss and gradient.

On several ranks, sequentially: the columns are shared out in contiguous groups and the
model is wrapped in ``DistributedDataParallel`` (the communication strategy's
``data_parallel``): each rank's loss is the mean over its columns and DDP averages the
gradients, which is the one-process gradient of the same B columns. With the exact
recurrence, the ranks are time shards of every window instead (``tprop.exact``).
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
from .exact import ExactWindows
from .optim import build_optimizer, set_lr
from .trainer import Trainer


def _carried(model: Any, state: Any) -> Any:
    """The state carried into the next window: detached, and in the parameters' precision
    (autocast may have computed it in a lower one)."""
    dtype = model.decoder.weight.dtype
    if isinstance(state, tuple):
        return tuple(s.detach().to(dtype) for s in state)
    return state.detach().to(dtype)


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
        self.exact = (ExactWindows(cfg, self.model, comm) if cfg.recurrence != "sequential"
                      else None)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, cfg.lr)
        self.step_module = self.model
        if comm.world > 1 and self.exact is None:  # data parallel over the columns
            self.columns = self._column_group(self.columns)
            self.step_module = comm.data_parallel(self.model)
        # each rank's loss is a mean over its columns (data parallel) or a part of the
        # window's mean (time shards): the window's loss is the sum over ranks / this
        self.loss_parts = comm.world if self.exact is None else 1

    def ranks_draw_alike(self) -> bool:
        return self.exact is not None  # time shards: the window's dropout masks, alike

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
        if self.exact is not None:  # its warm starts: resuming continues exactly
            out.update(self.exact.state_dict())
        return out

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.exact is not None:
            self.exact.load_state_dict(state, self.device)

    def window_loss(self, w: int, x: torch.Tensor, y: torch.Tensor, state: Any
                    ) -> tuple[torch.Tensor, Any]:
        """One window's mean token cross entropy (differentiable; on several ranks this
        rank's part of it) and its final state."""
        if self.exact is not None:
            return self.exact.loss(w, x, y, state)
        logits, state = self.step_module(x, state)
        return F.cross_entropy(logits.view(-1, self.ntoken), y.reshape(-1)), state

    def precise_window(self, w: int, x: torch.Tensor, y: torch.Tensor, state: Any
                       ) -> tuple[torch.Tensor, Any]:
        """:meth:`window_loss` under the run's precision (autocast)."""
        try:
            with self.precision.autocast():
                return self.window_loss(w, x, y, state)
        except RuntimeError as e:
            refusal = self.precision.refusal(e)
            if refusal is None:
                raise
            raise refusal from None

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
        opt.zero_grad(set_to_none=True)
        for w, (x, y) in enumerate(self.columns.windows(cfg.bptt)):
            group = min(accum, nwin - (w // accum) * accum)  # windows in this update
            sync = (w + 1) % accum == 0 or w + 1 == nwin
            state = _carried(model, state)
            with nullcontext() if sync else comm.no_sync(self.step_module):
                loss, state = self.precise_window(w, x, y, state)
                self.precision.backward(loss / group if group > 1 else loss)
            loss_sum += loss.detach()
            if sync:
                if self.exact is not None:
                    self.exact.reduce_grads(params)
                self.precision.unscale_(opt)
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                self.precision.step(opt)
                opt.zero_grad(set_to_none=True)
                updates += 1
                if comm.world > 1 and self.exact is None:  # what DDP all-reduced
                    comm.bytes["theta"] += sum(p.numel() * p.element_size() for p in params)
            if (w + 1) % 50 == 0 or w + 1 == nwin:
                mean = float(comm.sum([float(loss_sum)])[0]) / self.loss_parts / (w + 1)
                self.check_finite(mean, f"epoch {epoch}, window {w + 1}")
                bar.update(w + 1 - done)
                done = w + 1
                tok_s = done * x.numel() * self.loss_parts / (time.perf_counter() - t0)
                extra = self.exact.progress() if self.exact is not None else {}
                bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{tok_s:,.0f}", **extra)
        bar.close()
        out = {"train_loss": mean, "tokens": nwin * cfg.bptt * cfg.batch_size,
               "updates": updates}
        if self.exact is not None:
            out.update(self.exact.epoch_metrics())
        return out

    def epoch_line_extra(self, row: dict[str, Any]) -> str:
        if self.exact is None:
            return ""
        return (f" | iters {row['fwd_iters_mean']:.1f}/{row['adj_iters_mean']:.1f}"
                f" res {row['fwd_residual_max']:.1e}")

