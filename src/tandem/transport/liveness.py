"""Handles with deadlines, the timer that completes them, and heartbeats that name silent peers.

gloo facts this module designs around (measured here, see MACHINE-NOTES): a work handle's
``is_completed()`` stays False until ``wait()`` is called, ``wait(timeout)`` that expires breaks the
whole group, and there is no abort from Python. So a background thread calls ``wait()`` and the
caller waits on an event with its own deadline. When the deadline passes the caller gets a
:class:`~tandem.errors.PeerTimeout` naming the ranks that look responsible:

* ranks the launcher (or a peer) marked dead in the store;
* ranks whose heartbeat is stale (their process is gone or frozen);
* for a collective, ranks whose published collective count is behind ours (they never joined).

An operation with one peer that fails because the engine saw that peer's socket close names the
peer at once: only its process going away (or closing its group) closes it. Under torchrun,
where no launcher marks the dead, this is how a neighbour's death is known in time.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from tandem.errors import PeerTimeout, WorkerFailed

_log = logging.getLogger(__name__)
#: what gloo's error says when the other end of a pair's socket went away
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")

HEARTBEAT_S = 0.5
#: the store's count of ``dead/<rank>`` marks written (every writer adds one after its mark)
DEATHS = "deaths"
STALE_S = 5.0


class Pending:
    """The result of an asynchronous operation; ``wait()`` never blocks past its deadline."""

    def __init__(
        self, what: str, liveness: Liveness | None, peers: list[int] | None, timeout_s: float
    ) -> None:
        self.what = what
        self._liveness = liveness
        self._peers = peers
        self._timeout_s = timeout_s
        self._event = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self.completed_at: float | None = None

    def set_result(self, value: Any = None) -> None:
        self._result = value
        self.completed_at = time.monotonic()
        self._event.set()

    def set_error(self, err: BaseException) -> None:
        self._error = err
        self.completed_at = time.monotonic()
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until done, or raise PeerTimeout/WorkerFailed naming who did not answer."""
        limit = self._timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            left = deadline - time.monotonic()
            if self._event.wait(min(max(left, 0.0), 0.5)):
                break
            if self._liveness is not None:
                dead = self._liveness.dead_ranks(self._peers)
                if dead:
                    raise WorkerFailed(
                        f"{self.what}: worker rank(s) {dead} died; {self._liveness.describe(dead)}",
                        ranks=dead,
                    )
            if left <= 0:
                suspects = self._liveness.suspects(self._peers) if self._liveness else []
                who = f"rank(s) {suspects}" if suspects else f"peer(s) {self._peers or 'unknown'}"
                raise PeerTimeout(
                    f"{self.what}: no answer within {limit:.1f}s; {who} did not answer. "
                    "Raise timeout_s if the link is slow, or check those workers' logs.",
                    ranks=suspects or list(self._peers or []),
                )
        if self._error is not None:
            dead = self._liveness.dead_ranks(self._peers) if self._liveness else []
            if not dead and self._peers and len(self._peers) == 1 and \
                    any(gone in str(self._error) for gone in PEER_GONE):
                dead = list(self._peers)  # its socket closed: see the module's docstring
            if not dead and self._liveness is not None:
                time.sleep(HEARTBEAT_S * 3)  # give a dying peer's mark time to land
                dead = self._liveness.dead_ranks(self._peers) or self._liveness.suspects(
                    self._peers
                )
            if dead:
                raise WorkerFailed(
                    f"{self.what} failed because rank(s) {dead} stopped answering: {self._error}",
                    ranks=dead,
                ) from self._error
            raise WorkerFailed(f"{self.what} failed: {self._error}") from self._error
        return self._result


class CallerWait(Pending):
    """A handle whose ``wait()`` blocks on the engine's work in the caller's own thread.

    Why: the normal path hands the work to a waiter thread and the caller waits on an event, two
    thread wake-ups per operation; on an oversubscribed CPU (4 workers on 2 cores) that costs a
    few percent of a small model's step (``bench/dense_vs_ddp.py``) and more for a gossip swap
    of small messages (:mod:`tandem.transport.p2p`). Who may use it: a caller that waits at
    once, with no emulated link, and for which a wait that times out ends the run, because
    gloo's ``wait(timeout)`` that expires leaves the group broken (the synchronous ``allreduce``
    strategy's dense exchange, gossip's swaps). A dead peer makes gloo fail at once (its sockets
    close); either way the error names the rank, as :class:`Pending` does. ``done()`` is False
    until waited.

    ``work``: one engine handle or several (a message's pieces), waited in order within one
    deadline; ``finish()``, when given, runs once they are done and its value is the result
    (a receive's metering and unpacking), else the result is ``result``.
    """

    def __init__(self, work: Any, result: Any, what: str, liveness: Liveness | None,
                 peers: list[int] | None, timeout_s: float,
                 finish: Callable[[], Any] | None = None) -> None:
        super().__init__(what, liveness, peers, timeout_s)
        self._works = list(work) if isinstance(work, list) else [work]
        self._value, self._finish = result, finish

    def wait(self, timeout: float | None = None) -> Any:
        if self.done():
            return super().wait(0)
        limit = self._timeout_s if timeout is None else timeout
        start = time.monotonic()
        try:
            for work in self._works:
                left = start + limit - time.monotonic()
                work.wait(timedelta(seconds=max(left, 0.001)))
            value = self._finish() if self._finish is not None else self._value
        except Exception as err:  # noqa: BLE001 - worded by Pending's rules below
            if time.monotonic() - start < limit * 0.99:
                self.set_error(err)
            return super().wait(0)  # names the dead or silent rank(s) and raises
        self.set_result(value)
        return value


class Scheduler:
    """One timer thread that runs callbacks at given monotonic times (delayed completion)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="tandem-timer", daemon=True)
        self._thread.start()

    def at(self, when: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = None if not self._heap else self._heap[0][0] - time.monotonic()
                    self._cv.wait(timeout)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # noqa: BLE001 - one bad callback must not stop every later one
                _log.exception("tandem-timer: a delayed completion raised")

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()


class Waiters:
    """Threads that call the blocking ``wait()`` of engine work handles.

    Collectives of one group complete in issue order, so one ordered thread per group serves
    them (one thread for all groups would make a group's completions wait behind another
    group's, and threads issuing on different groups in different orders on different ranks
    could then deadlock); point-to-point receives can complete in any order, so each gets a
    pool thread.
    """

    def __init__(self, p2p_threads: int = 64) -> None:
        self.ordered = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-coll")
        self._per_group: dict[Any, ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=p2p_threads, thread_name_prefix="tandem-p2p")

    def ordered_for(self, key: Any) -> ThreadPoolExecutor:
        """The ordered thread of one group (``None``: the world group's, :attr:`ordered`)."""
        if key is None:
            return self.ordered
        with self._lock:
            if key not in self._per_group:
                self._per_group[key] = ThreadPoolExecutor(max_workers=1,
                                                          thread_name_prefix="tandem-coll")
            return self._per_group[key]

    def shutdown(self) -> None:
        for ex in [self.ordered, *self._per_group.values()]:
            ex.shutdown(wait=False, cancel_futures=True)
        self.pool.shutdown(wait=False, cancel_futures=True)


class Liveness:
    """Heartbeats and progress counters in the rendezvous store; answers "who is silent?"."""

    def __init__(self, store: Any, rank: int, world: int) -> None:
        self.store = store
        self.rank = rank
        self.world = world
        self.collectives_issued = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._beat()
        self._thread = threading.Thread(target=self._loop, name="tandem-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        with self._lock:
            self.store.set(f"hb/{self.rank}", f"{time.time():.3f}:{self.collectives_issued}")

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception:  # store gone: the launcher or rank 0 died; waits will report it
                return

    def stop(self) -> None:
        self._stop.set()

    @property
    def store_lock(self) -> threading.Lock:
        """Hold it around any other use of this process's store client: the heartbeat thread
        uses the same client, and concurrent requests on one client can interleave and hang."""
        return self._lock

    def mark_dead(self, rank: int, why: str, *, unless_marked: bool = False) -> None:
        """Write ``dead/<rank>`` (``unless_marked``: only if no one has) and count it in
        ``deaths`` (:meth:`deaths`)."""
        with self._lock:
            if unless_marked and self.store.check([f"dead/{rank}"]):
                return
            self.store.set(f"dead/{rank}", why)
            self.store.add(DEATHS, 1)

    def deaths(self) -> int | None:
        """How many death marks have been written so far (None: the store did not answer).
        One store request, however large the world: read it before reading every rank's mark."""
        try:
            with self._lock:
                return int(self.store.add(DEATHS, 0))
        except Exception:  # noqa: BLE001 - the store is gone; the waits will say why
            return None

    def _read(self, key: str) -> str | None:
        try:
            with self._lock:
                if not self.store.check([key]):
                    return None
                return self.store.get(key).decode()
        except Exception:
            return None

    def dead_ranks(self, peers: list[int] | None = None) -> list[int]:
        ranks = peers if peers is not None else range(self.world)
        return [r for r in ranks if r != self.rank and self._read(f"dead/{r}") is not None]

    def mark_finished(self) -> None:
        """This rank's part of the run is over and its records are closed (see
        :meth:`await_finished`)."""
        with self._lock:
            self.store.set(f"finished/{self.rank}", "1")

    def await_finished(self, timeout_s: float) -> list[int]:
        """Wait until every other rank has marked itself finished or is known to be gone (marked
        dead, or its heartbeat stale, :data:`STALE_S`), for at most ``timeout_s``; return the
        ranks that did not finish (sorted). For the rank that writes the summary under
        torchrun, where no launcher collects who finished, when the strategy goes on without
        lost workers and so has no closing barrier."""
        waiting = {r for r in range(self.world) if r != self.rank}
        deadline = time.monotonic() + timeout_s
        while True:
            waiting -= {r for r in waiting if self._read(f"finished/{r}") is not None}
            if waiting <= set(self.suspects(sorted(waiting))) or time.monotonic() > deadline:
                return sorted(waiting)
            time.sleep(0.1)

    def stopped_ranks(self, peers: list[int]) -> list[int]:
        """Ranks the launcher saw end with an error caused by another rank's failure."""
        return [r for r in peers if r != self.rank and self._read(f"stopped/{r}") is not None]

    def describe(self, ranks: list[int]) -> str:
        return "; ".join(f"rank {r}: {self._read(f'dead/{r}') or 'no heartbeat'}" for r in ranks)

    def suspects(self, peers: list[int] | None = None) -> list[int]:
        """Ranks that are dead, silent, or behind us in the sequence of collectives."""
        ranks = [r for r in (peers if peers is not None else range(self.world)) if r != self.rank]
        now = time.time()
        out = []
        for r in ranks:
            if self._read(f"dead/{r}") is not None:
                out.append(r)
                continue
            hb = self._read(f"hb/{r}")
            if hb is None:
                out.append(r)
                continue
            stamp, count = hb.split(":")
            if now - float(stamp) > STALE_S or (
                peers is None and int(count) < self.collectives_issued
            ):
                out.append(r)
        return out
