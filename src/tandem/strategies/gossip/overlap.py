"""``overlap=true``: a peer mixes ``x_t`` with its neighbours while its gradient at ``x_t``
computes.

GOCO's step (the default) adapts, then combines: ``y = x_t - lr * e(x_t)``, then
``x_{t+1} = W y``. The exchange can start only once the gradient is done, so a step costs the
compute plus the exchange. D-PSGD's own order (Xiangru Lian et al., "Can Decentralized
Algorithms Outperform Centralized Algorithms?", NeurIPS 2017, arXiv 1705.09056) combines, then
adapts: ``x_{t+1} = W x_t - lr * e(x_t)``. Both terms need only ``x_t``, so the exchange runs in a
helper thread while the gradient computes, and a step costs about the longer of the two. With a
codec the mixing is CHOCO's round on ``x_t`` (:mod:`.choco`), and the gradient step follows it.

What it changes: the result is no longer GOCO's sequence (the gradient is not mixed in the step
it was computed in, only from the next one on), though both converge to the same neighbourhood of
a solution; the simulator (:func:`tandem.sim.simulate` with ``overlap=True``) runs the same order.
What it hides: the exchange's waiting on the link (latency, line time, the slowest neighbour).
Not the CPU it uses: on a host whose cores the compute already fills, encoding and copying
compete with backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class BackgroundMix:
    """One mixing at a time in a helper thread: :meth:`start` it on ``x_t`` before the gradient,
    :meth:`finish` after it. The mixing's own waits carry the transport's deadlines (a silent
    neighbour fails it with the reason), so :meth:`finish` returns or raises."""

    def __init__(self, mix: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        self._mix = mix
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gossip-mix")
        self._pending: Future[torch.Tensor] | None = None

    def start(self, x: torch.Tensor, step: int) -> None:
        """Mix a copy of ``x`` (CHOCO's round updates its argument in place; ``x`` itself is
        the gradient's point, read by the main thread meanwhile)."""
        assert self._pending is None, "a mixing is already in flight"
        self._pending = self._pool.submit(self._mix, x.clone(), step)

    def finish(self) -> tuple[torch.Tensor, float]:
        """``(W x_t, seconds waited for it after the gradient)``: the exposed communication."""
        assert self._pending is not None, "finish() without start()"
        t = time.perf_counter()
        try:
            mixed = self._pending.result()
        finally:
            self._pending = None
        return mixed, time.perf_counter() - t

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
