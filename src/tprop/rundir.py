"""A run directory: ``config.json``, ``metrics.jsonl``, ``summary.json``, checkpoints, log.

One process writes a run directory at a time: its writer holds an OS file lock (``flock``) on
``.lock`` there from :meth:`RunDir.create` until :meth:`RunDir.unlock` (or until the process
ends: the kernel releases the lock of a killed process). Every write either completes or
leaves the file as it was; a full disk raises :class:`DiskFull` naming the file.
"""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import DiskFull, RunDirError, RunLocked

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
# what an interrupted atomic write leaves behind (removed by the directory's next writer)
STALE_PATTERNS = (".last.pt.*.tmp", ".best.pt.*.tmp", ".config.json.*.tmp",
                  ".summary.json.*.tmp", ".metrics.*")
_FULL = {errno.ENOSPC, errno.EDQUOT}
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # flock unsupported there
# torch's zip writer reports a failed write of the file object in these words
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "failed writing")


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- full disks
def full_disk_cause(e: BaseException, where: Path | None = None) -> OSError | None:
    """The "no space left" error behind ``e`` (``e`` itself, or what it was raised from or
    during: torch reports a failed write as a ``RuntimeError``), or None."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _FULL:
            return cur
        cur = cur.__cause__ or cur.__context__
    if where is not None and isinstance(e, RuntimeError) and any(
            m in str(e) for m in _TORCH_WRITE_FAILED):
        try:
            st = os.statvfs(where)
        except OSError:
            return None
        if st.f_bavail == 0:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def disk_full(path: Path, cause: OSError, what: str) -> DiskFull:
    """The error of a write to ``path`` that failed for lack of space; ``what`` says what is
    kept and what to do."""
    reason = cause.strerror or os.strerror(errno.ENOSPC)
    return DiskFull(f"the disk is full: could not write {path} ({reason}); {what}")


def _resume_hint(run_dir: Path) -> str:
    return f"free some space, then continue the run with `tprop train --resume {run_dir}`"


def write_json_atomic(path: Path, obj: Any, what: str | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename: ``path`` is
    either the old file or the new one. A full disk raises :class:`DiskFull` (``what``: the
    advice of its message)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in _FULL:
            raise disk_full(path, e, what or f"{path.name} is as it was") from None
        raise
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = full_disk_cause(e)
        if cause is not None:
            raise disk_full(path, cause, what or f"{path.name} is as it was") from None
        raise


def _append(path: Path, data: bytes, sync: bool, what: str) -> None:
    """Append ``data`` to ``path`` whole, or not at all (a failed write is cut off again)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in _FULL:
            raise disk_full(path, e, what) from None
        raise
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        except BaseException as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            cause = full_disk_cause(e)
            if cause is not None:
                raise disk_full(path, cause, what) from None
            raise
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- locking
def _lock_holder(lock_file: Path) -> str:
    try:
        pid = lock_file.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def _locked_error(path: Path, lock_file: Path) -> RunLocked:
    holder = _lock_holder(lock_file)
    who = ("another trainer of this process" if holder == f"pid {os.getpid()}" else
           f"another tprop process ({holder})")
    return RunLocked(f"{path} is in use: {who} is writing this run directory (it holds "
                     f"{lock_file}); wait for it to finish or stop it, or choose another "
                     "directory")


class RunDir:
    """The files of one run. Metrics are appended one JSON object per epoch."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None

    config_file = property(lambda self: self.path / "config.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    summary_file = property(lambda self: self.path / "summary.json")
    best_ckpt = property(lambda self: self.path / "best.pt")
    last_ckpt = property(lambda self: self.path / "last.pt")
    log_file = property(lambda self: self.path / "train.log")
    lock_file = property(lambda self: self.path / LOCK_NAME)

    # ------------------------------------------------------------------ the writer
    def create(self) -> None:
        """Make the directory and become its writer: take its lock (``RunLocked`` when another
        process holds it) and remove what interrupted writes left behind."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if e.errno in _FULL:
                raise disk_full(self.path, e, "free some space and try again") from None
            raise RunDirError(f"cannot create the run directory {self.path}: "
                              f"{e.strerror or e}") from None
        self.lock()
        self.remove_stale_files()

    @property
    def locked(self) -> bool:
        """Whether this object holds the directory's lock."""
        return self._lock_fd is not None

    def lock(self) -> None:
        """Take the directory's lock (held until :meth:`unlock` or the end of the process);
        ``RunLocked`` when another writer holds it."""
        if self._lock_fd is not None or fcntl is None:
            return
        for attempt in range(20):
            fd = self._open_lock(create=True)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if attempt == 0 and _lock_holder(self.lock_file) == f"pid {os.getpid()}":
                    gc.collect()  # a trainer of this process that is gone but not yet freed
                    continue
                raise _locked_error(self.path, self.lock_file) from None
            except OSError as e:
                os.close(fd)
                if e.errno in _NO_LOCKS:  # a file system without locks: write unguarded
                    return
                raise RunDirError(f"cannot lock {self.lock_file}: {e.strerror or e}") from None
            # the holder before us removes the file when it finishes: lock the one that is there
            try:
                ours = os.path.samestat(os.fstat(fd), os.stat(self.lock_file))
            except FileNotFoundError:
                ours = False
            if ours:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError:
                    pass  # the pid only names the holder in messages
                self._lock_fd = fd
                return
            os.close(fd)
        raise RunDirError(f"cannot lock {self.lock_file}: it keeps changing")

    def _open_lock(self, create: bool) -> int:
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.lock_file, flags, 0o644)
        except OSError as e:
            if e.errno in _FULL:
                raise disk_full(self.lock_file, e, "free some space and try again") from None
            if e.errno == errno.ENOENT:
                raise
            raise RunDirError(f"cannot lock {self.lock_file}: {e.strerror or e}") from None

    def check_unlocked(self) -> None:
        """``RunLocked`` when another process writes the directory now (changes nothing)."""
        if fcntl is None or self._lock_fd is not None:
            return
        try:
            fd = self._open_lock(create=False)
        except FileNotFoundError:
            return
        except RunDirError:
            return  # unreadable lock file: taking the lock will say so
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _locked_error(self.path, self.lock_file) from None
        except OSError:
            pass
        finally:
            os.close(fd)

    def unlock(self) -> None:
        """Give the directory's lock up (and remove the lock file)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            os.unlink(self.lock_file)  # while still holding it: see lock()
        except OSError:
            pass
        os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            try:
                self.unlock()
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass

    def remove_stale_files(self) -> list[str]:
        """Remove the temporary files interrupted writes left behind (call as the writer);
        the names removed."""
        removed = []
        for pattern in STALE_PATTERNS:
            for p in self.path.glob(pattern):
                try:
                    if p.is_file():
                        p.unlink()
                        removed.append(p.name)
                except OSError:
                    pass
        return sorted(removed)

    # ------------------------------------------------------------------ files
    def exists(self) -> bool:
        return self.config_file.is_file()

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config_file, config,
                          "config.json is as it was; free some space and run the command "
                          "again")

    def read_config(self) -> dict:
        """The saved configuration (a ``RunDirError`` naming the file when it is empty,
        unreadable or not a JSON object)."""
        path = self.config_file
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            raise RunDirError(f"cannot read {path}: {reason}") from None
        fix = ("it was damaged or hand-edited: restore it from a copy (the run's checkpoint "
               "last.pt holds the configuration it was trained with)")
        if not text.strip():
            raise RunDirError(f"{path} is empty; {fix}")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise RunDirError(f"{path} is not valid JSON ({e.msg}: line {e.lineno} column "
                              f"{e.colno}); {fix}") from None
        if not isinstance(obj, dict):
            raise RunDirError(f"{path} does not hold a JSON object of settings "
                              f"(it holds a {type(obj).__name__}); {fix}")
        return obj

    def append_metrics(self, row: dict) -> None:
        """Append one epoch's row (whole, or not at all)."""
        _append(self.metrics_file, (json.dumps(_clean(row)) + "\n").encode(), True,
                f"{self.metrics_file.name} is as it was before this epoch and the last "
                f"checkpoint is intact; {_resume_hint(self.path)}")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a crash
                    break
        return rows

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep the metrics of epochs <= last_epoch (after resuming from that epoch)."""
        rows = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
        what = (f"{self.metrics_file.name} is as it was; free some space, then resume again "
                f"with `tprop train --resume {self.path}`")
        try:
            fd, tmp = tempfile.mkstemp(prefix=".metrics.", suffix=".tmp", dir=self.path)
        except OSError as e:
            if e.errno in _FULL:
                raise disk_full(self.metrics_file, e, what) from None
            raise
        try:
            with os.fdopen(fd, "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.metrics_file)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            cause = full_disk_cause(e)
            if cause is not None:
                raise disk_full(self.metrics_file, cause, what) from None
            raise

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary_file, summary,
                          "the checkpoints and metrics are intact; free some space, then "
                          f"write it with `tprop train --resume {self.path}`")

    def log(self, line: str) -> None:
        _append(self.log_file, (line + "\n").encode(), False,
                f"the checkpoints are intact; {_resume_hint(self.path)}")


__all__ = ["DiskFull", "LOCK_NAME", "RunDir", "RunDirError", "RunLocked",
           "disk_full", "full_disk_cause", "write_json_atomic"]
