"""One emulated host's link, shared by the processes that run on it (``net.hosts``).

Why: on a real cluster a host's processes share its network card. A parameter server placed one
per host (``param_server`` under torchrun) shares the link with the worker beside it: the host
carries both the worker's pushes and the server's replies, while what the two send each other
never leaves the host. With one emulated link per process the emulator gave every host twice
its line rate, and ``bench/cluster`` measured the real parameter server up to 27 % slower than
its emulated twin (``docs/cluster.md``).

How: the link's timelines (the egress's messages in flight, as in
:class:`~tandem.transport.shaping.SharedEgress`, and when collectives release the egress and the
ingress) live in a small memory-mapped file under ``/dev/shm``, one per emulated host. Every
process of the host maps it and reads, updates and writes the timelines under an inter-process
lock (``fcntl.flock``, released by the kernel if a holder dies), so their messages share the
line rate exactly as one process's messages do. Each update is a few microseconds of work on a
few dozen numbers.

Lifetime: the host's first rank creates the file and publishes its path in the job's store;
the others open it; the last to open it unlinks the name (the memory lives on until the last
mapping goes), so nothing is left behind once every process has attached.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tandem.config import NetConfig
from tandem.errors import ConfigError, TandemError
from tandem.transport.file_lock import flocked

#: messages (in flight, or left but not yet collected by their sender) one host's link can hold
SLOTS = 512
#: clock, egress free, ingress free, next message id, egress busy from, busy to, and the two
#: token buckets (tokens, when): egress, ingress
_HEADER = 10
_FREE = -1.0


@dataclass
class LinkTimelines:
    """What one link's emulation keeps between operations (see :mod:`.shaping`)."""

    clock: float = 0.0  # the time ``left`` is valid at
    egress_free: float = 0.0  # collectives' reservations of the egress
    ingress_free: float = 0.0
    next_id: int = 0
    left: dict[int, float] = field(default_factory=dict)  # message -> bytes still to leave
    finished: dict[int, float] = field(default_factory=dict)  # message -> when it had left
    # the egress's latest busy period of point-to-point messages (``NetConfig.duplex``)
    busy_from: float = 0.0
    busy_to: float = 0.0
    # the token buckets (``NetConfig.burst_bytes``): tokens left when last used, and when
    egress_tokens: float = 0.0
    egress_tokens_at: float = 0.0
    ingress_tokens: float = 0.0
    ingress_tokens_at: float = 0.0


class HostLink:
    """The timelines of one emulated host's link, in a file its processes map."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = (_HEADER + 3 * SLOTS) * 8
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with flocked(self._fd):
            if os.fstat(self._fd).st_size < size:  # the first to open it lays it out
                os.ftruncate(self._fd, size)
                fresh = True
            else:
                fresh = False
            self._map = mmap.mmap(self._fd, size)
            self._words = np.frombuffer(self._map, dtype=np.float64)
            if fresh:
                self._words[:_HEADER] = 0.0
                self._words[_HEADER::3] = _FREE
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def timelines(self) -> Iterator[LinkTimelines]:
        """The host's timelines, exclusively (this process's threads and the host's other
        processes wait); what the block changes is written back when it ends."""
        with self._lock, flocked(self._fd):
            t = self._load()
            yield t
            self._store(t)

    def _load(self) -> LinkTimelines:
        w = self._words
        slots = w[_HEADER:].reshape(SLOTS, 3)
        used = slots[slots[:, 0] != _FREE]
        left = {int(m): float(b) for m, b, f in used if math.isnan(f)}
        finished = {int(m): float(f) for m, _, f in used if not math.isnan(f)}
        return LinkTimelines(float(w[0]), float(w[1]), float(w[2]), int(w[3]), left, finished,
                             float(w[4]), float(w[5]), float(w[6]), float(w[7]), float(w[8]),
                             float(w[9]))

    def _store(self, t: LinkTimelines) -> None:
        entries = [(m, b, math.nan) for m, b in t.left.items()] + \
                  [(m, 0.0, f) for m, f in t.finished.items()]
        if len(entries) > SLOTS:
            raise TandemError(f"emulated host link {self.path.name}: {len(entries)} messages in "
                              f"flight or uncollected, more than its {SLOTS} slots")
        w = self._words
        w[:_HEADER] = (t.clock, t.egress_free, t.ingress_free, float(t.next_id), t.busy_from,
                       t.busy_to, t.egress_tokens, t.egress_tokens_at, t.ingress_tokens,
                       t.ingress_tokens_at)
        slots = w[_HEADER:].reshape(SLOTS, 3)
        slots[:, 0] = _FREE
        if entries:
            slots[:len(entries)] = np.asarray(entries, dtype=np.float64)

    def unlink(self) -> None:
        """Remove the file's name (idempotent); the mappings stay valid."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def join_host(net: NetConfig | None, store: Any, rank: int,
              world: int) -> tuple[int | None, HostLink | None]:
    """``(this rank's emulated host, its shared link)``; ``(None, None)`` without ``net.hosts``."""
    hosts = net.hosts if net is not None else None
    check_hosts(hosts, world, under_torchrun=os.environ.get("TANDEM_STORE_HOSTED") != "1")
    if not hosts:
        return None, None
    return host_of(rank, hosts), open_host_link(store, rank, world, hosts)


def check_hosts(hosts: int | None, world: int, *, under_torchrun: bool) -> None:
    """Refuse ``net.hosts`` where it cannot do what it says, before any process joins."""
    if hosts is None:
        return
    if under_torchrun:
        raise ConfigError(f"net hosts={hosts} emulates hosts under the local launcher (tandem "
                          "train); under torchrun every process already runs on its node: "
                          "drop hosts= from net")
    if hosts > world:
        raise ConfigError(f"net hosts={hosts}: more emulated hosts than the job's {world} "
                          "processes")


def host_of(rank: int, hosts: int) -> int:
    """The emulated host of ``rank``: round robin, so that under the local launcher (workers
    first, then servers or agents) server or agent ``i`` shares host ``i`` with worker ``i``."""
    return rank % hosts


def open_host_link(store: Any, rank: int, world: int, hosts: int) -> HostLink:
    """This rank's host link, shared through the job's store (see the module's lifetime)."""
    host = host_of(rank, hosts)
    members = sum(1 for r in range(world) if host_of(r, hosts) == host)
    key = f"emulated_host/{host}"
    if rank == host:  # the host's first rank (ranks below ``hosts`` are each a host's first)
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        path = base / f"tandem-host{host}-{uuid.uuid4().hex[:12]}"
        link = HostLink(path)
        store.set(key, str(path))
    else:
        link = HostLink(Path(store.get(key).decode()))
    if store.add(f"{key}/opened", 1) == members:
        link.unlink()
    return link
