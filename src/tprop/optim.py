"""Optimisers by name, and the learning-rate schedule / stopping rule of a run."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch


def build_optimizer(params: Iterable[torch.Tensor], name: str, lr: float) -> torch.optim.Optimizer:
    """``sgd`` (plain gradient descent), ``adagrad``, ``adam``, ``rmsprop`` or ``nag``
    (SGD with Nesterov momentum 0.9)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "nag":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=1e-10)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"unknown optimiser {name!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class LRSchedule:
    """Learning rate across epochs, best validation perplexity, and when to stop.

    * fixed decay: the epoch-``e`` rate is ``base_lr * lr_decay ** max(0, e - lr_decay_start + 1)``;
    * annealing on plateau: after ``tol`` consecutive epochs without a new best validation
      perplexity, the rate is divided by ``lrshrink`` (and the count restarts);
    * stopping: with ``lrshrink == 1`` (no annealing) a run stops after ``tol`` such epochs;
      ``patience`` (when set) stops it after that many, whatever ``lrshrink`` is.
    """

    base_lr: float
    lrshrink: float = 1.0
    tol: int = 2
    patience: int | None = None
    lr_decay: float = 1.0
    lr_decay_start: int = 1
    shrink_factor: float = 1.0
    best: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    since_shrink: int = 0
    stop: bool = False

    def lr(self, epoch: int) -> float:
        """Learning rate for (1-based) ``epoch``."""
        decay = self.lr_decay ** max(0, epoch - self.lr_decay_start + 1)
        return self.base_lr * decay / self.shrink_factor

    def step(self, epoch: int, valid_ppl: float) -> bool:
        """Record an epoch's validation perplexity; True when it is a new best."""
        if valid_ppl < self.best:
            self.best, self.best_epoch = valid_ppl, epoch
            self.bad_epochs = self.since_shrink = 0
            return True
        self.bad_epochs += 1
        self.since_shrink += 1
        if self.patience is not None and self.bad_epochs >= self.patience:
            self.stop = True
        if self.since_shrink >= self.tol:
            if self.lrshrink > 1:
                self.shrink_factor *= self.lrshrink
                self.since_shrink = 0
            else:
                self.stop = True
        return False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
