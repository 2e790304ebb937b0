"""Sweeps: spec parsing, grid expansion, run naming, running, resuming, failures, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

import tprop.lab.sweep as sw
from tprop.cli import main
from tprop.lab.expand import cpu_count, expand, resolve, run_name
from tprop.lab.spec import SpecError, load_spec, parse_spec
from tprop.lab.sweep import parse_assignments, run_sweep


def tiny_base(data_dir: Path, **kw: Any) -> dict[str, Any]:
    """A tiny model on the generated corpus: each run takes well under a second."""
    base = dict(data_dir=str(data_dir), emsize=8, nhid=8, bptt=4, batch_size=4,
                blocks_per_update=4, h_steps=1, theta_steps=1, eval_batch_size=2,
                train_tokens=600, eval_tokens=150, epochs=1, device="cpu", seed=3)
    base.update(kw)
    return base


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write_spec(path: Path, base: dict[str, Any], grid: dict[str, list] | None = None,
               extra: str = "") -> Path:
    lines = ["[base]"] + [f"{k} = {toml_value(v)}" for k, v in base.items()
                          if k not in (grid or {})]
    if grid:
        lines += ["", "[grid]"] + [f"{k} = {toml_value(v)}" for k, v in grid.items()]
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def quiet(_line: str) -> None:
    pass


# --------------------------------------------------------------------------- expansion
SPEC = {
    "title": "t",
    "base": {"dataset": "ptb", "epochs": 3, "nhid": 20},
    "grid": {"method": ["pm", "admm"], "bptt": [5, 10]},
    "zip": {"h_steps": [0, 5], "lambda": [1.0, 0.1]},
    "presets": {
        "smoke": {"epochs": 1, "nhid": 8, "grid": {"bptt": [3]}, "zip": {"h_steps": [1, 2]},
                  "report": {"curves_by": "bptt"}},
    },
    "report": {"rows": ["method"]},
}


def test_product_times_zip_in_spec_order() -> None:
    spec = parse_spec(SPEC, "s.toml")
    points = expand(spec, validate=True, threads=1)
    assert len(points) == 2 * 2 * 2
    assert [p.name for p in points[:3]] == [
        "method=pm,bptt=5,h_steps=0,lambda=1.0",
        "method=pm,bptt=5,h_steps=5,lambda=0.1",
        "method=pm,bptt=10,h_steps=0,lambda=1.0",
    ]
    p = points[1]
    assert p.params == {"method": "pm", "bptt": 5, "h_steps": 5, "lam": 0.1}
    assert p.config["nhid"] == 20 and p.config["epochs"] == 3 and p.config["lam"] == 0.1
    assert p.config["quiet"] is True and p.config["threads"] == 1
    assert spec.keys() == ["method", "bptt", "h_steps", "lam"]


def test_preset_overrides_base_grid_zip_and_report() -> None:
    spec = parse_spec(SPEC, "s.toml")
    points = expand(spec, "smoke")
    assert [p.name for p in points] == [
        "method=pm,bptt=3,h_steps=1,lambda=1.0", "method=pm,bptt=3,h_steps=2,lambda=0.1",
        "method=admm,bptt=3,h_steps=1,lambda=1.0", "method=admm,bptt=3,h_steps=2,lambda=0.1"]
    assert all(p.config["epochs"] == 1 and p.config["nhid"] == 8 for p in points)
    _, _, _, report = resolve(spec, "smoke")
    assert report == {"rows": ["method"], "curves_by": "bptt"}
    # the spec itself is untouched by resolving a preset
    assert [p.config["nhid"] for p in expand(spec)] == [20] * 8


def test_grid_tables_union_fixed_values_and_preset_per_table() -> None:
    data = {
        "base": {"dataset": "ptb", "h_steps": 3},
        "grid": [{"method": ["bptt"], "bptt": [5, 10]},
                 {"method": ["pm"], "bptt": [5], "h_steps": [0, 1], "epochs": 7}],
        "presets": {"p": {"grid": [{}, {"epochs": 2, "h_steps": [4]}]},
                    "q": {"grid": {"bptt": [20]}}},
    }
    spec = parse_spec(data, "u.toml")
    points = expand(spec)
    assert [p.name for p in points] == ["method=bptt,bptt=5", "method=bptt,bptt=10",
                                        "method=pm,bptt=5,h_steps=0", "method=pm,bptt=5,h_steps=1"]
    # a single value in a grid table is that table's setting, not part of the name
    assert [p.config.get("epochs") for p in points] == [None, None, 7, 7]
    assert points[0].config["h_steps"] == 3  # [base] gives the value where no table varies it
    per_table = expand(spec, "p")
    assert [p.name for p in per_table][2:] == ["method=pm,bptt=5,h_steps=4"]
    assert per_table[2].config["epochs"] == 2
    assert [p.name for p in expand(spec, "q")] == ["method=bptt,bptt=20",
                                                   "method=pm,bptt=20,h_steps=0",
                                                   "method=pm,bptt=20,h_steps=1"]


def test_preset_lists_replace_lists_and_values_replace_values() -> None:
    data = {"base": {"dataset": "ptb"},
            "grid": [{"method": ["pm"], "h_steps": 0, "theta_steps": [1]},
                     {"method": ["pm"], "h_steps": [0, 5], "lam": [0.1, 1.0]}],
            "presets": {"s": {"grid": {"h_steps": [0, 1]}},
                        "t": {"grid": {"h_steps": 2}}}}
    spec = parse_spec(data, "r.toml")
    smoke = expand(spec, "s")
    assert smoke[0].name == "method=pm,theta_steps=1" and smoke[0].config["h_steps"] == 0
    assert [p.params["h_steps"] for p in smoke[1:]] == [0, 0, 1, 1]
    assert expand(spec, "t")[0].config["h_steps"] == 2
    bad = {**data, "presets": {"u": {"grid": {"lam": 3.0}}}}
    with pytest.raises(SpecError, match="not a key of \\[grid\\] with a single value"):
        parse_spec(bad, "r.toml")


def test_names_are_deterministic_safe_and_unique() -> None:
    assert run_name({"method": "pm", "h_steps": 10, "bptt": 5}) == "method=pm,h_steps=10,bptt=5"
    assert run_name({"lam": 1e-05, "full_batch": True, "blocks_per_update": "all"}) == \
        "lambda=1e-05,full_batch=true,blocks_per_update=all"
    assert run_name({}) == "run"
    spec = parse_spec({"base": {"dataset": "ptb"},
                       "grid": {"data_dir": ["a/b", "a_b", "a b:c"]}}, "n.toml")
    names = [p.name for p in expand(spec)]
    assert len(set(names)) == 3
    assert all("/" not in n and " " not in n and ":" not in n for n in names)
    assert names == [p.name for p in expand(spec)]  # deterministic
    long = run_name({"h_init": "x" * 300})
    assert len(long) <= 200 and long == run_name({"h_init": "x" * 300})


def test_none_aliases_and_bare_data_dir() -> None:
    spec = parse_spec({"base": {"data-dir": "/x", "train_tokens": "none", "block_size": 7,
                                "lambda": 2.0}}, "a.toml")
    (p,) = expand(spec)
    assert p.config["dataset"] is None and p.config["data_dir"] == "/x"
    # block_size is a field of its own now (the parallel recurrence's K), no longer --bptt's
    # alias: the spec key names that field
    assert p.config["train_tokens"] is None and p.config["block_size"] == 7 and \
        p.config["lam"] == 2.0
    (q,) = expand(parse_spec({"base": {"dataset": "ptb", "data_dir": "/x"}}, "b.toml"))
    assert q.config["dataset"] == "ptb"
    assert parse_assignments(["device=cpu", "lr=0.5", "train_tokens=none", "tied=true"]) == {
        "device": "cpu", "lr": 0.5, "train_tokens": None, "tied": True}


@pytest.mark.parametrize("data,words", [
    ({"base": {"nhidd": 3}}, ["nhidd", "s.toml", "nhid"]),
    ({"grid": {"h_stepz": [1]}}, ["h_stepz", "[grid]"]),
    ({"bases": {}}, ["bases"]),
    ({"zip": {"nhid": [1, 2], "emsize": [1]}}, ["one length"]),
    ({"base": {"nhid": "big"}}, ["nhid", "expected int"]),
    ({"base": {"nhid": [1, 2]}}, ["nhid", "single value"]),
    ({"base": {"nhid": 4}, "grid": {"nhid": [1, 2]}}, ["nhid", "[base]"]),
    ({"grid": {"nhid": [1]}, "zip": {"nhid": [2]}}, ["nhid", "[grid] and [zip]"]),
    ({"grid": {"nhid": [1, 2]}, "presets": {"x": {"nhid": 3}}}, ["presets.x", "nhid"]),
    ({"grid": {"nhid": [1, 2]}, "presets": {"x": {"grid": {"bptt": [3]}}}}, ["bptt", "not a key"]),
    ({"base": {"out": "x"}}, ["out", "set by the sweep"]),
    ({"report": {"colour": 1}}, ["colour", "report"]),
    ({"grid": {"nhid": []}}, ["nhid", "non-empty"]),
    ({"grid": [{"method": ["pm"]}, {"method": ["pm"]}]}, ["twice"]),
])
def test_spec_errors_name_the_key_and_the_file(data: dict, words: list[str]) -> None:
    data = {"base": {"dataset": "ptb", **data.get("base", {})},
            **{k: v for k, v in data.items() if k != "base"}}
    with pytest.raises(SpecError) as e:
        expand(parse_spec(data, "s.toml"))
    for w in words:
        assert w in str(e.value)


def test_invalid_values_and_presets_are_caught_before_running(tmp_path: Path) -> None:
    spec = parse_spec({"base": {"dataset": "ptb"}, "grid": {"nhid": [4, 0]}}, "v.toml")
    with pytest.raises(SpecError, match=r"v.toml: run nhid=0: --nhid"):
        expand(spec)
    with pytest.raises(SpecError, match="unknown preset 'cpu'"):
        expand(spec, "cpu")
    bad = tmp_path / "bad.toml"
    bad.write_text("[base\nnhid = 3\n")
    with pytest.raises(SpecError, match="invalid TOML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "missing.toml")


def test_threads_default_to_cpus_over_workers() -> None:
    spec = parse_spec({"base": {"dataset": "ptb"}}, "t.toml")
    (p,) = expand(spec, workers=2)
    assert p.config["threads"] == max(1, cpu_count() // 2)
    (q,) = expand(parse_spec({"base": {"dataset": "ptb", "threads": 3}}, "t.toml"), workers=2)
    assert q.config["threads"] == 3


# --------------------------------------------------------------------------- running
def summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def test_sweep_two_workers_records_a_failure_and_skips_done_runs(
        tiny_corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # bptt = 500 is longer than each of the 4 columns of 600 tokens: that run fails in set-up
    spec = write_spec(tmp_path / "s.toml", tiny_base(tiny_corpus_dir, method="bptt"),
                      {"bptt": [4, 500], "nhid": [6, 8]})
    out = tmp_path / "sweep"
    lines: list[str] = []
    res = run_sweep(spec, out, workers=2, echo=lines.append)
    names = ["bptt=4,nhid=6", "bptt=4,nhid=8", "bptt=500,nhid=6", "bptt=500,nhid=8"]
    assert [r["name"] for r in res.runs] == names
    for name in names[:2]:
        assert summary(out / name)["status"] == "finished"
    for name in names[2:]:
        assert not (out / name / "summary.json").exists()
        assert "--bptt" in (out / name / "error.txt").read_text()
    index = json.loads((out / "sweep.json").read_text())
    status = {r["name"]: r["status"] for r in index["runs"]}
    assert status == dict(zip(names, ["finished", "finished", "failed", "failed"]))
    assert "ConfigError: --bptt" in index["runs"][2]["error"]
    assert index["keys"] == ["bptt", "nhid"] and (out / "spec.toml").is_file()
    assert sum("start" in ln for ln in lines) == 4 and sum("FAILED" in ln for ln in lines) == 2
    assert any("done" in ln and "valid" in ln and "test" in ln for ln in lines)

    # the second sweep skips the finished runs (no run for them) and retries the failed ones
    mtimes = {n: (out / n / "summary.json").stat().st_mtime_ns for n in names[:2]}
    calls: list[str] = []
    real = sw.run_point

    def spy(task: dict) -> dict:
        calls.append(Path(task["dir"]).name)
        return real(task)

    monkeypatch.setattr(sw, "run_point", spy)
    res2 = run_sweep(spec, out, workers=1, threads=1, echo=quiet)
    assert calls == names[2:]
    assert [r["action"] for r in res2.runs] == ["skip", "skip", "new", "new"]
    assert {n: (out / n / "summary.json").stat().st_mtime_ns for n in names[:2]} == mtimes
    assert len(res2.failed) == 2


def test_interrupted_run_is_resumed_not_restarted(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    base = tiny_base(tiny_corpus_dir, method="pm")
    out = tmp_path / "sweep"
    run_sweep(write_spec(tmp_path / "a.toml", base), out, threads=1, echo=quiet)
    run = out / "run"
    first = (run / "metrics.jsonl").read_text()
    assert len(first.splitlines()) == 1 and (run / "last.pt").is_file()
    (run / "summary.json").unlink()  # as if killed after epoch 1 of 2
    spec2 = write_spec(tmp_path / "b.toml", {**base, "epochs": 2})
    lines: list[str] = []
    res = run_sweep(spec2, out, threads=1, echo=lines.append)
    assert res.runs[0]["action"] == "resume" and res.runs[0]["status"] == "finished"
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and rows[0] == first.splitlines()[0]  # epoch 1 kept as it was
    assert summary(run)["epochs_run"] == 2
    assert any("continued from last.pt" in ln for ln in lines)

    # a finished run whose spec now asks for more epochs is continued as well
    spec3 = write_spec(tmp_path / "c.toml", {**base, "epochs": 3})
    res = run_sweep(spec3, out, threads=1, echo=quiet)
    assert res.runs[0]["action"] == "resume"
    new_rows = (run / "metrics.jsonl").read_text().splitlines()
    assert new_rows[:2] == rows and len(new_rows) == 3


def test_summary_without_checkpoints_counts_as_finished(tiny_corpus_dir: Path,
                                                       tmp_path: Path) -> None:
    base = tiny_base(tiny_corpus_dir, method="bptt")
    out = tmp_path / "sweep"
    run_sweep(write_spec(tmp_path / "a.toml", base), out, threads=1, echo=quiet)
    run = out / "run"
    for name in ("best.pt", "last.pt", "point.json", "train.log"):
        (run / name).unlink()  # what a commit keeps: config, metrics, summary
    before = (run / "summary.json").read_text()
    # even a spec asking for more epochs cannot continue it: there is no checkpoint
    res = run_sweep(write_spec(tmp_path / "b.toml", {**base, "epochs": 2}), out, threads=1,
                    echo=quiet)
    assert res.runs[0]["action"] == "skip" and res.runs[0]["status"] == "finished"
    assert (run / "summary.json").read_text() == before and not (run / "last.pt").exists()


def test_a_directory_holding_another_run_is_not_touched(tiny_corpus_dir: Path,
                                                       tmp_path: Path) -> None:
    base = tiny_base(tiny_corpus_dir, method="bptt")
    out = tmp_path / "sweep"
    run_sweep(write_spec(tmp_path / "a.toml", base), out, threads=1, echo=quiet)
    (out / "run" / "summary.json").unlink()
    before = (out / "run" / "metrics.jsonl").read_text()
    res = run_sweep(write_spec(tmp_path / "b.toml", {**base, "lr": 0.5}), out, threads=1,
                    echo=quiet)
    assert res.runs[0]["status"] == "failed" and "lr 0.1 here, 0.5 in the spec" in \
        res.runs[0]["error"]
    assert (out / "run" / "metrics.jsonl").read_text() == before


def test_dry_run_writes_nothing(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "a.toml", tiny_base(tiny_corpus_dir), {"nhid": [4, 6]})
    lines: list[str] = []
    res = run_sweep(spec, tmp_path / "out", dry_run=True, echo=lines.append)
    assert [r["action"] for r in res.runs] == ["new", "new"]
    assert not (tmp_path / "out").exists() and any("nhid=6" in ln for ln in lines)


# --------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("content,args,words", [
    (None, [], ["no such spec file"]),
    ("[base\n", [], ["invalid TOML"]),
    ("[base]\nnhidd = 3\n", [], ["unknown config key", "nhidd"]),
    ("[base]\nnhid = 3\n", ["--preset", "cpu"], ["unknown preset"]),
    ("[base]\nnhid = 3\n", ["--set", "nhid"], ["KEY=VALUE"]),
])
def test_cli_errors_are_one_line_exit_2(content: str | None, args: list[str], words: list[str],
                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "s.toml"
    if content is not None:
        spec.write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(spec), "--out", str(tmp_path / "o"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err


def test_cli_sweep_then_report(tiny_corpus_dir: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(tmp_path / "s.toml", tiny_base(tiny_corpus_dir, method="bptt"),
                      {"nhid": [4, 6]})
    out = tmp_path / "o"
    assert main(["sweep", str(spec), "--out", str(out), "--threads", "1", "--report"]) == 0
    text = capsys.readouterr().out
    assert "[1/2] start" in text and "[2/2] done" in text and "report:" in text
    assert (out / "report.md").is_file()
    assert main(["sweep", str(spec), "--out", str(out), "--threads", "1"]) == 0
    assert capsys.readouterr().out.count("] skip") == 2
    assert os.path.isdir(out / "nhid=4")


# --------------------------------------------------------------------------- specs naming no runs
@pytest.mark.parametrize("content", [
    "",                                     # an empty file
    "title = \"nothing\"\n",                 # no table at all
    "[base]\n",                             # an empty [base] alone: the default run
    "[base]\nnhid = 3\n[grid]\n",           # a [grid] without keys
    "[[grid]]\n[[grid]]\n",                 # [[grid]] tables without keys
    "[presets.smoke]\nnhid = 3\n",          # presets of nothing
])
def test_a_spec_that_names_no_runs_is_refused(content: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "empty.toml"
    spec.write_text(content)
    with pytest.raises(SpecError, match="names no runs"):
        load_spec(spec)
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(spec), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "names no runs" in err
    assert str(spec) in err
    assert not (tmp_path / "o").exists()  # no run started, nothing written


def test_a_spec_with_settings_only_is_one_run() -> None:
    (p,) = expand(parse_spec({"base": {"dataset": "ptb", "nhid": 3}}, "one.toml"))
    assert p.name == "run" and p.config["nhid"] == 3
    (q,) = expand(parse_spec({"base": {"dataset": "ptb"}, "grid": {}, "zip": {"nhid": [4]}},
                             "z.toml"))
    assert q.name == "nhid=4"


# --------------------------------------------------------------------------- workers die with it
def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` still runs (not gone, not a zombie) the command holding ``marker``."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and marker in _cmdline(pid)


def _wait_for(cond: Any, timeout: float, proc: Any = None) -> bool:
    """Whether ``cond()`` holds within ``timeout`` seconds (False as soon as ``proc`` ends)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.1)
    return cond()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_killed_sweep_takes_its_workers_with_it(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    # two runs that would go on for minutes: no early stop, many epochs
    spec = write_spec(tmp_path / "s.toml", tiny_base(tiny_corpus_dir, method="bptt",
                                                   epochs=100000, tol=100000),
                      {"nhid": [6, 8]})
    out = tmp_path / "sweep"
    parent = subprocess.Popen([sys.executable, "-m", "tprop", "sweep", str(spec), "--out",
                               str(out), "--workers", "2", "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        started = _wait_for(lambda: all((out / n / "config.json").is_file()
                                        for n in ("nhid=6", "nhid=8")), 120, parent)
        assert started, f"the sweep did not start both runs (exit status {parent.poll()})"
        workers = [p for p in _children(parent.pid) if "spawn_main" in _cmdline(p)]
        assert len(workers) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not any(_alive(p, "spawn_main") for p in workers), 10), \
            "the workers outlived their sweep"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for p in workers:  # left over only when the test fails
            if _alive(p, "spawn_main"):
                os.kill(p, signal.SIGKILL)


def test_watchdog_ends_a_process_whose_parent_died(tmp_path: Path) -> None:
    """The fallback where prctl is unavailable: a thread polling the parent's pid."""
    import signal
    import subprocess
    import sys

    child = ("import os, time; from tprop.lab.pool import watch_parent; "
             "watch_parent(os.getppid(), 0.05); print(os.getpid(), flush=True); time.sleep(60)")
    middle = ("import subprocess, sys; "
              f"subprocess.run([sys.executable, '-c', {child!r}])")
    parent = subprocess.Popen([sys.executable, "-c", middle], stdout=subprocess.PIPE, text=True)
    pid = None
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid, "watch_parent") or not Path("/proc").is_dir()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        if Path("/proc").is_dir():
            assert _wait_for(lambda: not _alive(pid, "watch_parent"), 10)
        else:  # pragma: no cover - not Linux
            assert _wait_for(lambda: not _pid_exists(pid), 10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pid is not None and _alive(pid, "watch_parent"):
            os.kill(pid, signal.SIGKILL)
        parent.stdout.close()


def _pid_exists(pid: int) -> bool:  # pragma: no cover - not Linux
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
