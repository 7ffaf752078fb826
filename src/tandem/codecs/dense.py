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

from tandem.codecs.base import Codec, Message, group_rank, register, unflat

if TYPE_CHECKING:
    from tandem.transport.transport import Group, Transport


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0)


def contiguous_span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The one 1-D tensor the given tensors tile end to end (same storage, contiguous, in
    order, no gaps), or None. Lets a flat gradient buffer travel without a copy."""
    if not tensors:
        return None
    first = tensors[0]
    storage, start, offset = first.untyped_storage().data_ptr(), first.storage_offset(), 0
    for t in tensors:
        if (t.dtype != first.dtype or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != storage
                or t.storage_offset() != start + offset):
            return None
        offset += t.numel()
    return first.new_empty(0).set_(first.untyped_storage(), start, (offset,))


def unflatten(flat: torch.Tensor, like: list[tuple[int, ...]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape in like:
        n = 1
        for s in shape:
            n *= s
        out.append(flat[offset: offset + n].view(shape))
        offset += n
    return out


@register
class DenseCodec(Codec):
    name = "dense"
    transfer = "sum"
    #: with momentum 0, exchange() averages in the caller's buffer when the gradients tile one
    zero_copy_gradients = True

    def encode(self, grads: list[torch.Tensor]) -> Message:
        """One fresh fp32 buffer: the gradient, or with momentum correction the new velocity
        (kept as one flat buffer, see :meth:`Codec.corrected_flat`), copied for the wire."""
        shapes = [tuple(g.shape) for g in grads]
        flat = self.momentum_flat(grads)  # momentum correction only (no error feedback)
        if self.opts.momentum > 0:
            flat = flat.clone()  # the velocity stays ours: the all-reduce works in place
        return Message([flat], {"shapes": shapes})

    def decode(self, msg: Message) -> list[torch.Tensor]:
        return unflatten(msg.tensors[0], msg.meta["shapes"])

    def exchange(self, grads: list[torch.Tensor], transport: Transport,
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
            return unflat(buf, msg.meta["shapes"])
        self.rank, size = group_rank(transport, group)
        self.step += 1
        if size > 1:
            # the caller waits at once and a failed exchange ends the run: skip the waiter thread
            transport.all_reduce(span, group=group, caller_waits=True).wait()
            span.div_(size)
        return unflatten(span, [tuple(g.shape) for g in grads])
