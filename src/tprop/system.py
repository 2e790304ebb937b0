"""Process-level settings: device choice, the C allocator, threads."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from .config import ConfigError

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_tuned = False


def tune_allocator() -> bool:
    """Keep glibc from returning large freed blocks to the OS after every step.

    Training allocates and frees the same large temporaries (logits, activations) at every
    step; glibc's default serves each from a fresh ``mmap`` and unmaps it on free, which
    page-faults the memory in again every time (measured at 30-38 % of a CPU training step
    on the project's machines). ``mallopt`` turns mmap-serving off and raises the trim
    threshold, the in-process equivalent of ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<huge>``. Opt out with ``TPROP_MALLOC=default``. Returns True
    when the setting was applied (glibc only).
    """
    global _tuned
    if _tuned:
        return True
    if os.environ.get("TPROP_MALLOC", "").lower() == "default" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _tuned = ok
    return ok


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device: one of auto, cpu, cuda (got {name!r})")
    return torch.device(name)
