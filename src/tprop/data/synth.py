"""Synthetic corpora whose dependency length is known: ``tprop data synth NAME --out DIR``.

Each task writes ``DIR/train.txt``, ``valid.txt`` and ``test.txt`` in the ``word`` format
(tokens separated by spaces, one sequence per line; the loader appends ``<eos>`` to every line)
so that every command reads them as any corpus (``--data-dir DIR``), and ``DIR/synth.json``
with the task's parameters and its two **entropy floors**, per token of the stream the
commands evaluate (``<eos>`` included):

* ``ppl_mem``: the perplexity of the optimal predictor that knows the whole past — the
  irreducible entropy of the generative process;
* ``ppl_nomem``: the best perplexity when each token is predicted from the last ``L − 1``
  tokens only (L the dependency length): what a model with no memory reaching back the
  dependency distance can achieve. The lines are built so that any ``L − 1`` consecutive
  tokens reveal the position inside the line (distinct token classes, runs no longer than
  ``L − 1``), so this predictor knows the line's structure and lacks exactly the long-range
  information.

The share of the memory gap a run closes is then
``(log ppl_nomem − log ppl_run) / (log ppl_nomem − log ppl_mem)`` (``memory_gap_share``):
0 for a model that captured nothing of the dependency, 1 for one at the floor.

Every line is independent of the others and drawn from ``random.Random`` seeded by the seed
and the split's name, so a corpus is a deterministic function of its parameters. Parameters:
``length`` L (the dependency length in tokens), ``span`` m (long-range items per line),
``symbols`` N (alphabet of the items), ``fillers`` F (the filler alphabet; 1: a single blank
``_``), ``seed``, ``train_tokens`` and ``eval_tokens`` (at least this many tokens per split,
``<eos>`` included; whole lines).

Tasks (one line shown, then its entropy per line, in nats):

``copy`` — recall (FIFO). ``k_1 … k_m  f × (L−m)  r_1 … r_m``: m keys ``k<i>`` drawn
uniformly from N symbols, a run of fillers, then the recalls ``r<i>`` of the same symbols in
the same order; every recall is exactly L tokens after its key. m ≤ L − 1.
Mem: m log N + (L−m) log F. No memory: + m log N (no recall's key lies in its window).

``brackets`` — bracket matching (LIFO). ``(t_1 … (t_m  f × (L−1)  )t_m … )t_1``: m opening
brackets of random types, a filler run, the closing brackets in nested order. The innermost
pair spans L tokens, the outermost L + 2(m−1): every dependency is ≥ L. m ≤ L − 1.
Mem: m log N + (L−1) log F. No memory: + m log N.

``adding`` — addition in tokens. ``x_1 … x_m  f × (L−2m)  y_1 … y_m  s_1 … s_m`` with digits
x, y uniform in 0 … N−1 and ``s_i = (x_i + y_i) mod N``: each sum is L tokens after its first
operand (its second is m tokens before it, inside any window). 2m ≤ L.
Mem: 2m log N + (L−2m) log F. No memory: + m log N (y_i known, x_i not: s_i uniform).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..config import SPLITS
from ..errors import CorpusError

SYNTH_FILE = "synth.json"


class SynthError(CorpusError):
    """Invalid parameters of a synthetic task; the message names the parameter."""


@dataclass(frozen=True)
class SynthParams:
    """The parameters of a synthetic corpus (``None``: the task's default)."""

    task: str
    length: int = 20
    span: int | None = None
    symbols: int = 8
    fillers: int = 1
    seed: int = 1
    train_tokens: int = 100_000
    eval_tokens: int | None = None  # default: train_tokens // 5

    def resolved(self) -> SynthParams:
        """With the defaults filled in, validated."""
        if self.task not in TASKS:
            raise SynthError(f"unknown synthetic task {self.task!r}; known: {', '.join(TASKS)}")
        task = TASKS[self.task]
        span = self.span if self.span is not None else task.default_span(self.length)
        ev = self.eval_tokens if self.eval_tokens is not None else max(1, self.train_tokens // 5)
        p = SynthParams(self.task, self.length, span, self.symbols, self.fillers, self.seed,
                        self.train_tokens, ev)
        for name in ("length", "symbols", "fillers", "train_tokens", "eval_tokens"):
            if getattr(p, name) < 1:
                raise SynthError(f"--{name.replace('_', '-')}: must be >= 1 "
                                 f"(got {getattr(p, name)})")
        if p.symbols < 2:
            raise SynthError(f"--symbols: must be >= 2 (got {p.symbols})")
        if p.length < 2:
            raise SynthError(f"--length: must be >= 2 (got {p.length})")
        lo, hi = 1, task.max_span(p.length)
        if not lo <= span <= hi:
            raise SynthError(f"--span: {self.task} with --length {p.length} takes 1 … {hi} "
                             f"items per line (got {span})")
        return p


@dataclass(frozen=True)
class Task:
    """A synthetic task: its line generator and its analytic floors."""

    name: str
    summary: str
    max_span: Callable[[int], int]
    default_span: Callable[[int], int]
    line: Callable[[random.Random, SynthParams], list[str]]
    draws: int  # uniform symbols drawn per long-range item (copy, brackets 1; adding 2)
    fill_len: Callable[[SynthParams], int]  # fillers per line
    line_tokens: Callable[[SynthParams], int]  # tokens per line, <eos> included
    dependencies: Callable[[SynthParams], tuple[int, int]]  # shortest, longest

    def entropy(self, p: SynthParams) -> tuple[float, float]:
        """(with memory, without) in nats per line: the symbols drawn and the fillers; without
        memory every one of the m long-range items costs log N more."""
        mem = self.draws * p.span * math.log(p.symbols) + self.fill_len(p) * math.log(p.fillers)
        return mem, mem + p.span * math.log(p.symbols)


def _fill(rng: random.Random, p: SynthParams, n: int) -> list[str]:
    if p.fillers == 1:
        return ["_"] * n
    return [f"f{rng.randrange(p.fillers)}" for _ in range(n)]


def _copy_line(rng: random.Random, p: SynthParams) -> list[str]:
    keys = [rng.randrange(p.symbols) for _ in range(p.span)]
    return ([f"k{k}" for k in keys] + _fill(rng, p, p.length - p.span)
            + [f"r{k}" for k in keys])


def _brackets_line(rng: random.Random, p: SynthParams) -> list[str]:
    types = [rng.randrange(p.symbols) for _ in range(p.span)]
    return ([f"({t}" for t in types] + _fill(rng, p, p.length - 1)
            + [f"){t}" for t in reversed(types)])


def _adding_line(rng: random.Random, p: SynthParams) -> list[str]:
    xs = [rng.randrange(p.symbols) for _ in range(p.span)]
    fill = _fill(rng, p, p.length - 2 * p.span)
    ys = [rng.randrange(p.symbols) for _ in range(p.span)]
    return ([f"x{x}" for x in xs] + fill + [f"y{y}" for y in ys]
            + [f"s{(x + y) % p.symbols}" for x, y in zip(xs, ys)])


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("copy", "recall m keys L tokens later, in order (FIFO)",
         max_span=lambda L: L - 1, default_span=lambda L: min(4, L - 1), line=_copy_line,
         draws=1, fill_len=lambda p: p.length - p.span,
         line_tokens=lambda p: p.length + p.span + 1,
         dependencies=lambda p: (p.length, p.length)),
    Task("brackets", "close m nested brackets of random types (LIFO); innermost pair L apart",
         max_span=lambda L: L - 1, default_span=lambda L: min(4, L - 1), line=_brackets_line,
         draws=1, fill_len=lambda p: p.length - 1,
         line_tokens=lambda p: 2 * p.span + p.length,
         dependencies=lambda p: (p.length, p.length + 2 * (p.span - 1))),
    Task("adding", "s_i = x_i + y_i mod N, each sum L tokens after x_i",
         max_span=lambda L: L // 2, default_span=lambda L: max(1, min(4, L // 2)),
         line=_adding_line, draws=2, fill_len=lambda p: p.length - 2 * p.span,
         line_tokens=lambda p: p.length + p.span + 1,
         dependencies=lambda p: (p.length, p.length)),
]}


def vocabulary(p: SynthParams) -> list[str]:
    """Every token a corpus of these parameters may contain (``<eos>`` last)."""
    p = p.resolved()
    n = range(p.symbols)
    fill = ["_"] if p.fillers == 1 else [f"f{i}" for i in range(p.fillers)]
    if TASKS[p.task].fill_len(p) == 0:
        fill = []
    if p.task == "copy":
        toks = [f"k{i}" for i in n] + fill + [f"r{i}" for i in n]
    elif p.task == "brackets":
        toks = [f"({i}" for i in n] + fill + [f"){i}" for i in n]
    else:
        toks = [f"x{i}" for i in n] + fill + [f"y{i}" for i in n] + [f"s{i}" for i in n]
    return toks + ["<eos>"]


def floors(p: SynthParams) -> dict[str, Any]:
    """The analytic entropy floors per token (nats) and as perplexities."""
    p = p.resolved()
    task = TASKS[p.task]
    mem, nomem = task.entropy(p)
    n = task.line_tokens(p)
    lo, hi = task.dependencies(p)
    return {"tokens_per_line": n, "dependency_min": lo, "dependency_max": hi,
            "entropy_mem": mem / n, "entropy_nomem": nomem / n,
            "ppl_mem": math.exp(mem / n), "ppl_nomem": math.exp(nomem / n)}


def memory_gap_share(ppl: float, ppl_mem: float, ppl_nomem: float) -> float:
    """(log ppl_nomem − log ppl) / (log ppl_nomem − log ppl_mem): the share of the memory
    gap a model of perplexity ``ppl`` closes (0: none of the dependency, 1: all of it)."""
    return (math.log(ppl_nomem) - math.log(ppl)) / (math.log(ppl_nomem) - math.log(ppl_mem))


def generate_lines(p: SynthParams, split: str, min_tokens: int) -> list[list[str]]:
    """Whole lines of ``split`` until they hold at least ``min_tokens`` tokens (``<eos>``
    counted); deterministic in (parameters, split)."""
    p = p.resolved()
    task = TASKS[p.task]
    rng = random.Random(f"tprop-synth/{p.task}/{p.seed}/{split}")
    per = task.line_tokens(p)
    return [task.line(rng, p) for _ in range(-(-min_tokens // per))]


def info(p: SynthParams) -> dict[str, Any]:
    """What ``synth.json`` holds (without the token counts of the written files)."""
    p = p.resolved()
    return {"task": p.task, "summary": TASKS[p.task].summary, "params": asdict(p),
            "vocab_size": len(vocabulary(p)), **floors(p)}


def write_corpus(p: SynthParams, out: str | os.PathLike) -> dict[str, Any]:
    """Write the three splits and ``synth.json`` into ``out``; return synth.json's content."""
    p = p.resolved()
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    meta = info(p)
    counts: dict[str, int] = {}
    seen: set[str] = set()
    for split in SPLITS:
        n = p.train_tokens if split == "train" else p.eval_tokens
        lines = generate_lines(p, split, n)
        if split == "train":
            for ln in lines:
                seen.update(ln)
        text = "".join(" ".join(ln) + "\n" for ln in lines)
        tmp = d / f".{split}.txt.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, d / f"{split}.txt")
        counts[split] = sum(len(ln) + 1 for ln in lines)
    missing = [t for t in vocabulary(p)[:-1] if t not in seen]
    if missing:
        raise SynthError(f"--train-tokens: {p.train_tokens} training tokens do not contain "
                         f"every symbol ({', '.join(missing[:5])} missing); ask for more")
    meta["split_tokens"] = counts
    tmp = d / f".{SYNTH_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, d / SYNTH_FILE)
    return meta


def read_info(directory: str | os.PathLike) -> dict[str, Any] | None:
    """``synth.json`` of a corpus directory, or None when it has none (or it is unreadable)."""
    try:
        data = json.loads((Path(directory) / SYNTH_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def ensure_corpus(p: SynthParams, out: str | os.PathLike) -> tuple[dict[str, Any], bool]:
    """The corpus of ``p`` in ``out``: kept when ``synth.json`` there records the same
    parameters, else (re)written. Returns (synth.json's content, whether it was written)."""
    p = p.resolved()
    have = read_info(out)
    if (have is not None and have.get("params") == asdict(p)
            and all((Path(out) / f"{s}.txt").is_file() for s in SPLITS)):
        return have, False
    return write_corpus(p, out), True


def params_from(task: str, values: dict[str, Any], where: str = "synth") -> SynthParams:
    """``SynthParams`` from a table of values (a spec's ``[data]`` entry, say)."""
    names = set(SynthParams.__dataclass_fields__) - {"task"}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SynthError(f"{where}: unknown parameter {unknown[0]!r} (known: "
                         f"{', '.join(sorted(names))})")
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise SynthError(f"{where}: {k} must be a whole number (got {v!r})")
    return SynthParams(task, **values).resolved()


def describe(meta: dict[str, Any]) -> str:
    """The floors, for people."""
    p = meta["params"]
    dep = (f"{meta['dependency_min']}" if meta["dependency_min"] == meta["dependency_max"]
           else f"{meta['dependency_min']}–{meta['dependency_max']}")
    return (f"{meta['task']}: {meta['summary']}; length {p['length']}, span {p['span']}, "
            f"symbols {p['symbols']}, fillers {p['fillers']}, seed {p['seed']}\n"
            f"  dependency length {dep} tokens, {meta['tokens_per_line']} tokens per line, "
            f"vocabulary {meta['vocab_size']} (with <eos>)\n"
            f"  entropy floor with memory:    {meta['entropy_mem']:.4f} nats/token, "
            f"perplexity {meta['ppl_mem']:.4f}\n"
            f"  entropy floor without memory: {meta['entropy_nomem']:.4f} nats/token, "
            f"perplexity {meta['ppl_nomem']:.4f} (predicting from the last "
            f"{p['length'] - 1} tokens)")
