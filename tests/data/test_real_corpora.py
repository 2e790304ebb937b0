"""The real corpora in ../shared/data give the published vocabulary sizes and token counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tprop.cli import main
from tprop.data import EOS, UNK, load_corpus

PTB = {"vocab_size": 10_000, "train_tokens": 929_589, "valid_tokens": 73_760,
       "test_tokens": 82_430}
WIKITEXT2 = {"vocab_size": 33_278, "train_tokens": 2_088_628, "valid_tokens": 217_646,
             "test_tokens": 245_569}
# Not 5,017,483 / 393,043 / 442,424: the files' trailing "\n " is not a line (no extra <eos>).
PTB_CHAR = {"vocab_size": 50, "train_tokens": 5_017_482, "valid_tokens": 393_042,
            "test_tokens": 442_423}


def counts(stats: dict) -> dict:
    return {k: stats[k] for k in ("vocab_size", "train_tokens", "valid_tokens", "test_tokens")}


def cli_stats(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["data", "stats", *argv, "--json"]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out  # one JSON object on one line
    return json.loads(out)


def test_ptb_word(shared_data):
    c = load_corpus("ptb", shared_data)
    assert c.format == "word" and c.name == "ptb"
    assert counts(c.stats()) == PTB
    assert UNK in c.vocab and EOS in c.vocab
    assert Path(c.path) == shared_data / "ptb"


def test_ptb_word_valid_and_test_types_occur_in_train(shared_data):
    texts = {s: (shared_data / "ptb" / f"{s}.txt").read_text(encoding="utf-8")
             for s in ("train", "valid", "test")}
    train_types = set(texts["train"].split())
    assert len(train_types) == 9_999  # + <eos> = 10,000
    c = load_corpus("ptb", shared_data)
    unk = c.vocab.stoi[UNK]
    for s in ("valid", "test"):
        words = texts[s].split()
        assert set(words) <= train_types, sorted(set(words) - train_types)[:10]
        # so the only <unk> ids are the literal <unk> tokens of the file: no OOV mapping
        assert int((c.split(s) == unk).sum()) == words.count(UNK) > 0


def test_wikitext2(shared_data):
    c = load_corpus("wikitext-2", shared_data)
    assert c.format == "word"
    assert counts(c.stats()) == WIKITEXT2


def test_ptb_char_cli(shared_data, capsys):
    stats = cli_stats(capsys, "ptb-char", "--data-dir", str(shared_data))
    assert stats["name"] == "ptb-char" and stats["format"] == "ptb-char"
    assert Path(stats["path"]) == shared_data / "ptb-char"
    assert counts(stats) == PTB_CHAR


def test_ptb_cli(shared_data, capsys):
    stats = cli_stats(capsys, "ptb", "--data-dir", str(shared_data))
    assert stats["name"] == "ptb" and stats["format"] == "word"
    assert counts(stats) == PTB


def test_ptb_char_module_entry_point(shared_data, tmp_path):
    env = dict(os.environ, TPROP_DATA=str(shared_data), TPROP_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tprop", "data", "stats", "ptb-char", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert Path(stats["path"]) == shared_data / "ptb-char"
    assert counts(stats) == PTB_CHAR
