"""Corpus downloads against a local HTTP server: success, checksums, cleanup, network errors."""

from __future__ import annotations

import functools
import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tprop.data import download as dl
from tprop.data import registry
from tprop.data.corpus import CorpusError
from tprop.data.download import Download, DownloadError, Source, download_corpus

TEXTS = {
    "train": " the cat sat \n on the mat \n caf\u00e9 \n",
    "valid": " the mat \n",
    "test": " a cat \n",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        if self.path == "/truncated":  # promises 1000 bytes, sends 10, hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL) of a local HTTP server."""
    root = tmp_path / "srv"
    root.mkdir()
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "cache" / "data" / "demo"


def closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/x.zip"


def make_zip(path: Path, files: dict[str, bytes]) -> bytes:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path.read_bytes()


def make_tgz(path: Path, files: dict[str, bytes], symlinks: dict[str, str] = {}) -> bytes:  # noqa: B006
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in symlinks.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path.read_bytes()


def corpus_members(prefix: str) -> dict[str, bytes]:
    return {f"{prefix}wiki.{s}.tokens": TEXTS[s].encode() for s in TEXTS}


def assert_corpus(dest: Path) -> None:
    assert sorted(p.name for p in dest.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    for s, text in TEXTS.items():
        assert (dest / f"{s}.txt").read_bytes() == text.encode()


def assert_clean(dest: Path) -> None:
    """Neither dest nor any temporary file beside it."""
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def archive_source(url: str, kind: str, prefix: str, **pins) -> Source:
    members = {s: f"{prefix}wiki.{s}.tokens" for s in TEXTS}
    return Source((Download(url, kind=kind, members=members, **pins),))


# ----------------------------------------------------------------------------- success


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_download_lands_three_files(server, dest, tmp_path, kind):
    root, base = server
    files = corpus_members("corpus/")
    # traversal and absolute members, and (tar) a link pointing outside: never extracted
    evil_abs = tmp_path / "abs_evil.txt"
    files["../evil.txt"] = b"evil"
    files[str(evil_abs)] = b"evil"
    if kind == "zip":
        data = make_zip(root / "c.zip", files)
        url = base + "c.zip"
        prefix = "corpus/"
    else:
        files = {"./" + k if not k.startswith(("/", "..")) else k: v for k, v in files.items()}
        data = make_tgz(root / "c.tgz", files, symlinks={"./corpus/link": "/etc/passwd"})
        url = base + "c.tgz"
        prefix = "./corpus/"
    src = archive_source(url, kind, prefix, sha256=sha256(data))
    assert download_corpus(src, dest) == dest
    assert_corpus(dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["demo"]  # no temporaries
    assert not (tmp_path / "cache" / "data" / "evil.txt").exists()
    assert not (tmp_path / "cache" / "evil.txt").exists()
    assert not evil_abs.exists()


def test_tar_members_match_with_or_without_dot_slash(server, dest):
    root, base = server
    data = make_tgz(root / "c.tgz", corpus_members("./simple/data/"))
    src = archive_source(base + "c.tgz", "tar", "simple/data/", sha256=sha256(data))
    download_corpus(src, dest)
    assert_corpus(dest)


def test_plain_files_with_per_file_pins(server, dest):
    root, base = server
    downloads = []
    for s, text in TEXTS.items():
        (root / f"ptb.{s}.txt").write_bytes(text.encode())
        downloads.append(Download(base + f"ptb.{s}.txt", split=s, sha256=sha256(text.encode())))
    download_corpus(Source(tuple(downloads)), dest)
    assert_corpus(dest)


def test_md5_pin_and_split_pins_accepted(server, dest):
    root, base = server
    data = make_zip(root / "c.zip", corpus_members("w/"))
    pins = {s: sha256(t.encode()) for s, t in TEXTS.items()}
    src = archive_source(base + "c.zip", "zip", "w/", md5=md5(data), file_sha256=pins)
    download_corpus(src, dest)
    assert_corpus(dest)


def test_text8_style_split_by_characters(server, dest):
    root, base = server
    text = "ab\u00e9defghij"  # 10 characters, 11 bytes: the cut counts characters
    data = make_zip(root / "t8.zip", {"text8": text.encode()})
    src = Source(
        (Download(base + "t8.zip", kind="zip", members={"all": "text8"}, sha256=sha256(data),
                  file_sha256={"all": sha256(text.encode())}),),
        split_chars=(6, 2, 2),
    )
    download_corpus(src, dest)
    got = {s: (dest / f"{s}.txt").read_text(encoding="utf-8") for s in TEXTS}
    assert got == {"train": "ab\u00e9def", "valid": "gh", "test": "ij"}
    assert sorted(p.name for p in dest.iterdir()) == ["test.txt", "train.txt", "valid.txt"]


@pytest.mark.parametrize("sizes", [(6, 2, 1), (6, 2, 3)])
def test_text8_style_split_needs_exact_length(server, dest, sizes):
    root, base = server
    data = make_zip(root / "t8.zip", {"text8": b"abcdefghij"})
    src = Source((Download(base + "t8.zip", kind="zip", members={"all": "text8"},
                           sha256=sha256(data)),), split_chars=sizes)
    with pytest.raises(DownloadError, match="characters") as e:
        download_corpus(src, dest)
    assert e.value.network is False
    assert_clean(dest)


def test_complete_dest_is_not_touched(dest):
    dest.mkdir(parents=True)
    for s in TEXTS:
        (dest / f"{s}.txt").write_text("mine")
    src = archive_source(closed_port_url(), "zip", "", sha256="0" * 64)
    assert download_corpus(src, dest) == dest
    assert all((dest / f"{s}.txt").read_text() == "mine" for s in TEXTS)


def test_incomplete_dest_is_refused_not_clobbered(server, dest):
    root, base = server
    data = make_zip(root / "c.zip", corpus_members(""))
    dest.mkdir(parents=True)
    (dest / "train.txt").write_text("mine")
    with pytest.raises(DownloadError, match="exists"):
        download_corpus(archive_source(base + "c.zip", "zip", "", sha256=sha256(data)), dest)
    assert [p.name for p in dest.iterdir()] == ["train.txt"]
    assert (dest / "train.txt").read_text() == "mine"
    assert [p.name for p in dest.parent.iterdir()] == ["demo"]


def test_empty_dest_folder_is_filled(server, dest):
    root, base = server
    data = make_zip(root / "c.zip", corpus_members(""))
    dest.mkdir(parents=True)
    download_corpus(archive_source(base + "c.zip", "zip", "", sha256=sha256(data)), dest)
    assert_corpus(dest)


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("algo", ["sha256", "md5"])
def test_corrupted_archive_fails_checksum_and_cleans_up(server, dest, algo):
    root, base = server
    data = make_zip(root / "c.zip", corpus_members("w/"))
    pin = sha256(data) if algo == "sha256" else md5(data)
    (root / "c.zip").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    actual = sha256 if algo == "sha256" else md5
    url = base + "c.zip"
    with pytest.raises(DownloadError) as e:
        download_corpus(archive_source(url, "zip", "w/", **{algo: pin}), dest)
    msg = str(e.value)
    assert e.value.network is False
    assert "checksum" in msg and url in msg and pin in msg and "deleted" in msg
    assert actual((root / "c.zip").read_bytes()) in msg
    assert_clean(dest)


def test_split_checksum_mismatch_cleans_up(server, dest):
    root, base = server
    data = make_zip(root / "c.zip", corpus_members("w/"))
    pins = {s: sha256(t.encode()) for s, t in TEXTS.items()}
    pins["valid"] = sha256(b"something else")
    src = archive_source(base + "c.zip", "zip", "w/", sha256=sha256(data), file_sha256=pins)
    with pytest.raises(DownloadError) as e:
        download_corpus(src, dest)
    msg = str(e.value)
    assert e.value.network is False
    assert "checksum" in msg and "w/wiki.valid.tokens" in msg and pins["valid"] in msg
    assert sha256(TEXTS["valid"].encode()) in msg
    assert_clean(dest)


def test_second_download_failing_removes_the_first(server, dest):
    root, base = server
    (root / "ptb.train.txt").write_bytes(TEXTS["train"].encode())
    (root / "ptb.valid.txt").write_bytes(TEXTS["valid"].encode())
    src = Source((
        Download(base + "ptb.train.txt", split="train", sha256=sha256(TEXTS["train"].encode())),
        Download(base + "ptb.valid.txt", split="valid", sha256="0" * 64),
        Download(base + "ptb.test.txt", split="test", sha256="0" * 64),
    ))
    with pytest.raises(DownloadError, match="checksum"):
        download_corpus(src, dest)
    assert_clean(dest)


def test_missing_member_is_a_clear_error(server, dest):
    root, base = server
    data = make_zip(root / "c.zip", corpus_members("w/"))
    src = archive_source(base + "c.zip", "zip", "other/", sha256=sha256(data))
    with pytest.raises(DownloadError, match="no file 'other/wiki.train.tokens'") as e:
        download_corpus(src, dest)
    assert e.value.network is False
    assert_clean(dest)


def test_linked_member_is_refused(server, dest):
    root, base = server
    files = corpus_members("w/")
    del files["w/wiki.test.tokens"]
    data = make_tgz(root / "c.tgz", files, symlinks={"w/wiki.test.tokens": "/etc/passwd"})
    src = archive_source(base + "c.tgz", "tar", "w/", sha256=sha256(data))
    with pytest.raises(DownloadError, match="not a file"):
        download_corpus(src, dest)
    assert_clean(dest)


def test_not_an_archive(server, dest):
    root, base = server
    (root / "c.zip").write_bytes(b"<html>moved</html>")
    src = archive_source(base + "c.zip", "zip", "w/", sha256=sha256(b"<html>moved</html>"))
    with pytest.raises(DownloadError, match="not a readable zip archive") as e:
        download_corpus(src, dest)
    assert e.value.network is False
    assert_clean(dest)


def test_unreachable_host_is_a_network_error(dest):
    url = closed_port_url()
    with pytest.raises(DownloadError) as e:
        download_corpus(archive_source(url, "zip", "", sha256="0" * 64), dest, timeout=5)
    assert e.value.network is True
    assert url in str(e.value)
    assert_clean(dest)


def test_http_404_is_a_network_error(server, dest):
    _, base = server
    with pytest.raises(DownloadError, match="404") as e:
        download_corpus(archive_source(base + "gone.zip", "zip", "", sha256="0" * 64), dest)
    assert e.value.network is True
    assert_clean(dest)


def test_broken_transfer_is_a_network_error(server, dest):
    _, base = server
    with pytest.raises(DownloadError, match="broke off after 10 of 1000 bytes") as e:
        download_corpus(archive_source(base + "truncated", "zip", "", sha256="0" * 64), dest)
    assert e.value.network is True
    assert_clean(dest)


def test_silent_server_times_out(dest):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)  # accepts the connection in the kernel, never answers
    try:
        url = f"http://127.0.0.1:{s.getsockname()[1]}/x.zip"
        with pytest.raises(DownloadError) as e:
            download_corpus(archive_source(url, "zip", "", sha256="0" * 64), dest, timeout=0.3)
    finally:
        s.close()
    assert e.value.network is True
    assert_clean(dest)


def test_interrupt_cleans_up(server, dest, monkeypatch):
    root, base = server
    data = make_zip(root / "c.zip", corpus_members("w/"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_corpus(archive_source(base + "c.zip", "zip", "w/", sha256=sha256(data)), dest)
    assert_clean(dest)


# ----------------------------------------------------------------------------- declarations


def test_unpinned_download_is_rejected():
    with pytest.raises(ValueError, match="no checksum"):
        Download("http://example.invalid/c.zip", kind="zip", members={"train": "a"})
    with pytest.raises(ValueError, match="no checksum"):  # pins for only some outputs
        Download("http://example.invalid/c.zip", kind="zip",
                 members={"train": "a", "valid": "b"}, file_sha256={"train": "0" * 64})
    with pytest.raises(ValueError, match="sha256"):
        Download("http://example.invalid/a.txt", split="train", sha256="not-a-hash")


def test_source_must_yield_the_three_splits():
    a = Download("http://example.invalid/a", split="train", sha256="0" * 64)
    with pytest.raises(ValueError, match="yield exactly"):
        Source((a,))
    with pytest.raises(ValueError, match="same file"):
        Source((a, a))


def test_registered_sources_cover_the_registry_and_are_pinned():
    assert set(dl.SOURCES) == set(registry.CORPORA)
    for src in dl.SOURCES.values():
        for d in src.downloads:
            assert d.sha256 or d.md5 or set(d.file_sha256) == set(d.outputs)


def test_unknown_name():
    with pytest.raises(DownloadError, match="no download source"):
        download_corpus("no-such-corpus", "/nonexistent/x")


# ----------------------------------------------------------------------------- registry glue


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    c = tmp_path / "tcache"
    monkeypatch.setenv("TPROP_CACHE", str(c))
    monkeypatch.delenv("TPROP_DATA", raising=False)
    monkeypatch.delenv("TPROP_OFFLINE", raising=False)
    return c


def test_resolve_corpus_downloads_into_cache(server, cache, monkeypatch):
    root, base = server
    data = make_zip(root / "c.zip", corpus_members("w/"))
    monkeypatch.setitem(dl.SOURCES, "ptb", archive_source(base + "c.zip", "zip", "w/",
                                                          sha256=sha256(data)))
    path = registry.resolve_corpus("ptb")
    assert path == cache / "data" / "ptb"
    assert_corpus(path)
    assert registry.resolve_corpus("ptb") == path  # found, not downloaded again


def test_resolve_corpus_offline_says_where_to_put_files(cache, monkeypatch):
    monkeypatch.setenv("TPROP_OFFLINE", "1")
    with pytest.raises(CorpusError) as e:
        registry.resolve_corpus("ptb")
    msg = str(e.value)
    assert "TPROP_OFFLINE" in msg and "train.txt" in msg and str(cache / "data" / "ptb") in msg
    assert not (cache / "data" / "ptb").exists()


def test_resolve_corpus_network_failure_says_where_to_put_files(cache, monkeypatch):
    monkeypatch.setitem(dl.SOURCES, "ptb", archive_source(closed_port_url(), "zip", "",
                                                          sha256="0" * 64))
    with pytest.raises(CorpusError) as e:
        registry.resolve_corpus("ptb")
    msg = str(e.value)
    assert "cannot download" in msg and "train.txt" in msg
    assert str(cache / "data" / "ptb") in msg
    assert not (cache / "data" / "ptb").exists()


def test_resolve_corpus_checksum_failure_is_corpus_error(server, cache, monkeypatch):
    root, base = server
    make_zip(root / "c.zip", corpus_members("w/"))
    monkeypatch.setitem(dl.SOURCES, "ptb", archive_source(base + "c.zip", "zip", "w/",
                                                          sha256="0" * 64))
    with pytest.raises(CorpusError, match="checksum mismatch"):
        registry.resolve_corpus("ptb")
    assert list((cache / "data").iterdir()) == []
