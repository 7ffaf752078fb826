"""One ``exchange`` for the gathered codes laid out as fp32 scales then packed bits (QSGD's
bucket norms + level planes, signSGD's layer scales + sign bits).

Why not :meth:`Codec.exchange`: it re-packs the code and splits every gathered buffer into fresh
tensors. These codecs' ``encode`` already writes the wire buffer (``self._wire``, the layout
:meth:`Message.pack` gives, so the bytes on the wire are the same), and their decoders take the
gathered buffers as they are: stacked into rows and decoded as one batch on small models, or one
message at a time into reused buffers on large ones (:data:`LARGE` entries and up: bounded
scratch memory, no ``(k, D)`` batch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tandem.codecs.base import group_rank

if TYPE_CHECKING:
    from tandem.codecs.collectives import Collectives
    from tandem.transport.transport import Group

#: entries from which a model counts as large: messages are decoded one at a time into reused
#: buffers (bounded scratch memory, no page faults) instead of as one (k, D) batch
LARGE = 1 << 20


class ScaledBitsGather:
    """Mixin, listed before :class:`~tandem.codecs.base.Codec`. The codec provides ``encode``
    (leaving its packed code in ``self._wire``), ``decode``, ``_decode_rows(scales, bits,
    shapes, dim)`` and ``_decode_each([(scales, bits), ...], shapes, dim)``; ``_large`` says
    which decoder a gather takes."""

    _wire: torch.Tensor

    def _large(self, k: int, dim: int) -> bool:
        """Decode the ``k`` gathered messages one at a time (True) or as one batch (the codec
        decides: e.g. ``dim >= LARGE``)."""
        raise NotImplementedError

    def exchange(self, grads: list[torch.Tensor], transport: Collectives,
                 group: Group | None = None) -> list[torch.Tensor]:
        """The group's mean: our wire buffer all-gathered, the buffers decoded where they lie."""
        codec: Any = self
        codec.rank, size = group_rank(transport, group)
        msg = codec.encode(grads)
        codec.step += 1
        if size == 1:
            return codec.decode(msg)
        bufs = transport.all_gather(self._wire, group=group).wait()
        cut = 4 * msg.tensors[0].numel()
        shapes, dim = msg.meta["shapes"], msg.meta["dim"]
        if self._large(len(bufs), dim):
            # (the scales cloned: a gathered buffer need not be 4-byte aligned)
            return codec._decode_each([(b[:cut].clone().view(torch.float32), b[cut:])
                                       for b in bufs], shapes, dim)
        rows = torch.stack(bufs)
        return codec._decode_rows(rows[:, :cut].contiguous().view(torch.float32), rows[:, cut:],
                                  shapes, dim)
