"""LGC-PS's compressed round (``variant="ps"``): the leader's latent plus per-worker innovations.

The leader broadcasts its ordered positions ``I``, its scale and its latent ``E(v_r)``. Every
worker predicts its own values with its own decoder, ``p_i = D_i(E(v_r))``, and sends only its
innovation: its least-squares gain ``a_i`` on ``p_i`` (one fp32, which makes the reconstruction
contractive, ``||v_i - a_i p_i|| <= ||v_i||``, so error feedback stays bounded) and the ``m``
positions of ``I`` where ``a_i p_i`` is worst, with their true values. In an all-reduce world
every rank plays the server: the innovations are all-gathered and each rank decodes all N.

Tuning: ``innovation_ratio`` sets ``m`` (the uplink); see docs/lgc.md.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from tandem.codecs.lgc.autoencoder import AETrainer, Ctx, rms
from tandem.codecs.positions import pack_positions, unpack_positions
from tandem.transport.packing import pack

if TYPE_CHECKING:
    from tandem.codecs.lgc.plan import Plan, RoundState


def ps_round(c: RoundState, x: torch.Tensor, dense: torch.Tensor, p: Plan, ctx: Ctx,
             ae: AETrainer, order: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """One compressed PS round: ``(mean on the compressed range, this worker's reconstruction
    on the positions ``c._sent_idx`` (for error feedback), the dense layers)``. ``order``: the
    leader's ordered top-k (None on the other ranks)."""
    lead = ctx.me == ctx.leader
    out = torch.zeros_like(x)
    extra = None
    t0 = time.perf_counter()
    if lead:
        s_r = rms(x[order])
        extra = [torch.stack([s_r]), ae.encode(x[order] / s_r)]
    lead_s = time.perf_counter() - t0
    idx, s, z = c.shared_positions(x, p, ctx, extra, [(torch.float32, (1,)),
                                                      (torch.float32, (p.z,))], order)
    t0 = time.perf_counter() - lead_s
    c._sent_idx = idx
    v = x[idx]
    preds = ae.decode_all(z).mul_(s)  # (N, K): every worker's prediction
    # This worker's least-squares gain on its prediction: gain * pred is the projection of v
    # onto pred, so ||v - gain * pred|| <= ||v|| whatever the decoder says. Without it a
    # prediction driven by the leader's latent and scale can exceed v many times over; error
    # feedback then keeps -pred, the next leader's scale grows with it, and the run diverges.
    mine = preds[ctx.me]
    gain = (v @ mine) / (mine @ mine).clamp_min(1e-30)
    err = (v - gain * mine).abs()
    pos = err.topk(p.m, sorted=False).indices
    code = pack([gain.reshape(1).float(), v[pos], pack_positions(pos, p.k)])
    t1 = time.perf_counter()
    msgs = ctx.all_gather(code) if ctx.n > 1 else [code]
    t2 = time.perf_counter()
    # all N innovations decoded at once: rows of (gain, m values, m packed positions)
    rows = torch.stack(msgs)
    gains = _floats(rows[:, :4])
    vals = _floats(rows[:, 4: 4 + 4 * p.m])
    where = unpack_positions(rows[:, 4 + 4 * p.m:], p.m, p.k)
    recon = preds.mul_(gains).scatter_(1, where, vals)
    out[idx] = recon.mean(0)
    c.codec_s.append((t1 - t0) + (time.perf_counter() - t2))
    return out, recon[ctx.me], dense


def _floats(cols: torch.Tensor) -> torch.Tensor:
    """``(N, 4j)`` bytes (columns of the gathered rows) -> ``(N, j)`` float32, via a fresh
    row-major copy: ``contiguous()`` keeps a one-row slice's row stride (N = 1, a single
    worker), which a byte -> float view refuses unless it happens to be a multiple of 4."""
    return torch.empty(cols.shape, dtype=torch.uint8).copy_(cols).view(torch.float32)
