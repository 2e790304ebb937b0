"""The ``tprop`` command line: a thin shell over the Python API.

The flags of ``tprop train`` are derived from the configuration's field metadata
(``tprop.config.META``); this module imports nothing heavy at start-up, so that ``--help`` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import (
    BTPROP_METHODS,
    DEFAULTS,
    META,
    RESUMABLE,
    SPLITS,
    ConfigError,
    applies,
    check_value,
    describe_default,
    flag_of,
    groups,
    parse_value,
)
from .errors import USER_ERRORS, SigTerm

# the exact-recurrence settings `tprop eval` takes
EVAL_RECURRENCE = ("recurrence", "block_size", "rec_tol", "rec_max_iters", "rec_damping",
                   "rec_lm", "jacobian_chunk")
EXIT_USAGE = 2  # as tprop.trainer: a user's mistake
EXIT_DIVERGED = 3
EXIT_TERMINATED = 143  # stopped by SIGTERM (128 + 15)
EXIT_BROKEN_PIPE = 141  # the reader of the output went away (128 + SIGPIPE), as `yes | head`
LAUNCHED_ENV = "TPROP_LAUNCHED"  # set by `tprop train --nproc` in the ranks it starts

# argument groups of `tprop train`, in help order: (group, title, description)
GROUPS = [
    ("run", "run", None),
    ("distributed", "distributed (docs/distributed.md)", None),
    ("data", "data", None),
    ("model", "model", None),
    ("optimisation", "optimisation", None),
    ("btprop", "block target propagation (--method pm|admm|alm)",
     "θ is trained with --optim/--lr/--clip; the free states Z with the --h-* flags."),
    ("recurrence", "exact parallel-in-time recurrence (--method bptt; docs/parallel_time.md)",
     "A window of --bptt T steps is cut into blocks of --block-size K whose entering states "
     "are solved for exactly, all blocks running in one fused call per sweep."),
    ("schedule", "schedule and stopping", None),
    ("evaluation", "evaluation", None),
]


# ----------------------------------------------------------------- argument types
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _field_type(name: str) -> Any:
    meta = META[name]

    def parse(text: str) -> Any:
        try:
            return parse_value(meta, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = meta.kind  # argparse names the type in some messages
    return parse


def _add_field(group: argparse._ArgumentGroup, name: str) -> None:
    """The flag of config field ``name``; its absence leaves the attribute unset (so that
    presets and saved configs fill it)."""
    meta = META[name]
    help_text = meta.help
    if meta.show_default:
        help_text += f" (default {describe_default(name)})"
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                          "help": help_text.replace("%", "%%")}
    if meta.kind == "flag":
        kw["action"] = "store_true"
    elif meta.kind == "choice":
        kw["choices"] = meta.choices
    else:
        kw["type"] = _field_type(name)
    if meta.metavar:
        kw["metavar"] = meta.metavar
    group.add_argument(flag_of(name), *meta.aliases, **kw)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every config field as a flag (grouped as the metadata says), plus --resume, --nproc."""
    by_group = groups()
    resumable = ", ".join(flag_of(k) for k in RESUMABLE)
    for key, title, description in GROUPS:
        g = p.add_argument_group(title, description)
        if key == "run":
            g.add_argument("--resume", metavar="RUN_DIR", default=argparse.SUPPRESS,
                           help="continue the run in RUN_DIR from its last checkpoint (only "
                           f"{resumable} may change; --nproc may differ from the run's)")
        if key == "distributed":
            g.add_argument("--nproc", type=_positive_int, metavar="N", default=argparse.SUPPRESS,
                           help="train on N processes of this machine (runs torchrun "
                           "--standalone --nproc-per-node N -m tprop train ...)")
        for name in by_group.get(key, []):
            _add_field(g, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tprop",
        description="Train recurrent language models by truncated BPTT or (block) target "
        "propagation, evaluate them, and manage corpora.",
        epilog="Run `tprop COMMAND --help` for each command's options.",
    )
    p.add_argument("--version", action="version", version=f"tprop {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    t = sub.add_parser("train", help="train a model (writes a run directory)",
                       description="Train an RNN language model. Every flag is saved in the run "
                       "directory's config.json.")
    add_train_args(t)
    for add in (add_eval_args, add_generate_args, add_data_args, add_analyse_args,
                add_lab_commands):
        add(sub)
    return p


def _run_args(q: argparse.ArgumentParser, device: str = "auto") -> None:
    """What every command that reads a finished run takes."""
    q.add_argument("run_dir", metavar="RUN_DIR")
    q.add_argument("--checkpoint", choices=("best", "last"), default="best")
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default=device)


def add_eval_args(sub: Any) -> None:
    e = sub.add_parser("eval", help="perplexity of a trained run on a split",
                       description="Evaluate a run's checkpoint on a split, state carried.")
    _run_args(e)
    e.add_argument("--split", choices=SPLITS, default="test")
    e.add_argument("--eval-batch-size", type=_positive_int, default=None, metavar="B",
                   help="columns (default: the run's)")
    e.add_argument("--data-dir", metavar="DIR", help="where the corpus lies (default: as the run)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    g = e.add_argument_group("exact parallel recurrence (docs/parallel_time.md)")
    for name in EVAL_RECURRENCE:
        _add_field(g, name)


def add_generate_args(sub: Any) -> None:
    g = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample text from a run's checkpoint.")
    _run_args(g)
    g.add_argument("--tokens", type=_positive_int, default=100, metavar="N")
    g.add_argument("--temperature", type=_positive_float, default=1.0, metavar="T")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default 1: one token at a time is batch-1 work)")


def add_data_args(sub: Any) -> None:
    d = sub.add_parser("data", help="list, inspect and fetch corpora",
                       description="Named corpora: list them, print statistics, or fetch and "
                       "tokenise one ahead of time.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    dsub.add_parser("list", help="named corpora and where each is found")
    for name, helptext in (("stats", "vocabulary size and token counts"),
                           ("prepare", "find or download a corpus and cache its token ids")):
        q = dsub.add_parser(name, help=helptext)
        q.add_argument("name", metavar="NAME", nargs="?", help="a named corpus (tprop data "
                       "list)")
        q.add_argument("--data-dir", metavar="DIR")
        q.add_argument("--format", choices=META["format"].choices)
        if name == "stats":
            q.add_argument("--json", action="store_true", help="print one JSON object")
    add_synth_args(dsub)


def add_analyse_args(sub: Any) -> None:
    a = sub.add_parser("analyse", help="analyses of a trained run's dynamics",
                       description="Measure properties of a trained model's recurrence.")
    asub = a.add_subparsers(dest="analysis", metavar="ANALYSIS")
    asub.required = True
    ly = asub.add_parser("lyapunov", help="the largest Lyapunov exponent of the recurrence",
                         description="The largest Lyapunov exponent (per step) of the trained "
                         "cell driven by a split of its corpus, and the Jacobi sweeps it "
                         "predicts for the exact parallel recurrence (docs/parallel_time.md).")
    _run_args(ly, device="cpu")
    ly.add_argument("--split", choices=SPLITS, default="valid")
    ly.add_argument("--columns", type=_positive_int, default=4, metavar="B",
                    help="independent stream columns averaged (default 4)")
    ly.add_argument("--steps", type=_positive_int, default=2000, metavar="T",
                    help="steps measured per column (default 2000)")
    ly.add_argument("--burn-in", type=_positive_int, default=100, metavar="N",
                    help="steps run first to forget the zero state (default 100)")
    ly.add_argument("--block-size", type=_positive_int, default=None, metavar="K",
                    help="also predict the Jacobi sweeps for blocks of K (default: the run's)")
    ly.add_argument("--untrained", action="store_true", help="the run's model as initialised "
                    "(its seed), before any training")
    ly.add_argument("--data-dir", metavar="DIR", help="where the corpus lies (default: as the run)")
    ly.add_argument("--json", action="store_true", help="print one JSON object")


def add_synth_args(dsub: Any) -> None:
    """``tprop data synth NAME --out DIR``: a synthetic long-range corpus (tprop.data.synth)."""
    from .data.synth import TASKS, SynthParams

    d = SynthParams("copy")
    q = dsub.add_parser("synth", help="write a synthetic corpus with a known dependency length",
                        description="Write DIR/train.txt, valid.txt, test.txt (word format) and "
                        "DIR/synth.json for a task whose dependency length is known, and print "
                        "its entropy floors with and without long-range memory (docs/beyond.md"
                        "). Tasks: " + "; ".join(f"{t.name}: {t.summary}"
                                                  for t in TASKS.values()) + ".")
    q.add_argument("task", metavar="NAME", choices=list(TASKS), help=", ".join(TASKS))
    q.add_argument("--out", metavar="DIR", required=True, help="directory to write")
    q.add_argument("--length", type=_positive_int, default=d.length, metavar="L",
                   help=f"dependency length in tokens (default {d.length})")
    q.add_argument("--span", type=_positive_int, default=None, metavar="M",
                   help="long-range items per line (default min(4, the most the task allows))")
    q.add_argument("--symbols", type=_positive_int, default=d.symbols, metavar="N",
                   help=f"alphabet of the keys / brackets / digits (default {d.symbols})")
    q.add_argument("--fillers", type=_positive_int, default=d.fillers, metavar="F",
                   help="filler alphabet; 1 (default): one blank token")
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--train-tokens", type=_positive_int, default=d.train_tokens, metavar="N",
                   help=f"training tokens, <eos> included (default {d.train_tokens:,})")
    q.add_argument("--eval-tokens", type=_positive_int, default=None, metavar="N",
                   help="tokens of valid and of test (default train / 5)")
    q.add_argument("--json", action="store_true", help="print synth.json's content")


# ----------------------------------------------------------------- commands
def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import SynthParams, describe, write_corpus

    p = SynthParams(args.task, args.length, args.span, args.symbols, args.fillers, args.seed,
                    args.train_tokens, args.eval_tokens)
    meta = write_corpus(p, args.out)
    if args.json:
        print(json.dumps(meta))
    else:
        print(describe(meta))
        counts = ", ".join(f"{k} {v:,}" for k, v in meta["split_tokens"].items())
        print(f"  wrote {args.out}/{{train,valid,test}}.txt ({counts} tokens) and synth.json")
    return 0


def default_out(options: dict[str, Any]) -> str:
    import time

    name = options.get("dataset", DEFAULTS["dataset"]) or "custom"
    method = options.get("method", DEFAULTS["method"])
    return f"runs/{name}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"


def ignored_flags(options: dict[str, Any]) -> tuple[str, list[str]]:
    """The method a new run's ``options`` choose, and the flags among them that it does not
    read (``tprop.config.applies``)."""
    from .config import PRESETS

    preset = PRESETS.get(options.get("preset") or "", {})
    method = options.get("method", preset.get("method", DEFAULTS["method"]))
    flags = [flag_of(k) for k in options if k in META and not applies(k, method)
             and not (k == "block_size" and method in BTPROP_METHODS)]  # BTPROP's --bptt
    return method, flags


def warn_ignored(options: dict[str, Any]) -> None:
    """Say once, on standard error, which explicitly given flags the method ignores."""
    if _is_secondary_rank() or os.environ.get(LAUNCHED_ENV):
        return  # the launcher or rank 0 says it
    method, flags = ignored_flags(options)
    if flags:
        verb = "is" if len(flags) == 1 else "are"
        print(f"tprop train: note: {', '.join(flags)} {verb} ignored by --method {method}",
              file=sys.stderr, flush=True)


class PipeGuard:
    """A text stream (standard output or error) that, once its reader has gone (a closed
    pipe: ``tprop train | head``), drops what is written to it instead of raising."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.gone = True
        try:  # what is still buffered, and the interpreter's last flush, go nowhere
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self.stream.fileno())
            finally:
                os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SigTerm()


def cmd_train(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """``tprop train``: its output survives a reader that goes away (training goes on, the
    run's train.log keeps every line); SIGTERM stops a one-process run as Ctrl-C does."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PipeGuard(out), PipeGuard(err)
    one_process = os.environ.get("WORLD_SIZE", "").strip() in ("", "1")  # not a torchrun rank
    old = None
    if one_process and threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _train(args, argv)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        for guard in (sys.stdout, sys.stderr):
            if isinstance(guard, PipeGuard):
                guard.flush()
        sys.stdout, sys.stderr = out, err


def _train(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    options = {k: v for k, v in vars(args).items() if k != "command"}
    nproc = options.pop("nproc", 1)
    resume = options.pop("resume", None)
    if resume is None:
        warn_ignored(options)
    if nproc > 1:  # relaunch this command under torchrun, on nproc local ranks
        from .distributed import launch_local

        return launch_local(nproc, sys.argv[1:] if argv is None else argv)
    from .train import run_training

    if resume is None and "out" not in options:
        from .config import PRESETS

        preset = PRESETS.get(options.get("preset") or "", {})
        options["out"] = default_out({**preset, **options})
    summary = run_training(options, resume)
    return EXIT_DIVERGED if summary["status"] == "diverged" else 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import perplexity
    from .inference import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device, data_dir=args.data_dir)
    bs = args.eval_batch_size or run.cfg.eval_batch_size
    rec, k = _eval_recurrence(args)
    loss, n = run.evaluate(args.split, bs, rec, k)
    out = {"run": str(args.run_dir), "checkpoint": args.checkpoint, "split": args.split,
           "loss": loss, "ppl": perplexity(loss), "tokens": n, "eval_batch_size": bs,
           "recurrence": getattr(args, "recurrence", "sequential")}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.split} perplexity {out['ppl']:.2f} (loss {loss:.4f} nats/token, "
              f"{n:,} tokens, {args.checkpoint} checkpoint)")
    return 0


def _eval_recurrence(args: argparse.Namespace) -> tuple[Any, int | None]:
    """The exact recurrence ``tprop eval`` was asked for (None: sequential)."""
    given = {k: v for k, v in vars(args).items() if k in EVAL_RECURRENCE}
    name = given.get("recurrence", "sequential")
    if name == "sequential":
        return None, None
    if given.get("block_size") is None:
        raise ConfigError(f"--recurrence {name} needs --block-size K")
    for key, value in given.items():
        problem = check_value(META[key], value)
        if problem is not None:
            raise ConfigError(f"{flag_of(key)}: {problem}")
    from .recurrence import RecurrenceSettings

    fields = {k: v for k, v in given.items() if k != "block_size"}
    return RecurrenceSettings(**fields), given["block_size"]


def cmd_analyse(args: argparse.Namespace) -> int:
    from .analyse import lyapunov, sweeps_needed
    from .inference import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device, data_dir=args.data_dir)
    if args.untrained:
        run.model.load_state_dict(_initial_state(run))
    data = run.corpus.split(args.split)
    try:
        out = lyapunov(run.model, data, args.columns, args.steps, args.burn_in)
    except ValueError as e:
        raise ConfigError(f"--steps: {e}") from None
    cfg = run.cfg
    k = args.block_size or cfg.block_size or cfg.bptt
    blocks = max(1, math.ceil(cfg.bptt / k))
    out.update(run=str(args.run_dir), checkpoint="init" if args.untrained else args.checkpoint,
               split=args.split,
               block_size=k, window=cfg.bptt,
               per_block=out["lyapunov"] * k,
               predicted_sweeps=sweeps_needed(out["lyapunov"], k, blocks, cfg.rec_tol))
    if args.json:
        print(json.dumps(out))
    else:
        print(f"largest Lyapunov exponent {out['lyapunov']:+.4f} per step "
              f"(± {out['lyapunov_std']:.4f} over {args.columns} columns, {args.steps} steps "
              f"of {args.split}); {out['per_block']:+.3f} per block of {k}: Jacobi needs "
              f"about {out['predicted_sweeps']} of {blocks - 1} sweeps for a window of "
              f"{cfg.bptt} to --rec-tol {cfg.rec_tol:g}")
    return 0


def _initial_state(run: Any) -> dict[str, Any]:
    """The parameters the run started from (its model built anew under its seed)."""
    import torch

    from .trainer import build_model

    torch.manual_seed(run.cfg.seed)
    return build_model(run.cfg, len(run.vocab)).state_dict()


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device, need_data=False)
    print(run.generate(args.tokens, args.temperature, args.seed, args.threads))
    return 0


def cmd_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .data import CORPORA, find_corpus, load_corpus

    if args.data_command == "synth":
        return cmd_synth(args)
    if args.data_command == "list":
        for name, info in CORPORA.items():
            where = find_corpus(name)
            status = str(where) if where else ("download on first use")
            print(f"{name:14s} {info.format:9s} {info.description}\n{'':24s}{status}")
        return 0
    if args.name is None and args.data_dir is None:
        parser.error(f"data {args.data_command}: give a corpus NAME or --data-dir DIR")
    if args.name is not None and args.name not in CORPORA:
        parser.error(f"unknown corpus {args.name!r}; known: {', '.join(CORPORA)}")
    corpus = load_corpus(args.name, args.data_dir, fmt=args.format)
    stats = corpus.stats()
    if args.data_command == "prepare":
        print(f"{stats['name']}: ready at {stats['path']} ({stats['vocab_size']:,} types, "
              f"{stats['train_tokens']:,} training tokens; token ids cached)")
    elif args.json:
        print(json.dumps(stats))
    else:
        print(f"corpus       {stats['name']} ({stats['format']}) at {stats['path']}")
        print(f"vocab_size   {stats['vocab_size']:,}")
        for s in SPLITS:
            print(f"{s}_tokens {'':<{5 - len(s)}}{stats[s + '_tokens']:,}")
    return 0


def _is_secondary_rank() -> bool:
    """A rank other than 0 of a torchrun job (rank 0 alone reports errors)."""
    return os.environ.get("RANK", "0") not in ("", "0")


# ----------------------------------------------------------------- the lab (tprop.lab)
def _lab_common(q: argparse.ArgumentParser) -> None:
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
    _lab_common(s)

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
    _lab_common(x)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``tprop sweep``: 0 when every run is done, 1 when some failed."""
    from .lab.spec import load_spec
    from .lab.sweep import parse_assignments, run_sweep

    spec = load_spec(args.spec)
    out = args.out or f"runs/sweep/{spec.name}" + (f"-{args.preset}" if args.preset else "")
    result = run_sweep(spec, out, preset=args.preset, workers=args.workers,
                       overrides=parse_assignments(args.assign), threads=args.threads,
                       verbose=args.verbose, dry_run=args.dry_run)
    if args.report and not args.dry_run:
        from .lab.report import write_report

        print(f"report: {write_report(out)}")
    return 1 if result.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    """``tprop report``: the report of the runs under a folder."""
    from .lab.report import write_report

    print(f"report: {write_report(args.dir, title=args.title)}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """``tprop reproduce``: an experiment's sweep, then its report; 1 when some run failed."""
    from .lab.experiments import reproduce
    from .lab.sweep import parse_assignments

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


def _dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser,
              argv: Sequence[str] | None) -> int:
    if args.command == "train":
        return cmd_train(args, argv)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "data":
        return cmd_data(args, parser)
    if args.command == "analyse":
        return cmd_analyse(args)
    return run_lab_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; a torchrun rank leaves without the interpreter's teardown."""
    code = _main(argv)
    dist_mod = sys.modules.get("tprop.distributed")
    if dist_mod is not None and dist_mod.STARTED[0]:  # a rank, its process group closed:
        sys.stdout.flush()                             # no gloo threads at interpreter exit
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = _dispatch(args, parser, argv)
        sys.stdout.flush()  # here, where a reader that has gone is caught
        return code
    except SigTerm:
        print(f"tprop {args.command}: stopped by SIGTERM", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output has gone (`tprop eval ... | head`)
        PipeGuard(sys.stdout)._drop()
        return EXIT_BROKEN_PIPE
    except Exception as e:
        from .comm import Declined

        if isinstance(e, Declined) or (isinstance(e, ConfigError) and _is_secondary_rank()):
            return EXIT_USAGE  # rank 0 prints the message
        if not isinstance(e, USER_ERRORS):
            raise
        parser.exit(EXIT_USAGE, f"tprop {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
