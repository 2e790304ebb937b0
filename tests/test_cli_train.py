"""The command line of training and of using a run: errors, help, a full round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import write_corpus

from tprop.cli import main

SMALL = ["--model", "lstm", "--emsize", "8", "--nhid", "8", "--bptt", "5", "--batch-size", "4",
         "--eval-batch-size", "4", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny")


@pytest.fixture(scope="module")
def cli_run(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained through the command line (2 epochs)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    rc = main(["train", "--data-dir", str(corpus_dir), "--epochs", "2", "--out", str(out),
               "--optim", "adagrad", "--lr", "0.1", *SMALL])
    assert rc == 0
    return out


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args,flag", [
    (["--bptt", "0"], "--bptt"),
    (["--lr", "-1"], "--lr"),
    (["--dropout", "1.5"], "--dropout"),
    (["--dataset", "nosuch"], "nosuch"),
    (["--tied", "--emsize", "8", "--nhid", "16"], "--tied"),
    (["--epochs", "zero"], "--epochs"),
    (["--optim", "lbfgs"], "--optim"),
    (["--preset", "nosuch"], "--preset"),
])
def test_argument_errors(args: list[str], flag: str, tmp_path: Path,
                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(out), "--quiet", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert flag in lines[0]
    assert not (out / "config.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(corpus_dir: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data-dir", str(corpus_dir), "--out", str(tmp_path / "run"),
              "--quiet", "--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "cuda" in lines[0].lower()


def test_out_existing_run_is_refused(cli_run: Path, corpus_dir: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in cli_run.iterdir()}
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data-dir", str(corpus_dir), "--out", str(cli_run), "--epochs", "1",
              *SMALL])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "--resume" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in cli_run.iterdir()} == before


def test_resume_refuses_new_lr(cli_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = (cli_run / "config.json").read_text()
    with pytest.raises(SystemExit) as exc:
        main(["train", "--resume", str(cli_run), "--lr", "0.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "lr" in err
    assert (cli_run / "config.json").read_text() == before


# --------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv,words", [
    (["--help"], ["train", "eval", "generate", "data"]),
    (["train", "--help"], ["--bptt", "--lr", "--clip", "--optim", "--epochs", "--data-dir",
                           "--resume", "--preset", "--update-freq", "--full-batch", "--max-ppl"]),
    (["eval", "--help"], ["RUN_DIR", "--split", "--json", "--checkpoint"]),
    (["generate", "--help"], ["RUN_DIR", "--tokens", "--seed", "--temperature"]),
    (["data", "--help"], ["list", "stats", "prepare"]),
])
def test_help(argv: list[str], words: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for w in words:
        assert w in out, w


# --------------------------------------------------------------------------- round trip
def test_train_writes_run(cli_run: Path) -> None:
    cfg = json.loads((cli_run / "config.json").read_text())
    assert cfg["epochs"] == 2 and cfg["nhid"] == 8 and cfg["out"] == str(cli_run)
    summary = json.loads((cli_run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs_run"] == 2
    assert (cli_run / "best.pt").is_file() and (cli_run / "last.pt").is_file()


def test_eval_json_matches_summary(cli_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["eval", str(cli_run), "--split", "test", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    summary = json.loads((cli_run / "summary.json").read_text())
    assert res["split"] == "test" and res["tokens"] > 0
    assert res["ppl"] == pytest.approx(summary["test_ppl"], rel=1e-9)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)
    # valid on the best checkpoint is the best validation perplexity
    assert main(["eval", str(cli_run), "--split", "valid", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip())
    assert res["ppl"] == pytest.approx(summary["best_valid_ppl"], rel=1e-9)


def test_generate(cli_run: Path, corpus_dir: Path, capsys: pytest.CaptureFixture) -> None:
    vocab = set((corpus_dir / "train.txt").read_text().split())

    def gen(seed: int) -> str:
        capsys.readouterr()
        assert main(["generate", str(cli_run), "--tokens", "20", "--seed", str(seed)]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n")
        return out[:-1]

    text = gen(1)
    words = text.split()
    assert words and set(words) <= vocab
    # 20 tokens: every word, and every <eos>, which prints as a line break
    assert len(words) + text.count("\n") == 20
    assert gen(1) == text
    assert any(gen(s) != text for s in (2, 3, 4))


def test_preset_with_overrides(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--preset", "zaremba-small", "--epochs", "1", "--nhid", "8",
               "--emsize", "8", "--data-dir", str(corpus_dir), "--out", str(out), "--quiet",
               "--device", "cpu"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "zaremba-small"
    assert cfg["bptt"] == 20 and cfg["nlayers"] == 2 and cfg["optim"] == "sgd"  # preset
    assert cfg["lr_decay_start"] == 5 and cfg["lr"] == 20.0
    assert cfg["nhid"] == 8 and cfg["emsize"] == 8 and cfg["epochs"] == 1  # flags
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 1


def test_diverging_run_exit_code(corpus_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--data-dir", str(corpus_dir), "--out", str(out), "--epochs", "2",
               "--optim", "sgd", "--lr", "1e6", "--clip", "0", *SMALL])
    assert rc == 3
    assert json.loads((out / "summary.json").read_text())["status"] == "diverged"
    assert "diverged" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--dataset", "nosuch"], ["--bptt", "100000"]])
def test_failed_start_leaves_no_run_directory(corpus_dir: Path, tmp_path: Path,
                                              args: list[str]) -> None:
    out = tmp_path / "run"
    data = [] if "--dataset" in args else ["--data-dir", str(corpus_dir)]
    with pytest.raises(SystemExit) as exc:
        main(["train", *data, "--out", str(out), *SMALL, *args])
    assert exc.value.code == 2
    assert not out.exists()


def test_eval_train_split_is_the_trained_part(corpus_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(corpus_dir), "--out", str(out), "--epochs", "1",
                 "--train-tokens", "1001", "--eval-train", *SMALL]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "train", "--checkpoint", "last", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip())
    assert res["tokens"] <= 1000
    assert res["ppl"] == pytest.approx(row["train_eval_ppl"], rel=1e-9)
