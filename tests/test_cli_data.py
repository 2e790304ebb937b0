"""`tprop data list | stats | prepare`: output, exit codes and error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli as run

from tprop.data import CORPORA

KNOWN = ("ptb", "ptb-char", "wikitext-2", "wikitext-103", "text8")


@pytest.fixture
def env_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty $TPROP_DATA and $TPROP_CACHE folders, offline."""
    d = {"data": tmp_path / "data", "cache": tmp_path / "cache"}
    for p in d.values():
        p.mkdir()
    monkeypatch.setenv("TPROP_DATA", str(d["data"]))
    monkeypatch.setenv("TPROP_CACHE", str(d["cache"]))
    monkeypatch.setenv("TPROP_OFFLINE", "1")
    return d


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def count_tokens(path: Path) -> int:
    """Whitespace tokens + one <eos> per line, counted independently of tprop."""
    return sum(len(line.split()) + 1 for line in path.read_text().split("\n")[:-1])


def test_list_prints_every_named_corpus(env_dirs, capsys):
    code, out, err = run(capsys, "data", "list")
    assert code == 0 and err == ""
    assert set(KNOWN) <= set(CORPORA)
    listed = [line.split()[0] for line in out.splitlines() if line and not line[0].isspace()]
    assert listed == list(CORPORA)
    for name, info in CORPORA.items():
        assert any(line.split()[:2] == [name, info.format] for line in out.splitlines())
    assert out.count("download on first use") == len(CORPORA)


def test_list_shows_where_a_corpus_is_found(env_dirs, capsys, tmp_path):
    from conftest import write_corpus

    ptb = write_corpus(env_dirs["data"] / "ptb", n_train=50, n_eval=20)
    code, out, _ = run(capsys, "data", "list")
    assert code == 0
    lines = out.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("ptb "))
    assert lines[i + 1].strip() == str(ptb)
    assert out.count("download on first use") == len(CORPORA) - 1


def test_stats_unknown_name_exits_2_with_one_line(env_dirs, capsys):
    code, out, err = run(capsys, "data", "stats", "penn")
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert "unknown corpus 'penn'" in line
    for name in KNOWN:
        assert name in line


def test_stats_needs_a_name_or_data_dir(env_dirs, capsys):
    code, _, err = run(capsys, "data", "stats")
    assert code == 2
    (line,) = error_lines(err)
    assert "NAME or --data-dir" in line


def test_stats_data_dir_json(tiny_corpus_dir, env_dirs, capsys):
    code, out, err = run(capsys, "data", "stats", "--data-dir", str(tiny_corpus_dir), "--json")
    assert code == 0, err
    stats = json.loads(out)
    words = set((tiny_corpus_dir / "train.txt").read_text().split())
    assert stats == {
        "name": "custom",
        "format": "word",
        "path": str(tiny_corpus_dir),
        "vocab_size": len(words) + 1,
        "train_tokens": count_tokens(tiny_corpus_dir / "train.txt"),
        "valid_tokens": count_tokens(tiny_corpus_dir / "valid.txt"),
        "test_tokens": count_tokens(tiny_corpus_dir / "test.txt"),
    }
    assert stats["train_tokens"] > 3000


def test_stats_data_dir_char_format_text(tiny_corpus_dir, env_dirs, capsys):
    code, out, _ = run(capsys, "data", "stats", "--data-dir", str(tiny_corpus_dir),
                       "--format", "char")
    assert code == 0
    train = (tiny_corpus_dir / "train.txt").read_text()
    assert f"custom (char) at {tiny_corpus_dir}" in out
    assert f"vocab_size   {len(set(train)):,}" in out
    assert f"train_tokens {len(train):,}" in out


def test_stats_bad_data_dir_exits_2(tmp_path, env_dirs, capsys):
    code, out, err = run(capsys, "data", "stats", "--data-dir", str(tmp_path / "none"))
    assert code == 2 and out == ""
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert line == f"tprop data: error: --data-dir {tmp_path / 'none'}: no such directory"


@pytest.mark.parametrize("action", ["stats", "prepare"])
def test_explicit_data_dir_is_never_looked_past(action, tmp_path, env_dirs, capsys):
    """A named corpus with an explicit --data-dir is read there (or in DIR/NAME) or refused,
    naming what is missing: the copy in $TPROP_DATA is not used instead."""
    from conftest import write_corpus

    write_corpus(env_dirs["data"] / "ptb", n_train=50, n_eval=20)
    nowhere = tmp_path / "no" / "such"
    code, out, err = run(capsys, "data", action, "ptb", "--data-dir", str(nowhere))
    assert code == 2 and out == "" and "Traceback" not in err
    (line,) = error_lines(err)
    assert line == f"tprop data: error: --data-dir {nowhere}: no such directory"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(capsys, "data", action, "ptb", "--data-dir", str(empty))
    assert code == 2 and out == ""
    (line,) = error_lines(err)
    assert f"--data-dir {empty} does not hold corpus 'ptb'" in line
    assert f"{empty} lacks train.txt, valid.txt, test.txt" in line
    assert f"{empty / 'ptb'} does not exist" in line
    # DIR/ptb is the other place looked in
    write_corpus(empty / "ptb")
    code, out, err = run(capsys, "data", "stats", "ptb", "--data-dir", str(empty), "--json")
    assert code == 0, err
    assert json.loads(out)["path"] == str(empty / "ptb")
    assert not (env_dirs["cache"] / "data").exists()  # nothing downloaded


def test_prepare_absent_corpus_offline_exits_2_with_where_to_put_files(env_dirs, capsys):
    code, out, err = run(capsys, "data", "prepare", "wikitext-2")
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("tprop data: error: Corpus 'wikitext-2' was not found")
    assert "TPROP_OFFLINE is set" in line
    assert str(env_dirs["data"] / "wikitext-2") in line
    assert str(env_dirs["cache"] / "data" / "wikitext-2") in line
    assert "Put the corpus's train.txt, valid.txt and test.txt in one of these" in line
    assert "--data-dir" in line and "TPROP_DATA" in line
    assert "tprop data prepare wikitext-2" in line
    assert list(env_dirs["cache"].iterdir()) == []  # nothing downloaded or cached


def test_prepare_found_corpus_caches_token_ids(env_dirs, capsys):
    from conftest import write_corpus

    d = write_corpus(env_dirs["data"] / "ptb", n_train=200, n_eval=50)
    code, out, err = run(capsys, "data", "prepare", "ptb")
    assert code == 0, err
    assert out.startswith(f"ptb: ready at {d} (")
    assert f"{count_tokens(d / 'train.txt'):,} training tokens" in out
    assert len(list((env_dirs["cache"] / "tokens").glob("*.pt"))) == 1
