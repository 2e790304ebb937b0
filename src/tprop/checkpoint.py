"""Checkpoints: ``state_dict``s and plain data only, written atomically.

A checkpoint loads with ``torch.load(path, weights_only=True)`` (no pickled modules) and
maps to the CPU whatever device wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .data.corpus import atomic_torch_save
from .errors import ConfigError
from .rundir import disk_full, full_disk_cause

CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU and every CUDA device)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def encode_strings(items: list[str]) -> torch.Tensor:
    """A list of strings as one uint8 tensor (JSON, UTF-8): fast to save and load."""
    return torch.frombuffer(bytearray(json.dumps(items).encode()), dtype=torch.uint8)


def decode_strings(t: torch.Tensor | list[str]) -> list[str]:
    """Inverse of ``encode_strings`` (a plain list passes through)."""
    if isinstance(t, list):
        return t
    return json.loads(bytes(t.numpy().tobytes()).decode())


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors moved to the CPU) atomically to ``path``: the file there is
    the old checkpoint or the new one, never a part. A full disk raises ``DiskFull`` naming
    the file (the old checkpoint stays intact)."""
    path = Path(path)
    try:
        atomic_torch_save({"version": CHECKPOINT_VERSION, **_to_cpu(payload)}, path)
    except Exception as e:
        cause = full_disk_cause(e, path.parent)
        if cause is None:
            raise
        kept = (f"the previous {path.name} is intact" if path.is_file() else
                f"no {path.name} was written")
        raise disk_full(path, cause, f"{kept}; free some space, then continue the run with "
                        f"`tprop train --resume {path.parent}`") from None


# what every checkpoint of this version holds (tprop.trainer.Trainer.checkpoint_payload)
REQUIRED_KEYS = ("epoch", "method", "config", "model_config", "model", "schedule",
                 "method_state", "rng", "wall_s", "vocab", "format")


def _advice(path: Path) -> str:
    """What to do about the damaged checkpoint ``path``."""
    other = path.with_name("best.pt" if path.name == "last.pt" else "last.pt")
    if path.name == "last.pt" and other.is_file():
        return (f"restore it from a copy, or continue from the best epoch instead: copy {other}"
                f" over it, then run `tprop train --resume {path.parent}` again")
    if path.name == "best.pt" and other.is_file():
        return ("restore it from a copy, or use the run's last checkpoint (--checkpoint last "
                "with tprop eval / generate)")
    return "restore it from a copy"


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, refusing anything but tensors and plain data, and any
    file that is not a whole checkpoint of a version this tprop reads (``ConfigError``, naming
    the file and what to do)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path} is empty (0 bytes), not a checkpoint: it was cut short, e.g. "
                          f"by a full disk; {_advice(path)}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason.split(". ")[0].rstrip(".")
        if len(reason) > 160:
            reason = reason[:157] + "..."
        raise ConfigError(f"{path} is not a readable checkpoint ({reason}): it is truncated or "
                          f"damaged; {_advice(path)}") from None
    version = ckpt.get("version") if isinstance(ckpt, dict) else None
    if version != CHECKPOINT_VERSION:
        what = ("has no tprop checkpoint version" if version is None else
                f"is checkpoint version {version!r}; this tprop reads version "
                f"{CHECKPOINT_VERSION}")
        raise ConfigError(f"{path} {what}: it was not written by this tprop")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    bad = [k for k in ("config", "model_config", "model", "schedule", "method_state")
           if k in ckpt and not isinstance(ckpt[k], dict)]
    model = ckpt.get("model")
    if isinstance(model, dict) and not all(isinstance(v, torch.Tensor) for v in model.values()):
        bad.append("model")
    if "vocab" in ckpt and "vocab" not in bad:
        try:
            vocab = decode_strings(ckpt["vocab"])
            if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab):
                raise ValueError("not a list of strings")
        except (ValueError, TypeError, AttributeError):
            bad.append("vocab")
    if missing or bad:
        what = (f"lacks {', '.join(missing)}" if missing else
                f"has a damaged {', '.join(bad)}")
        raise ConfigError(f"{path} is not a whole tprop checkpoint (it {what}); "
                          f"{_advice(path)}")
    return ckpt
