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

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tandem.config import NetConfig
from tandem.transport import costs
from tandem.transport.accounting import ByteMeter, StepBytes
from tandem.transport.host_link import host_of, join_host
from tandem.transport.liveness import CallerWait, Liveness, Pending, Scheduler, Waiters
from tandem.transport.packing import TensorSpec, byte_pieces, header_of, nbytes_of, pack, unpack
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


class Transport:
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

    def _complete_at(self, when: float, pending: Pending, result: Any) -> None:
        if when <= time.monotonic():
            pending.set_result(result)
        else:
            self._scheduler.at(when, lambda: pending.set_result(result))

    def _pending(self, what: str, peers: list[int] | None) -> Pending:
        return Pending(what, self.liveness, peers, self.timeout_s)

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
    def _on_link(self, peer: int) -> bool:
        """Whether traffic with ``peer`` crosses an emulated link (not within one host)."""
        net = self.link.net
        return net is not None and (not net.hosts or host_of(peer, net.hosts) != self.host)

    def _next_tags(self, table: dict[int, int], peer: int, n: int) -> list[int]:
        with self._seq_lock:
            first = table.get(peer, 0) + 1
            table[peer] = first + n - 1
            return [t % (2**31 - 1) for t in range(first, first + n)]

    def send(self, tensor: torch.Tensor, dst: int, *, category: str = "train") -> Pending:
        """Send to ``dst``; completes when the emulated egress has carried it.

        When two ranks exchange (each sends to the other), post the receives *before* the sends:
        gloo does not read a pair's socket for a message whose receive is not posted yet, so two
        sends issued first take turns on the link. Measured between two network namespaces at
        100 Mbit/s, 800 kB each way: 133 ms with the sends first, 74 ms with the receives first
        (one way alone: 67 ms). The emulated link cannot show it (it releases a send after its
        modelled egress time), so only the real link tells.

        A message leaves in pieces of :data:`~tandem.transport.packing.P2P_PIECE_BYTES` (one
        tag each), which lets each direction's pieces interleave: the same exchange between four
        namespaces (800 kB to and from both ring neighbours, receives first) took 182-212 ms
        whole, 159-165 ms in 50 kB pieces (modelled: 128 ms).

        On an emulated link (not between two processes of one emulated host, ``net.hosts``) the
        message also carries, as a last piece, when it started to leave this rank's egress, for
        the receiver's ingress model (:meth:`.LinkEmulator.recv_done_time`); the byte meter
        and the link charge the message's own bytes only."""
        tensor = tensor.detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        self.meter.record("send", nbytes, 0, peer=dst, category=category)
        pieces = byte_pieces(tensor)
        emulated = self._on_link(dst)
        if emulated:  # the moment it starts to leave travels with it (see recv), unmetered
            message, started = self.link.start_send(nbytes)
            pieces.append(torch.tensor([started], dtype=torch.float64))
        tags = self._next_tags(self._send_seq, dst, len(pieces))
        pending = self._pending(f"send of {nbytes} bytes to rank {dst}", [dst])

        def issue(egress_done: float) -> None:
            try:
                works = [dist.isend(piece, dst, group=self._p2p_pg, tag=tag)
                         for piece, tag in zip(pieces, tags, strict=True)]
            except BaseException as err:  # noqa: BLE001
                pending.set_error(err)
                return

            def wait() -> None:
                try:
                    for work in works:
                        work.wait()
                    self._complete_at(egress_done, pending, None)
                except BaseException as err:  # noqa: BLE001
                    pending.set_error(err)

            self._waiters.pool.submit(wait)

        if not emulated:
            issue(time.monotonic())
            return pending

        def poll() -> None:  # on the emulated egress, shared with the sends in flight
            try:
                left, when = self.link.send_progress(message)
                release = self.link.arrival(when) if left else when
            except BaseException as err:  # noqa: BLE001
                pending.set_error(err)
                return
            if not left:  # others started meanwhile: ask again when it should have left
                self._scheduler.at(when, poll)
            elif release <= time.monotonic():
                issue(when)
            else:
                self._scheduler.at(release, lambda: issue(when))

        poll()
        return pending

    def recv(self, tensor: torch.Tensor, src: int, *, category: str = "train",
             then: Callable[[torch.Tensor], Any] | None = None) -> Pending:
        """Receive into ``tensor`` from ``src``; result: ``tensor``, or ``then(tensor)``
        (computed by the thread that completes the receive; an error in it is the result)."""
        nbytes = tensor.numel() * tensor.element_size()
        pending = self._pending(f"receive of {nbytes} bytes from rank {src}", [src])
        direct = tensor.device.type == "cpu" and tensor.is_contiguous()
        buf = tensor if direct else torch.empty(tensor.shape, dtype=tensor.dtype)
        pieces = byte_pieces(buf)  # cut as the sender cut it (see send)
        started = None
        on_link = self._on_link(src)
        if on_link:  # when the message started to leave its sender's egress
            started = torch.empty(1, dtype=torch.float64)
            pieces.append(started)
        tags = self._next_tags(self._recv_seq, src, len(pieces))
        try:  # gloo raises here, not in the wait, once it has seen the peer's socket close
            works = [dist.irecv(piece, src, group=self._p2p_pg, tag=tag)
                     for piece, tag in zip(pieces, tags, strict=True)]
        except BaseException as err:  # noqa: BLE001 - the handle's wait names the peer
            pending.set_error(err)
            return pending

        def wait() -> None:
            try:  # as in _finish_collective: every error reaches the caller at once
                for work in works:
                    work.wait()
                self.meter.record("recv", 0, nbytes, peer=src, category=category)
                if buf is not tensor:
                    tensor.copy_(buf)
                done = time.monotonic()
                if on_link:
                    done = self.link.recv_done_time(
                        nbytes, done, math.nan if started is None else float(started[0]))
                self._complete_at(done, pending, tensor if then is None else then(tensor))
            except BaseException as err:  # noqa: BLE001
                pending.set_error(err)

        self._waiters.pool.submit(wait)
        return pending

    def send_packed(
        self, tensors: list[torch.Tensor], dst: int, *, category: str = "train"
    ) -> Pending:
        """Send several tensors as one message; the receiver must know their specs."""
        return self.send(pack(tensors), dst, category=category)

    def recv_packed(self, specs: list[TensorSpec], src: int, *, category: str = "train") -> Pending:
        """Receive a message made by :meth:`send_packed`; result: list of tensors, unpacked by
        the receive's thread (no deadline but the caller's: ``wait_on`` may wait longer)."""
        buf = torch.empty(nbytes_of(specs), dtype=torch.uint8)
        return self.recv(buf, src, category=category, then=lambda b: unpack(b, specs))

    def send_message(
        self, tensors: list[torch.Tensor], dst: int, *, category: str = "train"
    ) -> Pending:
        """Send self-describing tensors (a header first); the receiver needs no specs."""
        header = header_of([(t.dtype, tuple(t.shape)) for t in tensors])
        self.send(torch.tensor([header.numel()], dtype=torch.int64), dst, category=category)
        self.send(header, dst, category=category)
        return self.send_packed(tensors, dst, category=category)

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
