"""Dense: the uncompressed baseline (fp32 gradients, summed by all-reduce).

Use it as the reference every other codec is compared with; with the ``allreduce`` strategy it is
the equivalent of PyTorch DDP. The layers are flattened into one buffer so that one collective
moves the whole gradient (fewest latency hops).

Zero copy: when the gradients already lie end to end in one buffer (the trainer's
``use_flat_gradients``, as DDP's ``gradient_as_bucket_view``), that buffer is all-reduced and
averaged in place: no concatenation, no per-layer division, no new tensors. The gradients
passed to :meth:`exchange` are then overwritten by the mean, which is what ``zero_copy_gradients``
announces to a strategy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tandem.codecs.base import Codec, Message, group_rank, register
from tandem.flat import contiguous_span, unflatten

if TYPE_CHECKING:
    from tandem.codecs.collectives import Collectives
    from tandem.transport.transport import Group


@register
class DenseCodec(Codec):
    name = "dense"
    transfer = "sum"
    #: with momentum 0, exchange() averages in the caller's buffer when the gradients tile one
    zero_copy_gradients = True

    def encode(self, grads: list[torch.Tensor]) -> Message:
        """One fresh fp32 buffer: the gradient, or with momentum correction the new velocity
        (kept as one flat buffer, see :meth:`ErrorFeedback.momentum_flat`), copied for the
        wire."""
        shapes = [tuple(g.shape) for g in grads]
        flat = self.memory.momentum_flat(grads)  # momentum correction only (no error feedback)
        if self.opts.momentum > 0:
            flat = flat.clone()  # the velocity stays ours: the all-reduce works in place
        return Message([flat], {"shapes": shapes})

    def decode(self, msg: Message) -> list[torch.Tensor]:
        return unflatten(msg.tensors[0], msg.meta["shapes"])

    def exchange(self, grads: list[torch.Tensor], transport: Collectives,
                 group: Group | None = None) -> list[torch.Tensor]:
        span = contiguous_span(grads) if self.opts.momentum == 0 else None
        if span is None or span.dtype != torch.float32:
            # one buffer, averaged in place (one division, not one per layer)
            self.rank, size = group_rank(transport, group)
            msg = self.encode(grads)
            self.step += 1
            buf = msg.tensors[0]
            if size > 1:
                transport.all_reduce(buf, group=group).wait()
                buf.div_(size)
            return unflatten(buf, msg.meta["shapes"])
        self.rank, size = group_rank(transport, group)
        self.step += 1
        if size > 1:
            # the caller waits at once and a failed exchange ends the run: skip the waiter thread
            transport.all_reduce(span, group=group, caller_waits=True).wait()
            span.div_(size)
        return unflatten(span, [tuple(g.shape) for g in grads])
