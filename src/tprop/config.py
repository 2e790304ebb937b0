"""The configuration of a training run: one flat dataclass, saved as ``config.json``.

Every field is declared once, with its metadata (:class:`Meta`): the flag that sets it, its
help text, the values it accepts, which methods read it, whether it is part of a run's
identity in a sweep, whether ``--resume`` may change it, its report header and the settings
view (solver, state terms, ...) it belongs to. The argument parser, the checks of
:meth:`TrainConfig.validate`, the resume whitelist, sweep identity, report columns and the
solvers' settings are all derived from it: adding a knob is one field plus its use.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

METHODS = ("bptt", "pm", "admm", "alm")
BTPROP_METHODS = ("pm", "admm", "alm")
OPTIMS = ("sgd", "adagrad", "adam", "rmsprop", "nag")
H_OPTIMS = ("sgd", "adagrad", "nag")
H_INITS = ("forward", "forward-parallel", "zero", "persist")
DEVICES = ("auto", "cpu", "cuda")
MODELS = ("rnn", "gru", "lstm", "diag-gru", "diag-lstm")  # tprop.models.CELLS
# constrained h-optimisation (tprop.constraints, docs/beyond.md)
PENALTIES = ("l2", "kl", "l2+kl")
KL_DIRECTIONS = ("target-pred", "pred-target")
STATE_CONSTRAINTS = ("none", "box", "l1")
DTYPES = ("float32", "float64")
PRECISIONS = ("fp32", "bf16", "fp16")  # tprop.precision
# the smallest --rec-tol the exact recurrence can meet when its states are rounded to a format
RESOLUTION = {"fp32": 0.0, "bf16": 1e-2, "fp16": 1e-3}
# exact parallel-in-time recurrence (tprop.recurrence, docs/parallel_time.md)
RECURRENCES = ("sequential", "jacobi", "newton", "quasi-newton")
WARM_STARTS = ("previous", "zero")
ON_UNCONVERGED = ("sequential", "continue", "error")
FORMATS = ("word", "ptb-char", "char")  # the tokenisations of tprop.data.corpus
SPLITS = ("train", "valid", "test")


# ============================================================================ field metadata
@dataclass(frozen=True)
class Meta:
    """What a configuration field is, for everything derived from it.

    ``kind``: ``int``, ``float``, ``str``, ``choice``, ``flag`` (a boolean switch) or ``bpu``
    (a number or ``all``); ``lo``/``hi`` bound numbers (``lo_open``: strictly above);
    ``optional``: None is accepted. ``methods``: the methods that read the field (None: all).
    ``identity``: part of what a run *is* (sweeps compare it); ``reported``: a report column
    when it varies (default: as ``identity``); ``resumable``: ``--resume`` may change it.
    """

    help: str
    kind: str = "str"
    group: str = "run"
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    lo: float | None = None
    lo_open: bool = False
    hi: float | None = None
    hi_open: bool = False
    optional: bool = False
    methods: tuple[str, ...] | None = None
    identity: bool = True
    reported: bool | None = None
    resumable: bool = False
    label: str | None = None
    view: tuple[str, ...] = ()
    show_default: bool = True


def _f(default: Any, help: str, **meta: Any) -> Any:
    return dataclasses.field(default=default, metadata={"meta": Meta(help, **meta)})


def _place(default: Any, help: str, **meta: Any) -> Any:
    """A field that says where or how a run is computed, not what it computes."""
    meta.setdefault("identity", False)
    meta.setdefault("reported", False)
    return _f(default, help, **meta)


# ============================================================================ presets
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


_BT = BTPROP_METHODS
_DUALS = ("admm", "alm")


@dataclass
class TrainConfig:
    """Everything that defines a training run."""

    # what to train
    method: str = _f("bptt", "training method", kind="choice", choices=METHODS)
    # data
    dataset: str | None = _f("ptb", "named corpus (see `tprop data list`)", group="data",
                             optional=True, metavar="NAME", label="corpus")
    data_dir: str | None = _place(None, "directory holding train.txt, valid.txt, test.txt "
                                  "(alone: your own corpus; with --dataset: where that corpus "
                                  "lies, and there only)", group="data", optional=True,
                                  metavar="DIR")
    format: str | None = _f(None, "tokenisation of --data-dir: word (default), ptb-char, "
                            "char (raw characters)", kind="choice", choices=FORMATS,
                            group="data", optional=True, show_default=False)
    train_tokens: int | None = _f(None, "use the first N training tokens only", kind="int",
                                  lo=1, optional=True, group="data", metavar="N")
    eval_tokens: int | None = _f(None, "use the first N tokens of valid and test only",
                                 kind="int", lo=1, optional=True, group="data", metavar="N")
    # model
    model: str = _f("lstm", "cell", kind="choice", choices=MODELS, group="model")
    emsize: int = _f(100, "embedding size", kind="int", lo=1, group="model", label="emb")
    nhid: int = _f(100, "hidden units per layer", kind="int", lo=1, group="model",
                   label="hidden")
    nlayers: int = _f(1, "layers", kind="int", lo=1, group="model")
    dropout: float = _f(0.0, "dropout", kind="float", lo=0, hi=1, hi_open=True, group="model")
    tied: bool = _f(False, "tie decoder and embedding weights", kind="flag", group="model")
    init_range: float = _f(0.1, "uniform init in ±R", kind="float", lo=0, lo_open=True,
                           group="model")
    # layout: K is the BPTT window and the TPROP block size (--bptt / --block-size)
    bptt: int = _f(10, "BPTT window / TPROP block length", kind="int", lo=1,
                   group="optimisation", metavar="K", label="K")
    batch_size: int = _f(32, "stream columns", kind="int", lo=1, group="optimisation",
                         metavar="B", methods=("bptt",), label="B")
    # optimisation
    optim: str = _f("adagrad", "optimiser; sgd is plain gradient descent", kind="choice",
                    choices=OPTIMS, group="optimisation")
    lr: float = _f(0.1, "learning rate", kind="float", lo=0, lo_open=True, group="optimisation")
    clip: float = _f(0.5, "gradient-norm clip, 0 disables", kind="float", lo=0,
                     group="optimisation", view=("solver",))
    update_freq: int = _f(1, "accumulate N windows' gradients per update", kind="int", lo=1,
                          group="optimisation", metavar="N", methods=("bptt",),
                          label="update freq")
    full_batch: bool = _f(False, "one update per epoch (all windows)", kind="flag",
                          group="optimisation", methods=("bptt",), label="full batch")
    # exact parallel-in-time recurrence (tprop.recurrence)
    recurrence: str = _f("sequential", "how a window's recurrence runs: sequential (the fused "
                         "kernel over the window), or its blocks of --block-size K solved in "
                         "parallel, exactly: jacobi (parallel shooting sweeps), newton (dense "
                         "block Jacobians and a parallel scan), quasi-newton (their diagonal)",
                         kind="choice", choices=RECURRENCES, group="recurrence",
                         view=("recurrence",))
    block_size: int | None = _f(None, "a free state every K steps: BPTT's window (--bptt) is "
                                "cut into blocks of K for --recurrence jacobi|newton|"
                                "quasi-newton; with --method pm|admm|alm it is the block length "
                                "(the same setting as --bptt)", kind="int", lo=1, optional=True,
                                group="recurrence", metavar="K", methods=("bptt",),
                                label="block", show_default=False)
    rec_tol: float = _f(1e-5, "converged when every residual |F_j(s_j) - s_(j+1)| is at most "
                        "this times max(1, |s_(j+1)|) (forward), and the adjoint's change at "
                        "most this times its size",
                        kind="float", lo=0, group="recurrence", methods=("bptt",),
                        label="tol", view=("recurrence",))
    rec_max_iters: int | None = _f(None, "most sweeps / Newton iterations per window, each way "
                                   "(default: enough to be exact, M - 1 for M blocks)",
                                   kind="int", lo=1, optional=True, group="recurrence",
                                   metavar="N", methods=("bptt",), label="max iters",
                                   view=("recurrence",), show_default=False)
    rec_damping: float = _f(1.0, "damping ω of each sweep or Newton step (s += ω δ)",
                            kind="float", lo=0, lo_open=True, hi=1, group="recurrence",
                            methods=("bptt",), label="ω", view=("recurrence",))
    rec_lm: float = _f(0.0, "Levenberg-Marquardt-style damping of the Newton Jacobians "
                       "(A / (1 + μ): 0 is Newton, large μ tends to Jacobi)", kind="float",
                       lo=0, group="recurrence", methods=("bptt",), label="μ",
                       view=("recurrence",))
    warm_start: str = _f("previous", "first guess of a window's free states: previous (the "
                         "solution of the same window in the previous epoch, zero at first) "
                         "or zero", kind="choice", choices=WARM_STARTS, group="recurrence",
                         methods=("bptt",), view=("recurrence",))
    credit_blocks: int | str = _f("all", "credit assignment horizon: the adjoint's sweeps; "
                                  "credit travels c+1 blocks back (-1: truncated BPTT with "
                                  "window K; all: the exact full window)", kind="credit",
                                  group="recurrence", metavar="c|all", methods=("bptt",),
                                  label="credit", view=("recurrence",))
    on_unconverged: str = _f("sequential", "a window that has not converged within "
                             "--rec-max-iters: finish it sequentially (exact), continue with "
                             "the states reached, or stop with an error", kind="choice",
                             choices=ON_UNCONVERGED, group="recurrence", methods=("bptt",),
                             view=("recurrence",))
    jacobian_chunk: int | None = _place(None, "blocks per Jacobian computation (memory bound "
                                        "of --recurrence newton; default: automatic)",
                                        kind="int", lo=1, optional=True, group="recurrence",
                                        metavar="N", methods=("bptt",), view=("recurrence",),
                                        show_default=False)
    # schedule and stopping
    epochs: int = _f(10, "epochs", kind="int", lo=1, group="schedule", identity=False,
                     reported=True, resumable=True)
    lrshrink: float = _f(1.0, "divide lr by this after --tol epochs without a better "
                         "validation perplexity; 1 disables annealing and stops the run "
                         "instead", kind="float", lo=1, group="schedule")
    tol: int = _f(2, "bad epochs tolerated", kind="int", lo=1, group="schedule")
    patience: int | None = _f(None, "stop after this many epochs without a new best, "
                              "whatever --lrshrink (default: off)", kind="int", lo=1,
                              optional=True, group="schedule", identity=False, reported=True,
                              resumable=True, show_default=False)
    lr_decay: float = _f(1.0, "fixed decay: multiply lr by this every epoch from "
                         "--lr-decay-start on (1: off)", kind="float", lo=0, lo_open=True,
                         hi=1, group="schedule")
    lr_decay_start: int = _f(1, "first decayed epoch", kind="int", lo=1, group="schedule",
                             metavar="EPOCH")
    max_ppl: float | None = _f(None, "stop when perplexity exceeds this (default 2 x "
                               "vocabulary size) or is NaN", kind="float", lo=1, lo_open=True,
                               optional=True, group="schedule", show_default=False)
    # block target propagation (methods pm, admm, alm)
    blocks_per_update: int | str = _f(32, "blocks per update; all = batch mode", kind="bpu",
                                      group="btprop", metavar="M|all", methods=_BT, label="M")
    h_steps: int = _f(10, "steps on Z per update", kind="int", lo=0, group="btprop",
                      metavar="H", methods=("pm", "admm"), label="h-steps", view=("solver",))
    h_lr: float = _f(1.0, "Z learning rate", kind="float", lo=0, lo_open=True, group="btprop",
                     methods=_BT, label="h-lr", view=("solver",))
    h_tol: float = _f(0.0, "stop h-steps when the Z-gradient norm is below this (0: never)",
                      kind="float", lo=0, group="btprop", methods=("pm", "admm"),
                      view=("solver",))
    h_clip: float = _f(0.0, "Z-gradient norm clip (0: off)", kind="float", lo=0,
                       group="btprop", methods=_BT, view=("solver",))
    h_optim: str = _f("adagrad", "Z optimiser", kind="choice", choices=H_OPTIMS,
                      group="btprop", methods=_BT, view=("solver",))
    h_init: str = _f("forward", "free-state initialisation per update", kind="choice",
                     choices=H_INITS, group="btprop", methods=_BT, label="h-init",
                     view=("solver",))
    theta_steps: int = _f(5, "steps on θ per update", kind="int", lo=1, group="btprop",
                          metavar="P", methods=("pm", "admm"), label="θ-steps",
                          view=("solver",))
    lam: float = _f(1.0, "penalty weight λ", kind="float", lo=0, lo_open=True, group="btprop",
                    flag="--lambda", methods=_BT, label="λ", view=("solver",))
    lambda_mult: float = _f(1.0, "multiply λ by this after each epoch", kind="float", lo=0,
                            lo_open=True, group="btprop", methods=_BT, view=("solver",))
    u_lr: float = _f(1.0, "dual step size ρ_u", kind="float", lo=0, lo_open=True,
                     group="btprop", methods=_DUALS, view=("solver",))
    u_clip: float = _f(0.0, "dual increment norm clip (0: off)", kind="float", lo=0,
                       group="btprop", methods=_DUALS, view=("solver",))
    u_start: int = _f(3, "first epoch with dual steps", kind="int", lo=1, group="btprop",
                      metavar="EPOCH", methods=_DUALS, view=("solver",))
    alm_max_steps: int = _f(10, "ALM joint steps per update", kind="int", lo=1,
                            group="btprop", methods=("alm",), view=("solver",))
    alm_grad_tol: float = _f(0.0, "stop ALM joint steps below this joint gradient norm "
                             "(0: never)", kind="float", lo=0, group="btprop",
                             methods=("alm",), view=("solver",))
    arctanh: bool = _f(False, "optimise w with z = tanh(w) on the bounded state coordinates "
                       "(keeps them in (-1, 1))", kind="flag", group="btprop", methods=_BT)
    # constrained h-optimisation (tprop.constraints); the defaults are the paper's objective
    penalty: str = _f("l2", "the term tying F_j to z_{j+1}: l2 (the squared distance), kl "
                      "(KL between the decoder's output distributions of z_{j+1} and F_j), "
                      "or both; ADMM/ALM duals attach to l2 only (docs/beyond.md)",
                      kind="choice", choices=PENALTIES, group="btprop", methods=_BT,
                      view=("terms",))
    kl_direction: str = _f("target-pred", "target-pred: KL(softmax g(z) || softmax g(F)); "
                           "pred-target: the other direction", kind="choice",
                           choices=KL_DIRECTIONS, group="btprop", methods=_BT,
                           label="KL direction", view=("terms",))
    kl_weight: float = _f(1.0, "weight of the KL term", kind="float", lo=0, lo_open=True,
                          group="btprop", methods=_BT, label="KL weight", view=("terms",))
    state_constraint: str = _f("none", "none; box: keep free states in the set the cell can "
                               "produce (tanh RNN/GRU: as --arctanh; LSTM: h = "
                               "sigmoid(w_o)*tanh(c), c free); l1: sparsity penalty "
                               "--l1-weight * |z|_1", kind="choice",
                               choices=STATE_CONSTRAINTS, group="btprop", methods=_BT,
                               label="states", view=("terms",))
    l1_weight: float = _f(0.0, "weight of the l1 penalty on the free states (needs "
                          "--state-constraint l1)", kind="float", lo=0, group="btprop",
                          methods=_BT, label="l1 weight", view=("terms",))
    positional_ppl: bool = _f(False, "record perplexity by position in the block",
                              kind="flag", group="btprop", methods=_BT, view=("solver",))
    chunk_blocks: int | None = _place(None, "blocks per recurrent call (memory bound; "
                                      "default: automatic)", kind="int", lo=1, optional=True,
                                      group="btprop", metavar="N", methods=_BT,
                                      show_default=False)
    # evaluation
    eval_batch_size: int = _f(10, "parallel columns for evaluation", kind="int", lo=1,
                              group="evaluation", metavar="B")
    eval_train: bool = _f(False, "also measure the training split's perplexity by evaluation "
                          "each epoch (train_eval_ppl)", kind="flag", group="evaluation")
    # run
    seed: int = _f(1, "random seed", kind="int", lo=-(2**63), hi=2**63 - 1)
    device: str = _place("auto", "auto: CUDA when available", kind="choice", choices=DEVICES,
                         resumable=True)
    threads: int | None = _place(None, "CPU threads for torch (default: torch's)", kind="int",
                                 lo=1, optional=True, resumable=True, show_default=False)
    dtype: str | None = _f(None, "precision of the parameters and free states (default: "
                           "torch's, float32)", kind="choice", choices=DTYPES, optional=True,
                           show_default=False)
    precision: str = _f("fp32", "mixed precision of the training forward passes (autocast; a "
                        "gradient scaler for fp16, BPTT only): parameters, optimiser state, free "
                        "states and losses stay float32, evaluation runs in float32",
                        kind="choice", choices=PRECISIONS)
    tensorboard: str | None = _place(None, "also write every metric of every epoch as "
                                     "TensorBoard events into DIR (needs the tensorboard "
                                     "package: pip install 'tprop[tensorboard]')",
                                     optional=True, metavar="DIR", resumable=True,
                                     show_default=False)
    dist_timeout: float = _place(120.0, "how long a rank waits for another before stopping "
                                 "with an error, in seconds", kind="float", lo=0,
                                 lo_open=True, group="distributed", metavar="SECONDS",
                                 resumable=True)
    out: str | None = _place(None, "run directory to create (default runs/<name>-<time>)",
                             optional=True, metavar="DIR", show_default=False)
    quiet: bool = _place(False, "no progress bar (epoch lines still print)", kind="flag",
                         resumable=True)
    preset: str | None = _place(None, "start from a named configuration (explicit flags "
                                "override it)", kind="choice", choices=tuple(PRESETS),
                                optional=True, show_default=False)

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
        for name, meta in META.items():
            problem = check_value(meta, getattr(self, name))
            if problem is not None:
                raise ConfigError(f"{flag_of(name)}: {problem} (got {getattr(self, name)!r})")
        self._check_combinations()
        return self

    def _check_combinations(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{flag_of(name)}: {what} (got {getattr(self, name)!r})")

        need(self.dataset is not None or self.data_dir is not None, "dataset",
             "give --dataset NAME or --data-dir DIR")
        need(not (self.tied and self.emsize != self.nhid), "tied",
             f"weight tying needs --emsize == --nhid ({self.emsize} != {self.nhid})")
        need(self.state_constraint != "l1" or self.l1_weight > 0, "l1_weight",
             "must be > 0 with --state-constraint l1")
        need(self.state_constraint == "l1" or self.l1_weight == 0, "l1_weight",
             "applies only with --state-constraint l1")
        need(not (self.penalty == "kl" and self.method in ("admm", "alm")), "penalty",
             f"'kl' alone has no squared distance for the duals of --method {self.method} to "
             "attach to; use 'l2+kl', or --method pm")
        need(self.recurrence == "sequential" or self.method == "bptt", "recurrence",
             "the exact parallel recurrence is an execution mode of --method bptt")
        need(self.recurrence == "sequential" or self.block_size is not None, "block_size",
             f"--recurrence {self.recurrence} needs --block-size K (a free state every K steps "
             f"of each --bptt window)")
        need(self.method != "bptt" or self.block_size is None or self.block_size <= self.bptt,
             "block_size", f"must be at most the window --bptt {self.bptt}")
        need(self.precision != "fp16" or self.method == "bptt", "precision",
             f"fp16 needs loss scaling, which the --method {self.method} solvers (several "
             "gradients per update) do not do: use bf16")
        need(self.precision == "fp32" or self.dtype != "float64", "precision",
             "mixed precision with --dtype float64 makes no sense: drop one of them")
        floor = RESOLUTION[self.precision]
        need(self.recurrence == "sequential" or self.rec_tol >= floor, "rec_tol",
             f"with --precision {self.precision} the solved states are rounded to about "
             f"{floor:g}: use --rec-tol {floor:g} or more, or --precision fp32")
        need(self.method == "bptt" or self.block_size in (None, self.bptt), "block_size",
             f"with --method {self.method} the block length is --bptt ({self.bptt}); give one "
             "of them")


# ============================================================================ derived views
META: dict[str, Meta] = {f.name: f.metadata["meta"] for f in fields(TrainConfig)}
DEFAULTS: dict[str, Any] = TrainConfig().to_dict()


def flag_of(name: str) -> str:
    """The command-line flag of field ``name`` (``lr_decay_start`` -> ``--lr-decay-start``)."""
    return META[name].flag or "--" + name.replace("_", "-")


def field_of(flag_or_key: str) -> str | None:
    """The field a flag (``--lambda``, ``--block-size``) or spec key (``lambda``) names."""
    key = flag_or_key.lstrip("-").replace("_", "-")
    for name, meta in META.items():
        if "--" + key in (flag_of(name), *meta.aliases, "--" + name.replace("_", "-")):
            return name
    return None


def applies(name: str, method: str) -> bool:
    """Whether ``method`` reads field ``name``."""
    methods = META[name].methods
    return methods is None or method in methods


RESUMABLE: tuple[str, ...] = tuple(n for n, m in META.items() if m.resumable)
NOT_IDENTITY: tuple[str, ...] = tuple(n for n, m in META.items() if not m.identity)
REPORTED: tuple[str, ...] = tuple(
    n for n, m in META.items() if (m.identity if m.reported is None else m.reported))


def label_of(name: str) -> str:
    """The report header of field ``name``."""
    return META[name].label or name


def view(name: str) -> tuple[str, ...]:
    """The fields of settings view ``name`` (``solver``, ``terms``), in declaration order."""
    return tuple(n for n, m in META.items() if name in m.view)


def view_class(view_name: str, class_name: str, doc: str, frozen: bool = False,
               **namespace: Any) -> type:
    """A dataclass holding the fields of a settings view, with the config's defaults;
    ``read(cfg)`` (and, unless ``namespace`` says otherwise, ``from_config(cfg)``) reads them
    off a ``TrainConfig`` (or anything with those fields)."""
    names = view(view_name)
    specs = [(n, Any, dataclasses.field(default=DEFAULTS[n])) for n in names]

    def read(cls: type, cfg: Any) -> Any:
        return cls(**{n: getattr(cfg, n) for n in names})

    namespace.setdefault("from_config", classmethod(read))
    namespace.update(read=classmethod(read), __doc__=doc)
    return dataclasses.make_dataclass(class_name, specs, frozen=frozen, namespace=namespace)


# ============================================================================ value checks
def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def check_value(meta: Meta, value: Any) -> str | None:
    """What is wrong with ``value`` for a field of this metadata, or None."""
    if value is None:
        return None if meta.optional else "a value is required"
    kind = meta.kind
    if kind == "flag":
        return None if isinstance(value, bool) else "expected true or false"
    if kind in ("choice", "str"):
        if not isinstance(value, str):
            return "expected a string"
        if kind == "choice" and value not in meta.choices:
            return f"one of {', '.join(meta.choices)}"
        return None
    if kind in ("bpu", "credit"):
        least = 1 if kind == "bpu" else -1
        if value == "all":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            return f"a number >= {least} or 'all'"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "expected a number"
    if kind == "int" and not isinstance(value, int):
        return "expected a whole number"
    if not math.isfinite(value):
        return "must be a finite number"
    return _range_problem(meta, value)


def _range_problem(meta: Meta, value: float) -> str | None:
    lo_ok = meta.lo is None or (value > meta.lo if meta.lo_open else value >= meta.lo)
    hi_ok = meta.hi is None or (value < meta.hi if meta.hi_open else value <= meta.hi)
    if lo_ok and hi_ok:
        return None
    if meta.lo is not None and meta.hi is not None:
        return (f"must be in {'(' if meta.lo_open else '['}{_num(meta.lo)}, "
                f"{_num(meta.hi)}{')' if meta.hi_open else ']'}")
    if meta.lo is not None:
        return f"must be {'>' if meta.lo_open else '>='} {_num(meta.lo)}"
    return f"must be {'<' if meta.hi_open else '<='} {_num(meta.hi)}"


def parse_value(meta: Meta, text: str) -> Any:
    """A command-line string as a field value; ValueError with the reason if it is not one."""
    if meta.kind in ("bpu", "credit") and text == "all":
        return text
    if meta.kind in ("int", "bpu", "credit"):
        try:
            value: Any = int(text)
        except ValueError:
            what = {"bpu": "a number >= 1 or 'all'", "credit": "a number >= -1 or 'all'"}.get(
                meta.kind, "a whole number")
            raise ValueError(f"expected {what}, got {text!r}") from None
    elif meta.kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    else:
        value = text
    problem = check_value(meta, value)
    if problem is not None:
        raise ValueError(f"{problem}, got {text}")
    return value


def make_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset's values, then ``overrides``; validated."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    values.update(overrides)
    if values.get("method", DEFAULTS["method"]) in BTPROP_METHODS and values.get("block_size"):
        if "bptt" not in overrides:  # --block-size K is BTPROP's block length: --bptt K
            values["bptt"] = values["block_size"]
        if values["bptt"] == values["block_size"]:
            values["block_size"] = None
    return TrainConfig.from_dict(values).validate()


def groups() -> dict[str, list[str]]:
    """Field names by argument group, in declaration order."""
    out: dict[str, list[str]] = {}
    for name, meta in META.items():
        out.setdefault(meta.group, []).append(name)
    return out


def describe_default(name: str) -> str:
    v = DEFAULTS[name]
    return "off" if v is False else _num(v) if not isinstance(v, str) else v


__all__: Sequence[str] = [
    "BTPROP_METHODS", "ConfigError", "DEFAULTS", "META", "METHODS", "Meta", "NOT_IDENTITY",
    "PRESETS", "REPORTED", "RESUMABLE", "TrainConfig", "applies", "check_value", "field_of",
    "flag_of", "groups", "label_of", "make_config", "parse_value", "view", "view_class",
]
