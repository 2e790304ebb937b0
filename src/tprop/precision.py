"""Mixed precision (``--precision fp32|bf16|fp16``): autocast for the forward passes, a gradient
scaler for fp16.

The parameters, the optimiser's state, the free states, duals and solver state of Block
TPROP, the exact recurrence's solved states and every loss accumulation stay in float32;
autocast runs the recurrent kernels and the decoder in the lower precision. Evaluation runs in
float32. fp16 needs loss scaling, which the gradient scaler does for BPTT; the BTPROP solvers
take several gradients per update (of the free states and of θ), so they are refused fp16
and run bf16 (no scaling needed) — ``TrainConfig.validate`` says so.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """How a run's forward passes and optimiser steps treat precision."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.dtype = DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> AbstractContextManager[Any]:
        """The context of a training forward pass (a no-op in fp32)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients back at their true scale (before clipping)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimiser step (skipped by the scaler when a gradient is not finite)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def probe(self, model: Any) -> None:
        """A forward and backward pass of a few tokens in this precision, so that a kernel
        that refuses it is reported before the run starts (see :meth:`refusal`)."""
        if self.dtype is None:
            return
        x = torch.zeros(2, 2, dtype=torch.long, device=self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        try:
            with self.autocast():
                logits, _ = model(x, model.init_state(2))
            torch.autograd.grad(logits.float().sum(), params, allow_unused=True)
        except RuntimeError as e:
            refusal = self.refusal(e)
            if refusal is None:
                raise
            raise refusal from None

    def refusal(self, error: BaseException) -> Exception | None:
        """A user's error for a kernel that refuses this precision (oneDNN's LSTM on the CPU
        cannot run fp16: "could not create a primitive descriptor"), else None."""
        if self.dtype is None or "primitive descriptor" not in str(error):
            return None
        from .errors import ConfigError

        return ConfigError(f"--precision {self.name}: the {self.device.type.upper()} kernels "
                           f"of this torch build cannot run the recurrence in {self.name} "
                           f"({str(error).splitlines()[0][:120]}); use --precision fp32 here "
                           "(mixed precision is for GPUs)")

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
