"""The data side of ``gossip`` (:mod:`tandem.strategies.gossip`) and ``coded_ps``: the M data
partitions gradient coding replicates, each copy's minibatch order, and the gradients of the
partitions one peer holds (:class:`PartitionGradients`, whose loaders a checkpoint saves).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.nn.utils import vector_to_parameters

from tandem.trainer.trainer import build_model
from tandem.workloads.base import ShardLoader, partition


def data_partitions(workload: Any, parts: int, scheme: str, labels_per_worker: int,
                    seed: int) -> list[torch.Tensor]:
    """The M data partitions (sample indices) gradient coding replicates; ``redundant`` = iid."""
    scheme = "iid" if scheme == "redundant" else scheme
    return partition(workload.train.y, parts, scheme, labels_per_worker=labels_per_worker,
                     seed=seed)


def loader_seed(seed: int, peer: int, part: int) -> int:
    """Minibatch order of partition ``part`` on ``peer`` (each copy draws its own batches)."""
    return (seed * 1_000_003 + peer) * 1009 + part


class PartitionGradients:
    """Gradients of the partitions one worker holds, computed on a private model copy.

    The private copy lets a helper thread compute at a snapshot of the parameters while the main
    thread gossips, and lets a late computation be abandoned safely.
    """

    def __init__(self, ctx: Any, peer: int, held: list[int], full_batch: bool,
                 floor_s: float = 0.0) -> None:
        cfg, work = ctx.cfg, ctx.workload
        self.model = build_model(work, cfg.seed, ctx.transport.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.loss_fn, self.device, self.floor_s = work.loss_fn, ctx.transport.device, floor_s
        parts = data_partitions(work, cfg.workers, cfg.workload.partition,
                                cfg.workload.labels_per_worker, cfg.seed)
        self.held = held
        self.full: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.loaders: list[ShardLoader] = []
        for k in held:
            if full_batch:
                self.full.append((work.train.x[parts[k]], work.train.y[parts[k]]))
            else:
                self.loaders.append(ShardLoader(work.train, parts[k], cfg.batch_size,
                                                seed=loader_seed(cfg.seed, peer, k)))

    def compute(self, flat: torch.Tensor) -> tuple[float, list[torch.Tensor], float]:
        """(mean loss, one flat gradient per held partition, seconds incl. the compute floor)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            vector_to_parameters(flat, self.params)
        self.model.train()
        losses, grads = [], []
        for j in range(len(self.held)):
            x, y = self.full[j] if self.full else self.loaders[j].next_batch()
            loss = self.loss_fn(self.model(x.to(self.device)), y.to(self.device))
            g = torch.autograd.grad(loss, self.params)
            grads.append(torch.cat([t.reshape(-1) for t in g]).detach())
            losses.append(float(loss.detach()))
        spent = time.perf_counter() - t0
        if spent < self.floor_s:
            time.sleep(self.floor_s - spent)
            spent = self.floor_s
        return sum(losses) / len(losses), grads, spent
