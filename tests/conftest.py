"""Shared fixtures: a tiny generated corpus, the real corpora, an isolated cache."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the token cache and downloads of the test session out of the user's home; one
    torch thread."""
    os.environ["TPROP_CACHE"] = str(tmp_path_factory.mktemp("tprop-cache"))
    os.environ["TPROP_OFFLINE"] = "1"
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine may be busy


def write_corpus(d: Path, n_train: int = 3000, n_eval: int = 400, seed: int = 0,
                 vocab: int = 30) -> Path:
    """A small word-level corpus with some structure (a Markov chain over ``vocab`` words)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    nxt = {w: rng.sample(words, 3) for w in words}

    def text(n: int) -> str:
        lines, cur, w = [], [], rng.choice(words)
        for _ in range(n):
            cur.append(w)
            if len(cur) >= rng.randint(5, 12):
                lines.append(" " + " ".join(cur) + " ")
                cur = []
            w = rng.choice(nxt[w])
        lines.append(" " + " ".join(cur) + " ")
        return "\n".join(lines) + "\n"

    d.mkdir(parents=True, exist_ok=True)
    (d / "train.txt").write_text(text(n_train))
    (d / "valid.txt").write_text(text(n_eval))
    (d / "test.txt").write_text(text(n_eval))
    return d


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.fixture
def tiny_corpus_dir(tmp_path: Path) -> Path:
    """A directory with train/valid/test.txt of a tiny word-level corpus."""
    return write_corpus(tmp_path / "tiny")


@pytest.fixture
def shared_data() -> Path:
    """The real corpora in ../shared/data: required under CI, skipped locally if absent."""
    env = os.environ.get("TPROP_DATA")
    path = Path(env).resolve() if env else SHARED_DATA  # absolute: subprocesses run elsewhere
    if not (path / "ptb" / "train.txt").is_file():
        msg = f"the real corpora are not at {path} (set TPROP_DATA to ../shared/data)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `tprop ARGV` run in this process."""
    from tprop.cli import main

    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
