"""LGC's rounds before the compressed stage: stage 1 (warm-up) and stage 2 (autoencoder training).

Stage 1 is plain top-k with error feedback at the DGC-ramped density of
:meth:`LGCCodec.warmup_ratio`, gathered (fp32 values and positions of ``ceil(log2 D)`` bits), so
the warm-up costs a few percent of dense instead of a dense warm-up's 100 %. Stage 2 exchanges
every worker's exact values on the leader's ordered top-k positions (all-gathered) and applies
their mean; each worker then takes one identical autoencoder step on the gathered vectors, so
every copy of the autoencoder stays the same without sending its weights.

Both return ``(mean on the compressed range, None)``: ``None`` tells the codec's error feedback
that the positions in ``c._sent_idx`` were sent exactly.

Tuning: ``warmup_start`` / ``warmup_fraction`` (stage 1), ``ae_fraction`` / ``ae_iters`` (stage 2;
more when ``describe()["ae_loss_last"]`` is still high); see docs/lgc.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tandem.codecs.lgc.autoencoder import Ctx, rms
from tandem.codecs.positions import pack_positions, positions_nbytes, unpack_positions
from tandem.codecs.topk import select_topk, sparse_mean
from tandem.transport.packing import pack, unpack

if TYPE_CHECKING:
    from tandem.codecs.lgc.plan import Plan, RoundState


def topk_round(c: RoundState, x: torch.Tensor, p: Plan, ctx: Ctx) -> tuple[torch.Tensor, None]:
    """Stage 1: top-k of ``x`` per layer at the ramped density (the same k on every worker),
    values and packed positions all-gathered, their sparse mean returned."""
    idx = select_topk(x, p.sizes, c.warmup_ratio(c.step))
    c._sent_idx = idx
    k, d = idx.numel(), x.numel()
    vals = x[idx]
    if ctx.n == 1:
        out = torch.zeros_like(x)
        out[idx] = vals
        return out, None
    bufs = ctx.all_gather(pack([vals, pack_positions(idx, d)]))
    specs = [(torch.float32, (k,)), (torch.uint8, (positions_nbytes(k, d),))]
    parts = [unpack(b, specs) for b in bufs]
    return sparse_mean([a for a, _ in parts], [unpack_positions(b, k, d) for _, b in parts],
                       d), None


def train_round(c: RoundState, x: torch.Tensor, p: Plan, ctx: Ctx) -> tuple[torch.Tensor, None]:
    """Stage 2: every worker's values on the leader's positions, gathered; their mean is
    applied and every worker takes the same autoencoder step on all of them (scaled by the
    leader's RMS, as the compressed rounds scale them)."""
    idx = c.shared_positions(x, p, ctx)[0]
    c._sent_idx = idx
    v = x[idx]
    vs = torch.stack(ctx.all_gather(v)) if ctx.n > 1 else v.unsqueeze(0)
    out = torch.zeros_like(x)
    out[idx] = vs.mean(0)
    scale = rms(vs[ctx.leader])
    c.trainer(p, ctx.n).train_step(vs / scale, ctx.leader, c.opts.ae_iters)
    return out, None
