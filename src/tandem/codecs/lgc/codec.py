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
   Guard (``rar_fallback``): if the leader's own code (after the fix-ups) loses to exact
   values on its ``Z + m`` largest positions (``best``) or to sending nothing
   (``worse_than_none``), the round sends those exact values instead, in the same slots
   (same bytes; the flag is the sign of the scale), which keeps error feedback contractive.
   ``variant="ps"``: the leader broadcasts I, the scale and its latent ``E(v_r)``; each worker
   predicts its own values with its decoder ``p_i = D_i(E(v_r))`` and sends only its innovation:
   its least-squares gain ``a_i`` on ``p_i`` (one float, which makes the reconstruction
   contractive so error feedback stays bounded) and the m positions where ``a_i p_i`` is worst,
   with their true values; every worker (the emulated server) decodes all N and averages.
4. Error feedback keeps ``x - (what the group reconstructs of this worker's values)``, its norm
   capped at ``ef_clip * ||u||`` (u: this step's momentum-corrected gradient; default 2), so
   entries delayed for hundreds of steps at rho = 1e-3 cannot return as one destabilising burst.

Modules: this one (options, plan, stage schedule, message level, state); the rounds of stages 1
and 2 in :mod:`.stages`, the compressed rounds in :mod:`.ps` and :mod:`.rar`; the autoencoder
in :mod:`.autoencoder`; error feedback in :mod:`tandem.codecs.memory`.

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
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from tandem.codecs.base import Codec, CodecOptions, Message, group_rank, register
from tandem.codecs.lgc.autoencoder import AETrainer, Ctx, latent_size, mean_ms
from tandem.codecs.lgc.plan import Plan
from tandem.codecs.lgc.ps import ps_round
from tandem.codecs.lgc.rar import rar_round
from tandem.codecs.lgc.stages import topk_round, train_round
from tandem.codecs.memory import ErrorFeedback
from tandem.codecs.positions import pack_positions, positions_nbytes, unpack_positions
from tandem.codecs.topk import keep_count, numel, select_topk
from tandem.flat import unflatten
from tandem.telemetry.log import get_logger
from tandem.transport.packing import pack, unpack

if TYPE_CHECKING:
    from tandem.codecs.collectives import Collectives
    from tandem.transport.transport import Group


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
    ef_clip: float = Field(2.0, ge=0, description="cap the error-feedback residual's norm at "
                           "ef_clip x the norm of this step's (momentum-corrected) gradient; "
                           "0 = off")
    rar_fallback: Literal["best", "worse_than_none", "off"] = Field(
        "best", description="rar: the leader replaces the latent round by exact values on its "
        "Z+m largest positions (same bytes) when its code loses to them (best) or is worse than "
        "sending nothing (worse_than_none)")


@register
class LGCCodec(Codec):
    """lgc: top-k + online conv autoencoder; leader-led (ps: innovations, rar: latent mean)."""

    name = "lgc"
    transfer = "led"
    error_feedback = True
    self_contained = False  # a leader's indices and the shared autoencoder
    counts_exchanges = True  # its stages are shares of the exchanges (stage_lengths)
    Options = LGCOptions

    def __init__(self, options: Any = None, *, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self.ae: AETrainer | None = None
        self.codec_s: list[float] = []
        self.resyncs = 0
        self.fallbacks = 0
        self._plans: dict[tuple[tuple[int, ...], ...], Plan] = {}
        self.synced = False
        self._sent_idx: torch.Tensor | None = None

    def new_memory(self) -> ErrorFeedback:
        o = self.opts
        return ErrorFeedback(o.momentum, o.momentum_masking, residual=self.error_feedback,
                             clip=o.ef_clip)

    # ---- plan and stages --------------------------------------------------------------------
    def plan(self, shapes: list[tuple[int, ...]]) -> Plan:
        key = tuple(tuple(s) for s in shapes)
        if key not in self._plans:
            self._plans[key] = self._make_plan(list(key))
        return self._plans[key]

    def _make_plan(self, shapes: list[tuple[int, ...]]) -> Plan:
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
        offs = [0]
        for sh in shapes:
            offs.append(offs[-1] + numel(sh))
        if comp and comp != list(range(comp[0], comp[-1] + 1)):
            raise AssertionError("lgc: compressed layers must be contiguous")
        start, stop = (offs[comp[0]], offs[comp[-1] + 1]) if comp else (0, 0)
        if not k:
            get_logger(__name__).warning(
                "lgc: no layer is compressed (%d weight layers, dense_first_last=%s): every "
                "gradient travels dense; set dense_first_last=false to compress them",
                len(multi), o.dense_first_last)
        return Plan(shapes, sorted(dense), comp, sizes, k, m, latent_size(k) if k else 0,
                    start, stop)

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
    def exchange(self, grads: list[torch.Tensor], transport: Collectives,
                 group: Group | None = None) -> list[torch.Tensor]:
        me, n = group_rank(transport, group)
        self.rank = me
        g = group or transport.world_group
        p = self.plan([tuple(t.shape) for t in grads])
        flat = self.memory.corrected_flat(grads)
        x = flat[p.start: p.stop]
        dense = self._dense_part(p, flat)
        stage = self.stage_at(self.step) if p.k else 1
        leader = self.leader_at(self.step, n)
        src = g.ranks[leader]
        ctx = Ctx(transport, group, n, me, leader, src)
        dense_pending = None
        payload = torch.cat([dense, x]) if stage == 1 and self.opts.warmup == "dense" else dense
        if n > 1 and payload.numel() and not (stage == 3 and self.opts.variant == "rar"):
            dense_pending = ctx.all_reduce(payload)
        if not p.k:
            out_x, sent_x = x, x
        elif stage == 1 and self.opts.warmup == "dense":
            out_x, sent_x = None, x
        elif stage == 1:
            out_x, sent_x = topk_round(self, x, p, ctx)
        elif stage == 2:
            out_x, sent_x = train_round(self, x, p, ctx)
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
        out = self._join(p, out_x, dense)
        self._keep(flat, p, sent_x)
        self.memory.cap_residual()
        self.step += 1
        return unflatten(out, p.shapes)

    def _keep(self, flat: torch.Tensor, p: Plan, sent_x: torch.Tensor | None) -> None:
        """Error feedback: ``r = flat - (what the group reconstructs of this worker)``.

        The rounds return ``sent_x`` as this worker's reconstructed values on the positions
        ``self._sent_idx`` (``None``: sent exactly), so the residual is ``flat`` itself with
        those K entries corrected and the dense layers zeroed, in place: no dense
        reconstruction vector and no whole-buffer subtraction (the result is the same to the
        bit). Without sparse positions (stage-1 dense warm-up, no compressed layer), or when a
        test tracks ``transmitted``, the dense reconstruction is built as before."""
        idx, self._sent_idx = self._sent_idx, None
        if idx is None or self.memory.track_transmitted:
            x = flat[p.start: p.stop]
            if idx is not None:
                vals = x[idx] if sent_x is None else sent_x
                sent_x = torch.zeros_like(x)
                sent_x[idx] = vals
            transmitted = self._join(p, x if sent_x is None else sent_x,
                                     self._dense_part(p, flat))
            self.memory.keep_flat(flat, transmitted=transmitted,
                                  sent=None if idx is None else idx + p.start)
            return
        flat[: p.start].zero_()
        flat[p.stop:].zero_()
        x = flat[p.start: p.stop]
        if sent_x is None:
            x.index_fill_(0, idx, 0.0)
        else:
            x.index_add_(0, idx, sent_x, alpha=-1)
        self.memory.keep_flat(flat, split=idx[:0], sent=idx + p.start)

    @staticmethod
    def _dense_part(p: Plan, flat: torch.Tensor) -> torch.Tensor:
        if not p.dense:
            return flat.new_empty(0)
        return torch.cat([flat[: p.start], flat[p.stop:]])

    @staticmethod
    def _join(p: Plan, comp_flat: torch.Tensor, dense_flat: torch.Tensor) -> torch.Tensor:
        """The flat gradient from its compressed range and its dense layers."""
        if not p.dense:
            return comp_flat
        return torch.cat([dense_flat[: p.start], comp_flat, dense_flat[p.start:]])

    def shared_positions(self, x: torch.Tensor, p: Plan, ctx: Ctx,
                          extra: list[torch.Tensor] | None = None,
                          specs: list[tuple[torch.dtype, tuple[int, ...]]] | None = None,
                          order: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The leader broadcasts its ordered positions (and ``extra`` tensors of ``specs``)."""
        d = x.numel()
        specs = [(torch.uint8, (positions_nbytes(p.k, d),))] + (specs or [])
        if ctx.me == ctx.leader:
            order = self.ordered_topk(x, p) if order is None else order
            buf = pack([pack_positions(order, d)] + (extra or []))
        else:
            buf = torch.empty(sum(math.prod(s) * torch.empty((), dtype=d).element_size()
                                  for d, s in specs), dtype=torch.uint8)
        if ctx.n > 1:
            ctx.broadcast(buf)
        parts = unpack(buf, specs)
        parts[0] = unpack_positions(parts[0], p.k, d)
        return parts

    def _compressed_round(self, x: torch.Tensor, dense: torch.Tensor, p: Plan, ctx: Ctx
                          ) -> tuple[torch.Tensor, ...]:
        ae = self.trainer(p, ctx.n)
        order = self.ordered_topk(x, p) if ctx.me == ctx.leader else None
        if self.opts.variant == "rar":
            return rar_round(self, x, dense, p, ctx, ae, order)
        return ps_round(self, x, dense, p, ctx, ae, order)

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
        flat = self.memory.corrected_flat(grads)
        x = flat[p.start: p.stop]
        dense = self._dense_part(p, flat)
        idx = self.ordered_topk(x, p)
        msg = Message([pack_positions(idx, x.numel()), x[idx], dense],
                      {"shapes": p.shapes, "dim": x.numel()})
        self.memory.keep_flat(flat, transmitted=self._decode_flat(p, msg), sent=idx + p.start)
        return msg

    def _decode_flat(self, p: Plan, msg: Message) -> torch.Tensor:
        d = msg.meta["dim"]
        x = torch.zeros(d)
        x[unpack_positions(msg.tensors[0], msg.tensors[1].numel(), d)] = msg.tensors[1]
        return self._join(p, x, msg.tensors[2])

    def decode(self, msg: Message) -> list[torch.Tensor]:
        p = self.plan(msg.meta["shapes"])
        return unflatten(self._decode_flat(p, msg), p.shapes)

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
                        rar_fallbacks=self.fallbacks,
                        ae_train_ms_per_step=mean_ms(ae.train_s),
                        ae_loss_first=ae.losses[0] if ae.losses else None,
                        ae_loss_last=ae.losses[-1] if ae.losses else None,
                        codec_ms_per_step=mean_ms(self.codec_s))
        return info
