"""Reusable optimizer and schedule factories for a :class:`~tandem.workloads.base.Workload`.

Both are module-level functions (and the schedule's multiplier a small class), so they pickle by
reference and travel to worker processes; customise them with ``functools.partial``, which pickles
too::

    Workload(..., optimizer=partial(adamw_groups, weight_decay=0.05),
             scheduler=partial(warmup_cosine, warmup_fraction=0.1))

* :func:`adamw_groups` -- AdamW with weight decay on weight matrices only, the usual recipe for
  transformers. Decaying biases, norm gains or embeddings only pulls them toward zero for no
  regularising benefit (a LayerNorm gain of 0 switches a feature off). Its ``lr`` argument is the
  run's learning rate: the trainer passes ``lr=`` to any optimizer factory that takes it.
* :func:`warmup_cosine` -- linear warm-up, then a cosine decay to ``min_ratio`` of the base rate
  at ``total_steps``. Warm-up keeps Adam's first steps (when its second-moment estimate is still
  noisy) from blowing up a fresh transformer; the cosine tail gives the last few hundred steps
  a small rate, which usually buys the final few percent of loss.

Tuning: for a ~1M-parameter transformer, ``lr`` 1e-3..3e-3 with ``betas=(0.9, 0.95)`` and
``weight_decay`` 0.1 is a safe start; halve ``lr`` if the loss spikes early, lengthen the warm-up
(``warmup_fraction``) for larger models or larger batches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: module types whose parameters are never decayed (their weights are gains or lookup rows)
NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.LocalResponseNorm,
)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Two parameter groups: matrices (decayed) and everything else (not decayed).

    A parameter is decayed when it has two or more dimensions and belongs to no module in
    :data:`NO_DECAY_MODULES`; so linear and convolution weights decay, while biases, norm gains
    and embedding tables (also one tied to an output head) do not. Frozen parameters
    (``requires_grad=False``) are left out; a shared parameter appears once. Empty groups are
    dropped, and the order of parameters follows ``model.named_parameters()`` (deterministic).
    """
    keep = {id(p) for m in model.modules() if isinstance(m, NO_DECAY_MODULES)
            for p in m.parameters(recurse=False)}
    decay: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in keep else other).append(p)
    groups: list[dict[str, object]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    return groups


def adamw_groups(model: nn.Module, lr: float, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW at learning rate ``lr``, decaying only weight matrices (see :func:`decay_groups`).

    ``betas=(0.9, 0.95)`` (a shorter second-moment memory than PyTorch's 0.999) reacts faster to
    the gradient-scale changes of early transformer training.
    """
    if lr <= 0:
        raise ValueError(f"adamw_groups: lr must be positive, got {lr}")
    groups = decay_groups(model, weight_decay)
    if not groups:
        raise ValueError("adamw_groups: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


class WarmupCosine:
    """The multiplier of :func:`warmup_cosine` at optimizer step ``step`` (picklable).

    Steps ``0 .. warmup-1`` rise linearly to 1 (step 0 already trains at ``1/warmup`` of the
    base rate, never at 0); then a half cosine falls from 1 to ``min_ratio`` at ``total_steps``
    and stays there if training runs longer.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return (f"WarmupCosine(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                f"min_ratio={self.min_ratio})")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int,
                  warmup_fraction: float = 0.05,
                  min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_fraction`` of ``total_steps``, then cosine to ``min_ratio``.

    Step the scheduler once per optimizer step. The warm-up lasts
    ``max(1, round(warmup_fraction * total_steps))`` steps (none when ``warmup_fraction`` is 0).
    Its state (``state_dict``) holds the multiplier's fields, so a resumed run continues the
    same curve.
    """
    if total_steps < 1:
        raise ValueError(f"warmup_cosine: total_steps must be at least 1, got {total_steps}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_cosine: warmup_fraction must lie in [0, 1), got "
                         f"{warmup_fraction}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"warmup_cosine: min_ratio must lie in [0, 1], got {min_ratio}")
    warmup = max(1, round(warmup_fraction * total_steps)) if warmup_fraction > 0 else 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup,
                                                                     min_ratio))


__all__ = ["NO_DECAY_MODULES", "WarmupCosine", "adamw_groups", "decay_groups", "warmup_cosine"]
