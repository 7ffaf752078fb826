"""Traffic and time of each operation on a per-process full-duplex link.

One place holds the formulas, used both by the byte meter (how many bytes an operation moves) and
by the link emulator (how long it takes on a link of ``B`` bytes/s and one-way latency ``L``).
Collectives follow the classic algorithms: ring all-reduce moves ``2(N-1)/N * s`` each way in
``2(N-1)`` latency hops; ring all-gather moves ``(N-1) * s``; broadcast, gather and scatter are
bounded by the root's link. All byte counts are integers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Traffic:
    """Bytes this rank sends and receives, and the latency hops the algorithm needs."""

    sent: int
    recv: int
    hops: int

    def seconds(self, bytes_per_s: float, latency_s: float) -> float:
        """Time on a full-duplex link: the busier direction sets the pace."""
        return max(self.sent, self.recv) / bytes_per_s + self.hops * latency_s


def all_reduce(nbytes: int, world: int) -> Traffic:
    if world <= 1:
        return Traffic(0, 0, 0)
    moved = 2 * (world - 1) * nbytes // world
    return Traffic(moved, moved, 2 * (world - 1))


def all_gather(nbytes_each: int, world: int) -> Traffic:
    if world <= 1:
        return Traffic(0, 0, 0)
    moved = (world - 1) * nbytes_each
    return Traffic(moved, moved, world - 1)


def broadcast(nbytes: int, world: int, is_root: bool) -> Traffic:
    if world <= 1:
        return Traffic(0, 0, 0)
    if is_root:
        return Traffic((world - 1) * nbytes, 0, 1)
    # A receiver's own link carries s, but it finishes when the root's link has sent all copies.
    return Traffic(0, nbytes, 1)


def broadcast_root_seconds(nbytes: int, world: int, bytes_per_s: float, latency_s: float) -> float:
    return (world - 1) * nbytes / bytes_per_s + latency_s if world > 1 else 0.0


def gather(nbytes_each: int, world: int, is_root: bool) -> Traffic:
    if world <= 1:
        return Traffic(0, 0, 0)
    if is_root:
        return Traffic(0, (world - 1) * nbytes_each, 1)
    return Traffic(nbytes_each, 0, 1)


def barrier(world: int) -> Traffic:
    return Traffic(0, 0, 2 * max(0, world - 1)) if world > 1 else Traffic(0, 0, 0)
