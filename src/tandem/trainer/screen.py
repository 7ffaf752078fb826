"""Catch a non-finite gradient before it leaves the worker (``--nan-policy stop|skip``)."""

from __future__ import annotations

import math

import torch

from tandem.errors import NonFiniteGradient


def screen_gradients(grads: list[torch.Tensor], policy: str, rank: int, step: int,
                     what: str = "", *, flat: torch.Tensor | None = None
                     ) -> tuple[list[torch.Tensor], bool]:
    """Catch a NaN/Inf gradient before it is sent: ``stop`` raises naming the rank and step,
    ``skip`` replaces it by zeros (this worker's contribution to the step is dropped).

    ``flat``: the one buffer the gradients live in (``use_flat_gradients``), screened in one
    pass. Returns the gradients to send and whether the step was skipped.
    """
    if check_finite([flat] if flat is not None else grads):
        return grads, False
    if policy == "stop":
        raise_non_finite(rank, step, what)
    return [torch.zeros_like(g) for g in grads], True


def check_finite(grads: list[torch.Tensor]) -> bool:
    """True when no element is NaN or Inf.

    A finite sum proves it (NaN and Inf propagate through a sum, and Inf + -Inf is NaN), at
    ~1/30 of the cost of an elementwise test on a step's gradient; only a non-finite sum (a
    real NaN/Inf, or an overflow of huge finite values) is checked element by element.
    """
    if all(math.isfinite(float(g.sum())) for g in grads):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


def raise_non_finite(rank: int, step: int, what: str = "") -> None:
    raise NonFiniteGradient(
        f"rank {rank}: non-finite gradient{what} at step {step}; "
        "lower the learning rate, or use --nan-policy skip"
    )
