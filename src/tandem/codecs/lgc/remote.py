"""LGC-PS on a real parameter server (M1 step 4): what a worker pushes and how it keeps its error
feedback, when the decoding happens on another machine.

The all-reduce emulation (:mod:`.ps`) lets every rank play the server. On a parameter server the
server decodes, so the protocol is stretched over the pull that answers each round:

* The server runs the schedule (warm-up, autoencoder training, compressed; :mod:`.psserver`)
  and, in every pull, tells each worker the stage of its next push, whether it leads it, the
  *support* ``I`` (the ordered top-k positions the last leader sent) and the training progress.
* **Warm-up**: every worker pushes its own top-k (ramped density, ``warmup_start -> ratio``),
  fp32 values and ``ceil(log2 Dc)``-bit positions, plus the dense layers.
* **Autoencoder training**: every worker pushes its exact values on ``I`` (K floats, no
  positions); the server applies their mean and trains the autoencoder on them.
* **Compressed**: every worker pushes only its *innovation*: the ``m`` entries of its values on
  ``I`` largest in magnitude (``u_i = TopK(g~_i, rho_in)`` placed on ``I``), fp32 values and
  ``ceil(log2 K)``-bit positions. The leader adds its latent ``z = E(v_r / s)`` (``Z ~ K/4``
  floats) and its scale ``s``. The server reconstructs worker i as
  ``a_i * s * D_i(z)`` with the innovation's entries exact (:mod:`.psserver`).
* The leader of every stage also pushes ordered top-k positions: the support of the next round
  (so non-leaders know ``I`` before they push: *design choice*), taken from its estimate of the
  next round's ``x`` (:meth:`PSWorkerCode._next_support`).

Error feedback: the residual is ``x = g + r`` minus what the server reconstructs of this
worker. In the warm-up and training stages that is known at push time (the sent entries, exact).
In the compressed stage the server's prediction ``a_i s D_i(z)`` is only known once the round is
decoded, so the residual first keeps ``x`` minus the innovation, and the pull that answers the
round brings ``(z, s, a_i)``: the worker decodes its own prediction with its copy of decoder
``D_i`` (the server sends the encoder and ``D_i`` once, when the compressed stage begins) and
subtracts it. Both ends compute ``a_i * (D_i(z) * s)`` with the same weights and the same
operations, so the residual is exactly ``x`` minus the server's reconstruction. ``ef_clip`` caps
the residual after each push and each correction. Codec ``momentum`` (DGC's momentum
correction; run the server's optimizer with momentum 0) keeps a velocity ``u = m u + g`` and
compresses ``u + r``; ``momentum_masking`` zeroes ``u`` on the sent entries (the whole support
in the compressed stage, as the all-reduce variant does).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from tandem.codecs.lgc.autoencoder import AETrainer, rms
from tandem.codecs.positions import pack_positions, positions_nbytes, unpack_positions
from tandem.codecs.topk import select_topk
from tandem.flat import flatten

if TYPE_CHECKING:
    from tandem.codecs.lgc.codec import LGCCodec
    from tandem.codecs.lgc.plan import Plan

#: pull extras' first tensor: [stage, lead, has support, has autoencoder, has correction,
#: progress]
INFO = 6


def dense_part(p: Plan, flat: torch.Tensor) -> torch.Tensor:
    """The dense (first and last) layers of a flat gradient, end to end."""
    if not p.dense:
        return flat.new_empty(0)
    return torch.cat([flat[: p.start], flat[p.stop:]])


def push_nbytes(p: Plan, stage: int, lead: bool, k_t: int | None = None) -> int:
    """Payload bytes of one LGC-PS push (what :meth:`PSWorkerCode.encode` returns), exactly.
    ``k_t``: the warm-up's ramped count (stage 1; None: a dense warm-up)."""
    dc = p.stop - p.start
    dense = 4 * (_numel(p) - dc)
    support = positions_nbytes(p.k, dc) if lead and p.k else 0
    if stage == 1:
        code = 4 * dc if k_t is None else 4 * k_t + positions_nbytes(k_t, dc)
        return code + dense + support
    if stage == 2:
        return 4 * p.k + dense + support
    latent = 4 * p.z + 4 if lead else 0
    return 4 * p.m + positions_nbytes(p.m, p.k) + dense + latent + support


def _numel(p: Plan) -> int:
    total = 0
    for s in p.shapes:
        n = 1
        for d in s:
            n *= int(d)
        total += n
    return total


def new_trainer(codec: LGCCodec, p: Plan, workers: int, seed: int | None = None) -> AETrainer:
    o = codec.opts
    return AETrainer(p.k, workers, channels=o.ae_channels, activation=o.activation,
                     lr=o.ae_lr, lambda1=o.lambda1, lambda2=o.lambda2,
                     seed=codec.seed if seed is None else seed)


def shipped_parameters(ae: AETrainer, worker: int) -> list[torch.nn.Parameter]:
    """What a worker needs of the autoencoder: the encoder (it may lead) and its decoder."""
    m = ae.model
    return list(m.encoder.parameters()) + list(m.decoders[worker].parameters())


class PSWorkerCode:
    """One worker's half of LGC-PS (see the module docstring)."""

    def __init__(self, codec: LGCCodec, index: int, workers: int,
                 shapes: list[tuple[int, ...]]) -> None:
        self.codec, self.opts = codec, codec.opts
        self.p = codec.plan(shapes)
        self.index, self.n = index, workers
        self.residual: torch.Tensor | None = None
        self.velocity: torch.Tensor | None = None  # codec momentum (``momentum`` > 0)
        self.stage = 1
        self.lead = index == codec.leader_at(0, workers)
        self.progress = 0
        self.support: torch.Tensor | None = None
        self.ae: AETrainer | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.unorm = 0.0
        self.pushes = [0, 0, 0]  # per stage
        self.corrections = 0
        self.codec_s = [0.0, 0.0, 0.0]  # per stage: encode + correction time (the codec's cost)

    # ---- pushing --------------------------------------------------------------------------
    def encode(self, grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], int, bool]:
        """``(tensors, stage, lead)`` of this push; updates the residual."""
        p, o = self.p, self.opts
        t0 = time.perf_counter()
        g = flatten([t.detach().float() for t in grads])
        if o.momentum:  # DGC momentum correction: compress u = m * u + g (masked where sent)
            g = g if self.velocity is None else self.velocity.mul_(o.momentum).add_(g)
            self.velocity = g
            g = g.clone()
        self.unorm = float(g.norm())
        stage = self.stage if p.k and (self.stage == 1 or self.support is not None) else 1
        lead = self.lead and bool(p.k)
        gc = g[p.start: p.stop].clone() if lead else None
        x = g if self.residual is None else g.add_(self.residual)
        xc = x[p.start: p.stop]
        dense = dense_part(p, x)
        sent: torch.Tensor | None  # positions of xc delivered exactly (None: all of xc)
        if stage == 1 and (o.warmup == "dense" or not p.k):
            out, sent = [xc.clone(), dense], None
        elif stage == 1:
            sent = select_topk(xc, p.sizes, self.codec.warmup_ratio(self.progress))
            out = [xc[sent], pack_positions(sent, xc.numel()), dense]
        elif stage == 2:
            assert self.support is not None
            sent = self.support
            out = [xc[sent], dense]
        else:
            assert self.support is not None
            v = xc[self.support]
            pos = v.abs().topk(p.m, sorted=False).indices
            out = [v[pos], pack_positions(pos, p.k), dense]
            if lead:
                s = rms(v)
                out += [self._trainer().encode(v / s), s.reshape(1)]
            self.pending = (self.support, pos)
            sent = self.support[pos]
        x[: p.start].zero_()
        x[p.stop:].zero_()
        if sent is None:
            xc.zero_()
        else:
            xc.index_fill_(0, sent, 0.0)
            # the whole support was delivered in stage 3 (reconstructed), as under all-reduce
            masked = self.support if stage == 3 else sent
            if self.velocity is not None and o.momentum_masking:
                self.velocity[p.start: p.stop].index_fill_(0, masked, 0.0)
        if gc is not None:  # the next support: where x will be largest next round
            out.append(pack_positions(self._next_support(xc, gc, stage), xc.numel()))
        self.residual = x
        self._cap()
        self.pushes[stage - 1] += 1
        self.codec_s[stage - 1] += time.perf_counter() - t0
        return out, stage, lead

    def _next_support(self, rest: torch.Tensor, gc: torch.Tensor, stage: int) -> torch.Tensor:
        """The leader's ordered top-k of its estimate of the next round's ``x``: what this push
        leaves in the residual (the support counted as delivered in the compressed stage) plus
        this round's gradient, as a guess at the next. Its own top-k of this round's ``x`` would
        name the entries every worker is just sending (*design choice*, docs/lgc.md)."""
        est = rest + gc  # one new buffer; on a delivered support the estimate is gc alone
        if stage == 3 and self.support is not None:
            est.index_copy_(0, self.support, gc.index_select(0, self.support))
        return self.codec.ordered_topk(est, self.p)

    def _cap(self) -> None:
        clip = self.opts.ef_clip
        if clip and self.residual is not None:
            rn, cap = float(self.residual.norm()), clip * self.unorm
            if rn > cap > 0:
                self.residual.mul_(cap / rn)

    def _trainer(self) -> AETrainer:
        if self.ae is None:  # before the server's weights arrive (never used to decode)
            self.ae = new_trainer(self.codec, self.p, self.n)
        return self.ae

    # ---- what the pull brings --------------------------------------------------------------
    @torch.no_grad()
    def pulled(self, extras: list[torch.Tensor]) -> None:
        """Take the server's word for the next push, the autoencoder, and this worker's
        correction for the round just decoded."""
        if not extras:  # the final model: nothing follows
            self.pending = None
            return
        p = self.p
        info = [int(v) for v in extras[0].tolist()]
        stage, lead, has_support, has_ae, has_corr, progress = info[:INFO]
        at = 1
        if has_support:
            self.support = unpack_positions(extras[at], p.k, p.stop - p.start)
            at += 1
        if has_ae:
            ae = self._trainer()
            torch.nn.utils.vector_to_parameters(extras[at], shipped_parameters(ae, self.index))
            ae._maps = None
            at += 1
        if has_corr and self.pending is not None and self.residual is not None:
            t0 = time.perf_counter()
            corr = extras[at]
            z, s, gain = corr[: p.z], corr[p.z], corr[p.z + 1]
            support, pos = self.pending
            pred = self._trainer().decode(z, self.index) * s
            mine = gain * pred
            mine[pos] = 0.0  # the innovation's entries were exact (already out of r)
            self.residual[p.start: p.stop].index_add_(0, support, mine, alpha=-1)
            self._cap()
            self.corrections += 1
            self.codec_s[2] += time.perf_counter() - t0
        self.pending = None
        self.stage, self.lead, self.progress = stage, bool(lead), progress

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"residual": self.residual, "velocity": self.velocity,
                "stage": self.stage, "lead": self.lead,
                "progress": self.progress, "support": self.support,
                "ae": None if self.ae is None else self.ae.state_dict(),
                "pending": None if self.pending is None else list(self.pending),
                "unorm": self.unorm, "pushes": list(self.pushes),
                "corrections": self.corrections}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residual, self.support = state["residual"], state["support"]
        self.velocity = state.get("velocity")
        self.stage, self.lead = int(state["stage"]), bool(state["lead"])
        self.progress, self.unorm = int(state["progress"]), float(state["unorm"])
        self.pending = None if state["pending"] is None else tuple(state["pending"])
        self.pushes, self.corrections = list(state["pushes"]), int(state["corrections"])
        if state["ae"] is not None:
            self._trainer().load_state_dict(state["ae"])

    def describe(self) -> dict[str, Any]:
        return {"pushes_per_stage": list(self.pushes), "corrections": self.corrections,
                "codec_ms_total_per_stage": [round(1e3 * t, 3) for t in self.codec_s],
                "residual_norm": None if self.residual is None else float(self.residual.norm())}
