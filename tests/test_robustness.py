"""What goes wrong around a run, and what tprop says: explicit data directories, damaged or
foreign run directories, full disks, two writers, stale temporary files, closed pipes and
signals, flags the method ignores, the first log line, and how fast the command line answers.

Every refusal is one ``error:`` line with exit status 2, no traceback, and leaves the run
directory as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli as cli
from conftest import write_corpus

from tprop.cli import ignored_flags, main
from tprop.errors import DiskFull, RunLocked
from tprop.rundir import LOCK_NAME, RunDir

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--model", "lstm", "--emsize", "8", "--nhid", "8", "--bptt", "5", "--batch-size", "4",
         "--eval-batch-size", "4", "--quiet", "--device", "cpu", "--optim", "adagrad",
         "--lr", "0.1"]


# --------------------------------------------------------------------------- helpers
def one_error(err: str) -> str:
    """The one `error:` line of a refusal (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(d: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of ``d`` with its modification time and bytes."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.iterdir())
            if p.is_file()}


def train_args(corpus: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["train", "--data-dir", str(corpus), "--out", str(out), "--epochs", str(epochs),
            *SMALL, *extra]


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(TPROP_OFFLINE="1", TPROP_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def tprop(*argv: str, **kw: Any) -> subprocess.Popen:
    """`python -m tprop ARGV` as a child process."""
    return subprocess.Popen([sys.executable, "-m", "tprop", *argv], **kw)


def wait_for(path: Path, proc: subprocess.Popen, limit: float = 120) -> None:
    t0 = time.monotonic()
    while not path.is_file():
        assert proc.poll() is None, f"the run ended early (status {proc.returncode})"
        assert time.monotonic() - t0 < limit, f"{path} never appeared"
        time.sleep(0.05)


def metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny")


@pytest.fixture(scope="module")
def finished(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPTT run of 2 epochs (nhid 8), trained through the command line."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(train_args(corpus_dir, out, 2)) == 0
    return out


@pytest.fixture(scope="module")
def straight(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run trained straight to 3 epochs (what an interrupted one must end as)."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert main(train_args(corpus_dir, out, 3)) == 0
    return out


@pytest.fixture(scope="module")
def foreign(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs another run's files may come from: another model size, another method."""
    base = tmp_path_factory.mktemp("foreign")
    runs = {"nhid12": base / "nhid12", "pm": base / "pm"}
    assert main(train_args(corpus_dir, runs["nhid12"], 1, "--nhid", "12")) == 0
    assert main(train_args(corpus_dir, runs["pm"], 1, "--method", "pm", "--blocks-per-update",
                           "5", "--h-steps", "1", "--theta-steps", "1")) == 0
    return runs


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of the finished run to damage."""
    d = tmp_path / "copy"
    shutil.copytree(finished, d)
    return d


# --------------------------------------------------------------------------- 1. --data-dir
@pytest.mark.parametrize("where", ["missing", "empty", "incomplete"])
def test_train_explicit_data_dir_is_used_or_refused(where: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """`tprop train --data-dir DIR` never falls back to $TPROP_DATA/ptb (which holds a corpus
    here): DIR is refused, naming what it lacks, and no run directory is made."""
    data = tmp_path / "data"
    write_corpus(data / "ptb")
    monkeypatch.setenv("TPROP_DATA", str(data))
    d = tmp_path / "dir"
    if where != "missing":
        d.mkdir()
    if where == "incomplete":
        (d / "train.txt").write_text((data / "ptb" / "train.txt").read_text())
    out = tmp_path / "run"
    code, _, err = cli(capsys, *train_args(d, out, 1))
    assert code == 2
    line = one_error(err)
    if where == "missing":
        assert line == f"tprop train: error: --data-dir {d}: no such directory"
    else:
        assert f"--data-dir {d} does not hold corpus 'ptb'" in line
        lacks = "valid.txt, test.txt" if where == "incomplete" else "train.txt, valid.txt, test.txt"
        assert f"{d} lacks {lacks}" in line and f"{d / 'ptb'} does not exist" in line
    assert not out.exists()


def test_eval_explicit_data_dir_is_used_or_refused(finished: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    nowhere = tmp_path / "nowhere"
    code, out, err = cli(capsys, "eval", str(finished), "--data-dir", str(nowhere))
    assert code == 2 and out == ""
    assert one_error(err) == f"tprop eval: error: --data-dir {nowhere}: no such directory"


# --------------------------------------------------------------------------- 2. resuming
def _write(name: str, text: str | bytes) -> Callable[[Path, dict[str, Path]], None]:
    def damage(d: Path, foreign: dict[str, Path]) -> None:
        p = d / name
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return damage


def _edit_config(**changes: Any) -> Callable[[Path, dict[str, Path]], None]:
    def damage(d: Path, foreign: dict[str, Path]) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return damage


def _truncate(name: str, keep: float) -> Callable[[Path, dict[str, Path]], None]:
    def damage(d: Path, foreign: dict[str, Path]) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])
    return damage


def _foreign_ckpt(which: str) -> Callable[[Path, dict[str, Path]], None]:
    def damage(d: Path, foreign: dict[str, Path]) -> None:
        shutil.copy(foreign[which] / "last.pt", d / "last.pt")
    return damage


def _doctor_ckpt(change: Callable[[dict], None], name: str = "last.pt"
                 ) -> Callable[[Path, dict[str, Path]], None]:
    def damage(d: Path, foreign: dict[str, Path]) -> None:
        ckpt = torch.load(d / name, weights_only=True)
        change(ckpt)
        torch.save(ckpt, d / name)
    return damage


def _no_optimizer(ckpt: dict) -> None:
    del ckpt["method_state"]["optimizer"]


def _small_decoder(ckpt: dict) -> None:
    ckpt["model"]["decoder.bias"] = torch.zeros(5)


# (case, damage, the file the message names, words of the message)
DAMAGES = [
    ("config-empty", _write("config.json", ""), "config.json", "is empty"),
    ("config-truncated", _truncate("config.json", 0.5), "config.json", "not valid JSON"),
    ("config-garbage", _write("config.json", b"\x00\xffPK"), "config.json", "cannot read"),
    ("config-list", _write("config.json", "[1, 2]"), "config.json", "JSON object"),
    ("config-string-for-number", _edit_config(lr="fast"), "config.json",
     "'lr' expected a number (got 'fast')"),
    ("config-unknown-key", _edit_config(learning_rate=0.1), "config.json",
     "unknown setting 'learning_rate'"),
    ("config-method-edited", _edit_config(method="pm"), "config.json",
     "says --method pm but"),
    ("config-epochs-below-done", _edit_config(epochs=1), "config.json", "is after epoch 2"),
    ("ckpt-empty", _write("last.pt", b""), "last.pt", "is empty (0 bytes)"),
    ("ckpt-truncated", _truncate("last.pt", 0.6), "last.pt", "not a readable checkpoint"),
    ("ckpt-garbage", _write("last.pt", os.urandom(3000)), "last.pt",
     "not a readable checkpoint"),
    ("ckpt-not-a-checkpoint", lambda d, f: torch.save({"a": torch.zeros(2)}, d / "last.pt"),
     "last.pt", "no tprop checkpoint version"),
    ("ckpt-other-size", _foreign_ckpt("nhid12"), "last.pt", "differ in --nhid (12"),
    ("ckpt-other-method", _foreign_ckpt("pm"), "last.pt", "written by --method pm"),
    ("ckpt-no-optimizer", _doctor_ckpt(_no_optimizer), "last.pt", "KeyError: 'optimizer'"),
    ("ckpt-resized-tensor", _doctor_ckpt(_small_decoder), "last.pt", "decoder.bias"),
    ("ckpt-damaged-vocab", _doctor_ckpt(lambda c: c.update(vocab=c["vocab"][:-2])), "last.pt",
     "damaged vocab"),
]


@pytest.mark.parametrize("case,damage,name,words", DAMAGES, ids=[c[0] for c in DAMAGES])
def test_resume_of_a_damaged_or_foreign_run_is_refused(
        case: str, damage: Callable, name: str, words: str, run_copy: Path,
        foreign: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    damage(run_copy, foreign)
    before = snapshot(run_copy)
    code, _, err = cli(capsys, "train", "--resume", str(run_copy))
    assert code == 2
    line = one_error(err)
    assert str(run_copy / name) in line, line
    assert words in line, line
    assert snapshot(run_copy) == before


def test_damaged_last_ckpt_message_says_how_to_recover(run_copy: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The advice works: continuing from best.pt instead of the damaged last.pt."""
    _truncate("last.pt", 0.5)(run_copy, {})
    code, _, err = cli(capsys, "train", "--resume", str(run_copy), "--epochs", "3")
    line = one_error(err)
    assert code == 2 and f"copy {run_copy / 'best.pt'} over it" in line
    shutil.copy(run_copy / "best.pt", run_copy / "last.pt")
    code, _, err = cli(capsys, "train", "--resume", str(run_copy), "--epochs", "3")
    assert code == 0, err
    assert [r["epoch"] for r in metrics(run_copy)] == [1, 2, 3]


def test_resume_with_fewer_epochs_than_trained_is_refused(run_copy: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    before = snapshot(run_copy)
    code, _, err = cli(capsys, "train", "--resume", str(run_copy), "--epochs", "1")
    assert code == 2
    line = one_error(err)
    assert f"--epochs 1: the run in {run_copy} has already trained 2 epochs" in line
    assert "--epochs 3 or more" in line
    assert snapshot(run_copy) == before
    assert json.loads((run_copy / "config.json").read_text())["epochs"] == 2


def test_resume_of_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "train", "--resume", str(tmp_path / "nope"))
    assert code == 2
    assert one_error(err).endswith(f"--resume: {tmp_path / 'nope'} does not exist")


# --------------------------------------------------------------------------- 3. eval, generate
@pytest.mark.parametrize("command", ["eval", "generate"])
@pytest.mark.parametrize("damage", ["truncated", "empty", "incomplete"])
def test_eval_and_generate_with_a_damaged_best_ckpt(command: str, damage: str, run_copy: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    if damage == "truncated":
        _truncate("best.pt", 0.5)(run_copy, {})
    elif damage == "empty":
        _write("best.pt", b"")(run_copy, {})
    else:
        _doctor_ckpt(lambda c: c.pop("model_config"), "best.pt")(run_copy, {})
    before = snapshot(run_copy)
    code, out, err = cli(capsys, command, str(run_copy))
    assert code == 2 and out == ""
    line = one_error(err)
    assert line.startswith(f"tprop {command}: error: {run_copy / 'best.pt'} ")
    assert "--checkpoint last" in line
    assert snapshot(run_copy) == before
    # the other checkpoint still serves
    code, out, err = cli(capsys, command, str(run_copy), "--checkpoint", "last")
    assert code == 0, err


# --------------------------------------------------------------------------- 4. full disks
class FullFile:
    """A file object on a disk that fills up after ``budget`` more bytes."""

    def __init__(self, f: Any, budget: int) -> None:
        self.f, self.budget = f, budget

    def write(self, data: Any) -> int:
        if len(data) > self.budget:
            self.f.write(data[: self.budget])
            self.budget = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> FullFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def _fd_name(fd: int) -> str:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}")).name
    except OSError:
        return ""


def fill_disk(monkeypatch: pytest.MonkeyPatch, prefix: str, skip: int, how: str) -> list[str]:
    """Make the write of the ``skip + 1``-th file whose name starts with ``prefix`` fail with
    ENOSPC: in the middle of the file object's writes (``write``: torch's zip writer or json),
    at the fsync that ends a checkpoint (``fsync``), or half-way through an ``os.write``
    (``os.write``: appends). Returns the names it failed."""
    seen: list[str] = []
    failed: list[str] = []

    def hit(name: str) -> bool:
        if not name.startswith(prefix):
            return False
        seen.append(name)
        if len(seen) == skip + 1:
            failed.append(name)
            return True
        return False

    if how == "write":
        real_fdopen = os.fdopen

        def fdopen(fd: int, *a: Any, **k: Any) -> Any:
            f = real_fdopen(fd, *a, **k)
            return FullFile(f, 300) if hit(_fd_name(fd)) else f

        monkeypatch.setattr(os, "fdopen", fdopen)
    elif how == "fsync":
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if hit(_fd_name(fd)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
    else:
        real_write = os.write

        def write(fd: int, data: Any) -> int:
            if hit(_fd_name(fd)):
                real_write(fd, bytes(data[: len(data) // 2]))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", write)
    return failed


# (case, file name prefix, writes of it that succeed first, how, file named, what is kept)
FULL = [
    ("last-ckpt-zip-writer", ".last.pt.", 1, "write", "last.pt", "previous last.pt is intact"),
    ("last-ckpt-fsync", ".last.pt.", 1, "fsync", "last.pt", "previous last.pt is intact"),
    ("best-ckpt", ".best.pt.", 1, "write", "best.pt", "previous best.pt is intact"),
    ("metrics-row", "metrics.jsonl", 1, "os.write", "metrics.jsonl", "as it was"),
    ("train-log", "train.log", 2, "os.write", "train.log", "checkpoints are intact"),
    ("summary", ".summary.json.", 0, "write", "summary.json", "checkpoints and metrics"),
    ("config", ".config.json.", 0, "write", "config.json", "config.json is as it was"),
]


@pytest.mark.parametrize("case,prefix,skip,how,name,kept", FULL, ids=[c[0] for c in FULL])
def test_full_disk_is_one_error_and_the_run_resumes(
        case: str, prefix: str, skip: int, how: str, name: str, kept: str, corpus_dir: Path,
        straight: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    failed = fill_disk(monkeypatch, prefix, skip, how)
    code, _, err = cli(capsys, *train_args(corpus_dir, out, 3))
    monkeypatch.undo()
    assert failed, "the disk never filled: a useless test"
    assert code == 2
    line = one_error(err)
    assert f"the disk is full: could not write {out / name} (No space left on device)" in line
    assert kept in line
    if case == "config":  # nothing trained: the same command starts it again
        assert "run the command again" in line
        assert not (out / "config.json").exists()
        assert main(train_args(corpus_dir, out, 3)) == 0
    else:
        assert f"tprop train --resume {out}" in line
        # no partial file, no temporary file; the last checkpoint loads
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
        text = (out / "metrics.jsonl").read_text()
        assert text.endswith("\n") and all(json.loads(x) for x in text.splitlines())
        if (out / "last.pt").is_file():
            ckpt = torch.load(out / "last.pt", weights_only=True)
            assert ckpt["epoch"] == (3 if case == "summary" else 1)
        code, _, err = cli(capsys, "train", "--resume", str(out))
        assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    # the run ends as if nothing had happened
    keys = ("epoch", "train_loss", "valid_loss", "lr")
    assert [{k: r[k] for k in keys} for r in metrics(out)] == \
        [{k: r[k] for k in keys} for r in metrics(straight)]


def test_rundir_writes_raise_disk_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python API sees the same error (a ConfigError, exit status 2 on the command line)."""
    run = RunDir(tmp_path / "r")
    run.create()
    run.append_metrics({"epoch": 1})
    fill_disk(monkeypatch, "metrics.jsonl", 0, "os.write")
    with pytest.raises(DiskFull, match="metrics.jsonl"):
        run.append_metrics({"epoch": 2, "a": "x" * 100})
    monkeypatch.undo()
    assert run.read_metrics() == [{"epoch": 1}]
    assert run.metrics_file.read_text() == '{"epoch": 1}\n'
    run.unlock()


# --------------------------------------------------------------------------- 5. one writer
HOLD = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); "
        "print('locked', flush=True); time.sleep(120)")


@contextmanager
def lock_held_elsewhere(d: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``d``'s run-directory lock, SIGKILLed at the end (no clean-up:
    the kernel drops the lock)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(d / LOCK_NAME)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_writer_is_refused_and_a_killed_one_leaves_no_lock(
        run_copy: Path, corpus_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    with lock_held_elsewhere(run_copy) as holder:
        before = snapshot(run_copy)
        code, _, err = cli(capsys, "train", "--resume", str(run_copy), "--epochs", "3")
        assert code == 2
        line = one_error(err)
        assert f"{run_copy} is in use: another tprop process (pid {holder.pid})" in line
        assert snapshot(run_copy) == before
        # a new run into a locked (empty) directory likewise
        empty = tmp_path / "empty"
        empty.mkdir()
        with lock_held_elsewhere(empty):
            code, _, err = cli(capsys, *train_args(corpus_dir, empty, 1))
            assert code == 2 and f"{empty} is in use" in one_error(err)
            assert not (empty / "config.json").exists()
    assert (run_copy / LOCK_NAME).exists()
    code, _, err = cli(capsys, "train", "--resume", str(run_copy), "--epochs", "3")
    assert code == 0, err
    assert not (run_copy / LOCK_NAME).exists()  # given up at the end


def test_two_trainers_of_one_process(finished: Path, tmp_path: Path) -> None:
    from tprop.train import release, resume_trainer

    d = tmp_path / "run"
    shutil.copytree(finished, d)
    first = resume_trainer(d, epochs=3)
    with pytest.raises(RunLocked, match="another trainer of this process"):
        resume_trainer(d, epochs=3)
    release(first)
    resume_trainer(d, epochs=3).fit()
    assert [r["epoch"] for r in metrics(d)] == [1, 2, 3]


def test_sweep_point_in_a_locked_directory_fails_without_training(
        corpus_dir: Path, tmp_path: Path) -> None:
    """A sweep's run (tprop.lab.runner.run_point: make_trainer with a run directory) takes the
    lock too: a point whose directory another process writes is recorded as failed."""
    from tprop.lab.runner import run_point

    d = tmp_path / "point"
    d.mkdir()
    with lock_held_elsewhere(d):
        config = dict(data_dir=str(corpus_dir), dataset=None, quiet=True, device="cpu",
                      emsize=8, nhid=8, bptt=5, batch_size=4, eval_batch_size=4, epochs=1)
        result = run_point({"dir": str(d), "config": config, "action": "new"})
    assert result["status"] == "failed"
    assert result["error"].startswith(f"RunLocked: {d} is in use")
    assert not (d / "config.json").exists() and not (d / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- 6. stale files
STALE = [".last.pt.k2j3.tmp", ".best.pt.x9.tmp", ".metrics.abc", ".metrics.q1.tmp",
         ".config.json.z.tmp", ".summary.json.w.tmp"]


def test_stale_temporary_files_are_removed_by_the_next_writer(
        run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    for name in STALE:
        (run_copy / name).write_bytes(b"PK\x03\x04 half a file")
    code, _, err = cli(capsys, "train", "--resume", str(run_copy), "--epochs", "3")
    assert code == 0, err
    assert not [p.name for p in run_copy.iterdir() if p.name.startswith(".")]
    assert torch.load(run_copy / "last.pt", weights_only=True)["epoch"] == 3


# --------------------------------------------------------------------------- 7. pipes, signals
def test_a_closed_stdout_pipe_does_not_stop_training(corpus_dir: Path, tmp_path: Path) -> None:
    """`tprop train ... | head -1`: training goes on to the end (status 0); train.log keeps
    every line; no traceback."""
    out = tmp_path / "run"
    err_file = tmp_path / "stderr"
    with open(err_file, "w") as err:
        p = tprop(*train_args(corpus_dir, out, 3), stdout=subprocess.PIPE, stderr=err,
                  text=True, env=env_for(tmp_path, PYTHONUNBUFFERED="1"))
        first = p.stdout.readline()
        p.stdout.close()  # the reader goes away
        rc = p.wait(timeout=300)
    assert first.startswith(f"run directory: {out}")
    assert rc == 0, err_file.read_text()
    assert err_file.read_text() == ""
    log = (out / "train.log").read_text()
    assert "epoch   3 |" in log and "done (finished)" in log
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


def test_other_commands_stop_quietly_when_the_reader_goes(tiny_corpus_dir: Path,
                                                          tmp_path: Path) -> None:
    """`tprop data stats ... | head -1`: status 141 (as a process killed by SIGPIPE), no
    traceback."""
    p = tprop("data", "stats", "--data-dir", str(tiny_corpus_dir), stdout=subprocess.PIPE,
              stderr=subprocess.PIPE, env=env_for(tmp_path))
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert err == ""


def test_sigterm_stops_like_ctrl_c_and_a_second_writer_is_refused_meanwhile(
        corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    p = tprop(*train_args(corpus_dir, out, 100_000, "--tol", "100000"),
              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_for(tmp_path))
    try:
        wait_for(out / "last.pt", p)
        # meanwhile: a second writer is refused, naming the directory (and the pid)
        code, _, err = cli(capsys, "train", "--resume", str(out))
        assert code == 2
        assert f"{out} is in use: another tprop process (pid {p.pid})" in one_error(err)
        code, _, err = cli(capsys, *train_args(corpus_dir, out, 1))
        assert code == 2 and "already holds a run" in one_error(err)
        p.send_signal(signal.SIGTERM)
        so, se = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 143, se
    assert "Traceback" not in se
    assert se.strip().splitlines()[-1] == "tprop train: stopped by SIGTERM"
    assert f"interrupted; continue with: tprop train --resume {out}" in so
    assert not (out / LOCK_NAME).exists()
    done = torch.load(out / "last.pt", weights_only=True)["epoch"]
    code, _, err = cli(capsys, "train", "--resume", str(out), "--epochs", str(done + 1))
    assert code == 0, err
    assert metrics(out)[-1]["epoch"] == done + 1


# --------------------------------------------------------------------------- 8. ignored flags
def test_flags_the_method_ignores_are_named_once(corpus_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, *train_args(corpus_dir, tmp_path / "a", 1, "--h-steps", "3",
                                           "--lambda", "2", "--blocks-per-update", "4"))
    assert code == 0, err
    notes = [line for line in err.splitlines() if "ignored" in line]
    assert notes == ["tprop train: note: --h-steps, --lambda, --blocks-per-update are ignored "
                     "by --method bptt"]
    code, _, err = cli(capsys, *train_args(corpus_dir, tmp_path / "b", 1))
    assert code == 0 and "ignored" not in err


@pytest.mark.parametrize("options,method,flags", [
    ({"method": "pm", "full_batch": True, "update_freq": 2, "rec_tol": 1e-3, "batch_size": 4},
     "pm", ["--full-batch", "--update-freq", "--rec-tol", "--batch-size"]),
    ({"method": "pm", "block_size": 5, "h_steps": 2}, "pm", []),  # --block-size is --bptt
    ({"method": "alm", "h_steps": 2, "u_lr": 0.5}, "alm", ["--h-steps"]),
    ({"penalty": "kl", "lam": 2.0, "rec_tol": 1e-3}, "bptt", ["--penalty", "--lambda"]),
    ({"preset": "quick", "h_lr": 0.5}, "bptt", ["--h-lr"]),
    ({"epochs": 3, "lr": 0.5, "clip": 1.0}, "bptt", []),
])
def test_ignored_flags(options: dict[str, Any], method: str, flags: list[str]) -> None:
    assert ignored_flags(options) == (method, flags)


# --------------------------------------------------------------------------- 9. first line
def test_first_log_line_names_method_optimiser_and_lr(finished: Path, foreign: dict[str, Path]
                                                       ) -> None:
    first = (finished / "train.log").read_text().splitlines()[0]
    assert first == f"run directory: {finished} (method bptt, optim adagrad, lr 0.1)"
    first = (foreign["pm"] / "train.log").read_text().splitlines()[0]
    assert first == (f"run directory: {foreign['pm']} (method pm, optim adagrad, lr 0.1, "
                     "h-optim adagrad, h-lr 1)")


# --------------------------------------------------------------------------- 10, speed
def test_gitignore_keeps_corpora_written_in_the_checkout_out() -> None:
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "/data/" in lines  # anchored: src/tprop/data and tests/data stay tracked
    assert "data/" not in lines


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--bptt", "0"],
                                  ["eval"]])
def test_help_and_argument_errors_answer_at_once(argv: list[str], tmp_path: Path) -> None:
    """Under a second (measured about 0.2 s); the bound is 2 s for a loaded machine."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "tprop", *argv], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    took = time.perf_counter() - t0
    assert res.returncode == (0 if "--help" in argv else 2)
    assert "Traceback" not in res.stderr
    assert took < 2.0, f"{argv}: {took:.2f} s"
