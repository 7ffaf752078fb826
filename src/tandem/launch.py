"""The local launcher: N worker processes on this machine, reaped whatever happens.

``tandem train`` uses it by default (the embedded launcher); tests use :func:`spawn` to run a
function in a real multi-process gloo group on loopback. Under ``torchrun`` the same worker entry
point (:func:`tandem.worker.main`) runs unchanged, with torchrun's store instead of ours.

How it works: this process hosts the rendezvous ``TCPStore`` (bound to 127.0.0.1 unless an address
is given, on a free port chosen by the OS, so there is no port race) and starts the children with
the ``spawn`` method. It watches them: when a child dies without reporting, it writes
``dead/<rank>`` into the store, so the survivors' waits end at once with an error naming that rank
instead of hanging until their timeout. Every child is terminated, then killed, then joined before
:func:`spawn` returns or raises, including on Ctrl-C.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

from tandem.errors import TandemError, WorkerFailed
from tandem.transport.rendezvous import host_store, mark_dead

_GRACE_S = 5.0


def _child(rank: int, world: int, addr: str, port: int, fn: Callable[..., Any], args: tuple,
           results: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": addr,
                       "MASTER_PORT": str(port), "TANDEM_STORE_HOSTED": "1"})
    import torch

    torch.set_num_threads(int(env.get("TANDEM_THREADS", "1")))
    try:
        value = fn(*args)
        results.put((rank, "ok", value))
    except BaseException as err:  # noqa: BLE001 - every failure is reported to the parent
        kind = type(err).__name__
        detail = str(err) if isinstance(err, TandemError) else traceback.format_exc()
        try:
            results.put((rank, "error", f"{kind}: {detail}"))
            time.sleep(0.2)  # let the queue's feeder thread flush
        finally:
            os._exit(1)
    # A clean exit still skips interpreter teardown of stuck engine threads.
    time.sleep(0.1)
    os._exit(0)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def spawn(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 300.0,
          addr: str = "127.0.0.1", env: dict[str, str] | None = None,
          on_start: Callable[[list[Any], Any], None] | None = None) -> list[Any]:
    """Run ``fn(*args)`` in ``world`` processes (ranks from env ``RANK``); return their results.

    Raises :class:`WorkerFailed` naming the failed ranks (first error text included) when any
    worker raises or dies, and when the whole job exceeds ``timeout_s``. ``on_start(procs, store)``
    lets a test act on the children (e.g. kill one).
    """
    ctx = mp.get_context("spawn")
    store = host_store(addr, world)
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, name=f"tandem-rank{r}",
                         args=(r, world, addr, store.port, fn, args, results, dict(env or {})))
             for r in range(world)]
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        if on_start is not None:
            on_start(procs, store)
        while len(out) + len(errors) < world:
            try:
                rank, status, value = results.get(timeout=0.2)
                (out if status == "ok" else errors)[rank] = value
                if status != "ok":
                    mark_dead(store, rank, f"raised {value.splitlines()[0][:200]}")
                continue
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):
                if r in out or r in errors or p.is_alive():
                    continue
                # exited without a report: give the queue a moment, then call it dead
                try:
                    rank, status, value = results.get(timeout=0.5)
                    (out if status == "ok" else errors)[rank] = value
                    continue
                except queue_mod.Empty:
                    pass
                if r not in out and r not in errors:
                    why = _describe_exit(p.exitcode)
                    errors[r] = f"worker {r} {why} without reporting"
                    mark_dead(store, r, why)
            if time.monotonic() > deadline:
                silent = [r for r in range(world) if r not in out and r not in errors]
                raise WorkerFailed(f"job exceeded {timeout_s:.0f}s; rank(s) {silent} never "
                                   "finished", ranks=silent)
    except KeyboardInterrupt:
        raise
    finally:
        _reap(procs)
        results.close()
    if errors:
        first = min(errors)
        ranks = sorted(errors)
        # Survivors usually fail *because* of the first one; report the root cause first.
        roots = [r for r in ranks if "died" not in errors[r] and "stopped answering" not in errors[r]]
        lead = roots[0] if roots else first
        raise WorkerFailed(f"rank {lead} failed: {errors[lead]}"
                           + (f" (also failed: {[r for r in ranks if r != lead]})" if len(ranks) > 1 else ""),
                           ranks=ranks, details=errors)
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
