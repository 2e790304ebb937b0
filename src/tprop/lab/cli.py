"""The lab's commands: ``sweep``, ``report`` and ``reproduce``."""

from __future__ import annotations

import argparse
from typing import Any


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _common(q: argparse.ArgumentParser) -> None:
    q.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="runs at a time, each in its own process (default 1: in this one)")
    q.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch threads per run (default: CPUs // workers)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   dest="assign", help="override a config field in every run (e.g. "
                   "--set device=cuda --set data_dir=../shared/data); repeatable")
    q.add_argument("--dry-run", action="store_true", help="list the runs and what would "
                   "be done with each, run nothing")
    q.add_argument("--verbose", action="store_true", help="print the runs' epoch lines "
                   "(they always go to each run's train.log)")


def add_lab_commands(sub: Any) -> None:
    """The subcommands ``sweep``, ``report`` and ``reproduce``."""
    s = sub.add_parser("sweep", help="run a grid of training runs from a TOML spec",
                       description="Run every point of a sweep spec (see experiments/README.md"
                       ") in its own run directory under --out; finished runs are skipped, "
                       "interrupted ones continued, failed ones recorded.")
    s.add_argument("spec", metavar="SPEC.toml")
    s.add_argument("--out", metavar="DIR", help="sweep folder (default runs/sweep/<spec>"
                   "[-<preset>])")
    s.add_argument("--preset", metavar="NAME", help="a preset of the spec (e.g. smoke, cpu, "
                   "paper); default: the spec's [base] and [grid] as written")
    s.add_argument("--report", action="store_true", help="write the report when done")
    _common(s)

    r = sub.add_parser("report", help="tables and plots of the runs under a folder",
                       description="Write DIR/report.md and DIR/plots/*.png from every run "
                       "directory under DIR.")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--title", help="the report's heading")

    x = sub.add_parser("reproduce", help="run one of the paper's experiments, then its report",
                       description="Run experiments/NAME.toml as a sweep under a preset, then "
                       "write its report.")
    x.add_argument("name", metavar="NAME", help="an experiment of experiments/ (e.g. "
                   "block_size)")
    x.add_argument("--preset", default="cpu", metavar="NAME", help="smoke, cpu (default) or "
                   "paper")
    x.add_argument("--out", metavar="DIR", help="default runs/reproduce/<name>-<preset>")
    _common(x)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``tprop sweep``: 0 when every run is done, 1 when some failed."""
    from .spec import load_spec
    from .sweep import parse_assignments, run_sweep

    spec = load_spec(args.spec)
    out = args.out or f"runs/sweep/{spec.name}" + (f"-{args.preset}" if args.preset else "")
    result = run_sweep(spec, out, preset=args.preset, workers=args.workers,
                       overrides=parse_assignments(args.assign), threads=args.threads,
                       verbose=args.verbose, dry_run=args.dry_run)
    if args.report and not args.dry_run:
        from .report import write_report

        print(f"report: {write_report(out)}")
    return 1 if result.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    """``tprop report``: the report of the runs under a folder."""
    from .report import write_report

    print(f"report: {write_report(args.dir, title=args.title)}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """``tprop reproduce``: an experiment's sweep, then its report; 1 when some run failed."""
    from .experiments import reproduce
    from .sweep import parse_assignments

    result, path = reproduce(args.name, preset=args.preset, out=args.out, workers=args.workers,
                             overrides=parse_assignments(args.assign), threads=args.threads,
                             verbose=args.verbose, dry_run=args.dry_run)
    if path is not None:
        print(f"report: {path}")
    return 1 if result.failed else 0


COMMANDS = {"sweep": cmd_sweep, "report": cmd_report, "reproduce": cmd_reproduce}


def run_lab_command(args: argparse.Namespace) -> int:
    """Run the lab command ``args.command``; its exit status."""
    return COMMANDS[args.command](args)
