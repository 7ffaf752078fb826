"""Hosts with a core of their own, on one machine: ``bench.cluster --pin``.

Four hosts sharing two cores make every exchange wait for neighbours the scheduler has not run
yet, a cost separate machines do not have. ``--pin`` runs fewer hosts (at most one per core) and
puts each on a core of its own, on both sides of the comparison:

* the real links: host ``i``'s ``torchrun`` and everything it starts run under
  ``taskset`` on usable core ``i`` (:func:`pinned_argv`; children inherit the affinity);
* the emulated twin: Tandem's launcher starts its workers as processes named
  ``tandem-rank<r>``; :func:`ranks_pinned` pins each one, every thread of it, to usable core
  ``r % hosts``, the host the emulator puts rank ``r`` on (``transport.host_link.host_of``).

"Usable" is what this process may run on (:func:`usable_cores`), not every core of the machine.

Without the second, the twin's ranks float over the cores while the real ranks do not, and the
emulation error would measure the scheduler as well as the emulator.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import threading
from collections.abc import Iterator

_RANK = re.compile(r"tandem-rank(\d+)")


def usable_cores() -> list[int]:
    """The cores this process may run on (a cgroup or a ``taskset`` may leave out some of the
    machine's): host ``i`` gets the ``i``-th of them."""
    return sorted(os.sched_getaffinity(0))


def pinned_argv(argvs: list[list[str]]) -> list[list[str]]:
    """``argvs[i]`` run on the ``i``-th usable core alone (``taskset -c``)."""
    cores = usable_cores()
    return [["taskset", "-c", str(cores[i]), *argv] for i, argv in enumerate(argvs)]


def pin_process(pid: int, core: int, done: set[int]) -> None:
    """Pin every thread of ``pid`` not in ``done`` (thread ids) to ``core``; threads started
    later inherit it from the one that starts them, so a poll catches the early ones. A
    process or thread gone meanwhile is skipped."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        if tid in done:
            continue
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, {core})
            done.add(tid)


@contextlib.contextmanager
def ranks_pinned(hosts: int, enabled: bool = True, every_s: float = 0.005,
                 idle_s: float = 0.5) -> Iterator[None]:
    """While the block runs (a ``tandem.train`` or ``tandem.launch.spawn`` in this process),
    pin each launcher worker ``tandem-rank<r>`` to usable core ``r % hosts``, polling every
    ``every_s`` while workers start; a poll that pins nothing doubles the wait, up to
    ``idle_s``, so the poll costs the measured run next to nothing once it is pinned (threads
    its workers start later inherit the core)."""
    if not enabled:
        yield
        return
    stop, done, cores = threading.Event(), set[int](), usable_cores()

    def loop() -> None:
        wait = every_s
        while not stop.wait(wait):
            before = len(done)
            for p in multiprocessing.active_children():
                m = _RANK.fullmatch(p.name)
                if m and p.pid:
                    pin_process(p.pid, cores[int(m.group(1)) % hosts], done)
            wait = every_s if len(done) > before else min(idle_s, 2 * wait)

    thread = threading.Thread(target=loop, name="bench-pin", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
