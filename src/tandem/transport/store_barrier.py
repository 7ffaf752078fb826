"""Barriers on the rendezvous store that tolerate dead ranks, waits on one live peer, and the
mark a rank leaves when it gives up on a peer (:func:`abandon`).

A collective fails as soon as one member is dead; checkpoint sets and a parameter server's
waits must instead go on without ranks the launcher has marked dead. Both helpers poll the
store (and the liveness marks) with deadlines, so no wait here is unbounded.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from tandem.errors import PeerTimeout, WorkerFailed
from tandem.transport.liveness import Pending
from tandem.transport.rendezvous import ABANDONED, abandoned_mark

#: how often a wait on a live peer re-checks whether that peer is still alive
POLL_S = 1.0


class CheckpointAbandoned(Exception):
    """A rank of the checkpoint died before reaching it: the set stays incomplete."""


def store_gather(transport: Any, tag: str, value: int, ranks: Iterable[int],
                 timeout_s: float, complete: bool = True) -> dict[int, int]:
    """Publish ``value`` under ``tag`` and collect the values ``ranks`` publish: a barrier on the
    rendezvous store that tolerates dead ranks (a collective would fail on them).

    Returns the values of every rank that arrived. A rank marked dead before arriving is left out;
    with ``complete`` :class:`CheckpointAbandoned` is then raised once everyone else has arrived,
    so that every survivor abandons the same checkpoint. A live rank silent past ``timeout_s``
    raises :class:`PeerTimeout` naming it.
    """
    store, live = transport.store, transport.liveness
    lock = live.store_lock  # the heartbeat thread shares this process's store client

    def arrived(r: int) -> int | None:
        with lock:
            key = f"ckpt/{tag}/{r}"
            return int(store.get(key).decode()) if store.check([key]) else None

    with lock:
        store.set(f"ckpt/{tag}/{transport.rank}", str(value))
    ranks = list(ranks)
    got: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for r in ranks:
            if r not in got and (v := arrived(r)) is not None:
                got[r] = v
        missing = [r for r in ranks if r not in got]
        if not missing:
            return got
        dead = live.dead_ranks(missing)
        if dead:  # arrival keys are set before death, so re-read before trusting the mark
            dead = [r for r in dead if arrived(r) is None]
        if dead and len(dead) == len(missing):
            if not complete:
                return got
            raise CheckpointAbandoned(f"checkpoint {tag}: rank(s) {dead} died before it")
        stopped = [r for r in live.stopped_ranks([r for r in missing if r not in dead])
                   if arrived(r) is None]
        if stopped and len(stopped) + len(dead) == len(missing):  # nobody else is coming
            raise WorkerFailed(f"checkpoint {tag}: rank(s) {stopped} stopped with an error "
                               "before it" + (f" and rank(s) {dead} died" if dead else ""),
                               ranks=stopped + dead)
        if time.monotonic() > deadline:
            raise PeerTimeout(f"checkpoint {tag}: rank(s) {missing} did not reach it within "
                              f"{timeout_s:.0f}s", ranks=missing)
        time.sleep(0.01)


def abandon(transport: Any, rank: int, why: str, grace_s: float = 0.0) -> None:
    """Record in the store that this process no longer waits for ``rank`` (it counted it lost
    or dead), with the reason. Under the local launcher, once every other rank has reported, a
    rank so marked that is still running gets ``grace_s`` more to finish by itself, then it is
    ended and listed as lost (``lost_ranks``) instead of holding the launcher until the job's
    deadline. Best effort: a store that is gone (the launcher died) changes nothing."""
    live = transport.liveness
    try:
        with live.store_lock:
            live.store.set(ABANDONED.format(rank=rank), abandoned_mark(why, grace_s))
    except Exception:  # noqa: BLE001 - the mark only speeds up the end of the job
        pass


def abandon_idle(transport: Any, handed_in: dict[int, int], why: str, grace_s: float) -> None:
    """At the end of a run, :func:`abandon` each rank of ``handed_in`` (rank -> what it handed
    in lately) that handed in nothing: it may be stuck; one merely between two steps stops by
    itself within ``grace_s``."""
    for rank, n in handed_in.items():
        if not n:
            abandon(transport, rank, why, grace_s)


def wait_on(pending: Pending, transport: Any, peer: int, limit_s: float | None,
            stop: Any = None) -> Any:
    """Wait for ``pending`` while ``peer`` is alive: a slow peer is waited for (up to ``limit_s``;
    ``None`` = as long as it lives), a dead or silent one raises at once."""
    start = time.monotonic()
    while True:
        try:
            return pending.wait(timeout=POLL_S)
        except PeerTimeout:
            if stop is not None and stop.is_set():
                raise
            suspects = transport.liveness.suspects([peer])
            if suspects:
                raise WorkerFailed(f"{pending.what}: rank {peer} stopped answering "
                                   f"({transport.liveness.describe(suspects)})",
                                   ranks=suspects) from None
            if limit_s is not None and time.monotonic() - start > limit_s:
                raise PeerTimeout(f"{pending.what}: no answer within {limit_s:.0f}s from rank "
                                  f"{peer}; raise timeout_s if the link is slow",
                                  ranks=[peer]) from None
