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

Cost (whole-buffer operations on one flat fp32 buffer; on the 46k-entry CNN with 4 ranks
about half of the previous implementation's time, and bit for bit the same codes and means):
the bucket norms come from one ``segment_reduce`` (a sequential fp32 sum, ~1 ns per entry, kept
for its exact rounding), the per-entry norm from one cached index; the rounding noise is 16 bits
per entry cut from 64-bit random words (a quarter of the generator calls of one fp32 uniform per
entry; the bias this grid adds is below 2^-17 of one level, far inside the Monte-Carlo test's
bound). The level is read from the float's mantissa after adding 2^23 (no float -> int
conversion) and cut into bit planes 8 entries at a time through int64 lanes, written into a
reused zero-padded bit buffer, and packed straight into the wire buffer (norms then planes, the
layout :meth:`Message.pack` gives). ``exchange`` sends that buffer and decodes the gathered ones
as rows of one stacked tensor; the decode is batched: bit planes unpacked together (one table
lookup per byte, the largest single cost), levels combined and signed in int8 (for
``levels`` <= 127), then each run of equal buckets scaled by a broadcast view of its norms in
one ``_foreach_mul_`` and the messages summed. What remains is mostly per-entry floors: the
sequential norm sum, the random words, the unpack lookup, the fp32 sum over messages. Tuning
for speed: ``bucket_size`` 0 or a multiple of the layer sizes keeps the runs few (more than 32
runs fall back to a per-entry gather).

Transfer: gathered. Bytes per code: ``4 * n_buckets + ceil(D * (w + 1) / 8)`` with
``w = ceil(log2(levels + 1))`` bits per level plus one sign bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from tandem.codecs.base import (
    Codec,
    CodecOptions,
    Message,
    group_rank,
    register,
    step_generator,
    unflat,
)
from tandem.codecs.bits import (
    bits_to_bytes,
    bytes_to_signs,
    combine_planes,
    packed_size,
    unpack_planes,
)
from tandem.codecs.topk import numel

if TYPE_CHECKING:
    from tandem.transport.group import Group, Transport


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
    instances: the scratch buffers are written on every call)."""

    counts: torch.Tensor  # bucket sizes (int64)
    ids: torch.Tensor  # the bucket of every entry
    runs: list[tuple[int, int]] | None  # runs of equal buckets: (buckets, bucket size)
    bits: torch.Tensor  # uint8 bit planes, padded to whole bytes (the tail stays 0)
    levels: torch.Tensor  # uint8 levels, padded to whole int64 words
    shifts: torch.Tensor  # (w, 1) shifts that cut a level into its bit planes
    nbytes: int


class QSGDOptions(CodecOptions):
    levels: int = Field(15, ge=1, le=32767, description="magnitude levels s (15: 4 bits + sign)")
    bucket_size: int = Field(512, ge=0, description="entries per norm; 0 = one norm per layer")


@register
class QSGDCodec(Codec):
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
            plan = plans[key] = _Plan(
                _bucket_tensor(counts), _bucket_ids(counts), _runs(counts),
                torch.zeros(nbytes * 8, dtype=torch.uint8),
                torch.zeros(-(-dim // 8) * 8, dtype=torch.uint8),
                torch.arange(w, dtype=kind).unsqueeze(1), nbytes)
        return plan

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        # momentum correction only (QSGD is unbiased, no error feedback)
        flat = self.corrected_flat(grads)
        self.keep_flat(flat, transmitted=flat)
        plan = self._plan(shapes)
        n, s, w = flat.numel(), self.opts.levels, level_bits(self.opts.levels)
        nb = plan.counts.numel()
        wire = torch.empty(4 * nb + plan.nbytes, dtype=torch.uint8)
        norms = wire[: 4 * nb].view(torch.float32)
        mag = flat.abs()
        torch.sqrt(torch.segment_reduce(mag * mag, "sum", lengths=plan.counts, unsafe=True),
                   out=norms)
        # |v| / ||v|| * s + u, floored: level l with E[l] = s |v| / ||v|| (0 where the norm is 0)
        scaled = mag.div_(norms.clamp_min(1e-30).index_select(0, plan.ids)).mul_(s)
        gen = step_generator(self.seed, self.rank, self.step, 0x51534744)
        # uniform16's draws, fused: (h + 32768.5) * 2^-16 is exact, so adding it via alpha
        # rounds exactly like adding the uniform itself
        half = _random_halves(n, gen).to(torch.float32).add_(32768.5)
        level = scaled.add_(half, alpha=1.0 / 65536).floor_().clamp_(0, s)
        # + 2^23: the integer level now sits in the low mantissa bits (an exact float add), so
        # its bits are read from the int32 view: no float -> int conversion
        low = level.add_(8388608.0).view(torch.int32)
        bits = plan.bits
        planes = bits[: w * n].view(w, n)
        if w <= 8:  # the levels as bytes, 8 to an int64: each shift cuts 8 entries' bit b
            lv = plan.levels
            lv[:n].copy_(low.view(torch.uint8)[0::4])
            cut = lv.view(torch.int64).unsqueeze(0).bitwise_right_shift(plan.shifts)
            planes.copy_(cut.bitwise_and_(_LANES).view(torch.uint8).view(w, -1)[:, :n])
        else:
            planes.copy_(low.unsqueeze(0).bitwise_right_shift(plan.shifts).bitwise_and_(1))
        torch.lt(flat, 0, out=bits[w * n: (w + 1) * n].view(torch.bool))
        bits_to_bytes(bits, out=wire[4 * nb:])
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
        return unflat(out.mul_(1.0 / (s * k)), shapes)

    def _decode_mean(self, msgs: list[Message]) -> list[torch.Tensor]:
        """The mean of the decoded messages, all in one batch."""
        shapes, dim = msgs[0].meta["shapes"], msgs[0].meta["dim"]
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

    def exchange(self, grads: list[torch.Tensor], transport: Transport,
                 group: Group | None = None) -> list[torch.Tensor]:
        """:meth:`Codec.exchange`'s gather path with the same bytes on the wire (norms then
        planes, as :meth:`Message.pack` lays them out), without re-packing our code or
        splitting every gathered buffer into fresh tensors: the buffers are stacked once and
        decoded as rows."""
        self.rank, size = group_rank(transport, group)
        msg = self.encode(grads)
        self.step += 1
        if size == 1:
            return self.decode(msg)
        bufs = transport.all_gather(self._wire, group=group).wait()
        rows = torch.stack(bufs)
        cut = 4 * msg.tensors[0].numel()
        norms = rows[:, :cut].contiguous().view(torch.float32)
        return self._decode_rows(norms, rows[:, cut:], msg.meta["shapes"], msg.meta["dim"])


def _per_bucket(op: Callable[..., Any], values: torch.Tensor, norms: torch.Tensor,
                plan: _Plan) -> None:
    """``op`` (e.g. ``torch._foreach_mul_``) of every entry of the ``(k, D)`` rows ``values``
    by its bucket's entry of the ``(k, buckets)`` rows ``norms``, in place: one foreach call
    over broadcast views, one per run of equal buckets (the 46k-entry CNN has 9 runs; with
    k = 4 rows this is half the cost of a per-entry gather of the norms, ~0.5 ns per entry; with
    one row the gather wins, so ``encode`` gathers), or a gather when there are many runs."""
    if plan.runs is None:
        op([values], [norms.index_select(1, plan.ids)])
        return
    k, runs = values.shape[0], plan.runs
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
