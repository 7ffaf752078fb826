"""Test-set evaluation, sharded over the ranks of a group and reduced exactly.

Rank ``i`` of a group of ``n`` evaluates test samples ``i, i + n, i + 2n, ...``; every rank
returns sums (the loss weighted by batch size, and each metric's ``(sum, count)``), one
all-reduce adds them, and the results are ratios of totals, so they equal a one-process pass over
the whole test set whatever ``n``. Metrics come from the workload
(:meth:`~tandem.workloads.base.Workload.metric_fns`); ``language`` workloads also report
perplexity (``exp`` of the mean loss per position).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tandem.errors import DataError
from tandem.workloads.dataset import ArrayDataset

if TYPE_CHECKING:
    from tandem.transport.transport import Group, Transport
    from tandem.workloads.base import Workload

EVAL_BATCH = 1024


@dataclass
class Evaluation:
    """The loss and metrics of one evaluation; ``accuracy`` is the headline metric."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    count: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.metrics.get("accuracy")

    def record(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`~tandem.telemetry.recorder.Recorder.eval`."""
        extra = {k: v for k, v in self.metrics.items() if k != "accuracy"}
        return {"accuracy": self.accuracy, "loss": self.loss, **extra}


def shard_batches(workload: Workload, rank: int, world: int,
                 batch: int = EVAL_BATCH) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's slice of the test set, in batches (two tensors, or through a DataLoader)."""
    data = workload.test
    if data is None:
        raise DataError(f"workload {workload.name} has no test set to evaluate on")
    if isinstance(data, ArrayDataset):
        x_all, y_all = data.x[rank::world], data.y[rank::world]
        for i in range(0, len(x_all), batch):
            yield x_all[i:i + batch], y_all[i:i + batch]
        return
    idx = list(range(rank, len(data), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, idx),
                                         batch_size=min(batch, 256))
    for x, y in loader:
        yield torch.as_tensor(x), torch.as_tensor(y)


@torch.no_grad()
def evaluate_shard(model: torch.nn.Module, workload: Workload, rank: int, world: int,
                   device: torch.device, batch: int = EVAL_BATCH) -> torch.Tensor:
    """``[loss_sum, count, m1_sum, m1_count, ...]`` of ``model`` on this rank's slice (metrics
    in the order of :meth:`~tandem.workloads.base.Workload.metric_fns`)."""
    model.eval()
    metrics = list(workload.metric_fns().values())
    sums = [0.0] * (2 + 2 * len(metrics))
    for x, y in shard_batches(workload, rank, world, batch):
        x, y = x.to(device), y.to(device)
        out = model(x)
        sums[0] += float(workload.loss_fn(out, y)) * len(x)
        sums[1] += len(x)
        for j, fn in enumerate(metrics):
            s, n = fn(out, y)
            sums[2 + 2 * j] += float(s)
            sums[3 + 2 * j] += float(n)
    return torch.tensor(sums, dtype=torch.float64)


def reduce_evaluation(stats: torch.Tensor, workload: Workload) -> Evaluation:
    """An :class:`Evaluation` from summed :func:`evaluate_shard` vectors."""
    vals = stats.tolist()
    loss = vals[0] / max(vals[1], 1.0)
    names = list(workload.metric_fns())
    metrics = {name: vals[2 + 2 * j] / vals[3 + 2 * j] if vals[3 + 2 * j] else float("nan")
               for j, name in enumerate(names)}
    if workload.task == "language":
        metrics["perplexity"] = math.exp(min(loss, 700.0))
    return Evaluation(loss, metrics, int(vals[1]))


def evaluate(model: torch.nn.Module, workload: Workload, transport: Transport,
             group: Group | None = None) -> Evaluation:
    """Loss and metrics over the whole test set, each rank of ``group`` doing a slice."""
    g = group or transport.world_group
    idx = g.ranks.index(transport.rank)
    stats = evaluate_shard(model, workload, idx, g.size, transport.device)
    if g.size > 1:
        transport.all_reduce(stats, group=group, category="eval").wait()
    return reduce_evaluation(stats, workload)


def evaluate_alone(model: torch.nn.Module, workload: Workload,
                   device: torch.device) -> Evaluation:
    """The whole test set in this process, no collective."""
    return reduce_evaluation(evaluate_shard(model, workload, 0, 1, device), workload)


def is_eval_step(step: int, every: int, total: int) -> bool:
    return (step + 1) % every == 0 or step + 1 == total
