"""Training runs: the epoch loop every method shares, and truncated BPTT.

``Trainer.fit`` owns what is common to all methods: the learning-rate schedule, validation,
early stopping, divergence bail-out, the run directory and its checkpoints, resuming.
A method subclasses ``Trainer`` and supplies ``train_epoch`` (and any state of its own
through ``method_state``/``load_method_state``). ``BPTTTrainer`` is truncated BPTT.
"""

from __future__ import annotations

import math
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import (
    encode_strings,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, TrainConfig
from .data import Corpus, StreamColumns, load_corpus
from .evaluate import evaluate, perplexity
from .models import RNNLM
from .optim import LRSchedule, build_optimizer, set_lr
from .rundir import RunDir
from .system import resolve_device, tune_allocator


class Diverged(RuntimeError):
    """Training produced a NaN loss or a perplexity above ``max_ppl``."""


def build_model(cfg: TrainConfig, ntoken: int) -> RNNLM:
    return RNNLM(ntoken, cfg.emsize, cfg.nhid, cfg.nlayers, cfg.model, cfg.dropout, cfg.tied,
                 cfg.init_range)


class Trainer(ABC):
    """One training run (any method): data, model, optimiser, schedule and the epoch loop.

    ``run_dir=None`` trains without writing files (for scripts, tests and benchmarks).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path | None = None,
        corpus: Corpus | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        tune_allocator()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.run = RunDir(run_dir) if run_dir is not None else None
        torch.manual_seed(cfg.seed)

        self.corpus = corpus if corpus is not None else load_corpus(
            cfg.dataset, cfg.data_dir, fmt=cfg.format)
        c = self.corpus
        self.train_data = c.train[: cfg.train_tokens].to(self.device)
        self.valid_data = c.valid[: cfg.eval_tokens].to(self.device)
        self.test_data = c.test[: cfg.eval_tokens].to(self.device)
        for split, data in (("valid", self.valid_data), ("test", self.test_data)):
            if data.numel() <= cfg.eval_batch_size:
                raise ConfigError(f"--eval-batch-size: the {split} split has only {data.numel()}"
                                  f" tokens, too few for {cfg.eval_batch_size} columns")
        self.ntoken = len(c.vocab)
        self.max_ppl = cfg.max_ppl if cfg.max_ppl is not None else 2.0 * self.ntoken

        self.model = build_model(cfg, self.ntoken).to(self.device)
        if cfg.dtype is not None:
            self.model.to(dtype=getattr(torch, cfg.dtype))
        self.schedule = LRSchedule(cfg.lr, cfg.lrshrink, cfg.tol, cfg.patience, cfg.lr_decay,
                                   cfg.lr_decay_start)
        self.setup()
        self.epoch = 0  # epochs completed
        self.wall_offset = 0.0  # seconds spent before a resume
        self.status = "running"
        self._best_in_memory: dict[str, torch.Tensor] | None = None
        if self.run is not None:  # only once everything above succeeded
            self.run.create()

    # --------------------------------------------------------------- per method
    @abstractmethod
    def setup(self) -> None:
        """Build the method's layout, optimiser(s) and state."""

    @abstractmethod
    def train_epoch(self, epoch: int, lr: float) -> dict[str, Any]:
        """Train one epoch; return at least ``train_loss`` (mean token cross entropy)
        and ``tokens`` (tokens trained on); other entries go to the epoch's metrics."""

    def method_state(self) -> dict[str, Any]:
        """Method-specific state for checkpoints (optimisers, free states, ...)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what ``method_state`` returned."""

    # --------------------------------------------------------------- helpers
    def log(self, line: str) -> None:
        tqdm.write(line, file=sys.stdout)
        if self.run is not None:
            self.run.log(line)

    def progress(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="upd", leave=False, dynamic_ncols=True,
                    disable=self.cfg.quiet, mininterval=0.5)

    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "method": self.cfg.method,
            "config": self.cfg.to_dict(),
            "model_config": self.model.config(),
            "model": self.model.state_dict(),
            "schedule": self.schedule.state_dict(),
            "method_state": self.method_state(),
            "rng": rng_state(),
            "wall_s": self.wall_offset,
            "vocab": encode_strings(self.corpus.vocab.itos),
            "format": self.corpus.format,
        }

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue from a checkpoint written by ``checkpoint_payload``."""
        self.model.load_state_dict(ckpt["model"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.load_method_state(ckpt["method_state"])
        self.epoch = ckpt["epoch"]
        self.wall_offset = ckpt["wall_s"]
        set_rng_state(ckpt["rng"])

    def evaluate_loss(self, data: torch.Tensor) -> float:
        """Mean token cross entropy over a split (distributed runs use rank 0's value)."""
        return evaluate(self.model, data, self.cfg.eval_batch_size)[0]

    def check_finite(self, loss: float, where: str) -> None:
        if not math.isfinite(loss) or perplexity(loss) > self.max_ppl:
            raise Diverged(f"{where}: loss {loss:.4g} (perplexity {perplexity(loss):.4g}) is NaN "
                           f"or above --max-ppl {self.max_ppl:g}")

    # --------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        """Train to the end (epochs, early stop or divergence); return the summary."""
        cfg, run = self.cfg, self.run
        if run is not None and self.epoch == 0:
            run.write_config(cfg.to_dict())
        start = time.perf_counter()
        last_row: dict[str, Any] = {}
        try:
            for epoch in range(self.epoch + 1, cfg.epochs + 1):
                if self.schedule.stop:
                    break
                t0 = time.perf_counter()
                lr = self.schedule.lr(epoch)
                stats = self.train_epoch(epoch, lr)
                train_s = time.perf_counter() - t0
                self.check_finite(stats["train_loss"], f"epoch {epoch} (training)")
                valid_loss = self.evaluate_loss(self.valid_data)
                self.check_finite(valid_loss, f"epoch {epoch} (validation)")
                row = {
                    "epoch": epoch, "lr": lr, "train_loss": stats["train_loss"],
                    "train_ppl": perplexity(stats["train_loss"]),
                    "valid_loss": valid_loss, "valid_ppl": perplexity(valid_loss),
                }
                if cfg.eval_train:
                    tl = self.evaluate_loss(self.train_data)
                    row["train_eval_ppl"] = perplexity(tl)
                row.update({k: v for k, v in stats.items() if k not in ("train_loss", "tokens")})
                row["tokens_per_s"] = stats["tokens"] / max(train_s, 1e-9)
                row["train_s"] = train_s
                row["epoch_s"] = time.perf_counter() - t0
                self.wall_offset += row["epoch_s"]
                row["wall_s"] = self.wall_offset
                is_best = self.schedule.step(epoch, row["valid_ppl"])
                self.epoch = epoch
                last_row = row
                self.log(self.epoch_line(row, is_best))
                if run is not None:
                    run.append_metrics(row)
                    payload = self.checkpoint_payload()
                    if is_best:
                        save_checkpoint(run.best_ckpt, payload)
                    save_checkpoint(run.last_ckpt, payload)
                elif is_best:
                    self._best_in_memory = {k: v.detach().clone()
                                            for k, v in self.model.state_dict().items()}
            self.status = "early-stopped" if self.schedule.stop else "finished"
        except Diverged as e:
            self.status = "diverged"
            kept = (f" The best checkpoint so far is kept ({run.best_ckpt})."
                    if run is not None and run.best_ckpt.is_file() else
                    " No epoch finished, so there is no checkpoint." if self.epoch == 0 else "")
            self.log(f"stopping: training diverged at {e}.{kept}")
        except KeyboardInterrupt:
            self.status = "interrupted"
            if run is not None:
                self.log(f"interrupted; continue with: tprop train --resume {run.path}")
            raise
        finally:
            if self.status == "running":
                self.status = "failed"
        summary = self.summarize(last_row, time.perf_counter() - start)
        if run is not None:
            run.write_summary(summary)
        return summary

    def summarize(self, last_row: dict[str, Any], session_s: float) -> dict[str, Any]:
        """Summary of the run; the best checkpoint's test perplexity is measured here."""
        best_state = None
        if self.run is not None and self.run.best_ckpt.is_file():
            best_state = load_checkpoint(self.run.best_ckpt)["model"]
        elif self._best_in_memory is not None:
            best_state = self._best_in_memory
        test_ppl = valid_ppl = None
        if best_state is not None:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(best_state)
            test_ppl = perplexity(evaluate(self.model, self.test_data, self.cfg.eval_batch_size)[0])
            self.model.load_state_dict(current)
            valid_ppl = self.schedule.best
        rows = self.run.read_metrics() if self.run is not None else [last_row]
        best_row = next((r for r in rows if r.get("epoch") == self.schedule.best_epoch), {})
        return {
            "status": self.status,
            "method": self.cfg.method,
            "best_valid_ppl": valid_ppl,
            "best_epoch": self.schedule.best_epoch or None,
            "test_ppl": test_ppl,
            "train_ppl_at_best": best_row.get("train_ppl"),
            "epochs_run": self.epoch,
            "final_lr": self.schedule.lr(max(self.epoch, 1)),
            "wall_s": self.wall_offset,
            "vocab_size": self.ntoken,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "train_tokens": int(self.train_data.numel()),
            "device": str(self.device),
        }

    def epoch_line_extra(self, row: dict[str, Any]) -> str:
        """Method-specific tail of the one-line epoch summary."""
        return ""

    def epoch_line(self, row: dict[str, Any], is_best: bool) -> str:
        extra = self.epoch_line_extra(row)
        return (f"epoch {row['epoch']:3d} | lr {row['lr']:.4g} | train loss {row['train_loss']:.3f}"
                f" ppl {row['train_ppl']:8.2f} | valid ppl {row['valid_ppl']:8.2f}"
                f"{' *' if is_best else '  '} | {row['tokens_per_s']:,.0f} tok/s"
                f" | {row['epoch_s']:.1f} s{extra}")


class BPTTTrainer(Trainer):
    """Truncated BPTT over ``batch_size`` stream columns and windows of ``bptt`` steps.

    The state is carried across windows but detached; the loss of a window is the mean
    token cross entropy; gradients of ``update_freq`` windows (all of them with
    ``full_batch``) are averaged into one update.
    """

    def setup(self) -> None:
        cfg = self.cfg
        try:
            self.columns = StreamColumns(self.train_data, cfg.batch_size)
        except ValueError as e:
            raise ConfigError(f"--batch-size: {e}") from None
        if self.columns.num_windows(cfg.bptt) < 1:
            raise ConfigError(f"--bptt: each of the {cfg.batch_size} columns holds only "
                              f"{self.columns.length} steps, fewer than one window of {cfg.bptt}")
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, cfg.lr)

    def method_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def train_epoch(self, epoch: int, lr: float) -> dict[str, Any]:
        cfg, model, opt = self.cfg, self.model, self.optimizer
        set_lr(opt, lr)
        model.train()
        params = [p for p in model.parameters()]
        nwin = self.columns.num_windows(cfg.bptt)
        accum = nwin if cfg.full_batch else cfg.update_freq
        state = model.init_state(cfg.batch_size)
        loss_sum = torch.zeros((), device=self.device)
        bar = self.progress(nwin, f"epoch {epoch}")
        t0, done = time.perf_counter(), 0
        opt.zero_grad(set_to_none=True)
        for w, (x, y) in enumerate(self.columns.windows(cfg.bptt)):
            group = min(accum, nwin - (w // accum) * accum)  # windows in this update
            state = model.detach_state(state)
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.view(-1, self.ntoken), y.reshape(-1))
            (loss / group if group > 1 else loss).backward()
            loss_sum += loss.detach()
            if (w + 1) % accum == 0 or w + 1 == nwin:
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if (w + 1) % 50 == 0 or w + 1 == nwin:
                mean = loss_sum.item() / (w + 1)
                self.check_finite(mean, f"epoch {epoch}, window {w + 1}")
                bar.update(w + 1 - done)
                done = w + 1
                tok_s = done * x.numel() / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{mean:.3f}", tok_s=f"{tok_s:,.0f}")
        bar.close()
        return {"train_loss": loss_sum.item() / nwin,
                "tokens": nwin * cfg.bptt * cfg.batch_size}


TRAINERS: dict[str, Callable[..., Trainer]] = {"bptt": BPTTTrainer}


def make_trainer(cfg: TrainConfig, run_dir: str | Path | None = None,
                 corpus: Corpus | None = None) -> Trainer:
    """The trainer for ``cfg.method``."""
    from . import btprop  # noqa: F401  (registers the block-TPROP methods)

    try:
        cls = TRAINERS[cfg.method]
    except KeyError:
        raise ConfigError(f"--method: unknown method {cfg.method!r}") from None
    return cls(cfg, run_dir, corpus)


def resume_trainer(run_dir: str | Path, corpus: Corpus | None = None,
                   **overrides: Any) -> Trainer:
    """A trainer that continues the run in ``run_dir`` from its ``last.pt``.

    ``overrides`` may change fields that do not alter the trajectory: ``epochs``,
    ``device``, ``quiet``, ``threads``, ``patience``, ``dist_timeout``.
    """
    run = RunDir(run_dir)
    if not run.exists():
        raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.json)")
    allowed = {"epochs", "device", "quiet", "threads", "patience", "dist_timeout"}
    bad = set(overrides) - allowed
    if bad:
        raise ConfigError(f"--resume: cannot change {', '.join(sorted(bad))} of an existing run")
    cfg = TrainConfig.from_dict(run.read_config()).replace(**overrides)
    trainer = make_trainer(cfg, run_dir, corpus)
    if run.last_ckpt.is_file():
        trainer.restore(load_checkpoint(run.last_ckpt))
        run.truncate_metrics(trainer.epoch)
    else:
        run.truncate_metrics(0)
    if overrides:
        run.write_config(cfg.to_dict())
    return trainer


def train(cfg: TrainConfig, out: str | Path | None = None, corpus: Corpus | None = None
          ) -> dict[str, Any]:
    """Train a model as ``cfg`` says, writing a run directory at ``out``; return the summary."""
    return make_trainer(cfg, out, corpus).fit()
