"""The configuration of a training run: one flat dataclass, saved as ``config.json``.

Every field is a command-line flag of ``tprop train`` (``lr_decay_start`` is
``--lr-decay-start``), so a saved config reruns a run exactly. Presets are named sets of
field values; explicit flags override them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

METHODS = ("bptt", "pm", "admm", "alm")
BTPROP_METHODS = ("pm", "admm", "alm")
OPTIMS = ("sgd", "adagrad", "adam", "rmsprop", "nag")
H_OPTIMS = ("sgd", "adagrad", "nag")
H_INITS = ("forward", "forward-parallel", "zero", "persist")
DEVICES = ("auto", "cpu", "cuda")
# constrained h-optimisation (tprop.constraints, docs/beyond.md)
PENALTIES = ("l2", "kl", "l2+kl")
KL_DIRECTIONS = ("target-pred", "pred-target")
STATE_CONSTRAINTS = ("none", "box", "l1")
DTYPES = ("float32", "float64")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag and what it accepts."""


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    # what to train
    method: str = "bptt"
    # data
    dataset: str | None = "ptb"
    data_dir: str | None = None
    format: str | None = None
    train_tokens: int | None = None
    eval_tokens: int | None = None
    # model
    model: str = "lstm"
    emsize: int = 100
    nhid: int = 100
    nlayers: int = 1
    dropout: float = 0.0
    tied: bool = False
    init_range: float = 0.1
    # layout: K is the BPTT window and the TPROP block size (--bptt / --block-size)
    bptt: int = 10
    batch_size: int = 32
    # optimisation
    optim: str = "adagrad"
    lr: float = 0.1
    clip: float = 0.5
    update_freq: int = 1
    full_batch: bool = False
    # schedule and stopping
    epochs: int = 10
    lrshrink: float = 1.0
    tol: int = 2
    patience: int | None = None
    lr_decay: float = 1.0
    lr_decay_start: int = 1
    max_ppl: float | None = None
    # block target propagation (methods pm, admm, alm)
    blocks_per_update: int | str = 32
    h_steps: int = 10
    h_lr: float = 1.0
    h_tol: float = 0.0
    h_clip: float = 0.0
    h_optim: str = "adagrad"
    h_init: str = "forward"
    theta_steps: int = 5
    lam: float = 1.0
    lambda_mult: float = 1.0
    u_lr: float = 1.0
    u_clip: float = 0.0
    u_start: int = 3
    alm_max_steps: int = 10
    alm_grad_tol: float = 0.0
    arctanh: bool = False
    # constrained h-optimisation (tprop.constraints); the defaults are the paper's objective
    penalty: str = "l2"
    kl_direction: str = "target-pred"
    kl_weight: float = 1.0
    state_constraint: str = "none"
    l1_weight: float = 0.0
    positional_ppl: bool = False
    chunk_blocks: int | None = None
    # evaluation
    eval_batch_size: int = 10
    eval_train: bool = False
    # run
    seed: int = 1
    device: str = "auto"
    threads: int | None = None
    dtype: str | None = None  # parameters and free states; None: torch's default (float32)
    dist_timeout: float = 120.0  # seconds a rank waits for another (distributed runs)
    out: str | None = None
    quiet: bool = False
    preset: str | None = None

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def validate(self) -> TrainConfig:
        """Raise ConfigError for any out-of-range value; return self."""

        def need(ok: bool, flag: str, what: str) -> None:
            if not ok:
                key = flag.lstrip("-").replace("-", "_")
                val = getattr(self, {"lambda": "lam"}.get(key, key), None)
                raise ConfigError(f"{flag}: {what} (got {val!r})")

        need(self.method in METHODS, "--method", f"one of {', '.join(METHODS)}")
        need(self.dataset is not None or self.data_dir is not None, "--dataset",
             "give --dataset NAME or --data-dir DIR")
        need(self.model in ("rnn", "gru", "lstm"), "--model", "one of rnn, gru, lstm")
        for name in ("emsize", "nhid", "nlayers", "bptt", "batch_size", "update_freq", "epochs",
                     "tol", "eval_batch_size", "lr_decay_start"):
            need(getattr(self, name) >= 1, "--" + name.replace("_", "-"), "must be >= 1")
        for name in ("train_tokens", "eval_tokens", "patience", "threads"):
            v = getattr(self, name)
            need(v is None or v >= 1, "--" + name.replace("_", "-"), "must be >= 1")
        need(0.0 <= self.dropout < 1.0, "--dropout", "must be in [0, 1)")
        need(not (self.tied and self.emsize != self.nhid), "--tied",
             f"weight tying needs --emsize == --nhid ({self.emsize} != {self.nhid})")
        need(self.init_range > 0 and math.isfinite(self.init_range), "--init-range",
             "must be > 0")
        need(self.optim in OPTIMS, "--optim", f"one of {', '.join(OPTIMS)}")
        need(self.lr > 0 and math.isfinite(self.lr), "--lr", "must be > 0")
        need(self.clip >= 0, "--clip", "must be >= 0 (0 disables clipping)")
        need(self.lrshrink >= 1, "--lrshrink", "must be >= 1 (1 disables annealing)")
        need(0 < self.lr_decay <= 1, "--lr-decay", "must be in (0, 1]")
        need(self.max_ppl is None or self.max_ppl > 1, "--max-ppl", "must be > 1")
        need(self.device in DEVICES, "--device", f"one of {', '.join(DEVICES)}")
        # block target propagation
        bpu = self.blocks_per_update
        need(bpu == "all" or (isinstance(bpu, int) and not isinstance(bpu, bool) and bpu >= 1),
             "--blocks-per-update", "a number >= 1 or 'all'")
        for name in ("h_steps", "h_tol", "h_clip", "u_clip", "alm_grad_tol"):
            need(getattr(self, name) >= 0, "--" + name.replace("_", "-"), "must be >= 0")
        for name in ("theta_steps", "u_start", "alm_max_steps"):
            need(getattr(self, name) >= 1, "--" + name.replace("_", "-"), "must be >= 1")
        for name in ("h_lr", "u_lr", "lam", "lambda_mult"):
            v = getattr(self, name)
            flag = "--lambda" if name == "lam" else "--" + name.replace("_", "-")
            need(v > 0 and math.isfinite(v), flag, "must be > 0")
        need(self.h_optim in H_OPTIMS, "--h-optim", f"one of {', '.join(H_OPTIMS)}")
        need(self.h_init in H_INITS, "--h-init", f"one of {', '.join(H_INITS)}")
        need(self.chunk_blocks is None or self.chunk_blocks >= 1, "--chunk-blocks",
             "must be >= 1")
        need(self.penalty in PENALTIES, "--penalty", f"one of {', '.join(PENALTIES)}")
        need(self.kl_direction in KL_DIRECTIONS, "--kl-direction",
             f"one of {', '.join(KL_DIRECTIONS)}")
        need(self.kl_weight > 0 and math.isfinite(self.kl_weight), "--kl-weight", "must be > 0")
        need(self.state_constraint in STATE_CONSTRAINTS, "--state-constraint",
             f"one of {', '.join(STATE_CONSTRAINTS)}")
        need(self.l1_weight >= 0 and math.isfinite(self.l1_weight), "--l1-weight",
             "must be >= 0")
        need(self.state_constraint != "l1" or self.l1_weight > 0, "--l1-weight",
             "must be > 0 with --state-constraint l1")
        need(self.state_constraint == "l1" or self.l1_weight == 0, "--l1-weight",
             "applies only with --state-constraint l1")
        need(not (self.penalty == "kl" and self.method in ("admm", "alm")), "--penalty",
             f"'kl' alone has no squared distance for the duals of --method {self.method} to "
             "attach to; use 'l2+kl', or --method pm")
        need(self.dtype is None or self.dtype in DTYPES, "--dtype", f"one of {', '.join(DTYPES)}")
        need(self.dist_timeout > 0 and math.isfinite(self.dist_timeout), "--dist-timeout",
             "must be a positive number of seconds")
        return self


# Presets: named overrides of the defaults. Explicit flags win over a preset.
PRESETS: dict[str, dict[str, Any]] = {
    # The small PTB model of Zaremba et al. (2014): 2x200 LSTM, 20 steps, batch 20, init
    # ±0.1, SGD lr 1 halved every epoch after the 4th, clip 5, 13 epochs, no dropout. Their
    # loss sums the per-step cross entropy over the window (mean over the batch); tprop's is
    # the mean over tokens, so the same updates are lr 1*K = 20 and clip 5/K = 0.25.
    "zaremba-small": dict(
        dataset="ptb", model="lstm", emsize=200, nhid=200, nlayers=2, dropout=0.0,
        init_range=0.1, bptt=20, batch_size=20, optim="sgd", lr=20.0, clip=0.25,
        lr_decay=0.5, lr_decay_start=5, lrshrink=1.0, tol=13, epochs=13, eval_batch_size=10,
    ),
    # A short PTB run (minutes on 2 CPU cores): the README's first command.
    "quick": dict(
        dataset="ptb", model="lstm", emsize=100, nhid=100, nlayers=1, bptt=20, batch_size=20,
        optim="sgd", lr=20.0, clip=0.25, lrshrink=4.0, tol=1, epochs=1,
        train_tokens=200_000, eval_tokens=20_000,
    ),
}


def make_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset's values, then ``overrides``; validated."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update(overrides)
    try:
        cfg = TrainConfig.from_dict(values)
    except TypeError as e:  # pragma: no cover - from_dict checks names first
        raise ConfigError(str(e)) from None
    return cfg.validate()
