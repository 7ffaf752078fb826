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

No wait is unbounded. Starting the workers has its own deadline (``start_timeout_s``, default
:data:`START_TIMEOUT_S`, or ``TANDEM_START_TIMEOUT_S``): a fork server stuck importing its preloads
would otherwise hold ``Process.start`` forever, so it is killed and the launch fails naming it.
Once a worker has failed, the job is lost; the others get ``failure_grace_s`` to report (enough
for a wait already in progress to time out and name whom it waited for), and a worker still
running after that is stuck outside any Tandem wait: it is terminated and named as the cause.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing import connection as mp_connection
from typing import Any

from tandem.allocator import tune_allocator
from tandem.errors import TandemError, WorkerFailed
from tandem.transport.rendezvous import host_store, mark_dead

_GRACE_S = 5.0
#: seconds the workers may take to start (``TANDEM_START_TIMEOUT_S`` overrides): the fork
#: server's first start imports torch, a few seconds of CPU, minutes on a badly overloaded host
START_TIMEOUT_S = 180.0

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


def _start_timeout(given: float | None) -> float:
    if given is not None:
        return given
    raw = os.environ.get("TANDEM_START_TIMEOUT_S", "")
    try:
        value = float(raw) if raw else START_TIMEOUT_S
    except ValueError:
        raise TandemError(f"TANDEM_START_TIMEOUT_S={raw!r}: expected seconds") from None
    if value <= 0:
        raise TandemError(f"TANDEM_START_TIMEOUT_S={raw!r}: expected a positive number of seconds")
    return value


def _fork_server_pid() -> int | None:
    from multiprocessing import forkserver

    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)


def _start_all(procs: list[Any], ctx: Any, timeout_s: float) -> None:
    """``p.start()`` for every worker, within ``timeout_s`` in all.

    With ``forkserver`` each start waits for the server to fork the child and answer with its
    pid; a server that never answers (stuck in its preload imports) would block here for good.
    A timer kills it at the deadline, which ends the blocked read with an EOF, and the launch
    fails naming the server. (``spawn`` starts cannot block: the child is simply exec'd.)"""
    lock, state = threading.Lock(), {"done": False, "killed": None}

    def expire() -> None:
        with lock:
            if state["done"]:
                return
            pid = _fork_server_pid() if ctx.get_start_method() == "forkserver" else None
            if pid:
                state["killed"] = pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        for r, p in enumerate(procs):
            try:
                with _main_not_rerun():
                    p.start()
            except (EOFError, OSError) as err:
                if ctx.get_start_method() != "forkserver":
                    raise
                if state["killed"] is None:
                    raise WorkerFailed(
                        f"worker {r} could not be started ({type(err).__name__}: {err}): the "
                        "fork server went away while forking it (killed, or out of memory?). "
                        "The next launch starts a new one; TANDEM_START_METHOD=spawn avoids it",
                        ranks=list(range(r, len(procs)))) from err
                raise WorkerFailed(
                    f"worker {r} was not started within {timeout_s:.0f}s: multiprocessing's fork "
                    f"server (pid {state['killed']}, importing {', '.join(_PRELOAD)}) never "
                    "answered and was killed. Check that `python -c 'import torch, "
                    "tandem.worker'` finishes on this machine, raise TANDEM_START_TIMEOUT_S on a "
                    "heavily loaded host, or set TANDEM_START_METHOD=spawn",
                    ranks=list(range(r, len(procs)))) from err
    finally:
        with lock:
            state["done"] = True
        timer.cancel()


@contextlib.contextmanager
def _main_not_rerun() -> Iterator[None]:
    """Start a child without making it re-run the launcher's ``__main__`` from a file that does
    not exist. multiprocessing re-imports the parent's main module in ``spawn`` and
    ``forkserver`` children from ``__main__.__file__``; a script fed on stdin (``python -``) has
    ``<stdin>`` there, and every child would die with FileNotFoundError. Its functions travel by
    value instead (the job pickles the workload with cloudpickle), so the child needs no main."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or os.path.exists(path):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


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
    start_timeout_s: float | None = None,
    failure_grace_s: float = 30.0,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world`` processes (ranks from env ``RANK``); return their results.

    Raises :class:`WorkerFailed` naming the failed ranks (first error text included) when any
    worker raises or dies, and when the whole job exceeds ``timeout_s``. ``on_start(procs, store)``
    lets a test act on the children (e.g. kill one). ``tolerate_death(rank)`` says which ranks
    may die (killed, or exited without a report) without failing the job, provided every other
    rank succeeds; their results are ``None``.

    ``start_timeout_s`` bounds starting the processes (see the module docstring).
    ``failure_grace_s``: after the first failure that dooms the job (a tolerated death does
    not), how long the remaining ranks may take to report; set it above the workers' own wait
    timeout, so that their errors, which name whom they waited for, arrive. Ranks still running
    then are terminated and reported as stuck."""
    start_limit = _start_timeout(start_timeout_s)
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
    died: set[int] = set()  # exited without a report, or stuck and terminated
    deadline = time.monotonic() + timeout_s

    def tolerated(r: int) -> bool:
        return tolerate_death is not None and tolerate_death(r)

    def take(conn: Any) -> None:
        r = readers.pop(conn)
        try:
            rank, status, value = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # closed without a report: the process died
            procs[r].join(1.0)
            why = _describe_exit(procs[r].exitcode)
            errors[r] = f"worker {r} {why} without reporting"
            died.add(r)
            mark_dead(store, r, why)
            return
        if status == "ok":
            out[rank] = value
        else:
            errors[rank] = value
            # A rank that failed *because* a peer went silent is a consequence, not a cause.
            if not value.startswith(("WorkerFailed", "PeerTimeout")):
                mark_dead(store, rank, f"raised {value.splitlines()[0][:200]}")

    def settling() -> str | None:
        """Why the ranks still running get only ``failure_grace_s`` more (None: they may run to
        the job's deadline): a failure that dooms the job. Not a tolerated death, and not the
        servers finishing first: a parameter server's worker 0 evaluates after that."""
        doomed = [r for r in sorted(errors) if not (tolerated(r) and r in died)]
        if doomed:
            return f"rank {doomed[0]} failed ({errors[doomed[0]].splitlines()[0][:300]})"
        return None

    previous_term = _raise_on_sigterm()
    settle_at, settle_why = None, None
    try:
        _start_all(procs, ctx, start_limit)
        for _, w in pipes:
            w.close()  # the parent keeps only the read ends: EOF means the child is gone
        if on_start is not None:
            on_start(procs, store)
        while readers:
            for conn in mp_connection.wait(list(readers), timeout=0.5):
                take(conn)
            now = time.monotonic()
            if settle_at is None and readers and (settle_why := settling()) is not None:
                settle_at = now + failure_grace_s
            if settle_at is not None and now > settle_at and readers:
                for r in sorted(readers.values()):
                    errors[r] = (f"worker {r} still running {failure_grace_s:.0f}s after "
                                 f"{settle_why}: stuck outside any Tandem wait; terminated "
                                 "without reporting")
                    died.add(r)
                readers.clear()
            if now > deadline and readers:
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
    lost = {r for r in errors if tolerated(r) and r in died}
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
