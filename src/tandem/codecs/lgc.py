"""lgc: Learned Gradient Compression (M1): top-k with error feedback whose values are encoded by
an autoencoder trained online, so that what the workers' gradients share travels once.

Method (Abrahamyan & Deligiannis, patent EP3920097 and arXiv 2103.08870; see docs/lgc.md):

1. ``x = g + r`` (error feedback); the first and last layers travel dense (``dense_first_last``);
   the rest are sparsified per layer to ``K = sum ceil(ratio * n_l)`` entries.
2. Three stages over the run (``total_steps``, set by the strategy via ``set_total_steps``):
   warm-up (``warmup_fraction``; top-k with a DGC density ramp ``warmup_start`` -> ``ratio``, so
   the whole run stays cheap, or dense), autoencoder
   training (``ae_fraction``; a leader's top-k positions are broadcast, every worker's values on
   them are all-gathered, the mean is applied and every worker takes one identical training step
   on the gathered vectors), compressed (the rest; the autoencoder is frozen).
3. ``variant="rar"`` (all-reduce): the leader broadcasts its positions I, a scale and the
   ``m = ceil(innovation_ratio * D)`` positions where its own code is worst; every worker encodes
   its values on I to a latent of ~K/4 floats; the latents and the values at the m positions are
   all-reduced (mean) and everyone decodes ``D(mean z)`` onto I, exact at the m positions.
   ``variant="ps"``: the leader broadcasts I, the scale and its latent ``E(v_r)``; each worker
   predicts its own values with its decoder ``p_i = D_i(E(v_r))`` and sends only its innovation:
   its least-squares gain ``a_i`` on ``p_i`` (one float, which makes the reconstruction
   contractive so error feedback stays bounded) and the m positions where ``a_i p_i`` is worst,
   with their true values; every worker (the emulated server) decodes all N and averages.
4. Error feedback keeps ``x - (what the group reconstructs of this worker's values)``.

Design choices (documented in docs/lgc.md): the leader sends its positions *ordered by its own
values* (the order of a set that is sent anyway costs nothing), which turns every worker's value
vector into a near-monotone curve that a small convolutional autoencoder compresses well; the
autoencoder is linear by default (``activation="none"``), so ``D(mean z) = mean D(z_i)`` and the
RAR average is exactly the mean of what each worker's error feedback assumed; RAR's m exact
positions keep the error feedback from growing where the autoencoder is systematically short.

Tuning: ``ratio`` sets K (1e-3 in the paper); ``innovation_ratio`` the PS uplink; longer
``ae_fraction`` or ``ae_iters`` > 1 when the loss (``describe()["ae_loss_last"]``) is still high.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, group_rank, register
from tandem.codecs.dense import flatten, unflatten
from tandem.codecs.lgc_ae import AETrainer, Ctx, latent_size, mean_ms, rms
from tandem.codecs.topk import keep_count, numel, select_topk, sparse_mean
from tandem.transport.packing import pack, unpack

if TYPE_CHECKING:
    from tandem.transport.group import Group, Transport


class LGCOptions(CodecOptions):
    variant: Literal["ps", "rar"] = Field("rar", description="ps: leader latent + innovations; "
                                          "rar: all-reduced latents")
    ratio: float = Field(1e-3, gt=0, le=1, description="rho: top-k density per compressed layer")
    innovation_ratio: float = Field(1e-5, gt=0, le=1, description="rho_in: innovation entries "
                                    "per worker, fraction of compressed D (ps; at least 1)")
    dense_first_last: bool = Field(True, description="send the first and last layers dense")
    warmup: Literal["topk", "dense"] = Field("topk", description="what stage 1 sends")
    warmup_start: float = Field(0.05, gt=0, le=1, description="top-k warm-up: density at step 0, "
                                "decaying exponentially to ratio over stage 1 (DGC ramp; set it "
                                "to ratio for a flat warm-up)")
    warmup_fraction: float = Field(0.1, ge=0, le=1, description="stage 1 share of total_steps")
    ae_fraction: float = Field(0.2, ge=0, le=1, description="stage 2 share of total_steps")
    total_steps: int | None = Field(None, ge=1, description="run length (else set by strategy)")
    warmup_steps: int | None = Field(None, ge=0, description="stage 1 length (overrides fraction)")
    ae_steps: int | None = Field(None, ge=0, description="stage 2 length (overrides fraction)")
    lambda1: float = Field(0.5, ge=0, description="weight of the reconstruction loss")
    lambda2: float = Field(0.5, ge=0, description="weight of the cross-worker code similarity")
    ae_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the autoencoder")
    ae_channels: int = Field(16, ge=1, description="hidden channels of the conv autoencoder")
    ae_iters: int = Field(1, ge=1, description="autoencoder training steps per stage-2 round")
    activation: Literal["none", "leaky_relu"] = Field("none", description="between conv layers")
    leader: Literal["rotating", "fixed"] = Field("rotating", description="rotating: step mod N; "
                                                 "fixed: rank 0")


@dataclass
class Plan:
    shapes: list[tuple[int, ...]]
    dense: list[int]
    comp: list[int]
    sizes: list[int]
    k: int
    m: int
    z: int


@register
class LGCCodec(Codec):
    """lgc: top-k + online conv autoencoder; leader-led (ps: innovations, rar: latent mean)."""

    name = "lgc"
    transfer = "led"
    error_feedback = True
    Options = LGCOptions

    def __init__(self, options: Any = None, *, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self.ae: AETrainer | None = None
        self.codec_s: list[float] = []
        self.resyncs = 0
        self.synced = False
        self._sent_idx: torch.Tensor | None = None

    # ---- plan and stages --------------------------------------------------------------------
    def plan(self, shapes: list[tuple[int, ...]]) -> Plan:
        o = self.opts
        multi = [i for i, s in enumerate(shapes) if len(s) >= 2]
        dense: set[int] = set()
        if o.dense_first_last and multi:
            dense |= set(range(0, multi[1] if len(multi) > 1 else len(shapes)))
            dense |= set(range(multi[-1], len(shapes)))
        comp = [i for i in range(len(shapes)) if i not in dense]
        sizes = [numel(shapes[i]) for i in comp]
        k = sum(keep_count(n, o.ratio) for n in sizes)
        m = min(k, max(1, math.ceil(o.innovation_ratio * sum(sizes) - 1e-9)))
        return Plan(shapes, sorted(dense), comp, sizes, k, m, latent_size(k) if k else 0)

    def stage_lengths(self) -> tuple[int, int]:
        o = self.opts
        total = o.total_steps or self.total_steps
        if total is None and (o.warmup_steps is None or o.ae_steps is None):
            from tandem.errors import ConfigError
            raise ConfigError("lgc: stage lengths unknown; set the codec option total_steps (or "
                              "warmup_steps and ae_steps), or call set_total_steps(n)")
        w = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_fraction * total)
        a = o.ae_steps if o.ae_steps is not None else round(o.ae_fraction * total)
        return w, a

    def stage_at(self, step: int) -> int:
        w, a = self.stage_lengths()
        return 1 if step < w else 2 if step < w + a else 3

    def warmup_ratio(self, step: int) -> float:
        """Stage-1 top-k density: the DGC ramp ``warmup_start -> ratio`` over the warm-up."""
        o = self.opts
        w = self.stage_lengths()[0]
        if step >= w or o.warmup_start <= o.ratio:
            return o.ratio
        return o.warmup_start * (o.ratio / o.warmup_start) ** (step / w)

    def leader_at(self, step: int, size: int) -> int:
        return step % size if self.opts.leader == "rotating" else 0

    def trainer(self, p: Plan, size: int) -> AETrainer:
        if self.ae is None:
            o = self.opts
            self.ae = AETrainer(p.k, size if o.variant == "ps" else 1, channels=o.ae_channels,
                                activation=o.activation, lr=o.ae_lr, lambda1=o.lambda1,
                                lambda2=o.lambda2, seed=self.seed)
        return self.ae

    def ordered_topk(self, x: torch.Tensor, p: Plan) -> torch.Tensor:
        """The top-k positions, ordered by value (descending): the leader's shared index list."""
        idx = select_topk(x, p.sizes, self.opts.ratio)
        return idx[x[idx].argsort(descending=True, stable=True)]

    # ---- exchange -----------------------------------------------------------------------------
    def exchange(self, grads: list[torch.Tensor], transport: Transport,
                 group: Group | None = None) -> list[torch.Tensor]:
        me, n = group_rank(transport, group)
        self.rank = me
        g = group or transport.world_group
        p = self.plan([tuple(t.shape) for t in grads])
        corrected = self.with_residual(grads)
        x = flatten([corrected[i].float() for i in p.comp])
        dense = flatten([corrected[i].float() for i in p.dense])
        stage = self.stage_at(self.step) if p.k else 1
        leader = self.leader_at(self.step, n)
        src = g.ranks[leader]
        ctx = Ctx(transport, group, n, me, leader, src)
        extra = torch.empty(0)
        if stage == 1 and self.opts.warmup == "dense":
            extra = x
        dense_pending = None
        payload = torch.cat([dense, extra])
        if n > 1 and payload.numel() and not (stage == 3 and self.opts.variant == "rar"):
            dense_pending = ctx.all_reduce(payload)
        if not p.k:
            out_x, sent_x = x, x
        elif stage == 1 and self.opts.warmup == "dense":
            out_x, sent_x = None, x
        elif stage == 1:
            out_x, sent_x = self._topk_round(x, p, ctx)
        elif stage == 2:
            out_x, sent_x = self._train_round(x, p, ctx)
        else:
            if not self.synced:
                self._verify_sync(p, ctx)
            out_x, sent_x, dense = self._compressed_round(x, dense, p, ctx)
        if dense_pending is not None:
            summed = dense_pending.wait() / n
            dense = summed[: dense.numel()]
            if out_x is None:
                out_x = summed[dense.numel():]
        elif out_x is None:
            out_x = x
        out = self._assemble(p, out_x, dense)
        transmitted = self._assemble(p, sent_x, flatten([corrected[i].float() for i in p.dense]))
        self.keep_residual(corrected, transmitted, self._masks(p, x.numel()))
        self.step += 1
        return out

    def _masks(self, p: Plan, dim: int) -> list[torch.Tensor | None] | None:
        """Momentum factor masking: the sparsified positions sent this step (dense layers and
        dense warm-up: none)."""
        idx, self._sent_idx = self._sent_idx, None
        if idx is None:
            return None
        mask = torch.zeros(dim, dtype=torch.bool)
        mask[idx] = True
        out: list[torch.Tensor | None] = [None] * len(p.shapes)
        for i, t in zip(p.comp, unflatten(mask, [p.shapes[i] for i in p.comp]), strict=True):
            out[i] = t
        return out

    def _assemble(self, p: Plan, comp_flat: torch.Tensor, dense_flat: torch.Tensor
                  ) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [torch.empty(0)] * len(p.shapes)
        for i, t in zip(p.comp, unflatten(comp_flat, [p.shapes[i] for i in p.comp]), strict=True):
            out[i] = t
        for i, t in zip(p.dense, unflatten(dense_flat, [p.shapes[i] for i in p.dense]),
                        strict=True):
            out[i] = t
        return out

    def _topk_round(self, x: torch.Tensor, p: Plan, ctx: Ctx) -> tuple[torch.Tensor, ...]:
        """Stage 1: plain top-k with error feedback (values fp32 + int32 positions), gathered,
        at the ramped density of :meth:`warmup_ratio` (the same k on every worker)."""
        idx = select_topk(x, p.sizes, self.warmup_ratio(self.step))
        self._sent_idx = idx
        k = idx.numel()
        vals, pos = x[idx], idx.to(torch.int32)
        sent = torch.zeros_like(x)
        sent[idx] = vals
        if ctx.n == 1:
            return sent, sent
        bufs = ctx.all_gather(pack([vals, pos]))
        parts = [unpack(b, [(torch.float32, (k,)), (torch.int32, (k,))]) for b in bufs]
        return sparse_mean([a for a, _ in parts], [b for _, b in parts], x.numel()), sent

    def _shared_positions(self, x: torch.Tensor, p: Plan, ctx: Ctx,
                          extra: list[torch.Tensor] | None = None,
                          specs: list[tuple[torch.dtype, tuple[int, ...]]] | None = None,
                          order: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The leader broadcasts its ordered positions (and ``extra`` tensors of ``specs``)."""
        specs = [(torch.int32, (p.k,))] + (specs or [])
        if ctx.me == ctx.leader:
            order = self.ordered_topk(x, p) if order is None else order
            buf = pack([order.to(torch.int32)] + (extra or []))
        else:
            buf = torch.empty(sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                                  for d, s in specs), dtype=torch.uint8)
        if ctx.n > 1:
            ctx.broadcast(buf)
        parts = unpack(buf, specs)
        parts[0] = parts[0].long()
        return parts

    def _train_round(self, x: torch.Tensor, p: Plan, ctx: Ctx) -> tuple[torch.Tensor, ...]:
        """Stage 2: values on the leader's positions, gathered; one AE step on all of them."""
        idx = self._shared_positions(x, p, ctx)[0]
        self._sent_idx = idx
        v = x[idx]
        vs = torch.stack(ctx.all_gather(v)) if ctx.n > 1 else v.unsqueeze(0)
        out = torch.zeros_like(x)
        out[idx] = vs.mean(0)
        sent = torch.zeros_like(x)
        sent[idx] = v
        scale = rms(vs[ctx.leader])
        self.trainer(p, ctx.n).train_step(vs / scale, ctx.leader, self.opts.ae_iters)
        return out, sent

    def _compressed_round(self, x: torch.Tensor, dense: torch.Tensor, p: Plan, ctx: Ctx
                          ) -> tuple[torch.Tensor, ...]:
        ae = self.trainer(p, ctx.n)
        lead = ctx.me == ctx.leader
        out = torch.zeros_like(x)
        sent = torch.zeros_like(x)
        order = self.ordered_topk(x, p) if lead else None
        if self.opts.variant == "rar":
            t0 = time.perf_counter()
            extra = None
            if lead:  # scale, and the m positions where the leader's own code is worst
                s_r = rms(x[order])
                err = (x[order] - ae.decode(ae.encode(x[order] / s_r)) * s_r).abs()
                extra = [torch.stack([s_r]), err.topk(p.m, sorted=False).indices.to(torch.int32)]
            lead_s = time.perf_counter() - t0
            idx, s, fix = self._shared_positions(x, p, ctx, extra, [(torch.float32, (1,)),
                                                                    (torch.int32, (p.m,))], order)
            fix = fix.long()
            self._sent_idx = idx
            t0 = time.perf_counter()
            v = x[idx]
            z = ae.encode(v / s)
            mine = ae.decode(z) * s
            mine[fix] = v[fix]
            spent = lead_s + time.perf_counter() - t0
            buf = torch.cat([dense, z, v[fix]])
            if ctx.n > 1:
                buf = ctx.all_reduce(buf).wait() / ctx.n
            t0 = time.perf_counter()
            nd = dense.numel()
            got = ae.decode(buf[nd: nd + p.z]) * s
            got[fix] = buf[nd + p.z:]
            out[idx] = got
            self.codec_s.append(spent + time.perf_counter() - t0)
            sent[idx] = mine
            return out, sent, buf[:nd]
        extra = None
        t0 = time.perf_counter()
        if lead:
            s_r = rms(x[order])
            extra = [torch.stack([s_r]), ae.encode(x[order] / s_r)]
        lead_s = time.perf_counter() - t0
        idx, s, z = self._shared_positions(x, p, ctx, extra, [(torch.float32, (1,)),
                                                              (torch.float32, (p.z,))], order)
        t0 = time.perf_counter() - lead_s
        self._sent_idx = idx
        v = x[idx]
        preds = [ae.decode(z, j) * s for j in range(ctx.n)]
        # This worker's least-squares gain on its prediction: gain * pred is the projection of
        # v onto pred, so ||v - gain * pred|| <= ||v|| whatever the decoder says. Without it a
        # prediction driven by the leader's latent and scale can exceed v many times over; error
        # feedback then keeps -pred, the next leader's scale grows with it, and the run diverges.
        mine = preds[ctx.me]
        gain = (v @ mine) / (mine @ mine).clamp_min(1e-30)
        err = (v - gain * mine).abs()
        pos = err.topk(p.m, sorted=False).indices
        code = pack([gain.reshape(1).float(), v[pos], pos.to(torch.int32)])
        t1 = time.perf_counter()
        msgs = ctx.all_gather(code) if ctx.n > 1 else [code]
        t2 = time.perf_counter()
        recon = []
        for j, b in enumerate(msgs):
            a, vals, where = unpack(b, [(torch.float32, (1,)), (torch.float32, (p.m,)),
                                        (torch.int32, (p.m,))])
            r = preds[j] * a
            r[where.long()] = vals
            recon.append(r)
        out[idx] = torch.stack(recon).mean(0)
        sent[idx] = recon[ctx.me]
        self.codec_s.append((t1 - t0) + (time.perf_counter() - t2))
        return out, sent, dense

    def _verify_sync(self, p: Plan, ctx: Ctx) -> None:
        """Once, on entering stage 3: check that every copy of the AE is identical (control
        traffic); if not, adopt the leader's weights (charged as training traffic)."""
        self.synced = True
        if ctx.n == 1:
            return
        ae = self.trainer(p, ctx.n)
        cs = ae.checksum()
        both = ctx.all_reduce(torch.cat([cs, -cs]), op="max", category="control").wait()
        if torch.equal(both[:3], -both[3:]):
            return
        self.resyncs += 1
        for t in list(ae.model.parameters()):
            ctx.broadcast(t.data)

    # ---- message level (point-to-point strategies) -------------------------------------------
    # A worker's code alone cannot use the other workers' correlation, and the autoencoder is
    # only trained by exchange(); so a message is the stage-1 code at every step: top-k values
    # with error feedback (+ the dense layers), positions ordered by value.
    def encode(self, grads: list[torch.Tensor]) -> Message:
        p = self.plan([tuple(t.shape) for t in grads])
        corrected = self.with_residual(grads)
        x = flatten([corrected[i].float() for i in p.comp])
        dense = flatten([corrected[i].float() for i in p.dense])
        idx = self.ordered_topk(x, p)
        msg = Message([idx.to(torch.int32), x[idx], dense], {"shapes": p.shapes, "dim": x.numel()})
        self._sent_idx = idx
        self.keep_residual(corrected, self.decode(msg), self._masks(p, x.numel()))
        return msg

    def decode(self, msg: Message) -> list[torch.Tensor]:
        p = self.plan(msg.meta["shapes"])
        x = torch.zeros(msg.meta["dim"])
        x[msg.tensors[0].long()] = msg.tensors[1]
        return self._assemble(p, x, msg.tensors[2])

    # ---- state and report ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(ae=None if self.ae is None else self.ae.state_dict(), synced=self.synced,
                     resyncs=self.resyncs)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.synced, self.resyncs = bool(state.get("synced")), int(state.get("resyncs", 0))
        if state.get("ae") is not None:
            m = state["ae"]["meta"]
            o = self.opts
            self.ae = AETrainer(m["k"], m["decoders"], channels=m["channels"],
                                activation=m["activation"], lr=o.ae_lr, lambda1=o.lambda1,
                                lambda2=o.lambda2, seed=m["seed"])
            self.ae.load_state_dict(state["ae"])

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"variant": self.opts.variant, "steps": self.step}
        try:
            info["stage_lengths"] = list(self.stage_lengths())
        except Exception:  # noqa: BLE001 - the run length may be unknown
            pass
        ae = self.ae
        if ae is not None:
            k = ae.meta["k"]
            info.update(k=k, latent_floats=latent_size(k), ae_params=ae.n_params,
                        ae_memory_bytes=ae.memory_bytes(), ae_resyncs=self.resyncs,
                        ae_train_ms_per_step=mean_ms(ae.train_s),
                        ae_loss_first=ae.losses[0] if ae.losses else None,
                        ae_loss_last=ae.losses[-1] if ae.losses else None,
                        codec_ms_per_step=mean_ms(self.codec_s))
        return info
