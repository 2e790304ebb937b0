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
from .checkpoint import decode_strings, load_checkpoint
from .comm import LOCAL, LocalComm
from .config import (
    META,
    RESUMABLE,
    ConfigError,
    TrainConfig,
    check_value,
    flag_of,
    make_config,
)
from .data import Corpus
from .errors import RunDirError
from .fmt import fmt_ppl
from .rundir import RunDir
from .trainer import Diverged, Trainer

__all__ = ["TRAINERS", "Diverged", "Trainer", "make_trainer", "prepare", "release", "resume",
           "resume_trainer", "run_training", "train"]

# method -> trainer class: the registry (a new method adds its line here)
TRAINERS: dict[str, Callable[..., Trainer]] = {
    "bptt": BPTTTrainer, "pm": BTPROPTrainer, "admm": BTPROPTrainer, "alm": BTPROPTrainer}


def make_trainer(cfg: TrainConfig, run_dir: str | Path | None = None,
                 corpus: Corpus | None = None, comm: LocalComm = LOCAL) -> Trainer:
    """The trainer for ``cfg.method`` (every rank passes the same ``run_dir``; rank 0 alone
    writes there, holding the directory's lock from the trainer's creation until
    :func:`release`, or until the trainer is freed: ``RunLocked`` when another process writes
    there)."""
    try:
        cls = TRAINERS[cfg.method]
    except KeyError:
        raise ConfigError(f"--method: unknown method {cfg.method!r}") from None
    return cls(cfg, run_dir, corpus, comm)


# ----------------------------------------------------------------------------- deciding
_DAMAGED = ("it was damaged or hand-edited: restore it from a copy, or undo the edit (the "
            "run's checkpoint last.pt holds the configuration it was trained with)")


def saved_config(run: RunDir) -> TrainConfig:
    """The configuration saved in ``run``'s ``config.json`` (a ``RunDirError`` naming the file
    and the field when it is damaged or was edited into something invalid)."""
    path = run.config_file
    saved = run.read_config()
    unknown = sorted(set(saved) - set(META))
    if unknown:
        raise RunDirError(f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(map(repr, unknown))}; {_DAMAGED}")
    for key, value in saved.items():
        problem = check_value(META[key], value)
        if problem is not None:
            raise RunDirError(f"{path}: {key!r} {problem} (got {value!r}); {_DAMAGED}")
    try:
        return TrainConfig.from_dict(saved).validate()
    except ConfigError as e:
        raise RunDirError(f"{path}: {e}; {_DAMAGED}") from None


def resumed_config(run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration of ``run_dir`` with ``overrides``, which may change only the
    fields that do not alter the trajectory (``RESUMABLE``)."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ConfigError(f"--resume: {run_dir} does not exist"
                          if not run.path.exists() else f"--resume: {run_dir} is not a directory")
    if not run.exists():
        raise ConfigError(f"--resume: {run_dir} is not a run directory (no config.json)")
    bad = sorted(set(overrides) - set(RESUMABLE))
    if bad:
        raise ConfigError("--resume: cannot change "
                          f"{', '.join(flag_of(k) for k in bad)} of an existing run "
                          f"(only {', '.join(flag_of(k) for k in RESUMABLE)} may change)")
    return saved_config(run).replace(**overrides).validate()


def new_config(options: dict[str, Any], out: str | Path | None = None) -> TrainConfig:
    """A new run's configuration: a preset (optional), then ``options``; its directory
    (``out``, else the config's) must not hold a run already."""
    options = dict(options)
    cfg = make_config(options.pop("preset", None), **options)
    out = out if out is not None else cfg.out
    if out is not None:
        _check_new_dir(out)
    return cfg


def _check_new_dir(out: str | Path) -> None:
    run = RunDir(out)
    if run.exists():
        raise ConfigError(f"--out: {out} already holds a run; continue it with "
                          f"`tprop train --resume {out}` or choose another --out")
    if run.path.is_dir():
        run.check_unlocked()


def _differences(ckpt_cfg: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The settings that define a trajectory on which a checkpoint's configuration and
    ``cfg`` differ (``--flag`` (checkpoint's value vs cfg's))."""
    out = []
    for key, value in ckpt_cfg.items():
        meta = META.get(key)
        if meta is None or not meta.identity or meta.resumable:
            continue
        if getattr(cfg, key) != value:
            out.append(f"{flag_of(key)} ({value!r} in the checkpoint, {getattr(cfg, key)!r} "
                       "in config.json)")
    return out


def check_checkpoint(run: RunDir, ckpt: dict[str, Any], cfg: TrainConfig,
                     overrides: dict[str, Any]) -> None:
    """Refuse (``RunDirError``) a ``last.pt`` that does not belong to the run configured in
    ``config.json`` (another method, model or trajectory), or ``--epochs`` below the epochs
    it has trained."""
    ckpt_path, cfg_path = run.last_ckpt, run.config_file
    if ckpt.get("method") != cfg.method:
        raise RunDirError(
            f"{cfg_path} says --method {cfg.method} but {ckpt_path} was written by --method "
            f"{ckpt.get('method')}: config.json was edited, or last.pt comes from another run; "
            f"set \"method\" back to {ckpt.get('method')!r}, or restore the run's own last.pt")
    diffs = _differences(ckpt["config"], cfg)
    if diffs:
        raise RunDirError(
            f"{ckpt_path} does not belong to the run configured in {cfg_path}: they differ in "
            f"{'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}. config.json was "
            "edited, or last.pt comes from another run: undo the edit, or restore the run's "
            "own last.pt")
    done = ckpt["epoch"]
    if isinstance(done, int) and cfg.epochs < done:
        if "epochs" in overrides:
            raise ConfigError(f"--epochs {cfg.epochs}: the run in {run.path} has already "
                              f"trained {done} epochs (its last.pt is after epoch {done}); "
                              f"give --epochs {done + 1} or more to train it further, or leave "
                              "--epochs out")
        raise RunDirError(f"{cfg_path}: \"epochs\" is {cfg.epochs} but {ckpt_path} is after "
                          f"epoch {done}; {_DAMAGED}")


def check_fits(trainer: Trainer, ckpt: dict[str, Any], run: RunDir) -> None:
    """Refuse (``RunDirError``) a checkpoint whose model or vocabulary is not the trainer's."""
    path = run.last_ckpt
    vocab = decode_strings(ckpt["vocab"])
    itos = trainer.corpus.vocab.itos
    if vocab != itos:
        raise RunDirError(
            f"{path} was trained on a corpus with another vocabulary ({len(vocab):,} types) "
            f"than the one found now for this run ({len(itos):,} types, at "
            f"{trainer.corpus.path}): the corpus files changed, or --data-dir points elsewhere "
            "than when the run started; restore the corpus it was trained on")
    mine = trainer.model.config()
    theirs = ckpt["model_config"]
    diffs = [f"{k} {theirs.get(k)!r} in the checkpoint, {v!r} here" for k, v in mine.items()
             if theirs.get(k) != v]
    if diffs:
        raise RunDirError(f"{path} holds another model than this run builds ({'; '.join(diffs)})"
                          ": it comes from another run; restore the run's own last.pt")
    state = trainer.model.state_dict()
    problems = sorted(set(state) ^ set(ckpt["model"]))
    problems += [k for k in state if k in ckpt["model"]
                 and tuple(ckpt["model"][k].shape) != tuple(state[k].shape)]
    if problems:
        raise RunDirError(f"{path} holds parameters that do not fit this run's model ("
                          f"{', '.join(problems[:4])}): it comes from another run or another "
                          "version of tprop; restore the run's own last.pt")


def restore(trainer: Trainer, ckpt: dict[str, Any], run: RunDir) -> None:
    """Restore ``ckpt`` into ``trainer``; what does not fit becomes a ``RunDirError``."""
    try:
        trainer.restore(ckpt)
    except ConfigError:
        raise
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = f"{type(e).__name__}: {reason[:160]}".rstrip(": ")
        raise RunDirError(f"{run.last_ckpt} does not fit this run ({reason}): it comes from "
                          f"another run or another version of tprop, or its config.json was "
                          "edited; restore the run's own last.pt and config.json") from None


def _decide(options: dict[str, Any], resume: str | Path | None,
            out: str | Path | None) -> dict[str, Any]:
    if resume is not None:
        run = RunDir(resume)
        run.check_unlocked()
        cfg = resumed_config(resume, options)
        ckpt = load_checkpoint(run.last_ckpt) if run.last_ckpt.is_file() else None
        if ckpt is not None:
            check_checkpoint(run, ckpt, cfg, options)
        return {"cfg": cfg.to_dict(), "out": str(resume), "ckpt": ckpt}
    cfg = new_config(options, out)
    where = out if out is not None else cfg.out
    return {"cfg": cfg.to_dict(), "out": None if where is None else str(where)}


def prepare(options: dict[str, Any], resume: str | Path | None = None,
            corpus: Corpus | None = None, comm: LocalComm = LOCAL,
            out: str | Path | None = None) -> Trainer:
    """The trainer of a new run (``options``: config fields, ``preset`` among them; its
    directory ``out`` or the config's ``out``) or of the run in ``resume`` continued from its
    ``last.pt`` (``options``: the fields to change), on every rank of ``comm``.

    Rank 0 holds the run directory's lock from the trainer's creation on (:func:`release`
    gives it up). A run directory another process writes, a damaged or foreign
    ``config.json`` or ``last.pt`` are refused before anything in the directory changes (but
    for the temporary files interrupted writes left, which the lock's holder removes)."""
    decided = comm.decide(lambda: _decide(options, resume, out), ConfigError)
    cfg, out = TrainConfig.from_dict(decided["cfg"]), decided["out"]
    trainer = make_trainer(cfg, out, corpus, comm)
    try:
        if resume is None:
            if out is not None:  # another run may have started there meanwhile
                comm.decide(lambda: _recheck_new(out), ConfigError)
            return trainer
        run = RunDir(resume)
        ckpt = decided.get("ckpt")
        if ckpt is not None:
            comm.decide(lambda: check_fits(trainer, ckpt, run), ConfigError)
            restore(trainer, ckpt, run)
        if comm.is_main:
            run.truncate_metrics(trainer.epoch)
            if options:
                run.write_config(cfg.to_dict())
    except BaseException:
        release(trainer)
        raise
    return trainer


def _recheck_new(out: str | Path) -> None:
    if RunDir(out).exists():
        raise ConfigError(f"--out: {out} already holds a run (started meanwhile by another "
                          f"process); continue it with `tprop train --resume {out}` or choose "
                          "another --out")


def release(trainer: Trainer | None) -> None:
    """Give up the trainer's run directory (its lock), if it holds one."""
    if trainer is not None and trainer.run is not None:
        trainer.run.unlock()


def resume_trainer(run_dir: str | Path, corpus: Corpus | None = None,
                   **overrides: Any) -> Trainer:
    """A trainer that continues the run in ``run_dir`` from its ``last.pt`` (one process); it
    holds the directory's lock until :func:`release` or until it is freed."""
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
        release(held[0] if held else None)
        comm.close()


def _fit(trainer: Trainer, resume: str | Path | None) -> dict[str, Any]:
    comm = trainer.comm
    if resume is not None:
        on = f" on {comm.world} ranks" if comm.world > 1 else ""
        trainer.log(f"resuming {resume} after epoch {trainer.epoch}{on}")
    elif trainer.run is not None:
        trainer.log(f"run directory: {trainer.run.path} ({describe_training(trainer.cfg)})")
    if comm.world > 1:
        trainer.log(f"distributed: {comm.world} ranks, backend {comm.backend}, "
                    f"--dist-timeout {comm.timeout_s:g} s")
    summary = trainer.fit()
    trainer.log(f"done ({summary['status']}): best valid ppl "
                f"{fmt_ppl(summary.get('best_valid_ppl'))} at epoch "
                f"{summary.get('best_epoch')}, test ppl {fmt_ppl(summary.get('test_ppl'))}")
    return summary


def describe_training(cfg: TrainConfig) -> str:
    """The method and its optimiser settings in a few words (the first log line of a run)."""
    text = f"method {cfg.method}, optim {cfg.optim}, lr {cfg.lr:g}"
    if cfg.method != "bptt":
        text += f", h-optim {cfg.h_optim}, h-lr {cfg.h_lr:g}"
    return text


def train(cfg: TrainConfig, out: str | Path | None = None, corpus: Corpus | None = None
          ) -> dict[str, Any]:
    """Train a model as ``cfg`` says, writing a run directory at ``out`` (none when None);
    return the summary."""
    return run_training(cfg.to_dict(), corpus=corpus, out=out)


def resume(run_dir: str | Path, corpus: Corpus | None = None, **overrides: Any
           ) -> dict[str, Any]:
    """Continue the run in ``run_dir`` (``overrides``: ``epochs``, ``device``, ...)."""
    return run_training(overrides, resume=run_dir, corpus=corpus)
