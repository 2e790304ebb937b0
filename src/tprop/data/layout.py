"""Layouts of a token stream: BPTT stream columns and the block layout of Block TPROP.

Both are views over the one 1-D token tensor (no copies are made, per epoch or otherwise).
Tensors are time-major, ``(time, batch)``, as torch's recurrent modules expect.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class StreamColumns:
    """The stream cut into ``B`` parallel columns, walked in windows of ``K`` steps.

    Column ``b`` is the contiguous chunk ``data[b*n : (b+1)*n]`` of the inputs, with targets
    shifted by one token; ``n = (T - 1) // B`` and the last ``(T - 1) mod B`` predictions are
    dropped. ``inputs`` and ``targets`` have shape ``(n, B)``.
    """

    def __init__(self, data: torch.Tensor, batch_size: int) -> None:
        if data.dim() != 1:
            raise ValueError("expected a 1-D token tensor")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        n = (data.numel() - 1) // batch_size
        if n < 1:
            raise ValueError(
                f"{data.numel()} tokens are too few for {batch_size} columns"
            )
        self.batch_size = batch_size
        self.length = n
        self.inputs = data[: n * batch_size].view(batch_size, n).t()
        self.targets = data[1 : n * batch_size + 1].view(batch_size, n).t()

    @property
    def num_tokens(self) -> int:
        """Number of predictions the columns hold."""
        return self.length * self.batch_size

    def num_windows(self, bptt: int, drop_last: bool = True) -> int:
        """Windows of ``bptt`` steps per epoch (a trailing partial window kept unless drop_last)."""
        full, rest = divmod(self.length, bptt)
        return full + (0 if drop_last or rest == 0 else 1)

    def windows(
        self, bptt: int, drop_last: bool = True, start: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(inputs, targets)``, each ``(K, B)``, for successive windows from window ``start``."""
        for w in range(start, self.num_windows(bptt, drop_last)):
            i = w * bptt
            k = min(bptt, self.length - i)
            yield self.inputs[i : i + k], self.targets[i : i + k]


class Blocks:
    """The stream cut into ``N = (T - 1) // K`` consecutive blocks of ``K`` tokens.

    Block ``j`` covers positions ``jK … jK+K-1``; ``inputs[j]`` are those tokens and
    ``targets[j]`` the tokens one position later. Both have shape ``(N, K)``.
    """

    def __init__(self, data: torch.Tensor, block_size: int) -> None:
        if data.dim() != 1:
            raise ValueError("expected a 1-D token tensor")
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        n = (data.numel() - 1) // block_size
        if n < 1:
            raise ValueError(f"{data.numel()} tokens are too few for one block of {block_size}")
        self.block_size = block_size
        self.num_blocks = n
        self.inputs = data[: n * block_size].view(n, block_size)
        self.targets = data[1 : n * block_size + 1].view(n, block_size)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def span(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Time-major ``(K, stop-start)`` inputs and targets of blocks ``start … stop-1``."""
        return self.inputs[start:stop].t(), self.targets[start:stop].t()
