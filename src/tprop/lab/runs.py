"""Run directories as the report reads them: :class:`Run` (config, metrics, summary, error)
and the runs found under a folder (:func:`read_runs`), with what could not be read."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import BTPROP_METHODS, DEFAULTS, META, METHODS, REPORTED, applies
from ..fmt import finite
from .spec import field_key

# the fields the minibatch size is made of (BPTT: columns x update_freq or all; BTPROP: M)
MINIBATCH_KEYS = {"batch_size", "update_freq", "full_batch", "blocks_per_update"}
# report keys that are not config fields: the minibatch size, the corpus a run read
EXTRA_KEYS = ("minibatch", "corpus")
MARKERS = ("config.json", "summary.json", "point.json")


def canon(key: str) -> str:
    """The config field a report setting names (``lambda`` -> ``lam``), else the key itself
    (``minibatch``, ``corpus``)."""
    return field_key(key) or key.replace("-", "_")


@dataclass
class Unreadable:
    """A run directory the report cannot show: the file at fault and why."""

    path: Path
    reason: str


@dataclass
class Run:
    """What a run directory holds, and the numbers the report shows."""

    path: Path
    name: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    error: str | None = None
    # what is wrong with the directory's files (e.g. two processes wrote its metrics)
    warnings: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The run's training method."""
        return self.config.get("method", "bptt")

    def param(self, key: str) -> Any:
        """The effective value of ``key``: None where it does not apply to the method."""
        if key == "minibatch":
            return minibatch_size(self.config)
        if key == "corpus":  # the corpus folder's name (e.g. a sweep's synthetic corpus)
            d = self.config.get("data_dir")
            return Path(d).name if d else self.config.get("dataset")
        if key in META and not applies(key, self.method):
            return None
        return self.config.get(key)

    @property
    def status(self) -> str:
        """The summary's status, else failed, incomplete or not started."""
        if self.summary is not None:
            return str(self.summary.get("status"))
        if self.error is not None:
            return "failed"
        return "incomplete" if self.metrics else "not started"

    @property
    def plottable(self) -> bool:
        """Whether its numbers can be drawn (no warning makes them doubtful)."""
        return not self.warnings

    def _best_row(self) -> dict[str, Any]:
        e = self.best_epoch
        return next((r for r in self.metrics if r.get("epoch") == e), {})

    @property
    def best_epoch(self) -> int | None:
        """The epoch of the best validation perplexity."""
        if self.summary is not None and self.summary.get("best_epoch") is not None:
            return self.summary["best_epoch"]
        rows = [r for r in self.metrics if finite(r.get("valid_ppl"))]
        return min(rows, key=lambda r: r["valid_ppl"])["epoch"] if rows else None

    def value(self, key: str) -> float | None:
        """``train_ppl``, ``train_eval_ppl``, ``valid_ppl`` (best epoch's) or ``test_ppl``."""
        s = self.summary or {}
        if key == "valid_ppl":
            v = s.get("best_valid_ppl")
            return v if v is not None else self._best_row().get("valid_ppl")
        if key == "test_ppl":
            return s.get("test_ppl")
        if key == "train_ppl":
            v = s.get("train_ppl_at_best")
            return v if v is not None else self._best_row().get("train_ppl")
        if key == "train_eval_ppl":
            return self._best_row().get("train_eval_ppl")
        raise KeyError(key)

    @property
    def epochs_run(self) -> int | None:
        """How many epochs the run trained."""
        if self.summary is not None and self.summary.get("epochs_run") is not None:
            return self.summary["epochs_run"]
        return len(self.metrics) if self.metrics else None

    @property
    def wall_s(self) -> float | None:
        """The run's wall time in seconds."""
        if self.summary is not None and self.summary.get("wall_s") is not None:
            return self.summary["wall_s"]
        return self.metrics[-1].get("wall_s") if self.metrics else None


def minibatch_size(cfg: dict[str, Any]) -> int | str | None:
    """Sequences of K tokens per update: BPTT columns x update_freq (or 'all'), BTPROP M."""
    method = cfg.get("method", "bptt")
    if method == "bptt":
        if cfg.get("full_batch"):
            return "all"
        return int(cfg.get("batch_size", 32)) * int(cfg.get("update_freq", 1))
    if method in BTPROP_METHODS:
        return cfg.get("blocks_per_update")
    return None


# ----------------------------------------------------------------------------- reading
class _BadFile(Exception):
    """A file of a run directory that is there but cannot be read."""


def _read_json(path: Path) -> Any:
    """The JSON of ``path``; None when it is absent; _BadFile when it cannot be read."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise _BadFile(f"cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadFile(f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _BadFile(f"holds a {type(data).__name__}, not an object")
    return data


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash
                    break
    return rows


def metrics_problem(rows: list[dict[str, Any]]) -> str | None:
    """What is wrong with a ``metrics.jsonl``'s epochs (repeated or not increasing, as when
    two processes trained the run at once), or None."""
    epochs = [r.get("epoch") if isinstance(r, dict) else None for r in rows]
    if all(isinstance(e, int) for e in epochs) and all(a < b for a, b in zip(epochs, epochs[1:])):
        return None
    shown = ", ".join(str(e) for e in epochs[:12]) + (", ..." if len(epochs) > 12 else "")
    return (f"metrics.jsonl: epochs {shown} repeat or do not increase (two processes wrote "
            "this run?); its numbers are doubtful and it is left out of the plots")


def _config_of(d: Path) -> dict[str, Any] | Unreadable:
    """The run's config: ``config.json``, else the sweep's ``point.json`` (a run not started)."""
    for name in ("config.json", "point.json"):
        try:
            data = _read_json(d / name)
        except _BadFile as e:
            return Unreadable(d / name, str(e))
        if data is None:
            continue
        cfg = data if name == "config.json" else data.get("config")
        return cfg if isinstance(cfg, dict) else Unreadable(d / name, "has no config table")
    return Unreadable(d / "config.json", "is missing (the directory holds a summary.json)")


def _error_of(d: Path) -> str | None:
    if not (d / "error.txt").is_file():
        return None
    lines = [ln for ln in (d / "error.txt").read_text().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "failed"


def _read_run(d: Path, name: str) -> Run | Unreadable:
    """The run in ``d``, with warnings about its files; Unreadable without a config."""
    cfg = _config_of(d)
    if isinstance(cfg, Unreadable):
        return cfg
    warnings = []
    try:
        summary = _read_json(d / "summary.json")
    except _BadFile as e:
        summary = None
        warnings.append(f"summary.json {e}; the run is shown as if it had none")
    metrics = _read_metrics(d / "metrics.jsonl")
    problem = metrics_problem(metrics)
    if problem is not None:
        warnings.append(problem)
    return Run(d, name, {**DEFAULTS, **cfg}, metrics, summary, _error_of(d), warnings)


def read_runs(root: str | os.PathLike) -> tuple[list[Run], list[Unreadable]]:
    """Every run directory under ``root`` (recursively; ``root`` itself included), and those
    that could not be read (a corrupt ``config.json``, say)."""
    root = Path(root)
    dirs: set[Path] = set()
    for marker in MARKERS:
        dirs.update(p.parent for p in root.rglob(marker))
    runs: list[Run] = []
    unreadable: list[Unreadable] = []
    for d in sorted(dirs):
        run = _read_run(d, str(d.relative_to(root)) if d != root else d.name)
        if isinstance(run, Unreadable):
            unreadable.append(run)
        else:
            runs.append(run)
    return runs, unreadable


def load_runs(root: str | os.PathLike) -> list[Run]:
    """Every readable run directory under ``root`` (recursively; ``root`` itself included)."""
    return read_runs(root)[0]


# ----------------------------------------------------------------------------- varying keys
def sort_key(v: Any) -> tuple:
    """Orders values: None, the methods in their order, numbers, then the rest as text."""
    if v is None:
        return (0, 0, "")
    if isinstance(v, str) and v in METHODS:
        return (1, METHODS.index(v), v)
    if isinstance(v, (int, float)):
        return (2, float(v), "")
    return (3, 0, str(v))


def distinct(values: list[Any]) -> list[Any]:
    """The values other than None, once each, sorted by :func:`sort_key`."""
    out: list[Any] = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return sorted(out, key=sort_key)


def varying_keys(runs: list[Run], preferred: list[str] = ()) -> list[str]:
    """Reported config fields with more than one (applicable) value across ``runs``, in a
    useful order: ``preferred`` first.

    ``minibatch`` replaces the BPTT/BTPROP minibatch fields (batch_size, update_freq,
    full_batch, blocks_per_update) when it varies; ``corpus`` comes first when the runs read
    several corpora.
    """
    vary = [k for k in REPORTED if len(distinct([r.param(k) for r in runs])) > 1]
    preferred = list(preferred)
    if len(distinct([r.param("minibatch") for r in runs])) > 1:
        vary = [k for k in vary if k not in MINIBATCH_KEYS] + ["minibatch"]
        first = next((i for i, k in enumerate(preferred) if k in MINIBATCH_KEYS), None)
        if first is not None and "minibatch" not in preferred:
            preferred.insert(first, "minibatch")
    if len(distinct([r.param("corpus") for r in runs])) > 1:  # runs on several corpora
        vary = ["corpus"] + vary
        preferred = ["corpus" if k == "data_dir" else k for k in preferred]
    order = [k for k in preferred if k in vary or k == "method"]
    order = list(dict.fromkeys(order))
    return order + [k for k in vary if k not in order]
