"""One point of a sweep: what to do with its run directory (:func:`plan`), and doing it
(:func:`run_point`, a worker's job).

A run whose ``summary.json`` says finished, early-stopped or diverged is skipped, with or
without checkpoints (committed results have none) -- unless it finished all its epochs, the
spec now asks for more, and ``last.pt`` is there: then it is continued. A run with
``config.json`` but no such summary (interrupted, or failed in a previous sweep) is continued
from ``last.pt`` (restarted in place when there is none). A directory holding a run of
another configuration is left alone. A run that raises is recorded as failed, its traceback
in ``error.txt``.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import traceback
from pathlib import Path
from typing import Any

from .. import config as core_config
from ..config import DEFAULTS, make_config
from .expand import Point
from .spec import display_key

# Statuses of a summary.json that make a run done (never rerun).
DONE = ("finished", "early-stopped", "diverged")
# Config fields that may differ between a run directory and the spec without making the run
# another one (where it lies, how it is computed, how long it goes on): the configuration's
# non-identity fields, and the preset a run was started from.
NOT_IDENTITY: tuple[str, ...] = tuple(dict.fromkeys((*core_config.NOT_IDENTITY, "preset")))
# The numbers of a summary.json that a sweep's index keeps per run.
RESULT_KEYS = ("status", "best_valid_ppl", "best_epoch", "test_ppl", "train_ppl_at_best",
               "epochs_run", "wall_s")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _config_diff(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The identity fields on which a run directory's config and the spec's disagree."""
    want = make_config(**wanted).to_dict()
    diffs = []
    for k, v in want.items():
        if k in NOT_IDENTITY:
            continue
        if k in stored and stored[k] != v:
            diffs.append(f"{display_key(k)} {stored[k]!r} here, {v!r} in the spec")
    return diffs


def plan(point: Point, run_dir: Path) -> tuple[str, str]:
    """What to do with ``point`` in ``run_dir``: ``(action, note)``.

    Actions: ``skip`` (done), ``resume`` (continue the run there), ``new`` (start it),
    ``conflict`` (the directory holds another run: fail without touching it).
    """
    stored = _read_json(run_dir / "config.json")
    stored = stored if isinstance(stored, dict) else None
    diffs = _config_diff(stored, point.config) if stored is not None else []
    summary = _read_json(run_dir / "summary.json")
    if isinstance(summary, dict) and summary.get("status") in DONE:
        if diffs:
            return "skip", "kept, but its config differs from the spec: " + "; ".join(diffs)
        epochs = int(point.config.get("epochs", DEFAULTS["epochs"]))
        if (summary["status"] == "finished" and (summary.get("epochs_run") or 0) < epochs
                and (run_dir / "last.pt").is_file()):
            return "resume", f"continued to {epochs} epochs"
        return "skip", ""
    if stored is not None:
        if diffs:
            return "conflict", (f"{run_dir} holds a run with another config ("
                                + "; ".join(diffs) + "); delete it to start this one afresh")
        if (run_dir / "last.pt").is_file():
            epochs = int(point.config.get("epochs", DEFAULTS["epochs"]))
            trained = max((r.get("epoch", 0) for r in _metrics(run_dir)), default=0)
            if trained > epochs:
                return "skip", f"kept: it has trained {trained} epochs, the spec asks {epochs}"
            return "resume", "continued from last.pt"
        return "resume", "restarted (no checkpoint)"
    return "new", ""


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    from ..rundir import RunDir

    return RunDir(run_dir).read_metrics()


def summary_result(summary: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers of a ``summary.json`` that the sweep's index records (None where absent)."""
    s = summary or {}
    return {k: s.get(k) for k in RESULT_KEYS}


_CORPUS: dict[tuple, Any] = {}  # the last corpus a run of this process loaded


def _corpus(cfg: Any) -> Any:
    """The run's corpus, reused from the previous run of this process when it is the same."""
    from ..data import load_corpus

    key = (cfg.dataset, str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None, cfg.format)
    if key not in _CORPUS:
        _CORPUS.clear()
        _CORPUS[key] = load_corpus(cfg.dataset, cfg.data_dir, fmt=cfg.format)
    return _CORPUS[key]


def _train(task: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    from ..train import make_trainer, release, resume_trainer

    cfg = make_config(**task["config"])
    corpus = _corpus(cfg)
    if task["action"] == "resume":
        trainer = resume_trainer(run_dir, corpus=corpus, epochs=cfg.epochs, threads=cfg.threads,
                                 quiet=cfg.quiet, device=cfg.device, patience=cfg.patience)
    else:
        trainer = make_trainer(cfg, run_dir, corpus=corpus)
    try:
        return trainer.fit()
    finally:
        release(trainer)  # the run directory's lock


def _failure(e: Exception) -> dict[str, Any]:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return {"status": "failed", "error": f"{type(e).__name__}: {msg}".rstrip(": ")}


def run_point(task: dict[str, Any]) -> dict[str, Any]:
    """Run, resume or continue one point (a worker's job); never raises but on Ctrl-C.

    ``task``: ``dir``, ``config`` (make_config fields), ``action`` (``new``/``resume``),
    ``verbose`` (let the trainer's epoch lines through to stdout).
    """
    import torch

    from ..errors import RunLocked

    run_dir = Path(task["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    err_file = run_dir / "error.txt"
    threads_before = torch.get_num_threads()
    sink = contextlib.nullcontext() if task.get("verbose") else contextlib.redirect_stdout(
        io.StringIO())
    t0 = time.perf_counter()
    try:
        with sink:
            result = summary_result(_train(task, run_dir))
        err_file.unlink(missing_ok=True)  # an earlier failure of this run, now trained
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of one run is recorded, never fatal
        if not isinstance(e, RunLocked):  # the directory is another writer's: leave it be
            err_file.write_text(traceback.format_exc())
        result = _failure(e)
    finally:
        torch.set_num_threads(threads_before)
    result["session_s"] = time.perf_counter() - t0
    return result
