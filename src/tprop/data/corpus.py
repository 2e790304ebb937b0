"""Corpora: text files -> vocabulary -> token-id tensors, with an on-disk token cache.

A corpus is a directory holding ``train.txt``, ``valid.txt`` and ``test.txt``. Three
tokenisations ("formats") are supported:

``word``
    Whitespace-separated tokens plus one ``<eos>`` per line (the ``line.split() +
    ['<eos>']`` rule of pytorch/examples' word_language_model). Blank lines count as lines.
``ptb-char``
    The Penn Treebank character format: characters separated by spaces, ``_`` between
    words. Tokenised exactly like ``word`` (each character is a whitespace token).
``char``
    Raw characters: every character of the file is a token, newline included; no ``<eos>``.

For ``word`` and ``ptb-char`` a line is text ended by ``\\n``; a whitespace-only remainder
after the last newline (PTB char files end with ``"\\n "``) is not a line.
The vocabulary is built from train, in order of first appearance. Tokens of valid/test
missing from it map to ``<unk>`` when the vocabulary has it, else loading fails with an
error naming the token and its line.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import FORMATS as FORMATS  # torch-free constants the command line shares
from ..config import SPLITS as SPLITS
from ..errors import CorpusError as CorpusError

EOS = "<eos>"
UNK = "<unk>"
_CACHE_VERSION = 1


class Vocab:
    """A bijection between token strings and ids (ids in order of first appearance)."""

    def __init__(self, tokens: Sequence[str] = ()) -> None:
        self.itos: list[str] = []
        self.stoi: dict[str, int] = {}
        for tok in tokens:
            self.add(tok)

    def add(self, tok: str) -> int:
        idx = self.stoi.get(tok)
        if idx is None:
            idx = self.stoi[tok] = len(self.itos)
            self.itos.append(tok)
        return idx

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, tok: str) -> bool:
        return tok in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi[t] for t in tokens]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]


@dataclass
class Corpus:
    """A vocabulary and the three splits as 1-D int64 token-id tensors."""

    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    format: str = "word"
    name: str = "custom"
    path: str | None = None

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise CorpusError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def stats(self) -> dict:
        return {
            "name": self.name,
            "format": self.format,
            "path": self.path,
            "vocab_size": len(self.vocab),
            "train_tokens": int(self.train.numel()),
            "valid_tokens": int(self.valid.numel()),
            "test_tokens": int(self.test.numel()),
        }

    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids back to readable text (``<eos>`` becomes a newline)."""
        toks = self.vocab.decode(ids)
        return detokenize(toks, self.format)


def detokenize(tokens: Sequence[str], fmt: str) -> str:
    """Readable text for a token sequence of the given format."""
    if fmt == "char":
        return "".join(tokens)
    if fmt == "ptb-char":
        out = []
        for t in tokens:
            out.append("\n" if t == EOS else " " if t == "_" else t)
        return "".join(out)
    lines: list[list[str]] = [[]]
    for t in tokens:
        if t == EOS:
            lines.append([])
        else:
            lines[-1].append(t)
    return "\n".join(" ".join(line) for line in lines)


# --------------------------------------------------------------------------- reading


def read_text(path: str | os.PathLike) -> str:
    """The file's text, decoded as strict UTF-8; a clear error for missing/undecodable files."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorpusError(f"missing file: {path}") from None
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CorpusError(
            f"{path}: bytes that are not UTF-8 at byte offset {e.start} (line {line}): "
            f"{data[e.start:e.start + 8]!r}. tprop reads corpora as UTF-8 text; re-encode the "
            "file (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None


def iter_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace tokens + <eos>) for each line of a word/ptb-char text."""
    lines = text.split("\n")
    last = lines.pop()  # the remainder after the final newline
    if last.strip():
        lines.append(last)
    for lineno, line in enumerate(lines, start=1):
        yield lineno, line.split() + [EOS]


def tokenize(text: str, fmt: str) -> list[str]:
    """The token sequence of ``text`` under format ``fmt``."""
    if fmt == "char":
        return list(text)
    if fmt not in FORMATS:
        raise CorpusError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out: list[str] = []
    for _, toks in iter_lines(text):
        out.extend(toks)
    return out


def _located_tokens(text: str, fmt: str) -> Iterator[tuple[int, str]]:
    """(line number, token) for every token of ``text`` under format ``fmt``."""
    if fmt == "char":
        line = 1
        for ch in text:
            yield line, ch
            line += ch == "\n"
        return
    for lineno, toks in iter_lines(text):
        for tok in toks:
            yield lineno, tok


def _encode_split(text: str, fmt: str, vocab: Vocab, split: str, path: Path) -> torch.Tensor:
    stoi = vocab.stoi
    unk = stoi.get(UNK)
    kind = "character" if fmt == "char" else "token"
    ids = []
    for lineno, tok in _located_tokens(text, fmt):
        i = stoi.get(tok)
        if i is None:
            if unk is None:
                raise CorpusError(
                    f"{path}: {kind} {tok!r} on line {lineno} of the {split} split does not "
                    "occur in train and the vocabulary has no <unk> to map it to."
                )
            i = unk
        ids.append(i)
    return torch.tensor(ids, dtype=torch.long)


def corpus_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The three split files of a corpus directory; a clear error when any is missing."""
    d = Path(directory)
    if not d.is_dir():
        raise CorpusError(f"corpus directory not found: {d}")
    files = {s: d / f"{s}.txt" for s in SPLITS}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise CorpusError(
            f"{d} is not a corpus directory: it lacks {', '.join(missing)}. A corpus directory "
            "holds train.txt, valid.txt and test.txt."
        )
    return files


def tokenize_files(files: dict[str, Path], fmt: str) -> tuple[Vocab, dict[str, torch.Tensor]]:
    """Build the vocabulary from train and encode all three splits."""
    if fmt not in FORMATS:
        raise CorpusError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    texts = {s: read_text(files[s]) for s in SPLITS}
    for s in SPLITS:
        if not texts[s].strip():
            raise CorpusError(f"{files[s]}: the {s} split is empty")
    vocab = Vocab()
    for _, tok in _located_tokens(texts["train"], fmt):
        vocab.add(tok)
    tensors = {s: _encode_split(texts[s], fmt, vocab, s, files[s]) for s in SPLITS}
    return vocab, tensors


# --------------------------------------------------------------------------- caching


def default_cache_dir() -> Path:
    """``$TPROP_CACHE``, else ``$XDG_CACHE_HOME/tprop``, else ``~/.cache/tprop``."""
    env = os.environ.get("TPROP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tprop"


def content_key(files: dict[str, Path], fmt: str) -> str:
    """A hash of the three files' bytes and the format: the token cache's key."""
    h = hashlib.sha256(f"tprop-tokens-v{_CACHE_VERSION}:{fmt}".encode())
    for s in SPLITS:
        try:
            with open(files[s], "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as e:
            raise CorpusError(f"cannot read {files[s]}: {e.strerror}") from None
        h.update(b"\0" + s.encode() + b"\0")
    return h.hexdigest()


def atomic_torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_corpus_dir(
    directory: str | os.PathLike,
    fmt: str = "word",
    *,
    name: str = "custom",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> Corpus:
    """Load a corpus directory, reusing cached token ids when the files are unchanged."""
    files = corpus_files(directory)
    if fmt not in FORMATS:
        raise CorpusError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    cache_file = None
    if use_cache:
        key = content_key(files, fmt)
        cache_file = Path(cache_dir or default_cache_dir()) / "tokens" / f"{key}.pt"
        if cache_file.is_file():
            try:
                blob = torch.load(cache_file, weights_only=True)
                return Corpus(
                    Vocab(blob["vocab"]), blob["train"], blob["valid"], blob["test"],
                    format=fmt, name=name, path=str(directory),
                )
            except Exception:  # a damaged cache entry is rebuilt, never fatal
                pass
    vocab, t = tokenize_files(files, fmt)
    if cache_file is not None:
        try:
            atomic_torch_save({"vocab": vocab.itos, **t}, cache_file)
        except OSError:
            pass  # a read-only cache only costs speed
    return Corpus(vocab, t["train"], t["valid"], t["test"], format=fmt, name=name,
                  path=str(directory))
