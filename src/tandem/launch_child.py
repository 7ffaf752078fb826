"""The worker's side of the local launcher (:mod:`tandem.launch`): what every child does before
it runs its function, and how it reports back.

A child takes the launcher's current environment, starts a session of its own
(:func:`_own_session`), asks the kernel to kill it when its parent dies, runs its function and
sends the launcher one report (its result, or its error with when it happened), then exits
without interpreter teardown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from tandem.allocator import tune_allocator
from tandem.errors import TandemError


def run_child(
    rank: int,
    world: int,
    addr: str,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    conn: Any,
    env: dict[str, str],
    launcher_env: dict[str, str],
) -> None:
    # A forkserver child inherits the server's environment, captured at the first launch: take
    # the launcher's as it is now, as a spawned child would.
    os.environ.clear()
    os.environ.update(launcher_env)
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": addr,
                       "MASTER_PORT": str(port), "TANDEM_STORE_HOSTED": "1"})
    _own_session()
    _die_with_parent()
    tune_allocator()  # before the first large tensor (see tandem.allocator)
    import torch

    torch.set_num_threads(int(env.get("TANDEM_THREADS", "1")))
    from multiprocessing import util

    try:  # the report carries when it happened (a TandemError's ``at``): the launcher orders by it
        payload, code = pickle.dumps((rank, "ok", fn(*args), time.time())), 0
    except BaseException as err:  # noqa: BLE001 - every failure is reported to the parent
        kind = type(err).__name__
        detail = str(err) if isinstance(err, TandemError) else traceback.format_exc()
        at = getattr(err, "at", None) or time.time()
        payload, code = pickle.dumps((rank, "error", f"{kind}: {detail}", at)), 1
    # Either way the exit skips interpreter teardown (an engine thread may be stuck in a wait).
    # multiprocessing's exit finalizers run *before* the report: once the launcher has it, it
    # may terminate this process, and a semaphore not yet unlinked (tqdm's lock, made by the
    # progress bar) would be left to the resource tracker ("leaked semaphore objects").
    try:
        util._run_finalizers(0)
    finally:
        try:
            conn.send_bytes(payload)
            conn.close()
        finally:
            exit_without_teardown(code)


def exit_without_teardown(code: int) -> NoReturn:
    """End this worker process with ``code`` now: flush what it printed and logged, run
    multiprocessing's exit hooks (finalizers, children of this process), then ``os._exit``.

    Why: a worker's interpreter and C++ teardown can block or abort once training is over. A
    helper thread may still sit in an engine wait that no peer will answer, and a process group
    that was not destroyed (a strategy that tolerates lost peers skips the closing barrier and
    the teardown) is destructed at exit. Under torchrun on a loaded machine, a ``gossip`` worker
    ended with ``terminate called without an active exception`` (SIGABRT) after its run record
    was complete, in 2 of 22 two-node runs with two busy loops beside them; its node's agent
    then failed and the other agent waited in torchrun's exit barrier. Both of Tandem's entries
    end this way: the local launcher's children and ``tandem worker`` under torchrun."""
    from multiprocessing import util

    try:
        util._exit_function()  # its finalizers, then its children joined, then the rest
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    finally:
        os._exit(code)


def _own_session() -> None:
    """Make this worker the leader of a session of its own.

    Why: Linux's autogroup scheduler (on by default on desktop and server kernels) shares the
    CPU between sessions first, then between the processes of a session. The launcher's
    children used to share its session, so a process that computes in short bursts between
    waits (a ``bsp_shared`` agent, a parameter server) got less of the CPU than its busy
    neighbours, less than it gets as a host of its own, which is what the link emulator
    models every process as. Measured with ``bench/cluster`` (bsp_shared + PowerSGD rank 2,
    textlm, 100 Mbit/s, 2 cores): in the same session, the agents made 32-37 supersteps and
    their exchange took 80-95 ms; in sessions of their own, 52-55 and 57-71 ms; on four
    network namespaces, each host its own session as real hosts would be, 49 and 48-52 ms.
    Where autogroup is off or absent this changes no scheduling."""
    with contextlib.suppress(OSError, AttributeError):  # already a leader; not POSIX
        os.setsid()


def _die_with_parent() -> None:
    """Linux: the kernel sends this child SIGKILL when its parent dies, even by SIGKILL. The parent
    is the launcher (``spawn``) or the fork server, which exits as soon as the launcher is gone.
    Elsewhere (no ``prctl``) the launcher's own reaping still applies."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
