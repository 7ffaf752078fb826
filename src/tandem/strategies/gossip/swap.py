"""How a peer swaps messages with its neighbours: one direction of the graph at a time.

A gossip round sends every neighbour this peer's message and receives each neighbour's. Posted
all at once, every link of a ring carries two flows each way (to and from both neighbours).
Sent one direction at a time (first every peer to its right neighbour, then every peer to its
left) each link carries one flow each way per phase, with the same line time (a peer's egress
carries both messages in turn instead of sharing its rate between them) and one more wait for
the slowest pair. Measured on four hosts joined by real links (``bench/p2p.py``, 800 KB
messages, 9 repetitions): at 100 Mbit/s the median swap took 1.35x its line time this way
against 1.43x posted at once (1.37x against 1.43x in the run before; the best repetitions tie,
1.29x against 1.28x), and a ``gossip`` step on the cluster benchmark's CNN 176 ms against 202
(two runs, not side by side); at 10 Mbit/s, where the token buckets drop packets either way,
the medians tie (1.42x against 1.42x; best 1.17x against 1.29x) and so did the ``gossip`` step
(1,942 against 1,949 ms).

The phases: every neighbour ``j`` of peer ``r`` is reached at *offset* ``d = (j - r) mod N``. In
phase ``d`` (increasing) ``r`` sends to ``r + d`` and receives from ``r - d`` when they are
neighbours. Both ends of an edge meet in the same phase (``r`` sends to ``j`` in phase ``j - r``,
where ``j`` receives from ``j - (j - r) = r``), each peer sends and receives at most one message
per phase, and since every peer takes its phases in the same increasing order, none waits on a
peer that waits on a later phase: no deadlock whatever the graph. A ring has two phases, the
complete graph ``N - 1`` (a pairwise exchange), the others as many as their distinct offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tandem.errors import WorkerFailed


def phases(rank: int, world: int, nbrs: Iterable[int]) -> list[tuple[int | None, int | None]]:
    """``[(send to, receive from), ...]`` in phase order for peer ``rank``; None where the phase
    has no such neighbour."""
    live = set(nbrs)
    offsets = sorted({(j - rank) % world for j in live} | {(rank - j) % world for j in live})
    out = []
    for d in offsets:
        to, frm = (rank + d) % world, (rank - d) % world
        out.append((to if to in live else None, frm if frm in live else None))
    return out


def swap(rank: int, world: int, nbrs: Iterable[int], post_recv: Callable[[int], Any],
         post_send: Callable[[int], Any]) -> tuple[dict[int, Any], set[int]]:
    """One round's messages with the neighbours ``nbrs``, phase by phase (see the module).

    ``post_recv(j)`` / ``post_send(j)`` post a receive from / a send to ``j`` and return its
    pending handle (``.wait()``, called right after the phase's posts: the transport may let
    the caller's thread wait on the engine, ``caller_waits``). Returns what each neighbour's
    receive gave, and the neighbours found dead (a ``WorkerFailed`` naming them); a dead
    neighbour's later transfers are skipped. Any other error propagates."""
    got: dict[int, Any] = {}
    lost: set[int] = set()
    for to, frm in phases(rank, world, nbrs):
        posted = []
        if frm is not None and frm not in lost:  # the receive first: see Transport.send
            posted.append((True, frm, post_recv(frm)))
        if to is not None and to not in lost:
            posted.append((False, to, post_send(to)))
        for is_recv, j, handle in posted:
            try:
                out = handle.wait()
            except WorkerFailed as err:
                if j not in err.ranks:
                    raise
                lost.add(j)
                continue
            if is_recv:
                got[j] = out
    return got, lost
