"""The data side of ``gossip`` (:mod:`tandem.strategies.gossip`) and ``coded_ps``: the M data
partitions gradient coding replicates, each copy's minibatch order, and the gradients of the
partitions one peer holds (:class:`PartitionGradients`, whose loaders a checkpoint saves).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.nn.utils import vector_to_parameters

from tandem.errors import DataError
from tandem.trainer.precision import Precision
from tandem.trainer.spec import training_spec
from tandem.trainer.trainer import build_model
from tandem.workloads.base import partition
from tandem.workloads.dataset import ArrayDataset
from tandem.workloads.loader import ShardLoader, shard_loader, targets_of


def data_partitions(workload: Any, parts: int, scheme: str, labels_per_worker: int,
                    seed: int) -> list[torch.Tensor]:
    """The M data partitions (sample indices) gradient coding replicates; ``redundant`` = iid."""
    scheme = "iid" if scheme == "redundant" else scheme
    return partition(targets_of(workload.train), parts, scheme, labels_per_worker=labels_per_worker,
                     seed=seed)


def loader_seed(seed: int, peer: int, part: int) -> int:
    """Minibatch order of partition ``part`` on ``peer`` (each copy draws its own batches)."""
    return (seed * 1_000_003 + peer) * 1009 + part


class PartitionGradients:
    """Gradients of the partitions one worker holds, computed on a private model copy.

    The private copy lets a helper thread compute at a snapshot of the parameters while the main
    thread gossips, and lets a late computation be abandoned safely. Each partition's gradient
    is one optimizer step's worth: ``accumulation`` micro-batches under the run's precision.

    ``floor_s`` pads *each* partition's gradient to at least that long (a sleep), so a peer
    holding d partitions pays d times the emulated compute, as it would on a heavier model.
    """

    def __init__(self, ctx: Any, peer: int, held: list[int], full_batch: bool,
                 floor_s: float = 0.0) -> None:
        cfg, work = ctx.cfg, ctx.workload
        self.model = build_model(work, cfg.seed, ctx.transport.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.loss_fn, self.device, self.floor_s = work.loss_fn, ctx.transport.device, floor_s
        spec = training_spec(cfg, work)
        self.micro = spec.accumulation
        self.precision = Precision(spec.precision, self.device)
        parts = data_partitions(work, cfg.workers, cfg.workload.partition,
                                cfg.workload.labels_per_worker, cfg.seed)
        self.held = held
        self.full: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.loaders: list[ShardLoader] = []
        for k in held:
            if full_batch:
                if not isinstance(work.train, ArrayDataset):
                    raise DataError("full_batch needs a two-tensor training set (ArrayDataset)")
                self.full.append((work.train.x[parts[k]], work.train.y[parts[k]]))
            else:
                self.loaders.append(shard_loader(work.train, parts[k], cfg.batch_size,
                                                 seed=loader_seed(cfg.seed, peer, k),
                                                 loader=work.loader))

    def compute(self, flat: torch.Tensor) -> tuple[float, list[torch.Tensor], float]:
        """(mean loss, one flat gradient per held partition, seconds incl. the compute floor)."""
        t_start = time.perf_counter()
        with torch.no_grad():
            vector_to_parameters(flat, self.params)
        self.model.train()
        losses, grads = [], []
        for j in range(len(self.held)):
            t0 = time.perf_counter()
            total: list[torch.Tensor] | None = None
            step_loss = 0.0
            for _ in range(self.micro if not self.full else 1):
                x, y = self.full[j] if self.full else self.loaders[j].next_batch()
                with self.precision.autocast():
                    loss = self.loss_fn(self.model(x.to(self.device)), y.to(self.device))
                if self.micro > 1 and not self.full:
                    loss = loss / self.micro
                g = torch.autograd.grad(loss, self.params, allow_unused=True)
                g = [t if t is not None else torch.zeros_like(p)
                     for t, p in zip(g, self.params, strict=True)]
                total = g if total is None else [a + b for a, b in zip(total, g, strict=True)]
                step_loss += float(loss.detach())
            assert total is not None
            grads.append(torch.cat([t.reshape(-1) for t in total]).detach())
            losses.append(step_loss)
            spent = time.perf_counter() - t0
            if spent < self.floor_s:  # each gradient pays the emulated compute
                time.sleep(self.floor_s - spent)
        return sum(losses) / len(losses), grads, time.perf_counter() - t_start
