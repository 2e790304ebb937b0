"""Tokenisation and loading of corpus directories: formats, OOV, errors, token cache, lookup."""

from __future__ import annotations

import builtins
import pathlib
from pathlib import Path

import pytest
import torch

import tprop.data.corpus as corpus_mod
from tprop.data import (
    CORPORA,
    EOS,
    UNK,
    CorpusError,
    Vocab,
    detokenize,
    find_corpus,
    load_corpus,
    load_corpus_dir,
    resolve_corpus,
    tokenize,
)


def make_dir(d: Path, train: str | bytes, valid: str | bytes, test: str | bytes) -> Path:
    """A corpus directory with the three given texts (bytes written as they are)."""
    d.mkdir(parents=True, exist_ok=True)
    for split, text in (("train", train), ("valid", valid), ("test", test)):
        p = d / f"{split}.txt"
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_bytes(text.encode("utf-8"))
    return d


def ids(t: torch.Tensor) -> list[int]:
    return [int(i) for i in t]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --------------------------------------------------------------------------- word format

WORD_TRAIN = " the cat sat \n\n on the mat \n the dog \n"
WORD_VALID = " the mat \n dog sat \n"
WORD_TEST = "\n the cat"  # a leading blank line; a last line without its newline


def test_word_tokens_are_whitespace_tokens_plus_one_eos_per_line():
    assert tokenize(WORD_TRAIN, "word") == [
        "the", "cat", "sat", EOS,
        EOS,  # the blank line counts as a line
        "on", "the", "mat", EOS,
        "the", "dog", EOS,
    ]
    # a non-blank remainder after the last newline is a line of its own
    assert tokenize(WORD_TEST, "word") == [EOS, "the", "cat", EOS]
    # whitespace-only lines (as in WikiText's " \n") are blank lines: one <eos> each
    assert tokenize(" \n \n", "word") == [EOS, EOS]
    # tabs and runs of spaces separate tokens too
    assert tokenize("a\t b  c\n", "word") == ["a", "b", "c", EOS]


def test_word_corpus_vocab_in_order_of_first_appearance(tmp_path, cache):
    c = load_corpus_dir(make_dir(tmp_path / "w", WORD_TRAIN, WORD_VALID, WORD_TEST),
                        "word", cache_dir=cache)
    assert c.vocab.itos == ["the", "cat", "sat", EOS, "on", "mat", "dog"]
    assert c.vocab.stoi == {t: i for i, t in enumerate(c.vocab.itos)}
    assert ids(c.train) == [0, 1, 2, 3, 3, 4, 0, 5, 3, 0, 6, 3]
    assert ids(c.valid) == [0, 5, 3, 6, 2, 3]
    assert ids(c.test) == [3, 0, 1, 3]
    for t in (c.train, c.valid, c.test):
        assert t.dtype == torch.int64 and t.dim() == 1


def test_word_encode_decode_round_trip(tmp_path, cache):
    c = load_corpus_dir(make_dir(tmp_path / "w", WORD_TRAIN, WORD_VALID, WORD_TEST),
                        "word", cache_dir=cache)
    toks = tokenize(WORD_TRAIN, "word")
    assert c.vocab.encode(toks) == ids(c.train)
    assert c.vocab.decode(c.train) == toks
    assert c.vocab.decode(c.vocab.encode(["dog", "the", EOS])) == ["dog", "the", EOS]
    assert c.detokenize(c.train) == "the cat sat\n\non the mat\nthe dog\n"
    assert c.detokenize(c.valid) == "the mat\ndog sat\n"
    assert detokenize(["a", "b", EOS, "c"], "word") == "a b\nc"


def test_word_corpus_stats(tmp_path, cache):
    d = make_dir(tmp_path / "w", WORD_TRAIN, WORD_VALID, WORD_TEST)
    c = load_corpus_dir(d, "word", name="mine", cache_dir=cache)
    assert c.stats() == {
        "name": "mine",
        "format": "word",
        "path": str(d),
        "vocab_size": 7,
        "train_tokens": 12,
        "valid_tokens": 6,
        "test_tokens": 4,
    }
    assert c.split("valid") is c.valid
    with pytest.raises(CorpusError, match="unknown split"):
        c.split("dev")


def test_vocab_class():
    v = Vocab(["b", "a", "b", "c"])
    assert v.itos == ["b", "a", "c"] and len(v) == 3
    assert "a" in v and "z" not in v
    assert v.add("z") == 3 and v.add("a") == 1
    assert v == Vocab(["b", "a", "c", "z"])
    assert v != Vocab(["a", "b", "c", "z"])


# --------------------------------------------------------------------------- ptb-char format

# Two lines in the PTB char layout: characters separated by spaces, "_" between words,
# every line ends with " \n", the file ends with "\n " (a trailing space, no final newline).
PTB_CHAR_TRAIN = "a _ b c \n c _ a \n "
PTB_CHAR_VALID = "b _ a \n "
PTB_CHAR_TEST = "c \n "


def test_ptb_char_trailing_space_is_not_a_line():
    toks = tokenize(PTB_CHAR_TRAIN, "ptb-char")
    assert toks == ["a", "_", "b", "c", EOS, "c", "_", "a", EOS]
    assert toks.count(EOS) == PTB_CHAR_TRAIN.count("\n") == 2
    # the naive `for line in f: line.split() + ['<eos>']` loader would give one more
    naive = sum(len(line.split()) + 1 for line in PTB_CHAR_TRAIN.splitlines(keepends=True))
    assert naive == len(toks) + 1


def test_ptb_char_corpus(tmp_path, cache):
    c = load_corpus_dir(make_dir(tmp_path / "pc", PTB_CHAR_TRAIN, PTB_CHAR_VALID, PTB_CHAR_TEST),
                        "ptb-char", cache_dir=cache)
    assert c.format == "ptb-char"
    assert c.vocab.itos == ["a", "_", "b", "c", EOS]
    assert "_" in c.vocab
    assert ids(c.train) == [0, 1, 2, 3, 4, 3, 1, 0, 4]
    assert ids(c.valid) == [2, 1, 0, 4]
    assert ids(c.test) == [3, 4]
    assert c.stats()["train_tokens"] == 9
    # "_" becomes a space, <eos> a newline, and characters are joined with nothing between
    assert c.detokenize(c.train) == "a bc\nc a\n"
    assert detokenize(["x", "_", "y", EOS], "ptb-char") == "x y\n"


# --------------------------------------------------------------------------- raw char format

CHAR_TRAIN = "ab c\n\ncafé ba\n"
CHAR_VALID = "a b\n"
CHAR_TEST = "éa"


def test_char_every_character_is_a_token():
    assert tokenize(CHAR_TRAIN, "char") == list(CHAR_TRAIN)
    assert tokenize("x\n ", "char") == ["x", "\n", " "]  # nothing is dropped


def test_char_corpus(tmp_path, cache):
    c = load_corpus_dir(make_dir(tmp_path / "ch", CHAR_TRAIN, CHAR_VALID, CHAR_TEST),
                        "char", cache_dir=cache)
    assert c.vocab.itos == ["a", "b", " ", "c", "\n", "f", "é"]
    assert EOS not in c.vocab
    assert c.stats()["train_tokens"] == len(CHAR_TRAIN) == 14
    assert c.stats()["valid_tokens"] == 4 and c.stats()["test_tokens"] == 2
    assert ids(c.test) == [6, 0]
    for split, text in (("train", CHAR_TRAIN), ("valid", CHAR_VALID), ("test", CHAR_TEST)):
        assert c.detokenize(c.split(split)) == text


# --------------------------------------------------------------------------- OOV


def test_oov_maps_to_unk_when_train_has_unk(tmp_path, cache):
    c = load_corpus_dir(make_dir(tmp_path / "u", " a <unk> b \n", " a zz b \n", " qq \n"),
                        "word", cache_dir=cache)
    assert c.vocab.itos == ["a", UNK, "b", EOS]
    assert ids(c.valid) == [0, 1, 2, 3]
    assert ids(c.test) == [1, 3]


@pytest.mark.parametrize("split", ["valid", "test"])
def test_oov_without_unk_names_token_line_and_split(tmp_path, cache, split):
    texts = {"train": " a b \n", "valid": " a b \n", "test": " b a \n"}
    texts[split] = " a b \n b a \n a zebra b \n"
    d = make_dir(tmp_path / "o", texts["train"], texts["valid"], texts["test"])
    with pytest.raises(CorpusError) as ei:
        load_corpus_dir(d, "word", cache_dir=cache)
    msg = str(ei.value)
    assert "'zebra'" in msg
    assert "line 3" in msg
    assert f"the {split} split" in msg
    assert f"{split}.txt" in msg


def test_char_oov_without_unk_names_character_and_line(tmp_path, cache):
    d = make_dir(tmp_path / "co", "ab\nba\n", "ab\nb\nabz\n", "a\n")
    with pytest.raises(CorpusError) as ei:
        load_corpus_dir(d, "char", cache_dir=cache)
    msg = str(ei.value)
    assert "'z'" in msg and "line 3" in msg and "valid" in msg


# --------------------------------------------------------------------------- errors


def test_missing_split_files_are_listed(tmp_path, cache):
    d = make_dir(tmp_path / "m", " a \n", " a \n", " a \n")
    (d / "valid.txt").unlink()
    (d / "test.txt").unlink()
    with pytest.raises(CorpusError) as ei:
        load_corpus_dir(d, "word", cache_dir=cache)
    msg = str(ei.value)
    assert "lacks valid.txt, test.txt" in msg
    assert str(d) in msg


def test_missing_directory(tmp_path, cache):
    d = tmp_path / "nowhere"
    with pytest.raises(CorpusError, match="corpus directory not found") as ei:
        load_corpus_dir(d, "word", cache_dir=cache)
    assert str(d) in str(ei.value)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_empty_split(tmp_path, cache, split):
    texts = {"train": " a b \n", "valid": " a \n", "test": " b \n"}
    texts[split] = ""
    d = make_dir(tmp_path / "e", texts["train"], texts["valid"], texts["test"])
    with pytest.raises(CorpusError) as ei:
        load_corpus_dir(d, "word", cache_dir=cache)
    assert f"the {split} split is empty" in str(ei.value)
    assert f"{split}.txt" in str(ei.value)


def test_undecodable_bytes_give_offset_and_line(tmp_path, cache):
    valid = b" a b \n b a \n a \xe9 b \n"  # latin-1 e-acute at byte 15, line 3
    d = make_dir(tmp_path / "bad", " a b \n", valid, " a \n")
    with pytest.raises(CorpusError) as ei:
        load_corpus_dir(d, "word", cache_dir=cache)
    msg = str(ei.value)
    assert valid.index(b"\xe9") == 15
    assert "byte offset 15" in msg
    assert "line 3" in msg
    assert "valid.txt" in msg
    assert "UTF-8" in msg


def test_unknown_format(tmp_path, cache):
    d = make_dir(tmp_path / "f", " a \n", " a \n", " a \n")
    with pytest.raises(CorpusError, match="unknown format 'bytes'") as ei:
        load_corpus_dir(d, "bytes", cache_dir=cache)
    assert "word" in str(ei.value) and "ptb-char" in str(ei.value)
    with pytest.raises(CorpusError, match="unknown format"):
        tokenize("a b\n", "words")
    assert not cache.exists()


def test_unknown_corpus_name():
    with pytest.raises(CorpusError) as ei:
        load_corpus("ptb-word")
    msg = str(ei.value)
    assert "unknown corpus 'ptb-word'" in msg
    for name in CORPORA:
        assert name in msg


def test_load_corpus_needs_a_name_or_a_directory():
    with pytest.raises(CorpusError, match="give a corpus name"):
        load_corpus()


def _deny_reading(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """Make ``target`` unreadable (EACCES) to the corpus module (tests run as root)."""
    real_open = builtins.open
    real_read_bytes = pathlib.Path.read_bytes

    def deny() -> PermissionError:
        return PermissionError(13, "Permission denied", str(target))

    def fake_open(file, *args, **kwargs):
        if Path(file) == target:
            raise deny()
        return real_open(file, *args, **kwargs)

    def fake_read_bytes(self):
        if Path(self) == target:
            raise deny()
        return real_read_bytes(self)

    monkeypatch.setattr(corpus_mod, "open", fake_open, raising=False)
    monkeypatch.setattr(pathlib.Path, "read_bytes", fake_read_bytes)


def test_unreadable_file_without_cache_is_a_corpus_error(tmp_path, monkeypatch):
    d = make_dir(tmp_path / "r", " a \n", " a \n", " a \n")
    _deny_reading(monkeypatch, d / "train.txt")
    with pytest.raises(CorpusError, match="cannot read .*train.txt: Permission denied"):
        load_corpus_dir(d, "word", use_cache=False)


def test_unreadable_file_with_cache_is_a_corpus_error(tmp_path, cache, monkeypatch):
    d = make_dir(tmp_path / "r", " a \n", " a \n", " a \n")
    _deny_reading(monkeypatch, d / "train.txt")
    with pytest.raises(CorpusError, match="cannot read"):
        load_corpus_dir(d, "word", cache_dir=cache)


# --------------------------------------------------------------------------- token cache


class CountingTokenizer:
    """Wraps tokenize_files, counting calls; raises once ``allow`` calls are used up."""

    def __init__(self, allow: int) -> None:
        self.real = corpus_mod.tokenize_files
        self.calls = 0
        self.allow = allow

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.allow:
            raise AssertionError("tokenize_files called although the cache holds the corpus")
        return self.real(*args, **kwargs)


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "tokens").glob("*.pt")) if (cache / "tokens").is_dir() else []


def assert_same_corpus(a, b) -> None:
    assert a.vocab == b.vocab and a.vocab.itos == b.vocab.itos
    for s in ("train", "valid", "test"):
        assert torch.equal(a.split(s), b.split(s))
        assert a.split(s).dtype == b.split(s).dtype == torch.int64


def test_second_load_uses_the_cache(tiny_corpus_dir, cache, monkeypatch):
    tok = CountingTokenizer(allow=2)
    monkeypatch.setattr(corpus_mod, "tokenize_files", tok)
    first = load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache)
    assert tok.calls == 1
    assert len(cache_files(cache)) == 1
    second = load_corpus_dir(tiny_corpus_dir, "word", name="again", cache_dir=cache)
    assert tok.calls == 1
    assert_same_corpus(first, second)
    assert second.name == "again" and second.format == "word"
    assert second.path == str(tiny_corpus_dir)
    # the cached corpus is also what a fresh tokenisation gives
    assert_same_corpus(first, load_corpus_dir(tiny_corpus_dir, "word", use_cache=False))
    assert tok.calls == 2


def test_cache_hit_for_a_copy_with_the_same_bytes(tiny_corpus_dir, tmp_path, cache, monkeypatch):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_corpus_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    first = load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache)
    monkeypatch.setattr(corpus_mod, "tokenize_files", CountingTokenizer(allow=0))
    second = load_corpus_dir(copy, "word", cache_dir=cache)
    assert_same_corpus(first, second)
    assert second.path == str(copy)


def test_changed_content_changes_the_key_and_retokenises(tiny_corpus_dir, cache, monkeypatch):
    tok = CountingTokenizer(allow=2)
    monkeypatch.setattr(corpus_mod, "tokenize_files", tok)
    first = load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache)
    test_file = tiny_corpus_dir / "test.txt"
    test_file.write_text(test_file.read_text() + " w0 w1 \n")
    second = load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache)
    assert tok.calls == 2
    assert len(cache_files(cache)) == 2
    assert torch.equal(first.train, second.train)
    assert second.test.numel() == first.test.numel() + 3
    assert ids(second.test[-3:]) == second.vocab.encode(["w0", "w1", EOS])


def test_format_is_part_of_the_key(tmp_path, cache, monkeypatch):
    d = make_dir(tmp_path / "fk", "a b\nb a\n", "a\n", "b\n")
    tok = CountingTokenizer(allow=2)
    monkeypatch.setattr(corpus_mod, "tokenize_files", tok)
    word = load_corpus_dir(d, "word", cache_dir=cache)
    char = load_corpus_dir(d, "char", cache_dir=cache)
    assert tok.calls == 2
    assert word.vocab.itos == ["a", "b", EOS]
    assert char.vocab.itos == ["a", " ", "b", "\n"]


def test_corrupted_cache_file_is_rebuilt(tiny_corpus_dir, cache, monkeypatch):
    first = load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache)
    (entry,) = cache_files(cache)
    entry.write_bytes(b"this is not a torch file")
    tok = CountingTokenizer(allow=1)
    monkeypatch.setattr(corpus_mod, "tokenize_files", tok)
    second = load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache)
    assert tok.calls == 1
    assert_same_corpus(first, second)
    # the entry was rewritten and is now served from the cache again
    blob = torch.load(entry, weights_only=True)
    assert blob["vocab"] == first.vocab.itos
    third = load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache)
    assert tok.calls == 1
    assert_same_corpus(first, third)


def test_cache_entry_with_missing_keys_is_rebuilt(tiny_corpus_dir, cache):
    first = load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache)
    (entry,) = cache_files(cache)
    torch.save({"vocab": ["x"]}, entry)
    assert_same_corpus(first, load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache))


def test_use_cache_false_writes_nothing(tiny_corpus_dir, tmp_path, cache, monkeypatch):
    env_cache = tmp_path / "env-cache"
    monkeypatch.setenv("TPROP_CACHE", str(env_cache))
    c = load_corpus_dir(tiny_corpus_dir, "word", cache_dir=cache, use_cache=False)
    c2 = load_corpus_dir(tiny_corpus_dir, "word", use_cache=False)
    assert not cache.exists()
    assert not env_cache.exists()
    assert_same_corpus(c, c2)
    assert c.train.numel() > 3000
    # without cache_dir the cache goes to $TPROP_CACHE/tokens
    load_corpus_dir(tiny_corpus_dir, "word")
    assert len(cache_files(env_cache)) == 1


# --------------------------------------------------------------------------- lookup order


def tagged_corpus(d: Path, tag: str) -> Path:
    """A tiny corpus whose vocabulary starts with ``tag`` (tells the candidates apart)."""
    return make_dir(d, f" {tag} x \n", f" {tag} \n", " x \n")


def first_word(name: str, data_dir: Path | None = None) -> str:
    return load_corpus(name, data_dir, use_cache=False).vocab.itos[0]


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty data_dir, $TPROP_DATA and $TPROP_CACHE folders, with the environment set."""
    p = {k: tmp_path / k for k in ("explicit", "env-data", "env-cache")}
    for v in p.values():
        v.mkdir()
    monkeypatch.setenv("TPROP_DATA", str(p["env-data"]))
    monkeypatch.setenv("TPROP_CACHE", str(p["env-cache"]))
    monkeypatch.setenv("TPROP_OFFLINE", "1")
    return p


def test_lookup_explicit_dir_itself_beats_everything(places):
    tagged_corpus(places["explicit"], "itself")
    tagged_corpus(places["explicit"] / "ptb", "sub")
    tagged_corpus(places["env-data"] / "ptb", "envdata")
    tagged_corpus(places["env-cache"] / "data" / "ptb", "cached")
    assert first_word("ptb", places["explicit"]) == "itself"
    assert resolve_corpus("ptb", places["explicit"]) == places["explicit"]


def test_lookup_explicit_subdir_beats_tprop_data(places):
    tagged_corpus(places["explicit"] / "ptb", "sub")
    tagged_corpus(places["env-data"] / "ptb", "envdata")
    tagged_corpus(places["env-cache"] / "data" / "ptb", "cached")
    assert first_word("ptb", places["explicit"]) == "sub"
    assert find_corpus("ptb", places["explicit"]) == places["explicit"] / "ptb"


def test_lookup_tprop_data_beats_cache(places):
    tagged_corpus(places["env-data"] / "ptb", "envdata")
    tagged_corpus(places["env-cache"] / "data" / "ptb", "cached")
    assert first_word("ptb") == "envdata"
    # an explicit data_dir that holds nothing is refused, never looked past
    with pytest.raises(CorpusError) as ei:
        first_word("ptb", places["explicit"])
    assert str(ei.value).startswith(f"--data-dir {places['explicit']} does not hold corpus "
                                    "'ptb'")
    # the named corpus's own format is used (ptb is word level)
    assert load_corpus("ptb", use_cache=False).format == "word"


def test_lookup_cache_last(places):
    tagged_corpus(places["env-cache"] / "data" / "ptb", "cached")
    tagged_corpus(places["env-data"] / "wikitext-2", "other-corpus")  # wrong name: ignored
    assert first_word("ptb") == "cached"
    assert resolve_corpus("ptb") == places["env-cache"] / "data" / "ptb"


def test_lookup_incomplete_dir_is_skipped(places):
    d = tagged_corpus(places["env-data"] / "ptb", "envdata")
    (d / "test.txt").unlink()
    tagged_corpus(places["env-cache"] / "data" / "ptb", "cached")
    assert first_word("ptb") == "cached"


def test_lookup_nothing_found_offline(places):
    with pytest.raises(CorpusError) as ei:
        load_corpus("ptb")
    msg = str(ei.value)
    assert "TPROP_OFFLINE is set" in msg
    for d in (places["env-data"] / "ptb", places["env-cache"] / "data" / "ptb"):
        assert str(d) in msg
    assert not (places["env-cache"] / "data" / "ptb").exists()


def test_lookup_explicit_dir_is_used_or_refused(places):
    """An explicit data_dir is the only place looked in (itself or its <name> subfolder): the
    corpora of $TPROP_DATA and the cache are never used instead, nothing is downloaded, and the
    error says what is missing where."""
    tagged_corpus(places["env-data"] / "ptb", "envdata")
    tagged_corpus(places["env-cache"] / "data" / "ptb", "cached")
    explicit = places["explicit"]
    nowhere = explicit / "no" / "such"
    with pytest.raises(CorpusError) as ei:
        load_corpus("ptb", nowhere)
    assert str(ei.value) == f"--data-dir {nowhere}: no such directory"
    # incomplete in both places: each is named with what it lacks
    (explicit / "train.txt").write_text(" a \n")
    (explicit / "ptb").mkdir()
    (explicit / "ptb" / "valid.txt").write_text(" a \n")
    with pytest.raises(CorpusError) as ei:
        load_corpus("ptb", explicit)
    msg = str(ei.value)
    assert f"{explicit} lacks valid.txt, test.txt" in msg
    assert f"{explicit / 'ptb'} lacks train.txt, test.txt" in msg
    assert "envdata" not in msg and "\n" not in msg
    # a bare directory (no corpus name) likewise
    with pytest.raises(CorpusError) as ei:
        load_corpus(None, nowhere)
    assert str(ei.value) == f"--data-dir {nowhere}: no such directory"
    with pytest.raises(CorpusError) as ei:
        load_corpus(None, explicit)
    assert f"{explicit} lacks valid.txt, test.txt" in str(ei.value)
    # a file is not a directory
    with pytest.raises(CorpusError, match="not a directory"):
        load_corpus("ptb", explicit / "train.txt")
    assert sorted(p.name for p in places["env-cache"].iterdir()) == ["data"]  # no tokens
