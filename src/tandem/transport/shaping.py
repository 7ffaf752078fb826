"""Emulated links: each process owns a full-duplex link of bandwidth B and one-way latency L.

Why emulate: on one machine loopback moves gigabytes per second, so communication never matters
and no method looks better than another. The emulator makes every operation take at least the
time a real link would: the real transfer still happens (the data is real), and the caller's
handle completes no earlier than the modelled finish time.

How it models a link:

* Egress and ingress are two timelines. A point-to-point message of ``s`` bytes occupies the
  sender's egress for ``s/B`` and reaches the receiver ``L`` later (plus jitter); the receiver's
  ingress is occupied for ``s/B`` too, so many senders to one receiver (a parameter server)
  queue up on its ingress, as they would on a real NIC.
* A collective occupies both directions for the algorithm's traffic (:mod:`.costs`) and finishes
  ``hops * L`` later. Its start is the moment the last rank joined, estimated from when the real
  collective finished (loopback transfer time is subtracted).

Tune: ``--net 100mbit:1ms`` for a shared datacenter link, ``--net 1gbit:200us`` for a fast LAN,
``--net 20mbit:30ms:5ms`` for a WAN with jitter. Jitter is drawn per operation from an exponential
with the given mean, seeded from the run seed and the rank (reproducible).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from tandem.config import NetConfig
from tandem.transport.costs import Traffic

# Loopback moves ~1 GB/s with gloo here; used to estimate when the last rank joined a collective.
_LOOPBACK_BYTES_PER_S = 1.0e9
_LOOPBACK_FIXED_S = 0.0003


class LinkEmulator:
    """Timelines of one process's link. ``None`` config means an ideal link (no delay)."""

    def __init__(self, net: NetConfig | None, rank: int = 0, seed: int = 0) -> None:
        self.net = net
        self._lock = threading.Lock()
        self._egress_free = 0.0
        self._ingress_free = 0.0
        self._rng = np.random.default_rng([seed, rank, 7919])

    @property
    def enabled(self) -> bool:
        return self.net is not None

    def _jitter(self) -> float:
        if self.net is None or self.net.jitter_s <= 0:
            return 0.0
        return float(self._rng.exponential(self.net.jitter_s))

    def send_release_time(self, nbytes: int, now: float | None = None) -> tuple[float, float]:
        """Reserve egress for a message; return (egress done, time the receiver may have it)."""
        now = time.monotonic() if now is None else now
        if self.net is None:
            return now, now
        with self._lock:
            start = max(now, self._egress_free)
            self._egress_free = start + nbytes / self.net.bytes_per_s
            done = self._egress_free
        return done, done + self.net.latency_s + self._jitter()

    def recv_done_time(self, nbytes: int, arrived: float) -> float:
        """Charge a received message to ingress; return when the receiver has all of it."""
        if self.net is None:
            return arrived
        dur = nbytes / self.net.bytes_per_s
        with self._lock:
            start = max(arrived - dur, self._ingress_free)
            self._ingress_free = start + dur
            return max(arrived, self._ingress_free)

    def collective_done_time(
        self, traffic: Traffic, issued: float, finished: float, seconds: float | None = None
    ) -> float:
        """When a collective issued at ``issued`` and really finished at ``finished`` completes.

        ``seconds`` overrides the modelled duration (broadcast: the root's link sets the pace).
        """
        if self.net is None:
            return finished
        model = seconds if seconds is not None else traffic.seconds(self.net.bytes_per_s, 0.0)
        model += traffic.hops * self.net.latency_s + (self._jitter() if traffic.hops else 0.0)
        real_cost = max(traffic.sent, traffic.recv) / _LOOPBACK_BYTES_PER_S + _LOOPBACK_FIXED_S
        joined = max(issued, finished - real_cost)
        with self._lock:
            start = max(joined, self._egress_free if traffic.sent else 0.0,
                        self._ingress_free if traffic.recv else 0.0)
            busy_until = start + (model - traffic.hops * self.net.latency_s)
            if traffic.sent:
                self._egress_free = busy_until
            if traffic.recv:
                self._ingress_free = busy_until
        return max(finished, start + model)
