"""The local launcher: N worker processes on this machine, reaped whatever happens.

``tandem train`` uses it by default (the embedded launcher); tests use :func:`spawn` to run a
function in a real multi-process gloo group on loopback. Under ``torchrun`` the same worker entry
point (:func:`tandem.worker.main`) runs unchanged, with torchrun's store instead of ours.

How it works: this process hosts the rendezvous ``TCPStore`` (bound to 127.0.0.1 unless an address
is given, on a free port chosen by the OS, so there is no port race) and starts the children (see
"Start method" below). It watches them: when a child dies without reporting, it writes
``dead/<rank>`` into the store, so the survivors' waits end at once with an error naming that rank
instead of hanging until their timeout. Every child is terminated, then killed, then joined before
:func:`spawn` returns or raises, including on Ctrl-C.

Start method: on Linux the children come from multiprocessing's ``forkserver``, which imports torch
and Tandem once (the first launch in a process) and forks each worker from that clean,
single-threaded image, so a worker starts in milliseconds instead of importing torch again (seconds
of CPU per worker; N workers sharing a few cores import N times at once). Each child still gets
the launcher's current environment, working directory and ``sys.path``, as with ``spawn``. What
``forkserver`` cannot redo per launch: settings read when torch's libraries load (``OMP_*``,
``MKL_*``) are those of the first launch in the process. Set ``TANDEM_START_METHOD=spawn`` to
start every worker from a fresh interpreter instead (slower, the portable default elsewhere).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing import connection as mp_connection
from typing import Any

from tandem.allocator import tune_allocator
from tandem.errors import TandemError, WorkerFailed
from tandem.transport.rendezvous import host_store, mark_dead

_GRACE_S = 5.0

#: modules the fork server imports once, before it forks any worker. ``torch._dynamo`` is what the
#: first optimizer built in a process imports (see ``tandem.worker._prewarm``): seconds of CPU
#: per worker otherwise, more than the rest of a short run.
_PRELOAD = ["torch", "torch._dynamo", "tandem.worker"]
START_METHODS = ("forkserver", "spawn")


def start_context() -> Any:
    """The multiprocessing context workers start from: ``forkserver`` with torch preloaded where
    the platform has it, else ``spawn``; ``TANDEM_START_METHOD`` (``forkserver`` or ``spawn``)
    overrides."""
    method = os.environ.get("TANDEM_START_METHOD", "forkserver")
    if method not in START_METHODS:
        raise TandemError(f"TANDEM_START_METHOD={method!r}: expected one of {START_METHODS}")
    if method == "forkserver" and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)  # read only when the server starts
        return ctx
    return mp.get_context("spawn")


def _child(
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
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": addr,
            "MASTER_PORT": str(port),
            "TANDEM_STORE_HOSTED": "1",
        }
    )
    _die_with_parent()
    tune_allocator()  # before the first large tensor (see tandem.allocator)
    import torch

    torch.set_num_threads(int(env.get("TANDEM_THREADS", "1")))
    try:
        value = fn(*args)
        conn.send_bytes(pickle.dumps((rank, "ok", value)))
        conn.close()
    except BaseException as err:  # noqa: BLE001 - every failure is reported to the parent
        kind = type(err).__name__
        detail = str(err) if isinstance(err, TandemError) else traceback.format_exc()
        try:
            conn.send_bytes(pickle.dumps((rank, "error", f"{kind}: {detail}")))
            conn.close()
        finally:
            os._exit(1)
    # A clean exit still skips interpreter teardown (an engine thread may be stuck in a wait),
    # but runs multiprocessing's finalizers so no semaphore is left for the resource tracker.
    from multiprocessing import util

    util._exit_function()
    os._exit(0)


def _die_with_parent() -> None:
    """Linux: the kernel sends this child SIGKILL when its parent dies, even by SIGKILL. The parent
    is the launcher (``spawn``) or the fork server, which exits as soon as the launcher is gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the launcher's own reaping still applies
        pass


def _raise_on_sigterm() -> Any:
    """While workers run, SIGTERM to the launcher unwinds like Ctrl-C, so they are reaped."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    return signal.signal(signal.SIGTERM, handler)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def spawn(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout_s: float = 300.0,
    addr: str = "127.0.0.1",
    env: dict[str, str] | None = None,
    on_start: Callable[[list[Any], Any], None] | None = None,
    tolerate_death: Callable[[int], bool] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world`` processes (ranks from env ``RANK``); return their results.

    Raises :class:`WorkerFailed` naming the failed ranks (first error text included) when any
    worker raises or dies, and when the whole job exceeds ``timeout_s``. ``on_start(procs, store)``
    lets a test act on the children (e.g. kill one). ``tolerate_death(rank)`` says which ranks
    may die (killed, or exited without a report) without failing the job, provided every other
    rank succeeds; their results are ``None``.
    """
    ctx = start_context()
    store = host_store(addr, world)
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
    procs = [
        ctx.Process(
            target=_child,
            name=f"tandem-rank{r}",
            args=(r, world, addr, store.port, fn, args, pipes[r][1], dict(env or {}),
                  dict(os.environ)),
        )
        for r in range(world)
    ]
    readers = {pipes[r][0]: r for r in range(world)}
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s

    def take(conn: Any) -> None:
        r = readers.pop(conn)
        try:
            rank, status, value = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # closed without a report: the process died
            procs[r].join(1.0)
            why = _describe_exit(procs[r].exitcode)
            errors[r] = f"worker {r} {why} without reporting"
            mark_dead(store, r, why)
            return
        if status == "ok":
            out[rank] = value
        else:
            errors[rank] = value
            # A rank that failed *because* a peer went silent is a consequence, not a cause.
            if not value.startswith(("WorkerFailed", "PeerTimeout")):
                mark_dead(store, rank, f"raised {value.splitlines()[0][:200]}")

    previous_term = _raise_on_sigterm()
    try:
        for p in procs:
            p.start()
        for _, w in pipes:
            w.close()  # the parent keeps only the read ends: EOF means the child is gone
        if on_start is not None:
            on_start(procs, store)
        while readers:
            for conn in mp_connection.wait(list(readers), timeout=0.5):
                take(conn)
            if time.monotonic() > deadline:
                silent = sorted(readers.values())
                raise WorkerFailed(
                    f"job exceeded {timeout_s:.0f}s; rank(s) {silent} never finished", ranks=silent
                )
    finally:
        _reap(procs)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        for r, _ in pipes:
            r.close()
    lost = {r for r, e in errors.items() if tolerate_death is not None and tolerate_death(r)
            and "without reporting" in e}
    if lost and len(lost) == len(errors) and out:
        return [out.get(r) for r in range(world)]
    if errors:
        first = min(errors)
        ranks = sorted(errors)
        # Survivors usually fail *because* of the first one; report the root cause first.
        roots = [r for r in ranks if not errors[r].startswith(("WorkerFailed", "PeerTimeout"))]
        lead = roots[0] if roots else first
        raise WorkerFailed(
            f"rank {lead} failed: {errors[lead]}"
            + (f" (also failed: {[r for r in ranks if r != lead]})" if len(ranks) > 1 else ""),
            ranks=ranks,
            details=errors,
        )
    return [out[r] for r in range(world)]


def _reap(procs: list[Any]) -> None:
    procs = [p for p in procs if p._popen is not None]  # skip any that never started
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + _GRACE_S
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
