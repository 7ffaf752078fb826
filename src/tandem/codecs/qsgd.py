"""qsgd: unbiased stochastic quantisation to ``levels`` magnitude levels per bucket (QSGD,
Alistarh et al. 2017), with the sign and level of every entry bit-packed.

Each bucket of ``bucket_size`` consecutive entries of a layer (or the whole layer when 0) sends
its L2 norm ``||v||`` as fp32 and, per entry, a sign bit and a level ``l`` in ``0..s`` drawn so that
``E[l] = s * |v_i| / ||v||`` (stochastic rounding): the decoded ``||v|| * sign * l / s`` is an
unbiased estimate of ``v_i``. No error feedback is needed (or used): the noise is zero-mean.

When to use: moderate compression (4-8x) with guarantees and no state; a good fit for parameter
servers since each worker's code decodes on its own. Tuning: ``levels`` trades bytes for variance
(variance per bucket <= min(b / s^2, sqrt(b) / s) * ||v||^2); ``bucket_size`` 512 (the paper's
choice) keeps the variance low; larger buckets spend fewer bytes on norms but add noise.

Cost (a few whole-buffer operations on one flat fp32 buffer; no loop over layers or buckets):
the bucket norms come from one ``segment_reduce``, the per-entry norm from one cached index;
the rounding noise is 16 bits per entry cut from 64-bit random words (a quarter of the
generator calls of one fp32 uniform per entry; the bias this grid adds is below 2^-17 of one
level, far inside the Monte-Carlo test's bound); ``aggregate`` decodes all gathered messages
in one batch (their bit planes unpacked together, one weighted sum over the messages).

Transfer: gathered. Bytes per code: ``4 * n_buckets + ceil(D * (w + 1) / 8)`` with
``w = ceil(log2(levels + 1))`` bits per level plus one sign bit.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, register, step_generator, unflat
from tandem.codecs.bits import combine_planes, pack_bits, unpack_planes
from tandem.codecs.topk import numel


def level_bits(levels: int) -> int:
    return max(1, math.ceil(math.log2(levels + 1)))


@lru_cache(maxsize=16)
def bucket_counts(shapes: tuple[tuple[int, ...], ...], bucket: int) -> tuple[int, ...]:
    """Sizes of the buckets, layer by layer (a layer's last bucket may be short)."""
    counts: list[int] = []
    for s in shapes:
        n = numel(s)
        if n == 0:
            continue
        b = n if bucket <= 0 else bucket
        counts += [b] * (n // b) + ([n % b] if n % b else [])
    return tuple(counts)


def uniform16(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` uniform fp32 draws on the midpoints of a 2^16 grid in (0, 1), from n/4 random
    64-bit words (the generator's cost is per call of its engine, not per bit)."""
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64,
                          generator=gen)
    half = words.view(torch.int16)[:n].to(torch.float32)
    return half.add_(32768.5).mul_(1.0 / 65536)


class QSGDOptions(CodecOptions):
    levels: int = Field(15, ge=1, le=32767, description="magnitude levels s (15: 4 bits + sign)")
    bucket_size: int = Field(512, ge=0, description="entries per norm; 0 = one norm per layer")


@register
class QSGDCodec(Codec):
    """qsgd: per-bucket fp32 norm + bit-packed sign and stochastic level per entry; gathered."""

    name = "qsgd"
    transfer = "gather"
    Options = QSGDOptions

    def _layout(self, shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(bucket sizes, the bucket of every entry), cached per model."""
        counts = bucket_counts(tuple(shapes), self.opts.bucket_size)
        return _bucket_tensor(counts), _bucket_ids(counts)

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        # momentum correction only (QSGD is unbiased, no error feedback)
        flat = self.corrected_flat(grads)
        self.keep_flat(flat, transmitted=flat)
        counts, ids = self._layout(shapes)
        mag = flat.abs()
        norms = torch.segment_reduce(mag * mag, "sum", lengths=counts).sqrt_()
        s = self.opts.levels
        per = norms.index_select(0, ids)
        # |v| / ||v|| * s + u, floored: level l with E[l] = s |v| / ||v|| (0 where the norm is 0)
        scaled = mag.div_(per.clamp_min_(1e-30)).mul_(s)
        gen = step_generator(self.seed, self.rank, self.step, 0x51534744)
        level = scaled.add_(uniform16(flat.numel(), gen)).floor_().clamp_(0, s)
        w = level_bits(s)
        kind = torch.uint8 if w < 8 else torch.int32
        codes = level.to(kind).bitwise_or_((flat < 0).to(kind).bitwise_left_shift_(w))
        return Message([norms, pack_bits(codes, w + 1)], {"shapes": shapes, "dim": flat.numel()})

    def _decode_mean(self, msgs: list[Message]) -> list[torch.Tensor]:
        """The mean of the decoded messages, all in one batch."""
        shapes, dim = msgs[0].meta["shapes"], msgs[0].meta["dim"]
        s = self.opts.levels
        w = level_bits(s)
        k = len(msgs)
        norms = msgs[0].tensors[0].unsqueeze(0) if k == 1 else \
            torch.stack([m.tensors[0] for m in msgs])
        bits = msgs[0].tensors[1].unsqueeze(0) if k == 1 else \
            torch.stack([m.tensors[1] for m in msgs])
        planes = unpack_planes(bits, dim, w + 1)
        level = combine_planes(planes[:, :w]).to(torch.float32)
        # sign plane 1 -> -1: level * (1 - 2 * sign), then each entry's bucket norm / (s * k)
        level.mul_(planes[:, w].to(torch.float32).mul_(-2.0).add_(1.0))
        per = norms.index_select(1, self._layout(shapes)[1])
        out = level.mul_(per).sum(0) if k > 1 else level.mul_(per).view(-1)
        return unflat(out.mul_(1.0 / (s * k)), shapes)

    def decode(self, msg: Message) -> list[torch.Tensor]:
        return self._decode_mean([msg])

    def aggregate(self, msgs: list[Message]) -> list[torch.Tensor]:
        return self._decode_mean(msgs)


@lru_cache(maxsize=16)
def _bucket_tensor(counts: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64)


@lru_cache(maxsize=16)
def _bucket_ids(counts: tuple[int, ...]) -> torch.Tensor:
    c = _bucket_tensor(counts)
    return torch.repeat_interleave(torch.arange(c.numel()), c)
