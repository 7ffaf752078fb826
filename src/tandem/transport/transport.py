"""The transport: the only module that talks to ``torch.distributed``.

Every exchange a strategy or codec makes goes through :class:`Transport`, which

* issues the engine's asynchronous operation (gloo on CPU, NCCL when CUDA is present);
* charges its bytes to the :class:`~tandem.transport.accounting.ByteMeter`;
* delays its completion to what an emulated link would allow (:mod:`.shaping`);
* returns a :class:`~tandem.transport.liveness.Pending` whose ``wait()`` has a deadline and,
  on expiry, names the ranks that did not answer.

Point-to-point traffic uses its own process group, so a broken receive never poisons the
collectives, and every message gets a unique tag (a per-peer sequence number) because gloo lets an
unsatisfied receive swallow the next message with the same source and tag.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tandem.config import NetConfig
from tandem.transport import costs
from tandem.transport.accounting import ByteMeter, StepBytes
from tandem.transport.host_link import join_host
from tandem.transport.liveness import CallerWait, Liveness, Pending, Scheduler, Waiters
from tandem.transport.p2p import PointToPoint
from tandem.transport.shaping import LinkEmulator, as_net

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass
class Group:
    """A set of ranks that run collectives together (``ranks`` are global ranks)."""

    pg: Any
    ranks: list[int]
    clock: Any = None  #: on an emulated link, the join clock's own group (``_join_clock``)

    @property
    def size(self) -> int:
        return len(self.ranks)


class Transport(PointToPoint):
    """Asynchronous, metered, deadline-bounded communication for one process."""

    def __init__(
        self,
        rank: int,
        world: int,
        store: Any,
        *,
        backend: str = "gloo",
        net: NetConfig | str | None = None,
        timeout_s: float = 60.0,
        seed: int = 0,
        device: torch.device | None = None,
    ) -> None:
        net = as_net(net)
        #: 0 on a job's first start, n after n torchrun restarts (set by transport_from_env)
        self.attempt = 0
        self.rank, self.world, self.backend = rank, world, backend
        self.timeout_s = timeout_s
        self.device = device or torch.device("cpu")
        self.meter = ByteMeter()
        #: this rank's emulated host (``net.hosts``; None: a link of its own)
        self.host, host_link = join_host(net, store, rank, world)
        self.link = LinkEmulator(net, rank, seed, host_link)
        self.store = store
        self.liveness = Liveness(dist.PrefixStore("live", store), rank, world)
        self._scheduler = Scheduler()
        self._waiters = Waiters()
        self._seq_lock = threading.Lock()
        self._send_seq: dict[int, int] = {}
        self._recv_seq: dict[int, int] = {}
        pg_timeout = timedelta(seconds=timeout_s + 30)
        if not dist.is_initialized():
            dist.init_process_group(
                backend,
                store=dist.PrefixStore("pg", store),
                rank=rank,
                world_size=world,
                timeout=pg_timeout,
            )
        self.world_group = Group(dist.group.WORLD, list(range(world)))
        # Point-to-point traffic on its own group (gloo p2p uses the device-less CPU path).
        self._p2p_pg = dist.new_group(list(range(world)), backend="gloo", timeout=pg_timeout)
        if self.link.enabled:
            self.world_group.clock = dist.new_group(list(range(world)), timeout=pg_timeout)

    # ---- groups -----------------------------------------------------------------------------
    def new_group(self, ranks: list[int]) -> Group:
        """Create a collective group; every rank must call this with the same ``ranks``."""
        pgs = [dist.new_group(sorted(ranks), timeout=timedelta(seconds=self.timeout_s + 30))
               for _ in range(2 if self.link.enabled else 1)]  # the second: the join clock's
        return Group(pgs[0], sorted(ranks), pgs[-1] if self.link.enabled else None)

    # ---- helpers ----------------------------------------------------------------------------
    def _finish_collective(
        self,
        work: Any,
        pending: Pending,
        traffic: costs.Traffic,
        issued: float,
        result: Any,
        seconds: float | None = None,
        group: Group | None = None,
        joined: tuple[Any, torch.Tensor] | None = None,
    ) -> None:
        def run() -> None:
            # any error, the engine's or ours, goes to the caller at once: an exception left in
            # this thread would leave the caller waiting for its deadline with no cause
            try:
                last_join = issued
                if joined is not None:
                    joined[0].wait()
                    last_join = float(joined[1].item())
                work.wait()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                done_at = self.link.collective_done_time(traffic, issued, time.monotonic(),
                                                         seconds, joined=last_join)
                self._complete_at(done_at, pending, result)
            except BaseException as err:  # noqa: BLE001 - reported to the caller
                pending.set_error(err)

        key = None if group is None or group is self.world_group else id(group.pg)
        self._waiters.ordered_for(key).submit(run)

    def _group(self, group: Group | None) -> Group:
        return group or self.world_group

    def _note_collective(self, group: Group) -> None:
        if group is self.world_group:
            self.liveness.collectives_issued += 1

    def _join_clock(self, group: Group, issued: float) -> tuple[Any, torch.Tensor] | None:
        """On an emulated link, a max all-reduce of every rank's issue time: when the last rank
        joined, exactly (unmetered; :meth:`.LinkEmulator.collective_done_time` says why). On
        the group's twin (``Group.clock``), beside the collective: on the group, before it, it
        added a loopback round trip the real link has not (``bench/links``, 4 KB: 3.4 ms, 0.51)."""
        if not self.link.enabled:
            return None
        clock = torch.tensor([issued], dtype=torch.float64, device=self.device)
        pg = group.pg if group.clock is None else group.clock
        return dist.all_reduce(clock, op=dist.ReduceOp.MAX, group=pg, async_op=True), clock

    # ---- collectives ------------------------------------------------------------------------
    def all_reduce(
        self,
        tensor: torch.Tensor,
        op: str = "sum",
        *,
        group: Group | None = None,
        category: str = "train",
        caller_waits: bool = False,
    ) -> Pending:
        """In-place all-reduce; the handle's result is ``tensor``.

        ``caller_waits``: the caller waits at once and a failed wait ends its run; then, with no
        emulated link on CPU, the caller's own thread waits on the engine (:class:`CallerWait`,
        one thread wake-up fewer per collective)."""
        g = self._group(group)
        nbytes = tensor.numel() * tensor.element_size()
        traffic = costs.all_reduce(nbytes, g.size)
        self.meter.record("all_reduce", traffic.sent, traffic.recv, category=category)
        pending = self._pending(
            f"all_reduce of {nbytes} bytes", None if g is self.world_group else g.ranks
        )
        issued = time.monotonic()
        self._note_collective(g)
        joined = self._join_clock(g, issued)
        work = dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=g.pg, async_op=True)
        if caller_waits and self.link.net is None and self.device.type == "cpu":
            return CallerWait(work, tensor, pending.what, self.liveness,
                              None if g is self.world_group else g.ranks, self.timeout_s)
        self._finish_collective(work, pending, traffic, issued, tensor, group=g, joined=joined)
        return pending

    def all_gather(
        self, tensor: torch.Tensor, *, group: Group | None = None, category: str = "train"
    ) -> Pending:
        """Gather equal-size tensors from every rank; result: list ordered by group rank."""
        g = self._group(group)
        nbytes = tensor.numel() * tensor.element_size()
        traffic = costs.all_gather(nbytes, g.size)
        self.meter.record("all_gather", traffic.sent, traffic.recv, category=category)
        out = [torch.empty_like(tensor) for _ in range(g.size)]
        pending = self._pending(
            f"all_gather of {nbytes} bytes", None if g is self.world_group else g.ranks
        )
        issued = time.monotonic()
        self._note_collective(g)
        joined = self._join_clock(g, issued)
        work = dist.all_gather(out, tensor.contiguous(), group=g.pg, async_op=True)
        self._finish_collective(work, pending, traffic, issued, out, group=g, joined=joined)
        return pending

    def broadcast(
        self, tensor: torch.Tensor, src: int, *, group: Group | None = None, category: str = "train"
    ) -> Pending:
        """In-place broadcast from global rank ``src``; the root's link sets the pace."""
        g = self._group(group)
        nbytes = tensor.numel() * tensor.element_size()
        traffic = costs.broadcast(nbytes, g.size, self.rank == src)
        self.meter.record("broadcast", traffic.sent, traffic.recv, category=category)
        seconds = None
        if self.link.net is not None:
            seconds = costs.broadcast_root_seconds(nbytes, g.size, self.link.net.bytes_per_s, 0.0)
        pending = self._pending(f"broadcast of {nbytes} bytes from rank {src}", [src])
        issued = time.monotonic()
        self._note_collective(g)
        joined = self._join_clock(g, issued)
        work = dist.broadcast(tensor, src=src, group=g.pg, async_op=True)
        self._finish_collective(work, pending, traffic, issued, tensor, seconds, g, joined)
        return pending

    def barrier(self, *, group: Group | None = None) -> Pending:
        g = self._group(group)
        pending = self._pending("barrier", None if g is self.world_group else g.ranks)
        issued = time.monotonic()
        self._note_collective(g)
        joined = self._join_clock(g, issued)
        work = dist.barrier(group=g.pg, async_op=True)
        self._finish_collective(work, pending, costs.barrier(g.size), issued, None, group=g,
                                joined=joined)
        return pending

    # ---- point to point ---------------------------------------------------------------------
    # ---- steps and shutdown -----------------------------------------------------------------
    def end_step(self) -> StepBytes:
        return self.meter.end_step()

    def close(self, *, graceful: bool = True) -> None:
        """Stop the helper threads; on a graceful close also tear down the process groups."""
        self.liveness.stop()
        self.link.close()
        self._scheduler.stop()
        self._waiters.shutdown()
        if graceful and dist.is_initialized():
            dist.destroy_process_group()
