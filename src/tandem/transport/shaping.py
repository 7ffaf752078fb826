"""Emulated links: each process owns a full-duplex link of bandwidth B and one-way latency L.

Why emulate: on one machine loopback moves gigabytes per second, so communication never matters
and no method looks better than another. The emulator makes every operation take at least the
time a real link would: the real transfer still happens (the data is real), and the caller's
handle completes no earlier than the modelled finish time.

How it models a link:

* Egress and ingress are two timelines. Point-to-point messages in flight on one egress share
  its rate equally (:class:`SharedEgress`): three messages of ``s`` bytes posted at once all
  leave after ``3s/B``, as TCP flows through one link do, not one after another at ``s/B``,
  ``2s/B``, ``3s/B``. A message reaches the receiver ``L`` after it has left (plus jitter); the
  receiver's ingress carries its ``s/B`` too, from the moment it started to leave (an 8-byte
  timestamp sent along with it, on loopback only: neither metered nor charged), so many senders
  to one receiver (a parameter server) queue up on its ingress, as they would on a real NIC.
* ``duplex`` (``--net 10mbit:1ms,duplex=1.5``): the part of a message that comes in while the
  receiver's egress is sending point-to-point messages takes ``duplex`` times its line time.
  TCP through a rate limiter slows when a link carries data both ways (the
  acknowledgements of one direction queue behind the data of the other): on four hosts joined
  by ``tbf`` links, a swap or an all-to-all took 1.3-1.6x its line time where a fan-in or a
  fan-out took 1.05x (``bench/p2p``). 1 (the default) is an ideal full-duplex link. Charged to
  the receiver only, so a swap ends at ``duplex`` times its line time, as both directions do on
  the real links. Collectives have their own factor, ``collective``, measured apart
  (``bench/p2p``'s all-reduce row against the ring's model): a collective that moves data both
  ways takes ``collective`` times its model past ``duplex_after``. On four hosts joined by
  ``tbf`` links a dense all-reduce took 1.05x at 100 Mbit/s and 1.23x at 10 Mbit/s, where the
  shaper's queue overflows and TCP recovers from the loss; set it from a measurement of yours.
  ``duplex_after=3.3ms``: only once the receiver's link has been sending that long. A shaper
  lets its burst through unqueued: at 100 Mbit/s (burst 3.3 ms) a 20 KB swap or all-to-all
  took 0.87-1.17x its line time (median repetitions), at 10 Mbit/s the same 20 KB (16 ms of
  line time) 1.08-1.69x (``bench/p2p --bytes 20000``).
* ``burst`` (``--net 10mbit,burst=4125b``): the link is a token bucket of that many bytes, as
  a ``tc tbf`` shaper or a cloud VM's rate limit is. The bucket refills at the line rate while
  the link idles; a message that finds it idle spends it, and those bytes cross at once: only
  the rest waits for the line rate. A collective spends it on its first piece only (a ring's
  later pieces wait for the earlier ones, and the bucket refills at the line rate meanwhile).
  The egress and the ingress each have
  one, as the testbed's two ``tbf`` per host link do (``bench/netns``: 3.3 ms of line rate,
  4,125 bytes at 10 Mbit/s, 41,250 at 100). Without it the emulator charged small messages
  every byte: on two hosts with a core each, the 1.6 KB swaps of ``gossip`` with top-k at
  0.1 % at 10 Mbit/s were emulated 26 % slower than the real links, and the all-reduces of
  top-k and PowerSGD at 100 Mbit/s 31-36 % (``bench/cluster --hosts 2 --pin``). 0: no bucket.
* A collective occupies both directions for the algorithm's traffic (:mod:`.costs`) and finishes
  ``hops * L`` later. Its start is the moment the last rank joined (every rank's issue time is
  sent along on loopback, unmetered, beside the collective), and no earlier than the messages
  already on the egress have left.

Why shared and not first come, first served: on real links between four hosts (``bench/p2p.py``,
``docs/cluster.md``) a server that sends its model to four workers and waits for their answers
(``coded_ps``) took ``8m + c`` a step (m: one model's line time, c: compute), within 2.4 % at
10 Mbit/s; serving the sends in turn predicts ``5m + c`` (the first worker computes while the
others are still served), 39 % short.

Tune: ``--net 100mbit:1ms`` for a shared datacenter link, ``--net 1gbit:200us`` for a fast LAN,
``--net 20mbit:30ms:5ms`` for a WAN with jitter. Jitter is drawn per operation from an exponential
with the given mean, seeded from the run seed and the rank (reproducible).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator

import numpy as np

from tandem.config import NetConfig
from tandem.errors import ConfigError
from tandem.transport.costs import Traffic
from tandem.transport.host_link import HostLink, LinkTimelines


def bucket_level(bucket: tuple[float, float], since: float, now: float, burst: float,
                 rate: float) -> float:
    """Bytes in a token bucket of ``burst`` bytes filling at ``rate`` bytes/s, at ``now``.
    ``bucket`` is (tokens, when last used); it has refilled only since ``since`` (>= when the
    link was last busy: tokens spent at the line rate are gone)."""
    tokens, at = bucket
    return min(burst, tokens + max(0.0, now - max(at, since)) * rate)


def spend(level: float, free: float, want: float, now: float) -> tuple[float, float]:
    """The bucket after ``free`` of ``want`` bytes left at once at ``now``: a remainder left
    for the line rate empties it."""
    return (level - free if free >= want else 0.0, now)


class SharedEgress:
    """Messages in flight on one egress, each draining at ``rate / (messages in flight)``
    (processor sharing). Times are monotonic seconds; the caller holds the emulator's lock.
    The state lives in ``timelines`` (a host's processes share theirs: :mod:`.host_link`).
    ``burst``: a message that finds the egress idle first spends the token bucket's bytes,
    which leave at once (:func:`bucket_level`)."""

    def __init__(self, bytes_per_s: float, timelines: LinkTimelines | None = None,
                 burst: float = 0.0) -> None:
        self.rate, self.burst = bytes_per_s, float(burst)
        self.t = timelines if timelines is not None else LinkTimelines()

    @property
    def left(self) -> dict[int, float]:
        """message -> bytes still to leave"""
        return self.t.left

    @property
    def finished(self) -> dict[int, float]:
        """message -> when its last byte left"""
        return self.t.finished

    @property
    def clock(self) -> float:
        """the time ``left`` is valid at"""
        return self.t.clock

    @clock.setter
    def clock(self, value: float) -> None:
        self.t.clock = value

    def advance(self, now: float) -> None:
        """Drain the messages in flight up to ``now``."""
        while self.left and self.clock < now:
            k, first = len(self.left), min(self.left.values())
            ends = self.clock + first * k / self.rate
            if ends > now:
                for m in self.left:
                    self.left[m] -= (now - self.clock) * self.rate / k
                break
            self.clock = ends
            for m in list(self.left):
                self.left[m] -= first
                if self.left[m] <= 1e-6:
                    del self.left[m]
                    self.finished[m] = ends
        self.clock = max(self.clock, now)

    def add(self, nbytes: int, start: float) -> int:
        """A message starts leaving at ``start`` (>= every earlier call's time)."""
        self.advance(start)
        m, self.t.next_id = self.t.next_id, self.t.next_id + 1
        t, left = self.t, float(nbytes)
        if left > 0 and not self.left and self.burst > 0:  # idle: the bucket's bytes go first
            level = bucket_level((t.egress_tokens, t.egress_tokens_at),
                                 max(t.busy_to, t.egress_free), start, self.burst, self.rate)
            free = min(level, left)
            t.egress_tokens, t.egress_tokens_at = spend(level, free, left, start)
            left -= free
        if left > 1e-6:
            if not self.left:  # the egress was idle: a busy period starts
                t.busy_from = start
            self.left[m] = left
            # processor sharing serves every byte at the line rate while any is left
            t.busy_to = max(t.busy_to, self.all_left())
        else:
            self.finished[m] = start
        return m

    def projected(self, m: int) -> float:
        """When message ``m`` will have left if no other message starts meanwhile."""
        left, t = dict(self.left), self.clock
        while True:
            k, first = len(left), min(left.values())
            t += first * k / self.rate
            if left[m] - first <= 1e-6:
                return t
            left = {x: b - first for x, b in left.items() if b - first > 1e-6}

    def all_left(self) -> float:
        """When every message now in flight will have left (no later ones)."""
        return self.clock + sum(self.left.values()) / self.rate


class LinkEmulator:
    """Timelines of one process's link. ``None`` config means an ideal link (no delay).

    ``host``: the link of the emulated host this process shares with others (``net.hosts``,
    :mod:`.host_link`); its timelines then live there, and every process of the host charges
    its traffic to them."""

    def __init__(self, net: NetConfig | None, rank: int = 0, seed: int = 0,
                 host: HostLink | None = None) -> None:
        self.net = net
        self.host = host
        self._lock = threading.Lock()
        self._local = LinkTimelines()
        self._rng = np.random.default_rng([seed, rank, 7919])

    @property
    def enabled(self) -> bool:
        return self.net is not None

    @contextlib.contextmanager
    def _timelines(self) -> Iterator[LinkTimelines]:
        if self.host is not None:
            with self.host.timelines() as t:
                yield t
        else:
            with self._lock:
                yield self._local

    def close(self) -> None:
        """Unlink a shared host link's file (in case a process of its host never opened it)."""
        if self.host is not None:
            self.host.unlink()

    def _jitter(self) -> float:
        if self.net is None or self.net.jitter_s <= 0:
            return 0.0
        return float(self._rng.exponential(self.net.jitter_s))

    def start_send(self, nbytes: int, now: float | None = None) -> tuple[int, float]:
        """A message of ``nbytes`` starts leaving (after any collective holding the egress):
        ``(message, when it starts)``; ask :meth:`send_progress` when it has left. Needs an
        emulated link."""
        now = time.monotonic() if now is None else now
        assert self.net is not None
        with self._timelines() as t:
            egress = SharedEgress(self.net.bytes_per_s, t, self.net.burst_bytes)
            message = egress.add(nbytes, max(now, t.egress_free))
            return message, egress.clock

    def send_progress(self, message: int, now: float | None = None) -> tuple[bool, float]:
        """``(True, when it left)`` once message has left by ``now``; else ``(False, when it
        will have left if nothing else starts)``: ask again then."""
        now = time.monotonic() if now is None else now
        assert self.net is not None
        with self._timelines() as t:
            egress = SharedEgress(self.net.bytes_per_s, t, self.net.burst_bytes)
            egress.advance(now)
            if message in egress.finished:
                return True, egress.finished.pop(message)
            return False, egress.projected(message)

    def arrival(self, left: float) -> float:
        """When a message that left the egress at ``left`` reaches its receiver."""
        assert self.net is not None
        return left + self.net.latency_s + self._jitter()

    def recv_done_time(self, nbytes: int, arrived: float, started: float = math.nan) -> float:
        """Charge a received message to ingress; return when the receiver has all of it.

        ``started``: when it started to leave its sender (the sender sends it along). The
        ingress carries ``nbytes`` at the line rate, one message after another, from then on:
        two messages that left their senders together, each at half the rate (a swap), both
        arrive at once, and neither waits for the other here. Unknown (``nan``): the message
        is taken to have crossed at the full rate just before it arrived."""
        if self.net is None:
            return arrived
        rate = self.net.bytes_per_s
        dur = nbytes / rate
        begun = arrived - dur if math.isnan(started) else min(started, arrived)
        with self._timelines() as t:
            start = max(begun, t.ingress_free)
            if self.net.burst_bytes and nbytes:  # the ingress's bucket lets its bytes in at once
                level = bucket_level((t.ingress_tokens, t.ingress_tokens_at), t.ingress_free,
                                     start, self.net.burst_bytes, rate)
                free = min(level, nbytes)
                t.ingress_tokens, t.ingress_tokens_at = spend(level, free, nbytes, start)
                dur = (nbytes - free) / rate
            if self.net.duplex > 1.0:  # the part that came in while the link sent is slower
                overlap = min(start + dur, t.busy_to) - max(start, t.busy_from
                                                            + self.net.duplex_after_s)
                dur += max(0.0, overlap) * (self.net.duplex - 1.0)
            t.ingress_free = start + dur
            return max(arrived, t.ingress_free)

    def collective_done_time(self, traffic: Traffic, issued: float, finished: float,
                             seconds: float | None = None, *, joined: float) -> float:
        """When a collective issued at ``issued``, joined by its last rank at ``joined`` and
        really finished at ``finished`` completes.

        ``seconds`` overrides the modelled duration (broadcast: the root's link sets the pace).
        ``joined`` is exact: the transport sends every rank's issue time along
        (``Transport._join_clock``). It used to be estimated as when the loopback collective
        finished less loopback's transfer time; on a CPU shared with busy processes the loopback
        hops wait for the scheduler, that guess came late and every small collective was charged
        the wait on top of its model (PowerSGD's all-reduces on the CNN at 10 Mbit/s: emulated
        18.5 % slower than the real links, ``bench/cluster``).

        On a shared host link (``net.hosts``) the collectives of the host's processes take
        their turns on it, one after another.
        """
        if self.net is None:
            return finished
        net, rate = self.net, self.net.bytes_per_s
        line = seconds if seconds is not None else traffic.seconds(rate, 0.0)
        hops = traffic.hops * net.latency_s
        jitter = self._jitter() if traffic.hops else 0.0
        joined = max(issued, joined)
        with self._timelines() as t:
            egress = SharedEgress(rate, t, net.burst_bytes)
            start = max(joined, max(t.egress_free, egress.all_left()) if traffic.sent else 0.0,
                        t.ingress_free if traffic.recv else 0.0)
            if net.burst_bytes and line > 0:  # both buckets' bytes cross at once
                line = self._collective_burst(t, traffic, start, line)
            model = line
            if net.collective > 1.0 and traffic.sent and traffic.recv:  # both ways on TCP
                model += max(0.0, line - net.duplex_after_s) * (net.collective - 1.0)
            model += hops + jitter
            busy_until = start + (model - hops)
            if traffic.sent:
                t.egress_free = busy_until
            if traffic.recv:
                t.ingress_free = busy_until
        return max(finished, start + model)

    def _collective_burst(self, t: LinkTimelines, traffic: Traffic, start: float,
                          line: float) -> float:
        """A collective's line time less what the token buckets let through at once: as many
        bytes as both of its directions' buckets hold (each spends them), at most one hop's
        share. A ring sends its pieces one after another, each once the previous one has
        arrived, and meanwhile the bucket refills only at the line rate: only the first piece
        finds it full (a 2-rank all-reduce of 4 KB: 2 KB at once, not 4)."""
        assert self.net is not None
        burst, rate = self.net.burst_bytes, self.net.bytes_per_s
        want = line * rate
        piece = want / max(1, traffic.hops)
        egress = bucket_level((t.egress_tokens, t.egress_tokens_at),
                              max(t.busy_to, t.egress_free), start, burst, rate) \
            if traffic.sent else math.inf
        ingress = bucket_level((t.ingress_tokens, t.ingress_tokens_at), t.ingress_free, start,
                               burst, rate) if traffic.recv else math.inf
        free = min(egress, ingress, piece)
        if traffic.sent:
            t.egress_tokens, t.egress_tokens_at = spend(egress, free, want, start)
        if traffic.recv:
            t.ingress_tokens, t.ingress_tokens_at = spend(ingress, free, want, start)
        return line - free / rate


def as_net(net: NetConfig | str | None) -> NetConfig | None:
    """``net`` as a :class:`NetConfig`: a spec string (``"100mbit:1ms"``) is parsed; anything
    else is refused here, not deep inside a communication thread."""
    if net is None or isinstance(net, NetConfig):
        return net
    if isinstance(net, str):
        try:
            return NetConfig.parse(net)
        except ValueError as err:  # pydantic's errors are ValueErrors too
            raise ConfigError(f"net {net!r}: {err}") from None
    raise ConfigError(f"net must be a NetConfig, a string like '100mbit:1ms' or None, not "
                      f"{type(net).__name__}")
