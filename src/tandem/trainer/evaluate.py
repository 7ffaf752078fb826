"""Test-set evaluation, sharded over the ranks of a group and reduced exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tandem.transport.transport import Group, Transport
    from tandem.workloads.base import Workload


@torch.no_grad()
def evaluate_shard(
    model: torch.nn.Module,
    workload: Workload,
    rank: int,
    world: int,
    device: torch.device,
    batch: int = 1024,
) -> torch.Tensor:
    """[correct, loss_sum, count] of ``model`` on this rank's slice of the test set."""
    model.eval()
    x_all, y_all = workload.test.x[rank::world], workload.test.y[rank::world]
    correct = loss_sum = 0.0
    for i in range(0, len(x_all), batch):
        x, y = x_all[i : i + batch].to(device), y_all[i : i + batch].to(device)
        out = model(x)
        loss_sum += float(workload.loss_fn(out, y)) * len(x)
        if workload.task == "classification":
            correct += float((out.argmax(1) == y).sum())
    return torch.tensor([correct, loss_sum, float(len(x_all))], dtype=torch.float64)


def evaluate(
    model: torch.nn.Module, workload: Workload, transport: Transport, group: Group | None = None
) -> tuple[float | None, float]:
    """Test accuracy and loss over the whole test set, each rank of ``group`` doing a slice."""
    g = group or transport.world_group
    idx = g.ranks.index(transport.rank)
    stats = evaluate_shard(model, workload, idx, g.size, transport.device)
    if g.size > 1:
        transport.all_reduce(stats, group=group, category="eval").wait()
    correct, loss_sum, count = stats.tolist()
    acc = correct / count if workload.task == "classification" else None
    return acc, loss_sum / max(count, 1.0)


def is_eval_step(step: int, every: int, total: int) -> bool:
    return (step + 1) % every == 0 or step + 1 == total
