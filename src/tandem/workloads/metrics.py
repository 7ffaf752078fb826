"""Evaluation metrics: named functions of a model's output and the target, reduced exactly.

A metric returns ``(sum, count)`` for one batch; the evaluation adds both over every batch of
every rank's test shard and reports ``sum / count``. So a metric is exact however the test set is
split (a mean of per-shard means would weight shards wrongly).

Built in:

* :func:`accuracy`: the class dimension is dim 1, PyTorch's layout for ``cross_entropy``:
  ``(N, C)`` for one label per sample and ``(N, C, d1, ...)`` for one label per position (a
  sequence model's ``(N, V, T)``); the count is the number of labels, so the result lies in
  [0, 1] whatever the shape.
* :func:`token_accuracy`: the class dimension is the last one, ``(N, T, V)`` (the layout most
  language models return).

Your own::

    def top5(out, y):
        hit = (out.topk(5, dim=1).indices == y[:, None]).any(1)
        return hit.sum(), y.numel()

    tandem.Workload.custom(..., metrics={"accuracy": tandem.metrics.accuracy, "top5": top5})
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: (output, target) -> (sum, count) over one batch
Metric = Callable[[Tensor, Tensor], tuple[Tensor | float, Tensor | float]]


def accuracy(output: Tensor, target: Tensor) -> tuple[Tensor, int]:
    """Correct predictions with the classes on dim 1: ``(N, C)`` or ``(N, C, *)``."""
    if output.dim() < 2:
        raise ValueError(f"accuracy needs class scores of shape (N, C, ...); got "
                         f"{tuple(output.shape)}")
    pred = output.argmax(1)
    if pred.shape != target.shape:
        raise ValueError(f"accuracy: predictions of shape {tuple(pred.shape)} (output "
                         f"{tuple(output.shape)} with classes on dim 1) do not match targets "
                         f"{tuple(target.shape)}; for (N, T, V) outputs use token_accuracy")
    return (pred == target).sum(), target.numel()


def token_accuracy(output: Tensor, target: Tensor) -> tuple[Tensor, int]:
    """Correct predictions with the classes on the last dim: ``(N, T, V)`` or ``(N, V)``."""
    pred = output.argmax(-1)
    if pred.shape != target.shape:
        raise ValueError(f"token_accuracy: predictions of shape {tuple(pred.shape)} (output "
                         f"{tuple(output.shape)} with classes last) do not match targets "
                         f"{tuple(target.shape)}")
    return (pred == target).sum(), target.numel()


def sequence_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy per position for ``(N, T, V)`` outputs and ``(N, T)`` targets."""
    return torch.nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]),
                                             target.reshape(-1))


__all__ = ["Metric", "accuracy", "sequence_cross_entropy", "token_accuracy"]
