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

from functools import lru_cache

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, register, unflat
from tandem.codecs.bits import pack_bits, unpack_planes
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
        key = tuple(shapes)
        flat = self.corrected_flat(grads)
        counts = layer_counts(key)
        scales = torch.segment_reduce(flat.abs(), "sum", lengths=counts).div_(counts.clamp_min(1))
        positive = flat >= 0
        msg = Message([scales, pack_bits(positive, 1)], {"shapes": shapes, "dim": flat.numel()})
        if self.uses_error_feedback() or self.track_transmitted:
            # what the receivers decode, computed directly (no unpack of our own bits)
            per = scales.index_select(0, layer_ids(key))
            self.keep_flat(flat, transmitted=torch.where(positive, per, per.neg()))
        else:
            self.keep_flat(flat, transmitted=flat)
        return msg

    def _decode_mean(self, msgs: list[Message]) -> torch.Tensor:
        """The mean of the decoded messages, in one batch: all sign bits unpacked at once,
        ``(2 bit - 1) * scale`` summed over the messages."""
        key, dim, k = tuple(msgs[0].meta["shapes"]), msgs[0].meta["dim"], len(msgs)
        bits = torch.stack([m.tensors[1] for m in msgs])
        scales = torch.stack([m.tensors[0] for m in msgs])
        signs = unpack_planes(bits, dim, 1).view(k, dim).to(torch.float32)
        per = scales.index_select(1, layer_ids(key))
        out = signs.mul_(2.0).sub_(1.0).mul_(per)
        return out.sum(0).div_(k) if k > 1 else out.view(-1)

    def decode(self, msg: Message) -> list[torch.Tensor]:
        return unflat(self._decode_mean([msg]), msg.meta["shapes"])

    def aggregate(self, msgs: list[Message]) -> list[torch.Tensor]:
        return unflat(self._decode_mean(msgs), msgs[0].meta["shapes"])


@lru_cache(maxsize=16)
def layer_counts(shapes: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """Entries per layer (int64), cached per model."""
    return torch.tensor([numel(s) for s in shapes], dtype=torch.int64)


@lru_cache(maxsize=16)
def layer_ids(shapes: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The layer of every entry (cached per model)."""
    counts = layer_counts(shapes)
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)
