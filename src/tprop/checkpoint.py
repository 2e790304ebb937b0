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
    """Write ``payload`` (tensors moved to the CPU) atomically to ``path``."""
    atomic_torch_save({"version": CHECKPOINT_VERSION, **_to_cpu(payload)}, Path(path))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint onto the CPU, refusing anything but tensors and plain data, and any
    file that is not a checkpoint of a version this tprop reads (``ConfigError``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not a readable checkpoint ({reason[:200]}); it may be "
                          "truncated or damaged: restore it from a copy, or delete it and "
                          "resume from the other checkpoint") from None
    version = ckpt.get("version") if isinstance(ckpt, dict) else None
    if version != CHECKPOINT_VERSION:
        what = ("has no tprop checkpoint version" if version is None else
                f"is checkpoint version {version!r}; this tprop reads version "
                f"{CHECKPOINT_VERSION}")
        raise ConfigError(f"{path} {what}: it was not written by this tprop")
    return ckpt
