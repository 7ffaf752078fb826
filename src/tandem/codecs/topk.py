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

Transfer: gathered (every worker picks different positions, so codes cannot be summed).
Bytes per worker per code: ``8 * k`` (fp32 value + int32 position per kept entry); an all-gather
moves ``(N - 1) * 8k`` per rank.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, register
from tandem.codecs.dense import unflatten


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def keep_count(n: int, ratio: float) -> int:
    """Entries kept of ``n`` at density ``ratio``: ceil, at least 1, at most n."""
    return max(1, min(n, math.ceil(ratio * n - 1e-9))) if n > 0 else 0


#: layers at most this long take a plain ``torch.topk``; longer ones a threshold pre-filter
SMALL = 4096
#: strided samples per long layer from which the pre-filter's threshold is read
SAMPLES = 512


@lru_cache(maxsize=64)
def _layout(sizes: tuple[int, ...], ratio: float) -> tuple[torch.Tensor, ...]:
    """Cached index tensors for :func:`select_topk` (one set per model and density)."""
    big = [i for i, n in enumerate(sizes) if n > SMALL]
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    sample = torch.cat([offs[i] + torch.arange(SAMPLES) * sizes[i] // SAMPLES for i in big]) \
        if big else torch.empty(0, dtype=torch.int64)
    # the sample rank of the threshold: ~3x the expected share of the top k, plus a margin of 4
    # (a deficit, fewer than k candidates above it, falls back to an exact torch.topk)
    rank = torch.tensor([min(SAMPLES - 1, math.ceil(3 * keep_count(sizes[i], ratio) * SAMPLES
                                                     / sizes[i]) + 4) for i in big])
    ks = torch.tensor([keep_count(sizes[i], ratio) for i in big])
    starts = torch.tensor([offs[i] for i in big])
    ends = torch.tensor([offs[i + 1] for i in big])
    return torch.tensor(big, dtype=torch.int64), sample, rank, ks, starts, ends


def _topk_long(mag: torch.Tensor, layout: tuple[torch.Tensor, ...]) -> list[torch.Tensor] | None:
    """Exact per-layer top-k of the long layers through a threshold pre-filter: a threshold
    below each layer's k-th largest (read from strided samples) keeps a few times k
    candidates, and an exact top-k among them is the exact top-k of the layer (ties aside).
    ``None`` when a threshold was too high (fewer than k candidates): the caller runs
    ``torch.topk`` on the whole layer instead."""
    big, sample, rank, ks, starts, ends = layout
    nb = big.numel()
    samp = mag[sample].view(nb, SAMPLES).sort(1, descending=True).values
    thr = samp.gather(1, rank.view(nb, 1)).view(nb)
    out = []
    for j in range(nb):
        seg = mag[int(starts[j]): int(ends[j])]
        cand = (seg >= thr[j]).nonzero().view(-1)
        k = int(ks[j])
        if cand.numel() < k:
            return None
        out.append(cand[seg[cand].topk(k, sorted=False).indices] + int(starts[j]))
    return out


def select_topk(flat: torch.Tensor, sizes: list[int], ratio: float,
                scope: str = "layer") -> torch.Tensor:
    """Positions (int64, into ``flat``) of the largest |entries|: per layer or global.

    Exact (the k largest, ties broken arbitrarily). Layers longer than :data:`SMALL` are
    pre-filtered by a sampled threshold (DGC's trick, kept exact: only the candidates above it
    are sorted), which is several times cheaper than ``torch.topk`` over the whole layer."""
    mag = flat.abs()
    if scope == "global":
        sizes = [flat.numel()]
    layout = _layout(tuple(sizes), float(ratio))
    long_parts = _topk_long(mag, layout) if layout[0].numel() else []
    parts, offset = [], 0
    big = set(layout[0].tolist())
    for i, n in enumerate(sizes):
        k = keep_count(n, ratio)
        if k and (i not in big or long_parts is None):
            parts.append(mag[offset: offset + n].topk(k, sorted=False).indices + offset)
        offset += n
    parts += long_parts or []
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def sent_masks(idx: torch.Tensor, dim: int, shapes: list[tuple[int, ...]]
               ) -> list[torch.Tensor | None]:
    """Per-layer boolean masks of the flat positions ``idx`` (momentum factor masking)."""
    mask = torch.zeros(dim, dtype=torch.bool)
    mask[idx.long()] = True
    return list(unflatten(mask, shapes))


def sparse_mean(values: list[torch.Tensor], indices: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Mean over workers of sparse vectors given as (values, positions)."""
    out = torch.zeros(dim, dtype=torch.float32)
    out.index_add_(0, torch.cat(indices).long(), torch.cat(values).float())
    return out / len(values)


class TopKOptions(CodecOptions):
    ratio: float = Field(0.01, gt=0, le=1, description="fraction of entries sent")
    scope: Literal["layer", "global"] = Field(
        "layer", description="keep ratio per layer, or of the whole gradient")
    error_feedback: bool = Field(True, description="accumulate what was not sent")
    warmup_steps: int = Field(0, ge=0, description="steps of DGC ramp from warmup_start to ratio")
    warmup_start: float = Field(0.25, gt=0, le=1, description="density at step 0 of the ramp")


@register
class TopKCodec(Codec):
    """topk: largest entries (fp32 values + int32 positions), error feedback, gathered."""

    name = "topk"
    transfer = "gather"
    error_feedback = True
    Options = TopKOptions

    def ratio_at(self, step: int) -> float:
        """Density at ``step``: exponential ramp during warm-up, then ``ratio``."""
        o = self.opts
        if step >= o.warmup_steps or o.warmup_start <= o.ratio:
            return o.ratio
        return o.warmup_start * (o.ratio / o.warmup_start) ** (step / o.warmup_steps)

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        flat = self.corrected_flat(grads)
        sizes = [numel(s) for s in shapes]
        idx = select_topk(flat, sizes, self.ratio_at(self.step), self.opts.scope)
        msg = Message([flat[idx], idx.to(torch.int32)], {"shapes": shapes, "dim": flat.numel()})
        self.keep_flat(flat, split=idx)
        return msg

    def decode(self, msg: Message) -> list[torch.Tensor]:
        out = torch.zeros(msg.meta["dim"], dtype=torch.float32)
        out[msg.tensors[1].long()] = msg.tensors[0]
        return unflatten(out, msg.meta["shapes"])

    def aggregate(self, msgs: list[Message]) -> list[torch.Tensor]:
        meta = msgs[0].meta
        out = sparse_mean([m.tensors[0] for m in msgs], [m.tensors[1] for m in msgs], meta["dim"])
        return unflatten(out, meta["shapes"])
