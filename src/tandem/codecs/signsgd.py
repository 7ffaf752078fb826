"""signsgd: scaled sign compression with error feedback (EF-signSGD, Karimireddy et al. 2019):
one bit per entry plus one fp32 scale per layer.

Each layer of the error-corrected gradient ``c`` is sent as ``mean(|c|) * sign(c)`` (zero counts
as positive): 32x fewer bytes than fp32. The error feedback (default on, and needed: plain
signSGD is biased and can diverge) carries the difference into the next step.

When to use: very slow links where even top-k's 8 bytes per kept entry cost too much per step,
and dense-ish gradients (convolutional nets). Tuning: there is little to tune; keep
``error_feedback`` on. With heavy momentum use the codec's ``momentum=0.9`` (momentum
correction, see :mod:`.base`) and the optimizer's momentum 0: the optimizer's momentum on the
decoded mean re-integrates the delayed residuals and the run collapsed to chance accuracy on the
Fashion CNN (lr 0.05, momentum 0.9); the scale itself, ``||c||_1 / n_l``, is EF-signSGD's.

Transfer: gathered (the scales differ per worker). Bytes per code: ``4 * L + ceil(D / 8)``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, register
from tandem.codecs.bits import pack_bits, unpack_bits
from tandem.codecs.dense import flatten, unflatten
from tandem.codecs.topk import numel


class SignSGDOptions(CodecOptions):
    error_feedback: bool = Field(True, description="accumulate the sign-compression error")


@register
class SignSGDCodec(Codec):
    """signsgd: mean-|g| scale (fp32) per layer + 1 bit per entry, error feedback; gathered."""

    name = "signsgd"
    transfer = "gather"
    error_feedback = True
    Options = SignSGDOptions

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        corrected = self.with_residual(grads)
        scales = torch.stack([c.float().abs().mean() if c.numel() else torch.zeros(())
                              for c in corrected])
        flat = flatten([c.float() for c in corrected])
        bits = pack_bits((flat >= 0).to(torch.int64), 1)
        msg = Message([scales, bits], {"shapes": shapes, "dim": flat.numel()})
        self.keep_residual(corrected, self.decode(msg))
        return msg

    def decode(self, msg: Message) -> list[torch.Tensor]:
        shapes = msg.meta["shapes"]
        signs = unpack_bits(msg.tensors[1], msg.meta["dim"], 1).float() * 2.0 - 1.0
        counts = torch.tensor([numel(s) for s in shapes], dtype=torch.int64)
        per = torch.repeat_interleave(msg.tensors[0], counts)
        return unflatten(per * signs, shapes)
