"""Point-to-point messages: the half of :class:`~tandem.transport.transport.Transport` that
sends to and receives from one peer (gossip's swaps, the parameter server's pushes and pulls,
``coded_ps``). Mixed into the transport, whose state it uses (the meter, the link emulator, the
point-to-point group, the waiter threads).

By default a completion thread waits on each message and then releases the caller's handle
(:class:`~tandem.transport.liveness.Pending`): a receive completes while the caller computes,
and an emulated link can hold it back to its modelled time. ``caller_waits=True`` drops that
thread for a caller that waits on the handle at once (a gossip swap): it gets a
:class:`~tandem.transport.liveness.CallerWait`, whose ``wait()`` waits on the engine in the
caller's own thread. A receive then also waits out, in that thread, what an emulated link
charges; a send does so only where no emulated link holds it back (the link's timer issues
those). Why: a completion thread costs two thread wake-ups per message, and on an
oversubscribed CPU each waits for a core. Measured: 4 gossip peers on 2 cores (``tandem train
--strategy gossip --codec topk --codec-opt ratio=0.001 --workers 4 --workload mnist5k
--workload-opt hidden=360 --batch-size 32``, loopback, 300 steps, three runs each way,
alternating), 17.1-17.6 ms a step before, 14.7-16.4 after, with the peer view's cheaper poll
(:meth:`tandem.topology.PeerView.poll`); the same models came out.

Errors read the same either way: a dead peer is named by a ``WorkerFailed``, a silent one by a
``PeerTimeout`` at the deadline (after which gloo's point-to-point group may be unusable, so
only a caller whose run ends on a timeout should ask: gossip's does).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from tandem.transport.accounting import ByteMeter
from tandem.transport.host_link import host_of
from tandem.transport.liveness import CallerWait, Liveness, Pending, Scheduler, Waiters
from tandem.transport.packing import TensorSpec, byte_pieces, header_of, nbytes_of, pack, unpack
from tandem.transport.shaping import LinkEmulator


class PointToPoint:
    """Sends and receives of one process (see the module); :class:`Transport` sets the state."""

    rank: int
    host: int | None
    timeout_s: float
    device: torch.device
    meter: ByteMeter
    link: LinkEmulator
    liveness: Liveness
    _scheduler: Scheduler
    _waiters: Waiters
    _seq_lock: threading.Lock
    _send_seq: dict[int, int]
    _recv_seq: dict[int, int]
    _p2p_pg: Any

    def _pending(self, what: str, peers: list[int] | None) -> Pending:
        return Pending(what, self.liveness, peers, self.timeout_s)

    def _complete_at(self, when: float, pending: Pending, result: Any) -> None:
        """Release ``pending`` at ``when`` (at once when that has passed; else the timer)."""
        if when <= time.monotonic():
            pending.set_result(result)
        else:
            self._scheduler.at(when, lambda: pending.set_result(result))

    def _caller_may_wait(self, caller_waits: bool) -> bool:
        """The caller's own thread may wait on the engine's work (no completion thread)."""
        return caller_waits and self.device.type == "cpu"

    def _on_link(self, peer: int) -> bool:
        """Whether traffic with ``peer`` crosses an emulated link (not within one host)."""
        net = self.link.net
        return net is not None and (not net.hosts or host_of(peer, net.hosts) != self.host)

    def _next_tags(self, table: dict[int, int], peer: int, n: int) -> list[int]:
        with self._seq_lock:
            first = table.get(peer, 0) + 1
            table[peer] = first + n - 1
            return [t % (2**31 - 1) for t in range(first, first + n)]

    def send(self, tensor: torch.Tensor, dst: int, *, category: str = "train",
             caller_waits: bool = False) -> Pending:
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

        def post() -> list[Any] | None:
            """The engine's sends of every piece; None (the error set on ``pending``, whose
            wait names the peer) if posting fails."""
            try:
                return [dist.isend(piece, dst, group=self._p2p_pg, tag=tag)
                        for piece, tag in zip(pieces, tags, strict=True)]
            except BaseException as err:  # noqa: BLE001
                pending.set_error(err)
                return None

        def issue(egress_done: float) -> None:
            works = post()
            if works is None:
                return

            def wait() -> None:
                try:
                    for work in works:
                        work.wait()
                    self._complete_at(egress_done, pending, None)
                except BaseException as err:  # noqa: BLE001
                    pending.set_error(err)

            self._waiters.pool.submit(wait)

        if not emulated and self._caller_may_wait(caller_waits):
            works = post()
            return pending if works is None else \
                CallerWait(works, None, pending.what, self.liveness, [dst], self.timeout_s)
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
             then: Callable[[torch.Tensor], Any] | None = None,
             caller_waits: bool = False) -> Pending:
        """Receive into ``tensor`` from ``src``; result: ``tensor``, or ``then(tensor)``
        (computed by the thread that completes the receive, or by the caller's ``wait()`` with
        ``caller_waits``; an error in it is the result)."""
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

        def arrived() -> float:
            """Meter and copy out what came; when the emulated link lets it arrive."""
            self.meter.record("recv", 0, nbytes, peer=src, category=category)
            if buf is not tensor:
                tensor.copy_(buf)
            done = time.monotonic()
            if on_link:
                done = self.link.recv_done_time(
                    nbytes, done, math.nan if started is None else float(started[0]))
            return done

        def received() -> Any:  # in the caller's thread: it waits out the link itself
            time.sleep(max(0.0, arrived() - time.monotonic()))
            return tensor if then is None else then(tensor)

        if self._caller_may_wait(caller_waits):
            return CallerWait(works, None, pending.what, self.liveness, [src], self.timeout_s,
                              finish=received)

        def wait() -> None:
            try:  # as in _finish_collective: every error reaches the caller at once
                for work in works:
                    work.wait()
                done = arrived()
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

    def recv_packed(self, specs: list[TensorSpec], src: int, *, category: str = "train",
                    caller_waits: bool = False) -> Pending:
        """Receive a message made by :meth:`send_packed`; result: list of tensors, unpacked by
        the receive's thread (no deadline but the caller's: ``wait_on`` may wait longer)."""
        buf = torch.empty(nbytes_of(specs), dtype=torch.uint8)
        return self.recv(buf, src, category=category, then=lambda b: unpack(b, specs),
                         caller_waits=caller_waits)

    def send_message(
        self, tensors: list[torch.Tensor], dst: int, *, category: str = "train"
    ) -> Pending:
        """Send self-describing tensors (a header first); the receiver needs no specs."""
        header = header_of([(t.dtype, tuple(t.shape)) for t in tensors])
        self.send(torch.tensor([header.numel()], dtype=torch.int64), dst, category=category)
        self.send(header, dst, category=category)
        return self.send_packed(tensors, dst, category=category)
