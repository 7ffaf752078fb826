"""topk: send only the largest-magnitude gradient entries (values + int32 positions), with
error feedback, per layer or over the whole gradient, with an optional DGC-style warm-up ramp.

When to use: bandwidth-starved links (≤ 1 Gbit/s) and models whose gradients are dominated by a
few large entries. With error feedback (default) the entries not sent are accumulated locally and
sent later, so convergence stays close to dense even at ``ratio`` = 0.001 (Deep Gradient
Compression, Lin et al. 2018). Tuning:

* ``ratio``: 0.01 is a safe start; 0.001 cuts bytes 10x more and usually needs the warm-up.
* ``scope``: ``layer`` (default) keeps ``ceil(ratio * n_l)`` entries of every layer, so no layer
  starves; ``global`` keeps the ``ceil(ratio * D)`` largest overall (fewer bytes spent on layers
  with tiny gradients, but small layers may never be sent until their residual grows).
* ``warmup_steps``/``warmup_start``: the density decays exponentially from ``warmup_start`` to
  ``ratio`` over the first steps (DGC uses 0.25 -> 0.001 over 4 epochs), which keeps the early,
  fast-changing phase of training close to dense.
* ``ef_clip`` (default 0, off): cap the residual's norm at ``ef_clip`` x this step's gradient
  norm. At 0.001 an entry can wait hundreds of steps and land as one burst; on the benchmark
  CNN right after a 40-step ramp to 0.001 that burst threw the model back to 0.14 test
  accuracy before it recovered. A cap of 1-4 removed the dip but ended 8-10 points lower after
  400 steps (it forgets what it clips), so it is off by default: use it when a run must never
  regress, not for the best final accuracy.

* ``positions``: ``int32`` (default) or ``packed``, ``ceil(log2 D)`` bits each
  (:mod:`tandem.codecs.positions`; 16 bits on a model under 65,536 parameters). Packed is
  LGC's encoding: use it to compare the two at the same bytes; it costs a pack and an unpack.

Transfer: gathered (every worker picks different positions, so codes cannot be summed).
Bytes per worker per code: ``8 * k`` (fp32 value + int32 position per kept entry), or
``4 * k + ceil(k * ceil(log2 D) / 8)`` packed; an all-gather moves ``N - 1`` codes per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, group_rank, register
from tandem.codecs.memory import ErrorFeedback
from tandem.codecs.positions import pack_positions, positions_nbytes, unpack_positions
from tandem.flat import unflatten

if TYPE_CHECKING:
    from tandem.codecs.collectives import Collectives
    from tandem.transport.transport import Group


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def keep_count(n: int, ratio: float) -> int:
    """Entries kept of ``n`` at density ``ratio``: ceil, at least 1, at most n."""
    return max(1, min(n, math.ceil(ratio * n - 1e-9))) if n > 0 else 0


#: layers at most this long take a plain ``torch.topk``; longer ones a threshold pre-filter
SMALL = 4096
#: strided samples per long layer from which the pre-filter's threshold is read
SAMPLES = 512


@dataclass(frozen=True)
class _Plan:
    """Everything :func:`select_topk` needs for one model and density, as Python ints and
    cached tensors, so a call does no ``.item()``/``.tolist()`` on its own bookkeeping."""

    small: tuple[tuple[int, int, int], ...]  # (start, end, k) of the short layers (k > 0)
    big: tuple[tuple[int, int, int], ...]  # (start, end, k) of the long layers
    every: tuple[tuple[int, int, int], ...]  # (start, end, k) of every layer with k > 0
    sample: torch.Tensor  # strided sample positions of the long layers
    ranks: tuple[int, ...]  # per long layer, the sample rank of its threshold
    top: int  # 1 + the largest rank: how many sorted samples per long layer are read
    offsets: torch.Tensor  # per kept entry (short layers, then long ones): its layer's start


@lru_cache(maxsize=64)
def _plan(sizes: tuple[int, ...], ratio: float) -> _Plan:
    """Cached layout for :func:`select_topk` (one per model and density)."""
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    rows = [(offs[i], offs[i + 1], keep_count(n, ratio)) for i, n in enumerate(sizes)]
    big = tuple(r for r, n in zip(rows, sizes, strict=True) if n > SMALL)
    small = tuple(r for r, n in zip(rows, sizes, strict=True) if n <= SMALL and r[2])
    sample = torch.cat([s + torch.arange(SAMPLES) * (e - s) // SAMPLES for s, e, _ in big]) \
        if big else torch.empty(0, dtype=torch.int64)
    # the sample rank of the threshold: ~3x the expected share of the top k, plus a margin of 4
    # (a deficit, fewer than k candidates above it, falls back to an exact torch.topk)
    ranks = tuple(min(SAMPLES - 1, math.ceil(3 * k * SAMPLES / (e - s)) + 4) for s, e, k in big)
    offsets = torch.tensor([s for s, _, k in small + big for _ in range(k)], dtype=torch.int64)
    return _Plan(small, big, tuple(r for r in rows if r[2]), sample, ranks,
                 max(ranks, default=-1) + 1, offsets)


def select_topk(flat: torch.Tensor, sizes: list[int], ratio: float,
                scope: str = "layer") -> torch.Tensor:
    """Positions (int64, into ``flat``) of the largest |entries|: per layer or global.

    Exact (the k largest, ties broken arbitrarily); the short layers' positions come first,
    then the long layers'. Layers longer than :data:`SMALL` are pre-filtered by a sampled
    threshold (DGC's trick, kept exact): a threshold below the layer's k-th largest, read
    from strided samples, keeps a few times k candidates, and an exact top-k among them is the
    exact top-k of the layer. That is several times cheaper than ``torch.topk`` over the
    whole layer; if a threshold was too high (fewer than k candidates) the call falls back to
    ``torch.topk`` on every layer. Cost: about 4 tensor operations per short layer and 6 per
    long one, the layer offsets added by one cached tensor."""
    mag = flat.abs()
    if scope == "global":
        sizes = [flat.numel()]
    plan = _plan(tuple(sizes), float(ratio))
    parts = [mag[s:e].topk(k, sorted=False).indices for s, e, k in plan.small]
    if plan.big:
        nb = len(plan.big)
        # the (rank+1)-th largest sample of each long layer (topk's sorted values = sort's)
        tops = mag.index_select(0, plan.sample).view(nb, SAMPLES).topk(plan.top, 1).values.tolist()
        for (s, e, k), row, rank in zip(plan.big, tops, plan.ranks, strict=True):
            seg = mag[s:e]
            cand = (seg >= row[rank]).nonzero().view(-1)
            if cand.numel() < k:
                parts = [mag[s:e].topk(k, sorted=False).indices + s for s, e, k in plan.every]
                return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
            parts.append(cand[seg[cand].topk(k, sorted=False).indices])
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(parts).add_(plan.offsets)


def sparse_mean(values: list[torch.Tensor], indices: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Mean over workers of sparse vectors given as (values, positions)."""
    out = torch.zeros(dim, dtype=torch.float32)
    out.index_add_(0, torch.cat(indices).long(), torch.cat(values).float())
    return out / len(values)


#: default residual cap of top-k (see :meth:`ErrorFeedback.cap_residual`)
EF_CLIP = 0.0


class TopKOptions(CodecOptions):
    ratio: float = Field(0.01, gt=0, le=1, description="fraction of entries sent")
    scope: Literal["layer", "global"] = Field(
        "layer", description="keep ratio per layer, or of the whole gradient")
    error_feedback: bool = Field(True, description="accumulate what was not sent")
    warmup_steps: int = Field(0, ge=0, description="steps of DGC ramp from warmup_start to ratio")
    warmup_start: float = Field(0.25, gt=0, le=1, description="density at step 0 of the ramp")
    ef_clip: float = Field(EF_CLIP, ge=0, description="cap the residual's norm at ef_clip x "
                           "the norm of this step's (momentum-corrected) gradient; 0 = off")
    positions: Literal["int32", "packed"] = Field(
        "int32", description="int32 positions, or packed in ceil(log2 D) bits (LGC's encoding)")


@register
class TopKCodec(Codec):
    """topk: largest entries (fp32 values + int32 or packed positions), error feedback,
    gathered."""

    name = "topk"
    transfer = "gather"
    error_feedback = True
    Options = TopKOptions

    def new_memory(self) -> ErrorFeedback:
        o = self.opts
        return ErrorFeedback(o.momentum, o.momentum_masking, residual=o.error_feedback,
                             clip=o.ef_clip)

    def ratio_at(self, step: int) -> float:
        """Density at ``step``: exponential ramp during warm-up, then ``ratio``."""
        o = self.opts
        if step >= o.warmup_steps or o.warmup_start <= o.ratio:
            return o.ratio
        return o.warmup_start * (o.ratio / o.warmup_start) ** (step / o.warmup_steps)

    def _encode(self, grads: list[torch.Tensor]) -> tuple[Message, torch.Tensor]:
        """The message and its packed bytes: values and positions are written straight into
        one uint8 buffer (the wire format of ``Message.pack``), so exchange packs nothing."""
        shapes = [tuple(g.shape) for g in grads]
        flat = self.memory.corrected_flat(grads)
        sizes = [numel(s) for s in shapes]
        idx = select_topk(flat, sizes, self.ratio_at(self.step), self.opts.scope)
        k, dim = idx.numel(), flat.numel()
        width = positions_nbytes(k, dim) if self.opts.positions == "packed" else 4 * k
        packed = torch.empty(4 * k + width, dtype=torch.uint8)
        vals = packed[: 4 * k].view(torch.float32)
        torch.index_select(flat, 0, idx, out=vals)
        pos = packed[4 * k:]
        if self.opts.positions == "packed":
            pos.copy_(pack_positions(idx, dim))
        else:
            pos = pos.view(torch.int32)
            pos.copy_(idx)
        msg = Message([vals, pos], {"shapes": shapes, "dim": dim})
        self.memory.keep_flat(flat, split=idx)
        self.memory.cap_residual()
        return msg, packed

    def _positions(self, buf: torch.Tensor, k: int, dim: int) -> torch.Tensor:
        """The positions of a code's position part (``uint8`` bytes, or ``int32``)."""
        if self.opts.positions == "packed":  # on the wire and in a message: uint8 bytes
            return unpack_positions(buf, k, dim)
        return _view(buf, torch.int32) if buf.dtype == torch.uint8 else buf

    def encode(self, grads: list[torch.Tensor]) -> Message:
        return self._encode(grads)[0]

    def decode(self, msg: Message) -> list[torch.Tensor]:
        vals, dim = msg.tensors[0], msg.meta["dim"]
        out = torch.zeros(dim, dtype=torch.float32)
        out[self._positions(msg.tensors[1], vals.numel(), dim).long()] = vals
        return unflatten(out, msg.meta["shapes"])

    def add_decoded(self, msg: Message, flat: torch.Tensor) -> None:
        """The kept entries added at their positions (no two are the same position, so this
        is bit for bit the dense decode's sum)."""
        vals = msg.tensors[0]
        flat.index_add_(0, self._positions(msg.tensors[1], vals.numel(), msg.meta["dim"]).long(),
                        vals.float())

    def aggregate(self, msgs: list[Message]) -> list[torch.Tensor]:
        meta = msgs[0].meta
        out = sparse_mean([m.tensors[0] for m in msgs],
                          [self._positions(m.tensors[1], m.tensors[0].numel(), meta["dim"])
                           for m in msgs], meta["dim"])
        return unflatten(out, meta["shapes"])

    def exchange(self, grads: list[torch.Tensor], transport: Collectives,
                 group: Group | None = None) -> list[torch.Tensor]:
        """:meth:`Codec.exchange` for top-k, with the gathered codes read in place: each
        worker's bytes are viewed as (values, positions), not unpacked into copies, and added
        into the mean by one ``index_add_`` per worker, in worker order (the same sums, in the
        same order, as :func:`sparse_mean`)."""
        self.rank, size = group_rank(transport, group)
        msg, packed = self._encode(grads)
        self.step += 1
        if size == 1:
            return self.decode(msg)
        bufs = transport.all_gather(packed, group=group).wait()
        k, dim = msg.tensors[0].numel(), msg.meta["dim"]
        out = torch.zeros(dim, dtype=torch.float32)
        for b in bufs:
            if b.numel() != packed.numel():
                raise ValueError(f"top-k code of {b.numel()} bytes, expected {packed.numel()}")
            out.index_add_(0, self._positions(b[4 * k:], k, dim), _view(b[: 4 * k], torch.float32))
        return unflatten(out.div_(len(bufs)), msg.meta["shapes"])


def _view(chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``chunk`` (uint8) read as ``dtype`` without a copy when its alignment allows."""
    try:
        return chunk.view(dtype)
    except RuntimeError:
        return chunk.clone().view(dtype)
