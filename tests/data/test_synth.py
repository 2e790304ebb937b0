"""Synthetic long-range corpora (tprop.data.synth): files, determinism, vocabulary, and the
analytic entropy floors against the empirical conditional entropies of generated text."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from tprop.cli import main
from tprop.data import load_corpus_dir, tokenize
from tprop.data.synth import (
    TASKS,
    SynthError,
    SynthParams,
    ensure_corpus,
    floors,
    memory_gap_share,
    params_from,
    read_info,
    vocabulary,
    write_corpus,
)


def plug_in_entropy(pairs: list[tuple[tuple, str]]) -> float:
    """Empirical H(next | context) in nats: the average log-loss of the best predictor fitted
    to the sample (counts of (context, next) over counts of context)."""
    joint = Counter(pairs)
    ctx = Counter(c for c, _ in pairs)
    n = len(pairs)
    return -sum(k / n * math.log(k / ctx[c]) for (c, _), k in joint.items())


def stream(d: Path, split: str = "train") -> list[str]:
    return tokenize((d / f"{split}.txt").read_text(), "word")


def with_memory(toks: list[str]) -> list[tuple[tuple, str]]:
    """Context = the whole line so far (lines are independent, so this is the full past);
    from the first line start on."""
    out, line, started = [], [], False
    for t in toks:
        if started:
            out.append((tuple(line), t))
        line.append(t)
        if t == "<eos>":
            line, started = [], True
    return out


def without_memory(toks: list[str], window: int) -> list[tuple[tuple, str]]:
    return [(tuple(toks[i - window:i]), toks[i]) for i in range(window, len(toks))]


SMALL = [
    SynthParams("copy", length=4, span=2, symbols=2, fillers=2, train_tokens=120_000),
    SynthParams("copy", length=5, span=1, symbols=3, fillers=1, train_tokens=120_000),
    SynthParams("brackets", length=4, span=2, symbols=2, fillers=2, train_tokens=120_000),
    SynthParams("brackets", length=3, span=2, symbols=3, fillers=1, train_tokens=120_000),
    SynthParams("adding", length=4, span=2, symbols=3, fillers=1, train_tokens=120_000),
    SynthParams("adding", length=6, span=2, symbols=2, fillers=2, train_tokens=120_000),
]


@pytest.mark.parametrize("p", SMALL, ids=lambda p: f"{p.task}-L{p.length}-m{p.span}")
def test_floors_equal_the_empirical_conditional_entropies(p: SynthParams,
                                                         tmp_path: Path) -> None:
    meta = write_corpus(p, tmp_path)
    toks = stream(tmp_path)
    h_mem = plug_in_entropy(with_memory(toks))
    h_nomem = plug_in_entropy(without_memory(toks, p.length - 1))
    assert abs(h_mem - meta["entropy_mem"]) < 0.01, (h_mem, meta["entropy_mem"])
    assert abs(h_nomem - meta["entropy_nomem"]) < 0.01, (h_nomem, meta["entropy_nomem"])
    # a window of L tokens (reaching the dependency) already achieves the memory floor
    # for tasks whose every dependency is exactly L (copy, adding)
    if p.task != "brackets":
        h_l = plug_in_entropy(without_memory(toks, p.length))
        assert abs(h_l - meta["entropy_mem"]) < 0.02
    assert meta["ppl_mem"] < meta["ppl_nomem"]
    assert math.isclose(math.log(meta["ppl_mem"]), meta["entropy_mem"])


def test_floors_by_hand() -> None:
    f = floors(SynthParams("copy", length=20, span=4, symbols=8))
    assert f["tokens_per_line"] == 25
    assert math.isclose(f["entropy_mem"], 4 * math.log(8) / 25)
    assert math.isclose(f["entropy_nomem"], 8 * math.log(8) / 25)
    f = floors(SynthParams("brackets", length=10, span=3, symbols=4, fillers=2))
    assert (f["dependency_min"], f["dependency_max"], f["tokens_per_line"]) == (10, 14, 16)
    assert math.isclose(f["entropy_mem"], (3 * math.log(4) + 9 * math.log(2)) / 16)
    f = floors(SynthParams("adding", length=10, span=2, symbols=5))
    assert math.isclose(f["entropy_nomem"] - f["entropy_mem"], 2 * math.log(5) / 13)


def test_files_vocabulary_and_info(tmp_path: Path) -> None:
    p = SynthParams("copy", length=6, span=2, symbols=4, train_tokens=3000, eval_tokens=500)
    meta = write_corpus(p, tmp_path)
    for s in ("train", "valid", "test"):
        lines = (tmp_path / f"{s}.txt").read_text().splitlines()
        assert all(len(ln.split()) == 8 for ln in lines)  # L + m tokens, then <eos>
    corpus = load_corpus_dir(tmp_path, "word", use_cache=False)
    assert set(corpus.vocab.itos) == set(vocabulary(p))
    assert len(corpus.vocab) == meta["vocab_size"] == 10
    assert corpus.train.numel() == meta["split_tokens"]["train"] >= 3000
    assert corpus.valid.numel() == meta["split_tokens"]["valid"] >= 500
    assert read_info(tmp_path) == json.loads((tmp_path / "synth.json").read_text()) == meta
    assert meta["params"]["span"] == 2 and meta["task"] == "copy"
    # every recall equals its key, L tokens later
    toks = stream(tmp_path)
    for i, t in enumerate(toks):
        if t.startswith("r"):
            assert toks[i - 6] == "k" + t[1:]


def test_brackets_nest_and_adding_adds(tmp_path: Path) -> None:
    write_corpus(SynthParams("brackets", length=5, span=3, symbols=3, train_tokens=500),
                 tmp_path / "b")
    for ln in (tmp_path / "b" / "train.txt").read_text().splitlines():
        stack = []
        for t in ln.split():
            if t.startswith("("):
                stack.append(t[1:])
            elif t.startswith(")"):
                assert stack.pop() == t[1:]
        assert not stack
    write_corpus(SynthParams("adding", length=6, span=3, symbols=5, train_tokens=500),
                 tmp_path / "a")
    for ln in (tmp_path / "a" / "train.txt").read_text().splitlines():
        t = ln.split()
        xs = [int(v[1:]) for v in t if v[0] == "x"]
        ys = [int(v[1:]) for v in t if v[0] == "y"]
        ss = [int(v[1:]) for v in t if v[0] == "s"]
        assert ss == [(x + y) % 5 for x, y in zip(xs, ys)]
        assert t.index("s" + str(ss[0])) == 6  # the first sum L tokens after x_1


def test_deterministic_given_the_seed(tmp_path: Path) -> None:
    p = SynthParams("adding", length=8, symbols=4, train_tokens=2000)
    write_corpus(p, tmp_path / "a")
    write_corpus(p, tmp_path / "b")
    write_corpus(SynthParams("adding", length=8, symbols=4, train_tokens=2000, seed=2),
                 tmp_path / "c")
    for s in ("train", "valid", "test"):
        a, b, c = ((tmp_path / x / f"{s}.txt").read_text() for x in "abc")
        assert a == b and a != c
    # the splits differ from one another
    assert (tmp_path / "a" / "valid.txt").read_text() != (tmp_path / "a" / "test.txt").read_text()


def test_ensure_keeps_or_rewrites(tmp_path: Path) -> None:
    p = SynthParams("copy", length=5, train_tokens=1000)
    _, wrote = ensure_corpus(p, tmp_path)
    assert wrote
    _, wrote = ensure_corpus(p, tmp_path)
    assert not wrote
    _, wrote = ensure_corpus(SynthParams("copy", length=6, train_tokens=1000), tmp_path)
    assert wrote and read_info(tmp_path)["params"]["length"] == 6


def test_parameter_errors() -> None:
    for p, what in [(SynthParams("copy", length=5, span=5), "--span"),
                    (SynthParams("adding", length=5, span=3), "--span"),
                    (SynthParams("copy", length=1), "--length"),
                    (SynthParams("copy", symbols=1), "--symbols"),
                    (SynthParams("nosuch"), "unknown synthetic task")]:
        with pytest.raises(SynthError, match=what):
            p.resolved()
    with pytest.raises(SynthError, match="unknown parameter 'size'"):
        params_from("copy", {"size": 3})
    with pytest.raises(SynthError, match="whole number"):
        params_from("copy", {"length": 2.5})
    assert params_from("brackets", {"length": 9}).span == 4
    assert set(TASKS) == {"copy", "brackets", "adding"}


def test_memory_gap_share() -> None:
    assert memory_gap_share(2.0, 2.0, 4.0) == 1.0
    assert memory_gap_share(4.0, 2.0, 4.0) == 0.0
    assert math.isclose(memory_gap_share(math.sqrt(8), 2.0, 4.0), 0.5)
    assert memory_gap_share(5.0, 2.0, 4.0) < 0


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "copy"
    assert main(["data", "synth", "copy", "--out", str(out), "--length", "6", "--symbols", "3",
                 "--train-tokens", "2000", "--eval-tokens", "300", "--seed", "4"]) == 0
    text = capsys.readouterr().out
    meta = read_info(out)
    assert f"perplexity {meta['ppl_mem']:.4f}" in text
    assert f"perplexity {meta['ppl_nomem']:.4f}" in text
    assert meta["params"] == {"task": "copy", "length": 6, "span": 4, "symbols": 3,
                              "fillers": 1, "seed": 4, "train_tokens": 2000, "eval_tokens": 300}
    assert main(["data", "synth", "adding", "--out", str(tmp_path / "a"), "--length", "4",
                 "--train-tokens", "800", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "adding"
    with pytest.raises(SystemExit) as e:
        main(["data", "synth", "copy", "--out", str(tmp_path / "x"), "--length", "3",
              "--span", "3"])
    assert e.value.code == 2
    assert "--span" in capsys.readouterr().err
    # and the corpus trains as any corpus directory
    assert main(["data", "stats", "--data-dir", str(out)]) == 0
    assert "vocab_size   8" in capsys.readouterr().out
