"""fp16: gradients cast to IEEE half precision and summed by all-reduce (2x fewer bytes).

When to use: a safe first step below dense on any link; accuracy is usually indistinguishable from
fp32 for gradients of normal magnitude. Half precision keeps 11 significant bits but only a range
of about 6e-8 .. 65504: tiny gradient entries flush to zero and huge ones overflow. ``prescale``
(default on, as in PyTorch's ``fp16_compress_hook``) divides by the group size *before* casting
so the sum over workers stays within range. If your gradients underflow (many exact zeros after
decoding), use ``bf16`` (fp32's range, 8 significant bits) instead.

Bytes per worker per step: all-reduce of ``2 * D`` bytes (``D`` = number of gradient entries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, group_rank, register
from tandem.flat import unflatten

if TYPE_CHECKING:
    from tandem.codecs.collectives import Collectives
    from tandem.transport.transport import Group


class CastOptions(CodecOptions):
    prescale: bool = Field(True, description="divide by the group size before casting, so the "
                                             "all-reduced sum cannot overflow")


class CastCodec(Codec):
    """Shared machinery of the cast codecs (fp16, bf16): cast, all-reduce, cast back."""

    transfer = "sum"
    dtype: ClassVar[torch.dtype] = torch.float16
    Options = CastOptions

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        flat = self.memory.momentum_flat(grads)  # momentum correction only (no error feedback)
        return Message([flat.to(self.dtype)], {"shapes": shapes})

    def decode(self, msg: Message) -> list[torch.Tensor]:
        return unflatten(msg.tensors[0].float(), msg.meta["shapes"])

    def exchange(self, grads: list[torch.Tensor], transport: Collectives,
                 group: Group | None = None) -> list[torch.Tensor]:
        self.rank, size = group_rank(transport, group)
        self.step += 1
        shapes = [tuple(g.shape) for g in grads]
        flat = self.memory.momentum_flat(grads)  # may be the velocity: never written below
        pre = self.opts.prescale and size > 1
        code = (flat / size if pre else flat).to(self.dtype)
        if size > 1:
            transport.all_reduce(code, group=group).wait()
        out = code.float()
        if not pre and size > 1:
            out = out / size
        return unflatten(out, shapes)


@register
class Fp16Codec(CastCodec):
    """fp16: half-precision gradients, summed by all-reduce (2 bytes per entry)."""

    name = "fp16"
    dtype = torch.float16
