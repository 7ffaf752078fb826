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

Transfer: gathered. Bytes per code: ``4 * n_buckets + ceil(D * (w + 1) / 8)`` with
``w = ceil(log2(levels + 1))`` bits per level plus one sign bit.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, register, step_generator
from tandem.codecs.bits import pack_bits, unpack_bits
from tandem.codecs.dense import flatten, unflatten
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


class QSGDOptions(CodecOptions):
    levels: int = Field(15, ge=1, le=32767, description="magnitude levels s (15: 4 bits + sign)")
    bucket_size: int = Field(512, ge=0, description="entries per norm; 0 = one norm per layer")


@register
class QSGDCodec(Codec):
    """qsgd: per-bucket fp32 norm + bit-packed sign and stochastic level per entry; gathered."""

    name = "qsgd"
    transfer = "gather"
    Options = QSGDOptions

    def _buckets(self, shapes: list[tuple[int, ...]]) -> torch.Tensor:
        return torch.tensor(bucket_counts(tuple(shapes), self.opts.bucket_size), dtype=torch.int64)

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        grads = self.with_residual(grads)  # momentum correction only (QSGD is unbiased, no EF)
        self.keep_residual(grads, grads)
        flat = flatten([g.detach().float() for g in grads])
        counts = self._buckets(shapes)
        ids = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        norms = torch.zeros(counts.numel()).index_add_(0, ids, flat * flat).sqrt()
        s = self.opts.levels
        per = norms[ids]
        ratio = torch.where(per > 0, flat.abs() / per.clamp_min(1e-30), torch.zeros_like(flat))
        gen = step_generator(self.seed, self.rank, self.step, 0x51534744)
        u = torch.rand(flat.numel(), generator=gen)
        level = torch.floor(ratio * s + u).clamp_(0, s).to(torch.int64)
        w = level_bits(s)
        codes = level | ((flat < 0).to(torch.int64) << w)
        msg = Message([norms, pack_bits(codes, w + 1)], {"shapes": shapes, "dim": flat.numel()})
        return msg

    def decode(self, msg: Message) -> list[torch.Tensor]:
        shapes, dim = msg.meta["shapes"], msg.meta["dim"]
        s = self.opts.levels
        w = level_bits(s)
        codes = unpack_bits(msg.tensors[1], dim, w + 1)
        level = (codes & ((1 << w) - 1)).float()
        sign = 1.0 - 2.0 * (codes >> w).float()
        counts = self._buckets(shapes)
        per = torch.repeat_interleave(msg.tensors[0], counts)
        return unflatten(per * sign * level / s, shapes)
