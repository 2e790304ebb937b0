"""A run directory: ``config.json``, ``metrics.jsonl``, ``summary.json``, checkpoints, log."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN and infinities become None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """The files of one run. Metrics are appended one JSON object per epoch."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.json")
    metrics_file = property(lambda self: self.path / "metrics.jsonl")
    summary_file = property(lambda self: self.path / "summary.json")
    best_ckpt = property(lambda self: self.path / "best.pt")
    last_ckpt = property(lambda self: self.path / "last.pt")
    log_file = property(lambda self: self.path / "train.log")

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def exists(self) -> bool:
        return self.config_file.is_file()

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.config_file, config)

    def read_config(self) -> dict:
        return json.loads(self.config_file.read_text())

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(_clean(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
        fd, tmp = tempfile.mkstemp(prefix=".metrics.", dir=self.path)
        with os.fdopen(fd, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.metrics_file)

    def write_summary(self, summary: dict) -> None:
        write_json_atomic(self.summary_file, summary)

    def log(self, line: str) -> None:
        with open(self.log_file, "a") as f:
            f.write(line + "\n")
