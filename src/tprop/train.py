"""Training runs: the one entry point that starts or resumes a run, for every caller.

``run_training`` serves the command line, the Python API (:func:`train`, :func:`resume`),
one rank of a ``torchrun`` job and ``tprop train --nproc`` (which relaunches under torchrun):
it picks the communication strategy (one process, or the process group torchrun describes),
has rank 0 decide the configuration (a new run or a resumed one), builds the trainer of the
method on every rank, restores the checkpoint when resuming, and trains.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bptt import BPTTTrainer
from .btprop import BTPROPTrainer
from .checkpoint import load_checkpoint
from .comm import LOCAL, LocalComm
from .config import RESUMABLE, ConfigError, TrainConfig, flag_of, make_config
from .data import Corpus
from .fmt import fmt_ppl
from .rundir import RunDir
from .trainer import Diverged, Trainer

__all__ = ["TRAINERS", "Diverged", "Trainer", "make_trainer", "resume", "resume_trainer",
           "run_training", "train"]

# method -> trainer class: the registry (a new method adds its line here)
TRAINERS: dict[str, Callable[..., Trainer]] = {
    "bptt": BPTTTrainer, "pm": BTPROPTrainer, "admm": BTPROPTrainer, "alm": BTPROPTrainer}


def make_trainer(cfg: TrainConfig, run_dir: str | Path | None = None,
                 corpus: Corpus | None = None, comm: LocalComm = LOCAL) -> Trainer:
    """The trainer for ``cfg.method`` (every rank passes the same ``run_dir``; rank 0 alone
    writes there)."""
    try:
        cls = TRAINERS[cfg.method]
    except KeyError:
        raise ConfigError(f"--method: unknown method {cfg.method!r}") from None
    return cls(cfg, run_dir, corpus, comm)


# ----------------------------------------------------------------------------- deciding
def resumed_config(run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration of ``run_dir`` with ``overrides``, which may change only the
    fields that do not alter the trajectory (``RESUMABLE``)."""
    run = RunDir(run_dir)
    if not run.exists():
        raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.json)")
    bad = sorted(set(overrides) - set(RESUMABLE))
    if bad:
        raise ConfigError("--resume: cannot change "
                          f"{', '.join(flag_of(k) for k in bad)} of an existing run "
                          f"(only {', '.join(flag_of(k) for k in RESUMABLE)} may change)")
    return TrainConfig.from_dict(run.read_config()).replace(**overrides).validate()


def new_config(options: dict[str, Any], out: str | Path | None = None) -> TrainConfig:
    """A new run's configuration: a preset (optional), then ``options``; its directory
    (``out``, else the config's) must not hold a run already."""
    options = dict(options)
    cfg = make_config(options.pop("preset", None), **options)
    out = out if out is not None else cfg.out
    if out is not None and RunDir(out).exists():
        raise ConfigError(f"--out: {out} already holds a run; continue it with "
                          f"`tprop train --resume {out}` or choose another --out")
    return cfg


def _decide(options: dict[str, Any], resume: str | Path | None,
            out: str | Path | None) -> dict[str, Any]:
    if resume is not None:
        return {"cfg": resumed_config(resume, options).to_dict(), "out": str(resume)}
    cfg = new_config(options, out)
    where = out if out is not None else cfg.out
    return {"cfg": cfg.to_dict(), "out": None if where is None else str(where)}


def prepare(options: dict[str, Any], resume: str | Path | None = None,
            corpus: Corpus | None = None, comm: LocalComm = LOCAL,
            out: str | Path | None = None) -> Trainer:
    """The trainer of a new run (``options``: config fields, ``preset`` among them; its
    directory ``out`` or the config's ``out``) or of the run in ``resume`` continued from its
    ``last.pt`` (``options``: the fields to change), on every rank of ``comm``."""
    decided = comm.decide(lambda: _decide(options, resume, out), ConfigError)
    cfg, out = TrainConfig.from_dict(decided["cfg"]), decided["out"]
    trainer = make_trainer(cfg, out, corpus, comm)
    if resume is None:
        return trainer
    run = RunDir(resume)
    ckpt = comm.broadcast_object(load_checkpoint(run.last_ckpt)
                                 if comm.is_main and run.last_ckpt.is_file() else None)
    if ckpt is not None:
        trainer.restore(ckpt)
    if comm.is_main:
        run.truncate_metrics(trainer.epoch)
        if options:
            run.write_config(cfg.to_dict())
    return trainer


def resume_trainer(run_dir: str | Path, corpus: Corpus | None = None,
                   **overrides: Any) -> Trainer:
    """A trainer that continues the run in ``run_dir`` from its ``last.pt`` (one process)."""
    return prepare(overrides, run_dir, corpus)


# ----------------------------------------------------------------------------- running
def connect(options: dict[str, Any], resume: str | Path | None) -> LocalComm:
    """The communication strategy of this process: one process, or the process group a
    ``torchrun`` job describes in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return LOCAL
    from . import distributed

    return distributed.connect(options, resume)


def run_training(options: dict[str, Any], resume: str | Path | None = None,
                 corpus: Corpus | None = None, out: str | Path | None = None
                 ) -> dict[str, Any]:
    """Start (or with ``resume``, continue) a run and train it to the end; return its summary.

    ``options`` are config fields (``preset`` included; with ``resume`` only the fields that
    may change); ``out`` is a new run's directory when not the config's own ``out``. Inside a
    ``torchrun`` job every rank calls this with the same arguments.
    """
    comm = connect(options, resume)
    held: list[Trainer] = []

    def where() -> tuple[str | None, int]:
        t = held[0] if held else None
        return (str(t.run.path) if t is not None and t.run else None,
                t.epoch if t is not None else 0)

    try:
        with comm.guard(where):
            held.append(prepare(options, resume, corpus, comm, out))
            return _fit(held[0], resume)
    finally:
        comm.close()


def _fit(trainer: Trainer, resume: str | Path | None) -> dict[str, Any]:
    comm = trainer.comm
    if resume is not None:
        on = f" on {comm.world} ranks" if comm.world > 1 else ""
        trainer.log(f"resuming {resume} after epoch {trainer.epoch}{on}")
    elif trainer.run is not None:
        trainer.log(f"run directory: {trainer.run.path}")
    if comm.world > 1:
        trainer.log(f"distributed: {comm.world} ranks, backend {comm.backend}, "
                    f"--dist-timeout {comm.timeout_s:g} s")
    summary = trainer.fit()
    trainer.log(f"done ({summary['status']}): best valid ppl "
                f"{fmt_ppl(summary.get('best_valid_ppl'))} at epoch "
                f"{summary.get('best_epoch')}, test ppl {fmt_ppl(summary.get('test_ppl'))}")
    return summary


def train(cfg: TrainConfig, out: str | Path | None = None, corpus: Corpus | None = None
          ) -> dict[str, Any]:
    """Train a model as ``cfg`` says, writing a run directory at ``out`` (none when None);
    return the summary."""
    return run_training(cfg.to_dict(), corpus=corpus, out=out)


def resume(run_dir: str | Path, corpus: Corpus | None = None, **overrides: Any
           ) -> dict[str, Any]:
    """Continue the run in ``run_dir`` (``overrides``: ``epochs``, ``device``, ...)."""
    return run_training(overrides, resume=run_dir, corpus=corpus)
