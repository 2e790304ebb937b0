"""Sweeps: every point of a spec (:mod:`tprop.lab.spec`) run into its own run directory.

The sweep's output folder holds one run directory per point (named as
:func:`tprop.lab.expand.run_name` says), ``spec.toml`` (a copy of the spec) and
``sweep.json`` (the index: every run's parameters, status, key numbers and error), and
``data/NAME`` for the synthetic corpora of the spec's ``[data]`` table that the runs read
(:mod:`tprop.lab.corpora`), written before the runs.

A sweep is resumable: done runs are skipped, interrupted ones continued, a run that raises is
recorded as failed and the sweep goes on; the next sweep tries it again (see
:mod:`tprop.lab.runner`).

Workers: with ``workers > 1`` the runs go to that many processes (multiprocessing, 'spawn'),
each with ``threads = max(1, cpus // workers)`` torch threads unless the spec or an override
sets ``threads``; they die with the sweep (:mod:`tprop.lab.pool`). With one worker the runs
happen in this process.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fmt import fmt_ppl, fmt_seconds
from .corpora import prepare_data
from .expand import Point, expand
from .pool import run_parallel
from .runner import plan, run_point, summary_result
from .spec import Spec, SpecError, canon_key, check_value, display_key, load_spec, resolve


@dataclass
class SweepResult:
    """What a sweep did: one record per run, in spec order (also in ``sweep.json``)."""

    out: Path
    runs: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The records of the runs that failed."""
        return [r for r in self.runs if r.get("status") == "failed"]


def _numbers(r: dict[str, Any]) -> str:
    """A run record's outcome in one line."""
    if r.get("status") == "failed":
        return r.get("error") or "failed"
    out = (f"{r.get('status')}: valid {fmt_ppl(r.get('best_valid_ppl'))}"
           f" @{r.get('best_epoch')}, test {fmt_ppl(r.get('test_ppl'))}")
    if r.get("epochs_run") is not None:
        out += f", {r['epochs_run']} epochs"
    if r.get("wall_s") is not None:
        out += f", {fmt_seconds(r['wall_s'])}"
    return out


def _note(rec: dict[str, Any]) -> str:
    return f"  ({rec['note']})" if rec.get("note") else ""


@dataclass
class _Sweep:
    """One sweep under way: its points, their records and the index they are written to."""

    spec: Spec
    preset: str | None
    out: Path
    points: list[Point]
    echo: Callable[[str], None]
    verbose: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def tag(self, i: int) -> str:
        """Point ``i``'s place in the sweep, ``[ 3/12]``."""
        n = len(self.points)
        return f"[{i + 1:>{len(str(n))}}/{n}]"

    def write_index(self) -> None:
        """Write ``sweep.json`` as the records stand."""
        from ..rundir import write_json_atomic

        spec = self.spec
        write_json_atomic(self.out / "sweep.json", {
            "spec": spec.name, "source": spec.source, "preset": self.preset,
            "title": spec.title, "description": spec.description,
            "keys": [display_key(k) for k in spec.keys(self.preset)],
            "report": self.report, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": self.runs,
        })

    def task(self, i: int) -> dict[str, Any]:
        """Point ``i``'s job for :func:`run_point` (its ``point.json`` written first)."""
        from ..rundir import write_json_atomic

        p, run_dir = self.points[i], self.out / self.points[i].name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "point.json", {
            "name": p.name, "params": self.runs[i]["params"], "config": p.config,
            "spec": self.spec.name, "preset": self.preset})
        return {"dir": str(run_dir), "config": p.config, "action": self.runs[i]["action"],
                "verbose": self.verbose}

    def started(self, i: int) -> None:
        """Point ``i`` is handed to a worker."""
        self.echo(f"{self.tag(i)} start   {self.runs[i]['name']}{_note(self.runs[i])}")

    def finished(self, i: int, result: dict[str, Any]) -> None:
        """Point ``i`` is done with ``result``: recorded, echoed, indexed."""
        rec = self.runs[i]
        rec.update(result)
        word = "FAILED " if result.get("status") == "failed" else "done   "
        self.echo(f"{self.tag(i)} {word} {rec['name']}  {_numbers(rec)}")
        self.write_index()


def _record(p: Point, action: str, note: str, out: Path) -> dict[str, Any]:
    """The index record of point ``p`` before it runs (a skipped run's numbers included)."""
    rec: dict[str, Any] = {"name": p.name, "dir": p.name,
                           "params": {display_key(k): v for k, v in p.params.items()},
                           "action": action}
    if action == "skip":
        try:
            rec.update(summary_result(json.loads((out / p.name / "summary.json").read_text())))
        except (OSError, json.JSONDecodeError):
            pass
    if note:
        rec["note"] = note
    return rec


def _prepare_folder(s: _Sweep) -> None:
    """The sweep folder, the corpora its runs read, ``spec.toml`` and a first index."""
    s.out.mkdir(parents=True, exist_ok=True)
    if s.spec.data:
        data = s.out / "data"
        used = {Path(p.config["data_dir"]).name for p in s.points if p.config.get("data_dir")
                and Path(p.config["data_dir"]).parent == data}
        prepare_data(s.spec, s.out, s.preset, s.echo, names=sorted(used))
    if s.spec.text is not None:
        (s.out / "spec.toml").write_text(s.spec.text, encoding="utf-8")
    s.write_index()


def _triage(s: _Sweep) -> list[int]:
    """Report the skipped and conflicting runs; the indices of those to run."""
    todo: list[int] = []
    for i, rec in enumerate(s.runs):
        if rec["action"] == "skip":
            s.echo(f"{s.tag(i)} skip    {rec['name']}  {_numbers(rec)}{_note(rec)}")
        elif rec["action"] == "conflict":
            rec.update(status="failed", error=rec.pop("note"))
            s.echo(f"{s.tag(i)} FAILED  {rec['name']}  {rec['error']}")
        else:
            todo.append(i)
    s.write_index()
    return todo


def _execute(s: _Sweep, todo: list[int], workers: int) -> None:
    try:
        if workers == 1 or len(todo) <= 1:
            for i in todo:
                s.started(i)
                s.finished(i, run_point(s.task(i)))
        else:
            run_parallel(todo, workers, s.task, s.started, s.finished)
    finally:
        s.write_index()


def _tally(runs: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        key = "skipped" if r["action"] == "skip" else (r.get("status") or "not run")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def _print(line: str) -> None:
    print(line, flush=True)


def run_sweep(spec: Spec | str | os.PathLike, out: str | os.PathLike,
              preset: str | None = None, workers: int = 1,
              overrides: dict[str, Any] | None = None, threads: int | None = None,
              echo: Callable[[str], None] | None = None, verbose: bool = False,
              dry_run: bool = False) -> SweepResult:
    """Run every point of ``spec`` (a :class:`Spec` or a path) into ``out/NAME``.

    Skips done runs, continues interrupted ones, records failures and goes on; writes
    ``out/sweep.json`` after every run. ``echo`` receives one line per event (default:
    print). ``dry_run`` only plans (prints what would happen) and writes nothing.
    """
    echo = echo or _print
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    if workers < 1:
        raise SpecError("--workers: must be >= 1")
    out = Path(out)
    points = expand(spec, preset, overrides, out=out, workers=workers, threads=threads)
    s = _Sweep(spec, preset, out, points, echo, verbose, report=resolve(spec, preset)[3])
    s.runs = [_record(p, *plan(p, out / p.name), out) for p in points]
    thr = points[0].config.get("threads")
    echo(f"sweep {spec.name}{f' (preset {preset})' if preset else ''}: {len(points)} runs, "
         f"{workers} worker{'s' if workers > 1 else ''} x {thr} thread{'s' if thr != 1 else ''}"
         f", in {out}")
    if dry_run:
        for i, rec in enumerate(s.runs):
            echo(f"{s.tag(i)} {rec['action']:<8} {rec['name']}{_note(rec)}")
        return SweepResult(out, s.runs)
    _prepare_folder(s)
    todo = _triage(s)
    t0 = time.perf_counter()
    _execute(s, todo, workers)
    echo(f"sweep {spec.name} done in {fmt_seconds(time.perf_counter() - t0)}: "
         f"{_tally(s.runs)} (index: {out / 'sweep.json'})")
    return SweepResult(out, s.runs)


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--set``) to a dict; values read as TOML, else as strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SpecError(f"--set: expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        k = canon_key(key, "--set", "--set")
        out[k] = check_value(k, value, "--set", "--set")
    return out
