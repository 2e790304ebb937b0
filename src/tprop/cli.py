"""The ``tprop`` command line: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import (
    DTYPES,
    H_INITS,
    H_OPTIMS,
    KL_DIRECTIONS,
    METHODS,
    OPTIMS,
    PENALTIES,
    PRESETS,
    STATE_CONSTRAINTS,
    ConfigError,
    TrainConfig,
    make_config,
)
from .data import CORPORA, FORMATS, SPLITS, CorpusError

EXIT_DIVERGED = 3


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


def _nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _fraction(s: str) -> float:
    v = _nonneg_float(s)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def _blocks_per_update(s: str) -> int | str:
    if s == "all":
        return s
    try:
        return _positive_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'all', got {s!r}") from None


def _add(group: argparse._ArgumentGroup, *flags: str, **kw: Any) -> None:
    """Add a flag whose absence leaves the attribute unset (so presets can fill it)."""
    kw.setdefault("default", argparse.SUPPRESS)
    group.add_argument(*flags, **kw)


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("run")
    _add(g, "--preset", choices=sorted(PRESETS), help="start from a named configuration "
         "(explicit flags override it): " + ", ".join(sorted(PRESETS)))
    _add(g, "--method", choices=METHODS, help=f"training method (default {d.method})")
    _add(g, "--out", metavar="DIR", help="run directory to create (default runs/<name>-<time>)")
    _add(g, "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last "
         "checkpoint (only --epochs, --device, --threads, --quiet, --patience, --dist-timeout "
         "may change; --nproc may differ from the run's)")
    _add(g, "--seed", type=int, help=f"random seed (default {d.seed})")
    _add(g, "--device", choices=("auto", "cpu", "cuda"), help="auto: CUDA when available")
    _add(g, "--threads", type=_positive_int, help="CPU threads for torch (default: torch's)")
    _add(g, "--quiet", action="store_true", help="no progress bar (epoch lines still print)")
    _add(g, "--dtype", choices=DTYPES, help="precision of the parameters and free states "
         "(default: torch's, float32)")

    g = p.add_argument_group("distributed (docs/distributed.md)")
    _add(g, "--nproc", type=_positive_int, metavar="N", help="train on N processes of this "
         "machine (runs torchrun --standalone --nproc-per-node N -m tprop train ...)")
    _add(g, "--dist-timeout", type=_positive_float, metavar="SECONDS", help="how long a rank "
         "waits for another before stopping with an error (default "
         f"{d.dist_timeout:g})")

    g = p.add_argument_group("data")
    _add(g, "--dataset", metavar="NAME", help=f"named corpus: {', '.join(CORPORA)} "
         f"(default {d.dataset})")
    _add(g, "--data-dir", metavar="DIR", help="directory holding train.txt, valid.txt, "
         "test.txt (alone: your own corpus; with --dataset: where that corpus lies)")
    _add(g, "--format", choices=FORMATS, help="tokenisation of --data-dir: word (default), "
         "ptb-char, char (raw characters)")
    _add(g, "--train-tokens", type=_positive_int, metavar="N", help="use the first N training "
         "tokens only")
    _add(g, "--eval-tokens", type=_positive_int, metavar="N", help="use the first N tokens of "
         "valid and test only")

    g = p.add_argument_group("model")
    _add(g, "--model", choices=("rnn", "gru", "lstm"), help=f"cell (default {d.model})")
    _add(g, "--emsize", type=_positive_int, help=f"embedding size (default {d.emsize})")
    _add(g, "--nhid", type=_positive_int, help=f"hidden units per layer (default {d.nhid})")
    _add(g, "--nlayers", type=_positive_int, help=f"layers (default {d.nlayers})")
    _add(g, "--dropout", type=_fraction, help=f"dropout (default {d.dropout})")
    _add(g, "--tied", action="store_true", help="tie decoder and embedding weights")
    _add(g, "--init-range", type=_positive_float, help="uniform init in ±R (default 0.1)")

    g = p.add_argument_group("optimisation")
    _add(g, "--bptt", "--block-size", dest="bptt", type=_positive_int, metavar="K",
         help=f"BPTT window / TPROP block length (one setting; default {d.bptt})")
    _add(g, "--batch-size", type=_positive_int, metavar="B", help=f"stream columns "
         f"(default {d.batch_size})")
    _add(g, "--optim", choices=OPTIMS, help=f"optimiser; sgd is plain gradient descent "
         f"(default {d.optim})")
    _add(g, "--lr", type=_positive_float, help=f"learning rate (default {d.lr})")
    _add(g, "--clip", type=_nonneg_float, help=f"gradient-norm clip, 0 disables "
         f"(default {d.clip})")
    _add(g, "--update-freq", type=_positive_int, metavar="N", help="accumulate N windows' "
         "gradients per update (default 1)")
    _add(g, "--full-batch", action="store_true", help="one update per epoch (all windows)")

    g = p.add_argument_group(
        "block target propagation (--method pm|admm|alm)",
        "θ is trained with --optim/--lr/--clip; the free states Z with the --h-* flags.")
    _add(g, "--blocks-per-update", type=_blocks_per_update, metavar="M|all",
         help=f"blocks per update; all = batch mode (default {d.blocks_per_update})")
    _add(g, "--h-steps", type=int, metavar="H", help=f"steps on Z per update (default "
         f"{d.h_steps})")
    _add(g, "--h-lr", type=_positive_float, help=f"Z learning rate (default {d.h_lr})")
    _add(g, "--h-tol", type=_nonneg_float, help="stop h-steps when the Z-gradient norm is "
         "below this (default 0: never)")
    _add(g, "--h-clip", type=_nonneg_float, help="Z-gradient norm clip (default 0: off)")
    _add(g, "--h-optim", choices=H_OPTIMS, help=f"Z optimiser (default {d.h_optim})")
    _add(g, "--h-init", choices=H_INITS, help=f"free-state initialisation per update "
         f"(default {d.h_init})")
    _add(g, "--theta-steps", type=_positive_int, metavar="P", help=f"steps on θ per update "
         f"(default {d.theta_steps})")
    _add(g, "--lambda", dest="lam", type=_positive_float, help=f"penalty weight λ "
         f"(default {d.lam})")
    _add(g, "--lambda-mult", type=_positive_float, help="multiply λ by this after each epoch")
    _add(g, "--u-lr", type=_positive_float, help=f"dual step size ρ_u (default {d.u_lr})")
    _add(g, "--u-clip", type=_nonneg_float, help="dual increment norm clip (default 0: off)")
    _add(g, "--u-start", type=_positive_int, metavar="EPOCH", help=f"first epoch with dual "
         f"steps (default {d.u_start})")
    _add(g, "--alm-max-steps", type=_positive_int, help=f"ALM joint steps per update "
         f"(default {d.alm_max_steps})")
    _add(g, "--alm-grad-tol", type=_nonneg_float, help="stop ALM joint steps below this "
         "joint gradient norm (default 0: never)")
    _add(g, "--arctanh", action="store_true", help="optimise w with z = tanh(w) on the "
         "bounded state coordinates (keeps them in (-1, 1))")
    _add(g, "--penalty", choices=PENALTIES, help="the term tying F_j to z_{j+1}: l2 (the "
         "squared distance, default), kl (KL between the decoder's output distributions of "
         "z_{j+1} and F_j), or both; ADMM/ALM duals attach to l2 only (docs/beyond.md)")
    _add(g, "--kl-direction", choices=KL_DIRECTIONS, help="target-pred: KL(softmax g(z) || "
         "softmax g(F)) (default); pred-target: the other direction")
    _add(g, "--kl-weight", type=_positive_float, help=f"weight of the KL term "
         f"(default {d.kl_weight:g})")
    _add(g, "--state-constraint", choices=STATE_CONSTRAINTS, help="none (default); box: keep "
         "free states in the set the cell can produce (tanh RNN/GRU: as --arctanh; LSTM: "
         "h = sigmoid(w_o)*tanh(c), c free); l1: sparsity penalty --l1-weight * |z|_1")
    _add(g, "--l1-weight", type=_nonneg_float, help="weight of the l1 penalty on the free "
         "states (needs --state-constraint l1)")
    _add(g, "--positional-ppl", action="store_true", help="record perplexity by position "
         "in the block")
    _add(g, "--chunk-blocks", type=_positive_int, metavar="N", help="blocks per recurrent "
         "call (memory bound; default: automatic)")

    g = p.add_argument_group("schedule and stopping")
    _add(g, "--epochs", type=_positive_int, help=f"epochs (default {d.epochs})")
    _add(g, "--lrshrink", type=float, help="divide lr by this after --tol epochs without a "
         "better validation perplexity; 1 disables annealing and stops the run instead "
         f"(default {d.lrshrink})")
    _add(g, "--tol", type=_positive_int, help=f"bad epochs tolerated (default {d.tol})")
    _add(g, "--patience", type=_positive_int, help="stop after this many epochs without a new "
         "best, whatever --lrshrink (default: off)")
    _add(g, "--lr-decay", type=_positive_float, help="fixed decay: multiply lr by this every "
         "epoch from --lr-decay-start on (default 1: off)")
    _add(g, "--lr-decay-start", type=_positive_int, metavar="EPOCH", help="first decayed epoch")
    _add(g, "--max-ppl", type=_positive_float, help="stop when perplexity exceeds this "
         "(default 2 x vocabulary size) or is NaN")

    g = p.add_argument_group("evaluation")
    _add(g, "--eval-batch-size", type=_positive_int, metavar="B", help="parallel columns for "
         f"evaluation (default {d.eval_batch_size})")
    _add(g, "--eval-train", action="store_true", help="also measure the training split's "
         "perplexity by evaluation each epoch (train_eval_ppl)")


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

    e = sub.add_parser("eval", help="perplexity of a trained run on a split",
                       description="Evaluate a run's checkpoint on a split, state carried.")
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--split", choices=SPLITS, default="test")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best")
    e.add_argument("--eval-batch-size", type=_positive_int, default=None, metavar="B",
                   help="columns (default: the run's)")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    e.add_argument("--data-dir", metavar="DIR", help="where the corpus lies (default: as the run)")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    g = sub.add_parser("generate", help="sample text from a trained run",
                       description="Sample text from a run's checkpoint.")
    g.add_argument("run_dir", metavar="RUN_DIR")
    g.add_argument("--tokens", type=_positive_int, default=100, metavar="N")
    g.add_argument("--temperature", type=_positive_float, default=1.0, metavar="T")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint", choices=("best", "last"), default="best")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    d = sub.add_parser("data", help="list, inspect and fetch corpora",
                       description="Named corpora: list them, print statistics, or fetch and "
                       "tokenise one ahead of time.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    dsub.add_parser("list", help="named corpora and where each is found")
    for name, helptext in (("stats", "vocabulary size and token counts"),
                           ("prepare", "find or download a corpus and cache its token ids")):
        q = dsub.add_parser(name, help=helptext)
        q.add_argument("name", metavar="NAME", nargs="?", help=", ".join(CORPORA))
        q.add_argument("--data-dir", metavar="DIR")
        q.add_argument("--format", choices=FORMATS)
        if name == "stats":
            q.add_argument("--json", action="store_true", help="print one JSON object")
    add_synth_args(dsub)
    add_sweep_args(sub)
    return p


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


def add_sweep_args(sub: Any) -> None:
    """The subcommands ``sweep``, ``report`` and ``reproduce`` (logic in tprop.sweep/report)."""

    def common(q: argparse.ArgumentParser) -> None:
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
    common(s)

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
    common(x)


# ----------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser,
              argv: Sequence[str] | None = None) -> int:
    from . import distributed
    from .train import make_trainer, resume_trainer

    given = {k: v for k, v in vars(args).items() if k != "command"}
    nproc = given.pop("nproc", 1)
    if nproc > 1:  # relaunch this command under torchrun, on nproc local ranks
        return distributed.launch_local(nproc, sys.argv[1:] if argv is None else argv)
    if distributed.env_world_size() > 1:  # one rank of a torchrun job
        return distributed.train_command(given)
    resume = given.pop("resume", None)
    if resume is not None:
        trainer = resume_trainer(resume, **given)
        trainer.log(f"resuming {resume} after epoch {trainer.epoch}")
    else:
        preset = given.pop("preset", None)
        cfg = make_config(preset, **given)
        out = cfg.out or default_out(cfg)
        from .rundir import RunDir

        if RunDir(out).exists():
            raise ConfigError(f"--out: {out} already holds a run; continue it with "
                              f"`tprop train --resume {out}` or choose another --out")
        cfg = cfg.replace(out=str(out))
        trainer = make_trainer(cfg, out)
        trainer.log(f"run directory: {out}")
    summary = trainer.fit()
    test = summary["test_ppl"]
    trainer.log(f"done ({summary['status']}): best valid ppl "
                f"{_fmt(summary['best_valid_ppl'])} at epoch {summary['best_epoch']}, "
                f"test ppl {_fmt(test)}")
    return EXIT_DIVERGED if summary["status"] == "diverged" else 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def default_out(cfg: TrainConfig) -> str:
    import time

    name = cfg.dataset or "custom"
    return f"runs/{name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_eval(args: argparse.Namespace) -> int:
    from .inference import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device, data_dir=args.data_dir)
    bs = args.eval_batch_size or run.cfg.eval_batch_size
    loss, n = run.evaluate(args.split, bs)
    from .evaluate import perplexity

    out = {"run": str(args.run_dir), "checkpoint": args.checkpoint, "split": args.split,
           "loss": loss, "ppl": perplexity(loss), "tokens": n, "eval_batch_size": bs}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.split} perplexity {out['ppl']:.2f} (loss {loss:.4f} nats/token, "
              f"{n:,} tokens, {args.checkpoint} checkpoint)")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference import load_run

    run = load_run(args.run_dir, args.checkpoint, device=args.device, need_data=False)
    print(run.generate(args.tokens, args.temperature, args.seed))
    return 0


def cmd_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .data import find_corpus, load_corpus

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


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import load_spec, parse_assignments, run_sweep

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
    from .report import write_report

    path = write_report(args.dir, title=args.title)
    print(f"report: {path}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments import reproduce
    from .sweep import parse_assignments

    result, path = reproduce(args.name, preset=args.preset, out=args.out, workers=args.workers,
                             overrides=parse_assignments(args.assign), threads=args.threads,
                             verbose=args.verbose, dry_run=args.dry_run)
    if path is not None:
        print(f"report: {path}")
    return 1 if result.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args, parser, argv)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "data":
            return cmd_data(args, parser)
        if args.command == "sweep":
            return cmd_sweep(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "reproduce":
            return cmd_reproduce(args)
    except (ConfigError, CorpusError, FileNotFoundError) as e:
        parser.exit(2, f"tprop {args.command}: error: {e}\n")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
