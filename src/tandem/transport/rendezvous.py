"""The rendezvous store: hosted by Tandem's launcher, by torchrun's agent, or by rank 0.

The store carries the process-group handshake, heartbeats and ``dead/<rank>`` marks (see
:mod:`.liveness`), and ``abandoned/<rank>`` marks: a rank whose peers gave up on it (a parameter
server counted it lost, a ``bsp_shared`` agent no longer waits for it) records so with the reason
(:func:`tandem.transport.store_barrier.abandon`); once every other rank has reported, the local
launcher ends an abandoned rank that is still running and lists it as lost instead of waiting for
it until the job's deadline (:class:`AbandonedRanks`).

The store binds to 127.0.0.1 unless an address is given: ``torch.distributed`` has no
authentication, so it belongs on a trusted network only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from tandem.transport.liveness import DEATHS


def host_store(addr: str, world: int, timeout_s: float = 300.0) -> Any:
    """Host a store on a free port (the OS picks it: no race); ``.port`` tells which."""
    return dist.TCPStore(addr, 0, world + 1, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def store_from_env(rank: int, world: int, timeout_s: float) -> tuple[Any, int]:
    """Connect to the store the launcher (or torchrun) started, or host it on rank 0. Returns
    the store and the *attempt*: 0 on a first start, n after n restarts of the job.

    torchrun's agent keeps one store across restarts, so each attempt's keys are kept apart
    under ``tandem/<attempt>/``. The attempt is not ``TORCHELASTIC_RESTART_COUNT``: that count
    is per node and only counts that node's own failures (an agent that restarts its workers
    because another node failed leaves it at 0), so across hosts it differs. Instead every rank
    counts its own starts in the store; each attempt starts every rank once, so the count is
    the same on all ranks of an attempt."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    hosted = os.environ.get("TANDEM_STORE_HOSTED") == "1"
    agent = hosted or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(addr, port, world, is_master=(not agent and rank == 0),
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    if hosted:
        return base, 0
    attempt = int(base.add(f"tandem/starts/{rank}", 1)) - 1 if agent else 0
    return dist.PrefixStore(f"tandem/{attempt}", base), attempt


def mark_dead(store: Any, rank: int, why: str) -> None:
    """Mark ``rank`` dead for every rank's waits, and count the mark (``Liveness.deaths``)."""
    store.set(f"live/dead/{rank}", why)
    store.add(f"live/{DEATHS}", 1)


def mark_stopped(store: Any, rank: int, why: str) -> None:
    """``rank`` ended with an error that is a consequence of another rank's failure: it will not
    arrive anywhere again, but it is not a cause (so it is not marked dead)."""
    store.set(f"live/stopped/{rank}", why)


#: key of the abandoned mark, under the liveness prefix (``live/``) like ``dead/<rank>``
ABANDONED = "abandoned/{rank}"


def abandoned_mark(why: str, grace_s: float = 0.0) -> str:
    """The value of an abandoned mark: why, and how long the rank may still take to finish by
    itself once every other rank has reported (0: end it at once)."""
    return json.dumps({"why": why[:500], "grace_s": float(grace_s), "at": time.time()})


def abandoned(store: Any, ranks: Iterable[int]) -> dict[int, tuple[str, float]]:
    """The ranks among ``ranks`` that their peers abandoned: rank -> (why, grace_s). Read by the
    launcher on the store it hosts."""
    out: dict[int, tuple[str, float]] = {}
    for r in ranks:
        key = "live/" + ABANDONED.format(rank=r)
        if store.check([key]):
            try:
                mark = json.loads(store.get(key).decode())
                out[r] = (str(mark["why"]), float(mark["grace_s"]))
            except (ValueError, KeyError, TypeError):
                out[r] = ("abandoned by a peer", 0.0)
    return out


class AbandonedRanks:
    """The launcher's view of the abandoned marks in the store it hosts."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.ends: dict[int, tuple[float, str]] = {}  # rank -> (may be ended at, why)

    def why(self, rank: int) -> str | None:
        """Why ``rank``'s peers went on without it (None: they did not)."""
        if rank in self.ends:
            return self.ends[rank][1]
        mark = abandoned(self.store, [rank]).get(rank)
        return None if mark is None else mark[0]

    def due(self, running: set[int], now: float) -> dict[int, str]:
        """``{rank: why}`` for every rank of ``running`` (monotonic ``now``) once *all* of them
        are abandoned and the grace of each, counted from when it was first seen, is over;
        else ``{}``."""
        for r, (why, grace) in abandoned(self.store, running - self.ends.keys()).items():
            self.ends[r] = (now + grace, why)
        if not running or not running <= self.ends.keys() or \
                any(now < self.ends[r][0] for r in running):
            return {}
        return {r: self.ends[r][1] for r in sorted(running)}
