"""The experiment specs shipped with the repository (``experiments/*.toml``) and
``tprop reproduce NAME``: run one of them as a sweep, then write its report.

Each spec reproduces one finding of the paper (see ``experiments/README.md``) and has the
presets ``smoke`` (seconds; run by the tests), ``cpu`` (the study on a 2-core machine) and
``paper`` (full scale, for a GPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .spec import SpecError, load_spec
from .sweep import SweepResult, run_sweep

PRESETS = ("smoke", "cpu", "paper")


def experiments_dir() -> Path:
    """``$TPROP_EXPERIMENTS``, else the ``experiments/`` folder of the source checkout."""
    env = os.environ.get("TPROP_EXPERIMENTS")
    if env:
        return Path(env)
    import tprop

    return Path(tprop.__file__).resolve().parents[2] / "experiments"


def list_specs() -> list[str]:
    """The names of the shipped experiments."""
    d = experiments_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def find_spec(name: str) -> Path:
    """The spec file of experiment ``name`` (a name, ``NAME.toml``, or a path to a spec)."""
    p = Path(name)
    if p.suffix == ".toml" and p.is_file():
        return p
    d = experiments_dir()
    if not d.is_dir():
        raise SpecError(f"the experiments folder {d} is missing (it ships with the source "
                        "checkout; set TPROP_EXPERIMENTS to its path)")
    stem = p.name[:-5] if p.name.endswith(".toml") else p.name
    path = d / f"{stem}.toml"
    if not path.is_file():
        raise SpecError(f"unknown experiment {name!r}; known: {', '.join(list_specs()) or 'none'}"
                        f" (in {d})")
    return path


def default_out(name: str, preset: str | None) -> Path:
    """Where ``tprop reproduce`` puts experiment ``name`` under ``preset``."""
    stem = Path(name).stem
    return Path("runs") / "reproduce" / (f"{stem}-{preset}" if preset else stem)


def reproduce(name: str, preset: str | None = "cpu", out: str | os.PathLike | None = None,
              workers: int = 1, overrides: dict[str, Any] | None = None,
              threads: int | None = None, echo: Callable[[str], None] | None = None,
              verbose: bool = False, dry_run: bool = False
              ) -> tuple[SweepResult, Path | None]:
    """Run experiment ``name`` under ``preset`` into ``out``, then write its report.

    Returns the sweep's result and the report's path (None for a dry run).
    """
    from .report import write_report

    spec = load_spec(find_spec(name))
    out = Path(out) if out is not None else default_out(spec.name, preset)
    result = run_sweep(spec, out, preset=preset, workers=workers, overrides=overrides,
                       threads=threads, echo=echo, verbose=verbose, dry_run=dry_run)
    if dry_run:
        return result, None
    return result, write_report(out, echo=echo)
