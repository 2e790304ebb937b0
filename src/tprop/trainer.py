"""The epoch loop every method shares.

``Trainer.fit`` owns what is common to all methods: the learning-rate schedule, validation,
early stopping, divergence bail-out, the run directory and its checkpoints. A method
subclasses ``Trainer`` and supplies ``setup`` and ``train_epoch`` (and any state of its own
through ``method_state``/``load_method_state``): ``tprop.bptt`` and ``tprop.btprop``.

The run's communication strategy (``comm``, ``tprop.comm``) is the only thing that differs
between one process and several: rank 0 alone logs, shows progress and writes the run
directory; validation is shared out over the ranks and all-reduced, so every rank takes the
same learning-rate and stopping decisions.
"""

from __future__ import annotations

import math
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import encode_strings, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .comm import LOCAL, LocalComm
from .config import ConfigError, TrainConfig
from .data import Corpus, load_corpus
from .evaluate import evaluate, perplexity
from .models import RNNLM
from .optim import LRSchedule
from .precision import Precision
from .rundir import RunDir
from .system import resolve_device, tune_allocator

EXIT_USAGE = 2  # a user's mistake (flags, data, run directory)
EXIT_DIVERGED = 3  # a run that diverged (NaN or perplexity above --max-ppl)


class Diverged(RuntimeError):
    """Training produced a NaN loss or a perplexity above ``max_ppl``."""


def _scalars(row: dict[str, Any]) -> list[tuple[str, float]]:
    """The numbers of a metrics row: scalars as they are, lists by index (``key/1`` …)."""
    out = []
    for key, value in row.items():
        if isinstance(value, bool) or key == "epoch":
            continue
        if isinstance(value, (int, float)):
            out.append((key, float(value)))
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out += [(f"{key}/{i + 1}", float(v)) for i, v in enumerate(value)]
    return out


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
        comm: LocalComm = LOCAL,
    ) -> None:
        cfg.validate()
        self.comm = comm
        self.checkpointing = run_dir is not None  # every rank takes part in gathering state
        if not comm.is_main:
            cfg, run_dir = cfg.replace(quiet=True), None
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
        for p in self.model.parameters():  # every rank starts from rank 0's parameters
            comm.broadcast_(p.data, 0, kind="setup")
        self.schedule = LRSchedule(cfg.lr, cfg.lrshrink, cfg.tol, cfg.patience, cfg.lr_decay,
                                   cfg.lr_decay_start)
        self.precision = Precision(cfg.precision, self.device)
        self.precision.probe(self.model)
        self._events: Any = None  # the TensorBoard writer, opened at the first epoch
        self.epoch = 0  # epochs completed
        self.setup()
        self.seed_rank()
        self.wall_offset = 0.0  # seconds spent before a resume
        self.status = "running"
        self._best_in_memory: dict[str, torch.Tensor] | None = None
        self._rows: list[dict[str, Any]] = []  # this session's metrics (runs without a dir)
        if self.run is not None:  # only once everything above succeeded
            self.run.create()

    # --------------------------------------------------------------- per method
    @abstractmethod
    def setup(self) -> None:
        """Build the method's layout, optimiser(s) and state."""

    @abstractmethod
    def train_epoch(self, epoch: int, lr: float) -> dict[str, Any]:
        """Train one epoch; return at least ``train_loss`` (mean token cross entropy),
        ``tokens`` (tokens trained on) and ``updates``; other entries go to the epoch's
        metrics."""

    def method_state(self) -> dict[str, Any]:
        """Method-specific state for checkpoints (optimisers, free states, ...). Called on
        every rank (it may gather sharded state); rank 0's is written."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what ``method_state`` returned."""

    def epoch_line_extra(self, row: dict[str, Any]) -> str:
        """Method-specific tail of the one-line epoch summary."""
        return ""

    # --------------------------------------------------------------- helpers
    def log(self, line: str) -> None:
        if not self.comm.is_main:
            return
        tqdm.write(line, file=sys.stdout)
        if self.run is not None:
            self.run.log(line)

    def progress(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="upd", leave=False, dynamic_ncols=True,
                    disable=self.cfg.quiet, mininterval=0.5)

    def ranks_draw_alike(self) -> bool:
        """Whether every rank must draw the same random numbers (else each its own)."""
        return False

    def seed_rank(self) -> None:
        """Ranks other than 0 draw their own dropout masks (unless they must draw alike)."""
        if self.ranks_draw_alike():
            return
        seed = self.comm.rank_seed(self.cfg.seed, self.epoch)
        if seed is not None:
            torch.manual_seed(seed)

    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "method": self.cfg.method,
            "config": self.cfg.to_dict(),
            "model_config": self.model.config(),
            "model": self.model.state_dict(),
            "schedule": self.schedule.state_dict(),
            "method_state": {**self.method_state(), **self.precision.state_dict()},
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
        self.precision.load_state_dict(ckpt["method_state"])
        self.epoch = ckpt["epoch"]
        self.wall_offset = ckpt["wall_s"]
        set_rng_state(ckpt["rng"])
        self.seed_rank()

    def divergence_hint(self) -> str:
        """What to try when a run diverges in its first epoch (the optimiser and its rate are
        the usual cause: tprop's default is the reference code's Adagrad, lr 0.1)."""
        if self.epoch > 0:
            return ""
        cfg = self.cfg
        hint = (f" The run used --optim {cfg.optim} --lr {cfg.lr:g} --clip {cfg.clip:g}: try a "
                "smaller --lr")
        if cfg.optim != "sgd":
            hint += (", or --optim sgd (plain SGD, as pytorch/examples' word_language_model "
                     "and Zaremba et al.: e.g. --optim sgd --lr 20 --clip 0.25)")
        return hint + "."

    def evaluate_loss(self, data: torch.Tensor) -> float:
        """Mean token cross entropy over a split (the same value on every rank)."""
        return evaluate(self.model, data, self.cfg.eval_batch_size, self.comm)[0]

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
        try:
            for epoch in range(self.epoch + 1, cfg.epochs + 1):
                if self.schedule.stop:
                    break
                self.run_epoch(epoch)
            self.status = "early-stopped" if self.schedule.stop else "finished"
        except Diverged as e:
            self.status = "diverged"
            kept = (f" The best checkpoint so far is kept ({run.best_ckpt})."
                    if run is not None and run.best_ckpt.is_file() else
                    " No epoch finished, so there is no checkpoint." if self.epoch == 0 else "")
            self.log(f"stopping: training diverged at {e}.{kept}{self.divergence_hint()}")
        except KeyboardInterrupt:
            self.status = "interrupted"
            if run is not None:
                self.log(f"interrupted; continue with: tprop train --resume {run.path}")
            raise
        finally:
            if self.status == "running":
                self.status = "failed"
        summary = self.summarize()
        if run is not None:
            run.write_summary(summary)
        if self._events is not None:
            self._events.close()
            self._events = None
        return summary

    def run_epoch(self, epoch: int) -> None:
        """Train, validate, log and checkpoint one epoch."""
        cfg, run = self.cfg, self.run
        t0 = time.perf_counter()
        lr = self.schedule.lr(epoch)
        self.comm.reset()
        stats = self.train_epoch(epoch, lr)
        exchanged = self.comm.bytes_row(stats.get("updates", 1))
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
            row["train_eval_ppl"] = perplexity(self.evaluate_loss(self.train_data))
        row.update({k: v for k, v in stats.items() if k not in ("train_loss", "tokens")})
        row.update(exchanged)
        row["tokens_per_s"] = stats["tokens"] / max(train_s, 1e-9)
        row["train_s"] = train_s
        row["epoch_s"] = time.perf_counter() - t0
        self.wall_offset += row["epoch_s"]
        row["wall_s"] = self.wall_offset
        is_best = self.schedule.step(epoch, row["valid_ppl"])
        self.epoch = epoch
        self._rows.append(row)
        self.log(self.epoch_line(row, is_best))
        self.write_events(row)
        if self.checkpointing:
            payload = self.checkpoint_payload()  # every rank: it may gather sharded state
            if run is not None:
                run.append_metrics(row)
                if is_best:
                    save_checkpoint(run.best_ckpt, payload)
                save_checkpoint(run.last_ckpt, payload)
        elif is_best:
            self._best_in_memory = {k: v.detach().clone()
                                    for k, v in self.model.state_dict().items()}

    def write_events(self, row: dict[str, Any]) -> None:
        """Every number of an epoch's metrics as a TensorBoard scalar (``--tensorboard``)."""
        if not self.cfg.tensorboard or not self.comm.is_main:
            return
        if self._events is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install "
                                  "'tprop[tensorboard]' (or pip install tensorboard)") from None
            self._events = SummaryWriter(self.cfg.tensorboard)
        for key, value in _scalars(row):
            self._events.add_scalar(key, value, row["epoch"])
        self._events.flush()

    def summarize(self) -> dict[str, Any]:
        """Summary of the run; the best checkpoint's test perplexity is measured here (on every
        rank, the evaluation being shared out); rank 0's is the run's."""
        best_state = None
        if self.checkpointing:
            best_state = self.comm.broadcast_object(
                load_checkpoint(self.run.best_ckpt)["model"]
                if self.run is not None and self.run.best_ckpt.is_file() else None)
        elif self._best_in_memory is not None:
            best_state = self._best_in_memory
        test_ppl = valid_ppl = None
        if best_state is not None:
            current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(best_state)
            test_ppl = perplexity(self.evaluate_loss(self.test_data))
            self.model.load_state_dict(current)
            valid_ppl = self.schedule.best
        if not self.comm.is_main:
            return {"status": self.status, "method": self.cfg.method,
                    "epochs_run": self.epoch, "rank": self.comm.rank}
        rows = self.run.read_metrics() if self.run is not None else self._rows
        best_row = next((r for r in rows if r.get("epoch") == self.schedule.best_epoch), {})
        summary = {
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
        if self.comm.world > 1:
            summary["world_size"] = self.comm.world
        return summary

    def epoch_line(self, row: dict[str, Any], is_best: bool) -> str:
        extra = self.epoch_line_extra(row)
        return (f"epoch {row['epoch']:3d} | lr {row['lr']:.4g} | train loss {row['train_loss']:.3f}"
                f" ppl {row['train_ppl']:8.2f} | valid ppl {row['valid_ppl']:8.2f}"
                f"{' *' if is_best else '  '} | {row['tokens_per_s']:,.0f} tok/s"
                f" | {row['epoch_s']:.1f} s{extra}")
