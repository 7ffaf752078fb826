"""A Transport-compatible adapter over a plain ``torch.distributed`` process group.

For code that runs inside someone else's loop (the DDP communication hook) where no Tandem
:class:`~tandem.transport.transport.Transport` exists: the operations are synchronous, and bytes are
charged with the same formulas as the transport's, so ``adapter.meter`` reports the same figures.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from tandem.transport import costs
from tandem.transport.accounting import ByteMeter, StepBytes
from tandem.transport.transport import Group

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class Done:
    """An already-completed operation (the adapter runs collectives synchronously)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def wait(self, timeout: float | None = None) -> Any:
        return self.value

    def done(self) -> bool:
        return True


class ProcessGroupTransport:
    """What codecs use of :class:`~tandem.transport.transport.Transport`, over a process group:
    the codecs' ``Collectives`` protocol (``tandem.codecs.collectives``, which this layer does
    not import), plus the byte meter."""

    def __init__(self, pg: Any = None) -> None:
        self.pg = pg if pg is not None else dist.group.WORLD
        self.rank: int = dist.get_rank()
        self.world: int = dist.get_world_size()
        self.world_group: Group = Group(self.pg, dist.get_process_group_ranks(self.pg))
        self.meter = ByteMeter()

    def _g(self, group: Group | None) -> Group:
        return group or self.world_group

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, group: Group | None = None,
                   category: str = "train", caller_waits: bool = False) -> Done:
        g = self._g(group)
        t = costs.all_reduce(tensor.numel() * tensor.element_size(), g.size)
        self.meter.record("all_reduce", t.sent, t.recv, category=category)
        dist.all_reduce(tensor, op=_OPS[op], group=g.pg)
        return Done(tensor)

    def all_gather(self, tensor: torch.Tensor, *, group: Group | None = None,
                   category: str = "train") -> Done:
        g = self._g(group)
        t = costs.all_gather(tensor.numel() * tensor.element_size(), g.size)
        self.meter.record("all_gather", t.sent, t.recv, category=category)
        out = [torch.empty_like(tensor) for _ in range(g.size)]
        dist.all_gather(out, tensor.contiguous(), group=g.pg)
        return Done(out)

    def broadcast(self, tensor: torch.Tensor, src: int, *, group: Group | None = None,
                  category: str = "train") -> Done:
        g = self._g(group)
        t = costs.broadcast(tensor.numel() * tensor.element_size(), g.size, self.rank == src)
        self.meter.record("broadcast", t.sent, t.recv, category=category)
        dist.broadcast(tensor, src=src, group=g.pg)
        return Done(tensor)

    def end_step(self) -> StepBytes:
        return self.meter.end_step()
