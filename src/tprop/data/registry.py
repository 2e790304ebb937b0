"""Named corpora and where to find them.

Where a named corpus is looked for: with an explicit ``data_dir``, there only (the directory
itself, or ``data_dir/<name>``): a corpus that is not there is an error naming what is
missing. Without one: ``$TPROP_DATA/<name>``, then ``<cache>/data/<name>``; when neither holds
the files, the corpus is downloaded into the cache from its canonical source (with sha256
checks) unless ``download=False`` or ``$TPROP_OFFLINE`` is set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .corpus import SPLITS, Corpus, CorpusError, default_cache_dir, load_corpus_dir


@dataclass(frozen=True)
class CorpusInfo:
    """A named corpus: its tokenisation and a one-line description."""

    name: str
    format: str
    description: str
    download_only: bool = False


CORPORA: dict[str, CorpusInfo] = {
    info.name: info
    for info in [
        CorpusInfo("ptb", "word", "Penn Treebank, word level (Mikolov's 10k-word version)"),
        CorpusInfo("ptb-char", "ptb-char", "Penn Treebank, character level (Mikolov)"),
        CorpusInfo("wikitext-2", "word", "WikiText-2 v1 (tokenised, with <unk>)"),
        CorpusInfo("wikitext-103", "word", "WikiText-103 v1 (tokenised, with <unk>)",
                   download_only=True),
        CorpusInfo("text8", "char", "text8: 100M characters of Wikipedia, split 90M/5M/5M",
                   download_only=True),
    ]
}


def _has_splits(d: Path) -> bool:
    return all((d / f"{s}.txt").is_file() for s in SPLITS)


def candidate_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The directories searched for corpus ``name``, in order (``data_dir`` and its
    ``<name>`` subfolder alone when ``data_dir`` is given)."""
    if data_dir is not None:
        return [Path(data_dir), Path(data_dir) / name]
    out: list[Path] = []
    env = os.environ.get("TPROP_DATA")
    if env:
        out.append(Path(env).expanduser() / name)
    out.append(default_cache_dir() / "data" / name)
    return out


def _lacks(d: Path) -> str:
    """What directory ``d`` lacks of a corpus's three files."""
    if not d.exists():
        return f"{d} does not exist"
    if not d.is_dir():
        return f"{d} is not a directory"
    missing = [f"{s}.txt" for s in SPLITS if not (d / f"{s}.txt").is_file()]
    return f"{d} lacks {', '.join(missing)}"


def missing_data_dir_message(data_dir: str | os.PathLike, name: str | None = None) -> str:
    """The error of an explicit ``--data-dir`` that does not hold corpus ``name`` (or, for
    None, any corpus), naming what is missing."""
    d = Path(data_dir)
    if not d.exists():
        return f"--data-dir {d}: no such directory"
    if not d.is_dir():
        return f"--data-dir {d}: not a directory"
    if name is None:
        return (f"--data-dir {d} is not a corpus directory: {_lacks(d)} (a corpus directory "
                "holds train.txt, valid.txt and test.txt)")
    return (f"--data-dir {d} does not hold corpus {name!r}: {_lacks(d)}, and {_lacks(d / name)}."
            " Put train.txt, valid.txt and test.txt in one of the two, or leave --data-dir "
            f"out to use $TPROP_DATA/{name}, the cache or a download")


def find_corpus(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first directory holding corpus ``name``'s three files, or None."""
    for d in candidate_dirs(name, data_dir):
        if _has_splits(d):
            return d
    return None


def offline_message(name: str, data_dir: str | os.PathLike | None, reason: str) -> str:
    places = ", ".join(str(d) for d in candidate_dirs(name, data_dir))
    return (
        f"Corpus {name!r} was not found and could not be downloaded ({reason}). tprop looked "
        f"in: {places}. Put the corpus's train.txt, valid.txt and test.txt in one of these "
        f"directories (or point --data-dir at a directory holding them, or set TPROP_DATA to a "
        f"folder with a '{name}' subfolder), or run `tprop data prepare {name}` on a machine "
        "that is online and copy the cache folder over."
    )


def resolve_corpus(
    name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> Path:
    """The directory of corpus ``name``, downloading it into the cache when allowed."""
    if name not in CORPORA:
        raise CorpusError(
            f"unknown corpus {name!r}; known corpora: {', '.join(CORPORA)} "
            "(or pass --data-dir DIR for your own)"
        )
    found = find_corpus(name, data_dir)
    if found is not None:
        return found
    if data_dir is not None:  # an explicit place is used or refused, never looked past
        raise CorpusError(missing_data_dir_message(data_dir, name))
    if not download or os.environ.get("TPROP_OFFLINE"):
        why = "downloads are off" if not download else "TPROP_OFFLINE is set"
        raise CorpusError(offline_message(name, data_dir, why))
    from .download import DownloadError, download_corpus

    dest = default_cache_dir() / "data" / name
    try:
        download_corpus(name, dest)
    except DownloadError as e:
        if e.network:
            raise CorpusError(offline_message(name, data_dir, str(e))) from None
        raise CorpusError(str(e)) from None
    return dest


def load_corpus(
    name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    *,
    fmt: str | None = None,
    download: bool = True,
    use_cache: bool = True,
) -> Corpus:
    """Load a named corpus (``name``; from ``data_dir`` alone when given) or any corpus
    directory (``data_dir`` alone).

    ``fmt`` overrides the tokenisation (``word``, ``ptb-char``, ``char``); it defaults to the
    named corpus's own, or ``word`` for a bare directory.
    """
    if name is None:
        if data_dir is None:
            raise CorpusError("give a corpus name (--dataset) or a directory (--data-dir)")
        if not _has_splits(Path(data_dir)):
            raise CorpusError(missing_data_dir_message(data_dir))
        return load_corpus_dir(data_dir, fmt or "word", name="custom", use_cache=use_cache)
    path = resolve_corpus(name, data_dir, download=download)
    return load_corpus_dir(path, fmt or CORPORA[name].format, name=name, use_cache=use_cache)
