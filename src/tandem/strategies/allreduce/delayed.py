"""``delay=1``: each step's exchange runs in a background thread while the next step computes.

Synchronous data parallelism waits for the exchange of step ``t``'s gradients before step
``t + 1`` can start. On a slow link that wait is most of the step, and no codec makes it zero.
With ``delay=1`` the worker hands step ``t``'s gradients to this thread and computes step
``t + 1`` at once; the mean of step ``t`` is applied one step later:

    w[t+1] = w[t] - lr * mean_t-1        (mean_t-1 = the workers' mean of g(w[t-1]))

This is one-step-stale synchronous SGD: every worker still applies the same mean at the same
step (the replicas stay equal), but a gradient is applied to weights one update newer than the
ones it was computed on. The first step applies nothing; the last step applies its own mean as
well, so a run of ``T`` steps applies ``T`` means. It hides up to one step's compute of
communication per step: the step costs ``max(compute, exchange)`` instead of their sum.

Collectives must not interleave across threads (gloo would pair them differently on different
ranks), so before anything else in the worker talks to the group (evaluation, a checkpoint's
barrier, the correlation probe) :meth:`DelayedExchange.drain` waits for the exchange in flight
and keeps its mean for the next step. A checkpoint holds that pending mean, so a resumed run
applies exactly what the uninterrupted one would have.

Bytes are metered when they are sent, by the same transport as always: a step's record holds
the bytes that left during it (mostly the previous step's exchange); the totals are exact.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from tandem.errors import PeerTimeout

if TYPE_CHECKING:
    from collections.abc import Callable


#: origin of the step records' ``t_compute_start`` / ``t_prev_comm_done`` (one per process)
CLOCK0 = time.perf_counter()


class DelayedExchange:
    """One exchange in flight at a time, in step order, on one background thread."""

    def __init__(self, run: Callable[[list[torch.Tensor]], list[torch.Tensor]], rank: int,
                 timeout_s: float) -> None:
        self._run = run
        self._rank = rank
        self._timeout_s = timeout_s
        # a daemon thread, not an executor: a worker that fails while an exchange is blocked
        # in a collective must be able to exit (an executor's thread is joined at exit)
        self._queue: queue.Queue[tuple[list[torch.Tensor], cf.Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tandem-delayed-exchange",
                                        daemon=True)
        self._thread.start()
        self._flight: tuple[int, cf.Future[tuple[list[torch.Tensor], float]]] | None = None
        #: the mean of the last finished exchange, not applied yet (a checkpoint holds it)
        self.pending: list[torch.Tensor] | None = None
        #: when the exchange of :attr:`pending` finished (seconds since :data:`CLOCK0`)
        self.pending_done_at: float | None = None

    def submit(self, step: int, grads: list[torch.Tensor]) -> None:
        """Start exchanging ``step``'s gradients (copied: the trainer reuses its buffers)."""
        if self._flight is not None:
            raise RuntimeError("DelayedExchange.submit with an exchange in flight")
        fut: cf.Future[tuple[list[torch.Tensor], float]] = cf.Future()
        self._queue.put(([g.detach().clone() for g in grads], fut))
        self._flight = (step, fut)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            grads, fut = item
            try:
                fut.set_result(self._exchange(grads))
            except BaseException as err:  # noqa: BLE001 - re-raised by drain, in the worker
                fut.set_exception(err)

    def _exchange(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
        # a copy: a codec may reuse the buffers it returns on its next exchange
        mean = [m.clone() for m in self._run(grads)]
        return mean, time.perf_counter() - CLOCK0

    def drain(self) -> float:
        """Wait for the exchange in flight (if any) and keep its mean as :attr:`pending`;
        returns the seconds waited. A second mean while one is pending is an error."""
        if self._flight is None:
            return 0.0
        step, fut = self._flight
        limit = max(60.0, 4 * self._timeout_s)
        t0 = time.perf_counter()
        try:
            mean, done_at = fut.result(timeout=limit)
        except cf.TimeoutError:
            raise PeerTimeout(f"rank {self._rank}: the exchange of step {step}'s gradients "
                              f"did not finish within {limit:.0f} s (allreduce delay=1); the "
                              "transport named no peer, so every peer may be alive and slow"
                              ) from None
        finally:
            self._flight = None
        if self.pending is not None:
            raise RuntimeError("DelayedExchange: two means pending")
        self.pending, self.pending_done_at = mean, done_at
        return time.perf_counter() - t0

    def take(self) -> list[torch.Tensor] | None:
        """The pending mean, handed over once (None before the first exchange finishes)."""
        mean, self.pending, self.pending_done_at = self.pending, None, None
        return mean

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = state.get("pending")

    def close(self) -> None:
        self._queue.put(None)
