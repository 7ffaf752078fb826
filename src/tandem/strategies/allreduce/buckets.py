"""Overlap the dense all-reduce with the backward pass, bucket by bucket.

Backward produces the last layers' gradients first. With the trainer's flat gradient buffer
(``LocalTrainer.use_flat_gradients``) the parameters of a model's tail lie end to end at the
buffer's tail, so a *bucket* is a contiguous slice of that buffer. As soon as backward has
written every gradient of a bucket, a hook launches its all-reduce (asynchronously, through the
transport, so it is metered, link-emulated and deadline-bounded like every exchange) while
backward goes on with the earlier layers. After backward only the last bucket is still in flight.
This is what DDP does with its gradient buckets; the mean is the same sum, divided in place.

Buckets are launched strictly in index order on every rank (a bucket whose hooks fired early
waits for the ones before it), so the collectives match across ranks whatever order the
autograd engine runs the hooks in. A parameter that got no gradient this step (unused in the
forward) does not hold its bucket back forever: :meth:`finish` launches what is left.

Each bucket is screened for NaN/Inf before it is sent (``--nan-policy stop``: the error names
the rank and step). ``skip`` cannot undo buckets already sent, so the ``allreduce`` strategy uses
this path only with ``stop`` (and without injected faults, whose delays come after backward).

Tuning: ``bucket_kb`` (``--strategy-opt bucket_kb=...``) sets the bucket size. Smaller buckets
start communicating earlier but each pays the link's latency (2(N-1) hops per ring all-reduce);
the default (``0``, auto) is a quarter of the gradient, at least 64 KB and at most 25 MB (DDP's
bucket cap), which gives 2 buckets for a 47k-parameter CNN and ~4 for ResNet-18.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tandem.trainer import check_finite, raise_non_finite

if TYPE_CHECKING:
    from tandem.trainer import LocalTrainer
    from tandem.transport.transport import Transport

MIN_AUTO_BUCKET = 64 * 1024
MAX_AUTO_BUCKET = 25 * 1024 * 1024


def plan_buckets(sizes: list[int], cap_bytes: int, itemsize: int = 4) -> list[tuple[int, int]]:
    """Bucket boundaries ``[(start, stop), ...]`` over a flat buffer holding parameters of
    ``sizes`` elements in order, filled from the last parameter backwards; bucket 0 is the tail.
    A bucket closes once it holds at least ``cap_bytes``."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    buckets, stop, held = [], offsets[-1], 0
    for i in reversed(range(len(sizes))):
        held += sizes[i] * itemsize
        if held >= cap_bytes and i > 0:
            buckets.append((offsets[i], stop))
            stop, held = offsets[i], 0
    if stop > 0 or not buckets:
        buckets.append((0, stop))
    return buckets


def auto_bucket_bytes(total_bytes: int) -> int:
    return int(min(max(total_bytes // 4, MIN_AUTO_BUCKET), MAX_AUTO_BUCKET))


class BucketedAllReduce:
    """Launches each bucket's all-reduce from gradient hooks; :meth:`finish` returns the mean."""

    def __init__(self, trainer: LocalTrainer, transport: Transport, bucket_bytes: int = 0
                 ) -> None:
        if trainer.flat_grad is None:
            raise ValueError("BucketedAllReduce needs trainer.use_flat_gradients()")
        self.trainer, self.transport = trainer, transport
        self.flat = trainer.flat_grad
        sizes = [p.numel() for p in trainer.params]
        cap = bucket_bytes or auto_bucket_bytes(self.flat.numel() * self.flat.element_size())
        self.buckets = plan_buckets(sizes, cap, self.flat.element_size())
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        owner = [next(b for b, (lo, hi) in enumerate(self.buckets) if lo <= starts[i] < hi)
                 if sizes[i] else 0 for i in range(len(sizes))]
        self._members = [sum(1 for o, n in zip(owner, sizes, strict=True) if o == b and n)
                         for b in range(len(self.buckets))]
        self._left: list[int] = []
        self._pending: list[Any] = []
        self._step = -1
        self._armed = False
        for i, p in enumerate(trainer.params):
            if sizes[i]:
                p.register_post_accumulate_grad_hook(self._hook(owner[i]))

    def _hook(self, bucket: int):  # noqa: ANN202 - a torch hook
        def on_grad(_: torch.Tensor) -> None:
            if not self._armed:
                return
            self._left[bucket] -= 1
            self._launch_ready()
        return on_grad

    def arm(self, step: int) -> None:
        """Call before this step's backward: hooks launch buckets only while armed."""
        self._left = list(self._members)
        self._pending = []
        self._step = step
        self._armed = True

    def _launch_ready(self) -> None:
        while len(self._pending) < len(self.buckets) and self._left[len(self._pending)] <= 0:
            self._launch(len(self._pending))

    def _launch(self, b: int) -> None:
        lo, hi = self.buckets[b]
        span = self.flat[lo:hi]
        if not check_finite([span]):
            self._armed = False
            raise_non_finite(self.transport.rank, self._step)
        self._pending.append(self.transport.all_reduce(span))

    def finish(self) -> list[torch.Tensor]:
        """Launch what is left, wait for every bucket, average in place; the mean per layer
        (views of the trainer's gradient buffer, which ``p.grad`` already points at)."""
        self._armed = False
        while len(self._pending) < len(self.buckets):
            self._launch(len(self._pending))
        for pending in self._pending:
            pending.wait()
        self.flat.div_(self.transport.world)
        self._pending = []
        return list(self.trainer._grad_views)

    @property
    def count(self) -> int:
        return len(self.buckets)
