"""Dense: the uncompressed baseline (fp32 gradients, summed by all-reduce).

Use it as the reference every other codec is compared with; with the ``allreduce`` strategy it is
the equivalent of PyTorch DDP. The layers are flattened into one buffer so that one collective
moves the whole gradient (fewest latency hops).
"""

from __future__ import annotations

import torch

from tandem.codecs.base import Codec, Message, register


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0)


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

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        grads = self.with_residual(grads)  # momentum correction only (no error feedback)
        self.keep_residual(grads, grads)
        return Message([flatten([g.detach().float() for g in grads])], {"shapes": shapes})

    def decode(self, msg: Message) -> list[torch.Tensor]:
        return unflatten(msg.tensors[0], msg.meta["shapes"])
