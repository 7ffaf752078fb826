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

Cost (whole-buffer operations on one flat fp32 buffer, bit for bit the same codes and means
as the per-entry formulation): the bucket norms come from one ``segment_reduce`` (a sequential
fp32 sum, ~1 ns per entry, kept for its exact rounding); the rounding noise is 16 bits per entry
cut from 64-bit random words (a quarter of the generator calls of one fp32 uniform per entry;
the bias this grid adds is below 2^-17 of one level, far inside the Monte-Carlo test's bound).
The level is read from the float's mantissa after adding 2^23 (no float -> int conversion) and
cut into bit planes 8 entries at a time through int64 lanes, written into a reused zero-padded
bit buffer, and packed straight into the wire buffer (norms then planes, the layout
:meth:`Message.pack` gives). ``exchange`` sends that buffer and decodes the gathered ones: bit
planes unpacked by one table lookup per byte, levels combined and signed in int8 (for
``levels`` <= 127), converted once, each run of equal buckets scaled by a broadcast view of its
norms (one ``_foreach_mul_``), and the messages summed.

Small models (the 46k-entry CNN, 4 ranks: ~1 ms, per-op overhead dominates): the messages are
stacked and decoded as one ``(k, D)`` batch, ``encode`` divides by a per-entry gather of the
norms. Large models (>= 2^20 entries; ResNet-18, 11.2M, 4 ranks: ~0.35-0.4x the time of the
batched code, which spent most of it in page faults of fresh 50-200 MB temporaries and in
per-entry norm gathers): every per-entry temporary lives in the plan's reused scratch
(~14 bytes per entry with 15 levels, held by the codec between steps; the 8-byte per-entry
bucket index is no longer built while the runs suffice), ``encode`` divides per run of buckets,
and the messages are decoded one at a time into that scratch and added into the (fresh) mean,
in the order ``sum(0)`` adds them. What remains is per-entry floors: the sequential norm sum,
the random words, the unpack lookup (~1.5 ns per packed byte), the fp32 passes over each
message, and the memory's concatenation and momentum (:mod:`.memory`). Tuning for speed:
``bucket_size`` 0 or a multiple of the layer sizes keeps the runs few (more than
max(32, D / 65536) runs fall back to a per-entry gather).

Transfer: gathered. Bytes per code: ``4 * n_buckets + ceil(D * (w + 1) / 8)`` with
``w = ceil(log2(levels + 1))`` bits per level plus one sign bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from pydantic import Field

from tandem.codecs.base import (
    Codec,
    CodecOptions,
    Message,
    register,
    step_generator,
)
from tandem.codecs.bits import (
    bits_to_bytes,
    bytes_to_bits,
    bytes_to_signs,
    combine_planes,
    packed_size,
    unpack_planes,
)
from tandem.codecs.gathered import LARGE as _LARGE
from tandem.codecs.gathered import ScaledBitsGather
from tandem.codecs.topk import numel
from tandem.flat import unflatten


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
    return _random_halves(n, gen).to(torch.float32).add_(32768.5).mul_(1.0 / 65536)


@dataclass
class _Plan:
    """Per-model constants and scratch memory of one codec instance (never shared between
    instances: the scratch buffers are written on every call). The scratch is reused because
    on a large model a fresh buffer costs more in page faults than the operation writing it
    (~3 ms per 4 MB touched): encode and the decode share it (mag: the scaled magnitudes, then
    the decoded values of one message; raw: squares, the random draws as fp32, the levels'
    cut planes, then the byte indices of the unpack lookup; bits: the random words, the bit
    planes, the magic products, then the unpacked bits)."""

    counts: torch.Tensor  # bucket sizes (int64)
    sizes: tuple[int, ...]  # the same, as the key of the cached bucket ids
    runs: list[tuple[int, int]] | None  # runs of equal buckets: (buckets, bucket size)
    bits: torch.Tensor  # uint8 bit planes, padded to whole int64 words (the tail is re-zeroed)
    levels: torch.Tensor  # uint8 levels, padded to whole int64 words
    shifts: torch.Tensor  # (w, 1) shifts that cut a level into its bit planes
    nbytes: int
    mag: torch.Tensor  # fp32 scratch, one per entry
    raw: torch.Tensor  # int64 scratch of max(4 D, 8 w ceil(D / 8)) bytes
    ids: torch.Tensor | None = None  # the bucket of every entry, built on first use

    def bucket_ids(self) -> torch.Tensor:
        if self.ids is None:
            self.ids = _bucket_ids(self.sizes)
        return self.ids

    def __post_init__(self) -> None:
        self.sq = self.raw.view(torch.float32)[: self.mag.numel()]  # fp32 view of raw
        w, words = self.shifts.numel(), self.levels.numel() // 8
        self.cut = self.raw[: w * words].view(w, words)  # (w, words) int64 view of raw


class QSGDOptions(CodecOptions):
    levels: int = Field(15, ge=1, le=32767, description="magnitude levels s (15: 4 bits + sign)")
    bucket_size: int = Field(512, ge=0, description="entries per norm; 0 = one norm per layer")


@register
class QSGDCodec(ScaledBitsGather, Codec):
    """qsgd: per-bucket fp32 norm + bit-packed sign and stochastic level per entry; gathered."""

    name = "qsgd"
    transfer = "gather"
    Options = QSGDOptions

    def _plan(self, shapes: list[tuple[int, ...]]) -> _Plan:
        """This instance's constants and scratch buffers for a model, built once."""
        key = tuple(shapes)
        plans: dict[Any, _Plan] = self.__dict__.setdefault("_plans", {})
        plan = plans.get(key)
        if plan is None:
            counts = bucket_counts(key, self.opts.bucket_size)
            dim, w = sum(counts), level_bits(self.opts.levels)
            nbytes = packed_size(dim, w + 1)
            kind = torch.int64 if w <= 8 else torch.int32
            words = -(-dim // 8)
            plan = plans[key] = _Plan(
                _bucket_tensor(counts), counts, _runs(counts, max(32, dim >> 16)),
                torch.zeros(nbytes * 8, dtype=torch.uint8),
                torch.zeros(words * 8, dtype=torch.uint8),
                torch.arange(w, dtype=kind).unsqueeze(1), nbytes,
                torch.empty(dim), torch.empty(max(-(-dim // 2), w * words), dtype=torch.int64))
        return plan

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        # momentum correction only (QSGD is unbiased, no error feedback)
        flat = self.memory.corrected_flat(grads)
        self.memory.keep_flat(flat, transmitted=flat)
        plan = self._plan(shapes)
        n, s, w = flat.numel(), self.opts.levels, level_bits(self.opts.levels)
        nb = plan.counts.numel()
        wire = torch.empty(4 * nb + plan.nbytes, dtype=torch.uint8)
        norms = wire[: 4 * nb].view(torch.float32)
        mag = torch.abs(flat, out=plan.mag)
        sq = torch.mul(mag, mag, out=plan.sq)
        torch.sqrt(torch.segment_reduce(sq, "sum", lengths=plan.counts, unsafe=True), out=norms)
        # |v| / ||v|| * s + u, floored: level l with E[l] = s |v| / ||v|| (0 where the norm is 0)
        bits, large, clamped = plan.bits, n >= _LARGE, norms.clamp_min(1e-30)
        if large and plan.runs is not None:  # per run of buckets: no per-entry gather
            _per_bucket(torch._foreach_div_, mag.unsqueeze(0), clamped.unsqueeze(0), plan)
        else:
            mag.div_(clamped.index_select(0, plan.bucket_ids()))
        scaled = mag.mul_(s)
        gen = step_generator(self.seed, self.rank, self.step, 0x51534744)
        # uniform16's draws, fused: (h + 32768.5) * 2^-16 is exact, so adding it via alpha
        # rounds exactly like adding the uniform itself (on a large model the words go into
        # the bit buffer, free until the planes are cut)
        words = bits.view(torch.int64)[: (n + 3) // 4] if large else \
            torch.empty((n + 3) // 4, dtype=torch.int64)
        words.random_(-(1 << 63), (1 << 63) - 1, generator=gen)
        half = sq.copy_(words.view(torch.int16)[:n]).add_(32768.5)
        level = scaled.add_(half, alpha=1.0 / 65536).floor_().clamp_(0, s)
        # + 2^23: the integer level now sits in the low mantissa bits (an exact float add), so
        # its bits are read from the int32 view: no float -> int conversion
        low = level.add_(8388608.0).view(torch.int32)
        planes = bits[: w * n].view(w, n)
        if w <= 8:  # the levels as bytes, 8 to an int64: each shift cuts 8 entries' bit b
            lv = plan.levels
            lv[:n].copy_(low.view(torch.uint8)[0::4])
            cut = torch.bitwise_right_shift(lv.view(torch.int64).unsqueeze(0), plan.shifts,
                                            out=plan.cut)
            planes.copy_(cut.bitwise_and_(_LANES).view(torch.uint8).view(w, -1)[:, :n])
        else:
            planes.copy_(low.unsqueeze(0).bitwise_right_shift(plan.shifts).bitwise_and_(1))
        torch.lt(flat, 0, out=bits[w * n: (w + 1) * n].view(torch.bool))
        if large and bits.numel() > (w + 1) * n:  # the zero padding, overwritten last time
            bits[(w + 1) * n:].zero_()
        bits_to_bytes(bits, out=wire[4 * nb:], in_place=large)
        self._wire = wire
        return Message([norms, wire[4 * nb:]], {"shapes": shapes, "dim": n})

    def _decode_rows(self, norms: torch.Tensor, bits: torch.Tensor,
                     shapes: list[tuple[int, ...]], dim: int) -> list[torch.Tensor]:
        """The mean of ``k`` codes given as rows ``(k, buckets)`` fp32 norms and ``(k, bytes)``
        packed planes, all in one batch."""
        s, w, k = self.opts.levels, level_bits(self.opts.levels), norms.shape[0]
        if k > 1 and w <= 7:
            # +-level in int8: level * (1 - 2 sign), the factor looked up per byte of the sign
            # plane; a level 0 with sign 1 becomes +0 (the float path gave -0, which the sum
            # over the messages turns into +0 anyway)
            planes = unpack_planes(bits[:, : packed_size(dim, w)], dim, w)
            level = planes[:, 0]
            for b in range(1, w):
                level.add_(planes[:, b], alpha=1 << b)
            first = w * dim // 8
            factor = bytes_to_signs(bits[:, first:], -1)[:, w * dim - 8 * first:][:, :dim]
            value = level.view(torch.int8).mul_(factor).to(torch.float32)
        else:
            planes = unpack_planes(bits, dim, w + 1)
            value = combine_planes(planes[:, :w]).to(torch.float32)
            value.mul_(planes[:, w].to(torch.float32).mul_(-2.0).add_(1.0))
        _per_bucket(torch._foreach_mul_, value, norms, self._plan(shapes))
        out = value.sum(0) if k > 1 else value.view(-1)
        return unflatten(out.mul_(1.0 / (s * k)), shapes)

    def _decode_each(self, codes: list[tuple[torch.Tensor, torch.Tensor]],
                     shapes: list[tuple[int, ...]], dim: int) -> list[torch.Tensor]:
        """The mean of ``k`` > 1 codes ``(norms, packed planes)`` of a large model (``levels``
        <= 127), one message at a time into the plan's scratch buffers: its bytes unpacked
        by the table lookup into the bit buffer, the levels combined and signed in int8, as
        fp32 scaled per run of buckets and added to the sum, in the order of ``sum(0)``."""
        s, w, k = self.opts.levels, level_bits(self.opts.levels), len(codes)
        plan = self._plan(shapes)
        nb = packed_size(dim, w + 1)
        index, spread = plan.raw.view(torch.int32), plan.bits.view(torch.int64)
        level, value = plan.levels[:dim], plan.mag[:dim]
        out = None
        for norms, packed in codes:
            bits = bytes_to_bits(packed[:nb], index=index, out=spread)
            planes = bits[: (w + 1) * dim].view(w + 1, dim)
            if w == 1:
                level.copy_(planes[0])
            else:
                torch.add(planes[0], planes[1], alpha=2, out=level)
            for b in range(2, w):
                level.add_(planes[b], alpha=1 << b)
            # -level where the sign bit is set: (level ^ -1) + 1, in uint8 (a level 0 with
            # sign 1 gives +0, as the batched int8 path)
            sign = planes[w].neg_()
            value.copy_(level.bitwise_xor_(sign).sub_(sign).view(torch.int8))
            _per_bucket(torch._foreach_mul_, value.unsqueeze(0), norms.unsqueeze(0), plan)
            # the sum in the order of sum(0): (0 + v0) + v1 + ...; 0 + v0 = v0 + 0
            out = torch.add(value, 0.0) if out is None else out.add_(value)
        assert out is not None
        return unflatten(out.mul_(1.0 / (s * k)), shapes)

    def _large(self, k: int, dim: int) -> bool:
        return k > 1 and dim >= _LARGE and level_bits(self.opts.levels) <= 7

    def _decode_mean(self, msgs: list[Message]) -> list[torch.Tensor]:
        """The mean of the decoded messages, all in one batch (a large model: one by one)."""
        shapes, dim = msgs[0].meta["shapes"], msgs[0].meta["dim"]
        if self._large(len(msgs), dim):
            return self._decode_each([(m.tensors[0], m.tensors[1]) for m in msgs], shapes, dim)
        if len(msgs) == 1:
            norms, bits = msgs[0].tensors[0].unsqueeze(0), msgs[0].tensors[1].unsqueeze(0)
        else:
            norms = torch.stack([m.tensors[0] for m in msgs])
            bits = torch.stack([m.tensors[1] for m in msgs])
        return self._decode_rows(norms, bits, shapes, dim)

    def decode(self, msg: Message) -> list[torch.Tensor]:
        return self._decode_mean([msg])

    def aggregate(self, msgs: list[Message]) -> list[torch.Tensor]:
        return self._decode_mean(msgs)


def _per_bucket(op: Callable[..., Any], values: torch.Tensor, norms: torch.Tensor,
                plan: _Plan) -> None:
    """``op`` (e.g. ``torch._foreach_mul_``) of every entry of the ``(k, D)`` rows ``values``
    by its bucket's entry of the ``(k, buckets)`` rows ``norms``, in place: one foreach call
    over broadcast views, one per run of equal buckets (the 46k-entry CNN has 9 runs, ResNet-18
    with 512-entry buckets 33; with k = 4 rows this is half the cost of a per-entry gather of
    the norms, ~0.5 ns per entry, and on a large model far less even for one row; for one row
    of a small model ``encode`` gathers, which is cheaper there), or a gather when there are
    many runs."""
    k = values.shape[0]
    if plan.runs is None:
        op([values], [norms.index_select(1, plan.bucket_ids())])
        return
    runs = plan.runs
    cols = values.split([count * size for count, size in runs], dim=1)
    per = norms.split([count for count, _ in runs], dim=1)
    op([c.view(k, count, size) for c, (count, size) in zip(cols, runs, strict=True)],
       [p.unsqueeze(2) for p in per])


#: the low bit of each byte of an int64
_LANES = 0x0101010101010101


def _random_halves(n: int, gen: torch.Generator) -> torch.Tensor:
    """:func:`uniform16`'s raw draws: ``n`` int16 cut from n/4 random 64-bit words."""
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64,
                          generator=gen)
    return words.view(torch.int16)[:n]


def _runs(counts: tuple[int, ...], most: int = 32) -> list[tuple[int, int]] | None:
    """Maximal runs of equally sized consecutive buckets as (buckets, bucket size); None when
    there are more than ``most`` (then one per-entry gather is cheaper than a broadcast
    multiplication per run)."""
    runs: list[tuple[int, int]] = []
    for c in counts:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0] + 1, c)
        elif len(runs) == most:
            return None
        else:
            runs.append((1, c))
    return runs


@lru_cache(maxsize=16)
def _bucket_tensor(counts: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int64)


@lru_cache(maxsize=16)
def _bucket_ids(counts: tuple[int, ...]) -> torch.Tensor:
    c = _bucket_tensor(counts)
    return torch.repeat_interleave(torch.arange(c.numel()), c)
