"""LGC-RAR's compressed round (``variant="rar"``): latents averaged by one all-reduce, with the
leader's guard (``rar_fallback``).

The leader broadcasts its ordered positions ``I``, a scale and the ``m`` positions where its own
code is worst; every worker encodes its values on ``I``; the latents and the values at those
``m`` positions ride one all-reduce (with the dense layers); everyone decodes ``D(mean z)`` onto
``I`` and puts the exact means at the ``m`` positions.

Guard: the leader checks its own code, the error of ``D(E(v_r))`` with the m fix-ups, against
its norm (``worse_than_none``) or against the same bytes spent on exact values, its ``Z + m``
largest entries (``best``). When the code loses, the round falls back to exact values: the
leader sends its positions ordered by magnitude and every worker's values on the first ``Z + m``
of them are averaged by the same all-reduce, in the slots the latent and the fix-ups would have
used (same bytes). The flag travels as the sign of the scale (free). A fallback round is a plain
top-k split of the entries, so it is contractive for every worker.

Tuning: ``rar_fallback``; ``describe()["rar_fallbacks"]`` near the number of compressed steps
means the autoencoder never beats exact values at its byte budget (see docs/lgc.md).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from tandem.codecs.lgc.autoencoder import AETrainer, Ctx, rms
from tandem.codecs.positions import pack_positions, positions_nbytes, unpack_positions

if TYPE_CHECKING:
    from tandem.codecs.lgc.plan import Plan, RoundState


def rar_round(c: RoundState, x: torch.Tensor, dense: torch.Tensor, p: Plan, ctx: Ctx,
              ae: AETrainer, order: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """One compressed RAR round: ``(mean on the compressed range, this worker's
    reconstruction on the positions ``c._sent_idx`` (None: its exact values; for error
    feedback), the mean of the dense layers)``."""
    lead = ctx.me == ctx.leader
    out = torch.zeros_like(x)
    t0 = time.perf_counter()
    extra = None
    nx = p.z + p.m  # exact values that fit in the latent's and the fix-ups' slots
    if lead:  # scale, and the m positions where the leader's own code is worst
        assert order is not None
        v_r = x[order]
        s_r = rms(v_r)
        err = v_r - ae.decode(ae.encode(v_r / s_r)) * s_r
        fix = err.abs().topk(p.m, sorted=False).indices
        if fall_back(c.opts.rar_fallback, v_r, err, fix, nx):
            order = order[v_r.abs().argsort(descending=True, stable=True)]
            s_r, fix = -s_r, torch.zeros_like(fix)
        extra = [torch.stack([s_r]), pack_positions(fix, p.k)]
    lead_s = time.perf_counter() - t0
    idx, s, fix = c.shared_positions(x, p, ctx, extra, [
        (torch.float32, (1,)), (torch.uint8, (positions_nbytes(p.m, p.k),))], order)
    t0 = time.perf_counter()
    nd = dense.numel()
    if float(s) < 0:  # fallback: exact values on the leader's nx largest positions
        c.fallbacks += 1
        idx = idx[:nx]
        c._sent_idx = idx
        v = x[idx]
        buf = torch.cat([dense, v])
        spent = lead_s + time.perf_counter() - t0
        if ctx.n > 1:
            buf = ctx.all_reduce(buf).wait() / ctx.n
        out[idx] = buf[nd:]
        c.codec_s.append(spent)
        return out, None, buf[:nd]
    fix = unpack_positions(fix, p.m, p.k)
    c._sent_idx = idx
    v = x[idx]
    z = ae.encode(v / s)
    mine = ae.decode(z) * s
    mine[fix] = v[fix]
    spent = lead_s + time.perf_counter() - t0
    buf = torch.cat([dense, z, v[fix]])
    if ctx.n > 1:
        buf = ctx.all_reduce(buf).wait() / ctx.n
    t0 = time.perf_counter()
    got = ae.decode(buf[nd: nd + p.z]) * s
    got[fix] = buf[nd + p.z:]
    out[idx] = got
    c.codec_s.append(spent + time.perf_counter() - t0)
    return out, mine, buf[:nd]


def fall_back(mode: str, v_r: torch.Tensor, err: torch.Tensor, fix: torch.Tensor,
              nx: int) -> bool:
    """The leader's guard: is its latent code (``err`` = its error, zero at the m fix-ups
    ``fix``) worse than the alternative ``mode`` names (``rar_fallback``)?"""
    if mode == "off":
        return False
    e_code = err.index_fill(0, fix, 0.0).norm()
    if mode == "worse_than_none":
        return bool(e_code >= v_r.norm())
    e_exact = v_r.abs().topk(min(nx, v_r.numel()), sorted=False).values.pow(2).sum()
    return bool(e_code.pow(2) > v_r.pow(2).sum() - e_exact)
