"""The local launcher: N worker processes on this machine, reaped whatever happens.

``tandem train`` uses it by default (the embedded launcher); tests use :func:`spawn` to run a
function in a real multi-process gloo group on loopback. Under ``torchrun`` the same worker entry
point (:func:`tandem.worker.main`) runs unchanged, with torchrun's store instead of ours.

How it works: this process hosts the rendezvous ``TCPStore`` (bound to 127.0.0.1 unless an address
is given, on a free port chosen by the OS, so there is no port race) and starts the children (see
"Start method" below). It watches them: when a child dies without reporting, it writes
``dead/<rank>`` into the store, so the survivors' waits end at once with an error naming that rank
instead of hanging until their timeout. Every child is terminated, then killed, then joined before
:func:`spawn` returns or raises, including on Ctrl-C. Each report carries when it happened, and a
failed job names its true cause first: the earliest failure that is not a consequence of another.

Start method: on Linux the children come from multiprocessing's ``forkserver``, which imports torch
and Tandem once (the first launch in a process) and forks each worker from that clean,
single-threaded image, so a worker starts in milliseconds instead of importing torch again (seconds
of CPU per worker; N workers sharing a few cores import N times at once). Each child still gets
the launcher's current environment, working directory and ``sys.path``, as with ``spawn``. What
``forkserver`` cannot redo per launch: settings read when torch's libraries load (``OMP_*``,
``MKL_*``) are those of the first launch in the process. Set ``TANDEM_START_METHOD=spawn`` to
start every worker from a fresh interpreter instead (slower, the portable default elsewhere).

Sessions: every worker starts a session of its own (``tandem.launch_child._own_session``), so
that it gets the CPU share a host of its own would, and a terminal's Ctrl-C reaches the launcher
only, which ends the workers as above.

No wait is unbounded. Starting the workers has its own deadline (``start_timeout_s``, default
:data:`START_TIMEOUT_S`, or ``TANDEM_START_TIMEOUT_S``): a fork server stuck importing its preloads
would otherwise hold ``Process.start`` forever, so it is killed and the launch fails naming it.
Once a worker has failed, the job is lost; the others get ``failure_grace_s`` to report (enough
for a wait already in progress to time out and name whom it waited for), and a worker still
running after that is stuck outside any Tandem wait: it is terminated and named as the cause.
A tolerated rank its peers abandoned (``abandoned/<rank>`` in the store) is ended once every other
rank has reported and its grace is over, and counts as lost. A rank that fails after its peers
abandoned it (a connection they closed) is reported as abandoned first, then the error it got.
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
from collections.abc import Callable, Collection, Iterator
from multiprocessing import connection as mp_connection
from typing import Any

from tandem.errors import CONSEQUENCES, TandemError, WorkerFailed, first_cause, is_secondary
from tandem.launch_child import run_child
from tandem.transport.rendezvous import AbandonedRanks, host_store, mark_dead, mark_stopped

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
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

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

    Raises :class:`WorkerFailed` naming the failed ranks when any worker raises or dies, and
    when the whole job exceeds ``timeout_s``; the rank named first, with its error text, is the
    earliest *primary* failure (:func:`tandem.errors.first_cause`: never a consequence of
    another's, such as a peer timeout or a connection its exiting peer closed).
    ``on_start(procs, store)`` lets a test act on the children (e.g. kill one).
    ``tolerate_death(rank)`` says which ranks may die (killed, or exited without a report)
    without failing the job, provided every other rank succeeds; their results are ``None``.
    So may a tolerated rank its peers *abandoned* (:func:`.store_barrier.abandon`): still
    running once every other rank has reported, it is ended after the mark's grace.

    ``start_timeout_s`` bounds starting the processes (see the module docstring).
    ``failure_grace_s``: after the first failure that dooms the job (a tolerated death does
    not), how long the remaining ranks may take to report; set it above the workers' own wait
    timeout, so that their errors, which name whom they waited for, arrive. Ranks still running
    then are terminated and reported as stuck."""
    start_limit = _start_timeout(start_timeout_s)
    ctx = start_context()
    store = host_store(addr, world)
    pipes = [ctx.Pipe(duplex=False) for _ in range(world)]
    procs = [ctx.Process(target=run_child, name=f"tandem-rank{r}",
                         args=(r, world, addr, store.port, fn, args, pipes[r][1],
                               dict(env or {}), dict(os.environ))) for r in range(world)]
    readers = {pipes[r][0]: r for r in range(world)}
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    when: dict[int, float] = {}  # rank -> time.time() of its failure
    died: set[int] = set()  # exited without a report, stuck and terminated, or abandoned
    gone_on = AbandonedRanks(store)  # ranks whose peers went on without them
    deadline = time.monotonic() + timeout_s

    def tolerated(r: int) -> bool:
        return tolerate_death is not None and tolerate_death(r)

    def take(conn: Any) -> None:
        r = readers.pop(conn)
        try:
            rank, status, value, at = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # closed without a report: the process died
            when[r] = time.time()
            procs[r].join(1.0)
            why = _describe_exit(procs[r].exitcode)
            errors[r] = f"worker {r} {why} without reporting"
            died.add(r)
            mark_dead(store, r, why)
            return
        if status == "ok":
            out[rank] = value
            return
        errors[rank], when[rank] = value, at
        if is_secondary(value) and (why := gone_on.why(rank)) is not None:
            # it failed because its peers had gone on without it (e.g. they closed the
            # connection it was still opening): that is the cause, named first
            errors[rank] = f"worker {rank} was abandoned by its peers ({why}); then: {value}"
            if tolerated(rank):
                died.add(rank)
                return
        # A rank that failed *because* a peer went silent is a consequence, not a cause.
        if not value.startswith(CONSEQUENCES):
            mark_dead(store, rank, f"raised {value.splitlines()[0][:200]}")
        else:  # gone as a consequence: waits on it end at once, without blaming it
            mark_stopped(store, rank, value.splitlines()[0][:200])

    def settling() -> str | None:
        """Why the ranks still running get only ``failure_grace_s`` more (None: they may run to
        the job's deadline): a failure that dooms the job. Not a tolerated death, and not the
        servers finishing first: a parameter server's worker 0 evaluates after that."""
        if doomed := {r: errors[r] for r in errors if not (tolerated(r) and r in died)}:
            r = first_cause(doomed, when)
            return f"rank {r} failed ({errors[r].splitlines()[0][:300]})"
        return None

    def give_up(why: dict[int, str]) -> None:
        """Stop waiting for the ranks in ``why`` (still running): they count as died."""
        for conn, r in list(readers.items()):
            if r in why:
                errors[r], when[r] = why[r], time.time()
                died.add(r)
                del readers[conn]

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
            if settle_at is None and 0 < len(readers) < world:  # someone has reported
                give_up({r: f"worker {r} was abandoned by its peers ({why}) and still running "
                            "after every other rank had finished: ended"  # the others: are they?
                         for r, why in gone_on.due(set(readers.values()), now).items()})
            if settle_at is not None and now > settle_at:
                give_up({r: f"worker {r} still running {failure_grace_s:.0f}s after {settle_why}: "
                            "stuck outside any Tandem wait; terminated without reporting"
                         for r in readers.values()})
            if now > deadline and readers:
                silent = sorted(readers.values())
                raise WorkerFailed(
                    f"job exceeded {timeout_s:.0f}s; rank(s) {silent} never finished", ranks=silent
                )
    finally:
        _reap(procs, reported=set(out) | (set(errors) - died))
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        for r, _ in pipes:
            r.close()
    lost = {r for r in errors if tolerated(r) and r in died}
    if lost and len(lost) == len(errors) and out:
        return [out.get(r) for r in range(world)]
    if errors:
        ranks = sorted(errors)
        lead = first_cause(errors, when)  # the true cause first, then the consequences
        raise WorkerFailed(
            f"rank {lead} failed: {errors[lead]}"
            + (f" (also failed: {[r for r in ranks if r != lead]})" if len(ranks) > 1 else ""),
            ranks=ranks,
            details=errors,
        )
    return [out[r] for r in range(world)]


def _reap(procs: list[Any], reported: Collection[int] = ()) -> None:
    """Terminate, then kill, then join every started child. A child that has ``reported`` is
    exiting by itself: it gets a moment to do so first."""
    started = [(r, p) for r, p in enumerate(procs) if p._popen is not None]  # skip unstarted
    end = time.monotonic() + _GRACE_S
    for r, p in started:
        if r in reported:
            p.join(max(0.0, end - time.monotonic()))
    for _, p in started:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + _GRACE_S
    for _, p in started:
        p.join(max(0.0, end - time.monotonic()))
    for _, p in started:
        if p.is_alive():
            p.kill()
            p.join(5)
