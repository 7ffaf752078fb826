"""Mixed precision and the optimizer step every strategy takes the same way.

``bf16``: forward and loss under ``torch.autocast`` with bfloat16 (CPU or GPU); parameters,
gradients and the optimizer stay fp32, and bf16's fp32-sized exponent needs no loss scaling.
``fp16``: autocast with float16 and a gradient scaler (GPU): the loss is scaled before backward,
the *aggregated* gradient is unscaled before clipping, and a step whose gradient overflowed is
skipped (every worker applies the same aggregated gradient, so every worker skips the same step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from tandem.errors import ConfigError


class Precision:
    """Autocast and (fp16) gradient scaling for one worker."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode = mode
        self.device_type = device.type
        self.scaler: Any = None
        if mode == "fp16":
            if device.type != "cuda":
                raise ConfigError("precision: fp16 needs a GPU (float16 autocast with a "
                                  "gradient scaler); on CPU use bf16")
            self.scaler = torch.amp.GradScaler("cuda")
        elif mode not in ("fp32", "bf16"):
            raise ConfigError(f"precision: unknown {mode!r}; use fp32, bf16 or fp16")

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.mode == "fp32":
            yield
            return
        dtype = torch.bfloat16 if self.mode == "bf16" else torch.float16
        with torch.autocast(self.device_type, dtype=dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()


def step_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                   clip: float | None, scheduler: Any = None,
                   precision: Precision | None = None) -> float | None:
    """One optimizer step on the gradients in ``p.grad``: unscale (fp16), clip the global norm,
    step (skipped by the scaler on overflow), advance the schedule. Returns the gradient's
    norm before clipping when clipping, else None."""
    scaler = precision.scaler if precision is not None else None
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = None
    if clip is not None:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return norm
