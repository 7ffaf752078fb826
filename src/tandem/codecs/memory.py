"""Error feedback and momentum correction: what a codec remembers of the gradients it sent.

**Error feedback** (the ``error_feedback`` option of top-k, random-k, signSGD, PowerSGD; always on
in LGC): a lossy code delays what it does not send instead of dropping it. The codec compresses
the corrected gradient ``g~ = g + r`` and keeps ``r = g~ - transmitted``, where *transmitted* is
exactly what the receivers reconstruct of this worker's code. Turn it off only for a codec that
is unbiased on its own, or when something else keeps that memory (compressed gossip's public
copies set :attr:`ErrorFeedback.enabled` to False).

**Momentum correction** (every codec's ``momentum``; Deep Gradient Compression, Lin et al. 2018):
an optimizer's heavy momentum applied to the decoded mean integrates the delayed bursts of error
feedback a second time and destabilises sparse and sign codes. With ``momentum = m`` the memory
keeps a local velocity ``u = m * u + g`` and the codec compresses ``u + r``; run the optimizer
with momentum 0. Sparse codes also zero ``u`` where they sent (momentum factor masking,
``momentum_masking``), so an entry that was sent does not keep pushing.

**Residual cap** (``ef_clip``, top-k and LGC): at densities of 1e-3 an entry can wait hundreds of
steps and land as one burst that throws the model back; the cap scales the residual down to at
most ``ef_clip * ||u||`` (u: this step's momentum-corrected gradient), forgetting the oldest part
of such entries. Costs one norm per step; 0 turns it off.

Two equivalent ways to use it: per layer (:meth:`ErrorFeedback.corrected` then
:meth:`ErrorFeedback.keep`, for codecs that work on matrices, PowerSGD) and on one flat buffer
(:meth:`ErrorFeedback.corrected_flat` then :meth:`ErrorFeedback.keep_flat`, the fast path of
the sparse and sign codecs: a few whole-buffer operations instead of a few per layer). Both keep
the same state: ``residuals`` and ``velocity`` are per-layer tensors, on the flat path views of
one buffer each, so checkpoints look the same whichever path wrote them.
"""

from __future__ import annotations

from typing import Any

import torch

from tandem.flat import flatten, unflatten

#: a per-layer state (residuals or velocity) and the flat buffer its tensors are views of
_Flat = tuple[list[torch.Tensor], torch.Tensor]


class ErrorFeedback:
    """One codec instance's residual and velocity, and the rules that update them.

    ``momentum`` and ``masking``: the codec's ``momentum`` / ``momentum_masking`` options;
    ``residual``: whether the codec keeps a residual at all (its ``error_feedback`` option);
    ``clip``: the residual cap ``ef_clip`` (0: off). Tests set ``track_transmitted`` to keep
    the last ``transmitted`` (what the receivers reconstruct of this worker's code).
    """

    def __init__(self, momentum: float = 0.0, masking: bool = True, *, residual: bool = False,
                 clip: float = 0.0) -> None:
        self.momentum = float(momentum)
        self.masking = bool(masking)
        self.residual = bool(residual)
        self.clip = float(clip)
        #: False turns error feedback off whatever the options say: a strategy that keeps its
        #: own memory of what was sent (compressed gossip's public copies) sets it
        self.enabled = True
        self.residuals: list[torch.Tensor] | None = None
        self.velocity: list[torch.Tensor] | None = None
        self.track_transmitted = False
        self.transmitted: list[torch.Tensor] | None = None
        #: the velocity the current encode computed (kept by keep / keep_flat)
        self._next_velocity: Any = None
        self._step_norm: torch.Tensor | None = None
        self._shapes: list[tuple[int, ...]] = []
        self._flat: dict[str, _Flat] = {}

    @property
    def active(self) -> bool:
        """Whether a residual is kept (the codec's error feedback, not switched off)."""
        return self.enabled and self.residual

    @property
    def needs_transmitted(self) -> bool:
        """Whether :meth:`keep_flat` needs the real ``transmitted`` (a codec may skip
        reconstructing its own code otherwise)."""
        return self.active or self.track_transmitted

    # ---- per layer ----------------------------------------------------------------------------
    def corrected(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """``g~ = g + r`` per layer (``g`` itself without error feedback); with momentum
        correction ``g`` is first replaced by the new velocity ``m * u + g``. No state changes
        until :meth:`keep` (calling this twice gives the same result)."""
        grads = [g.detach() for g in grads]
        m = self.momentum
        if m > 0:
            if self.velocity is None:
                self.velocity = [torch.zeros_like(g, dtype=torch.float32) for g in grads]
            grads = [m * u + g.float() for u, g in zip(self.velocity, grads, strict=True)]
            self._next_velocity = grads
        if not self.active:
            return grads
        if self.residuals is None:
            self.residuals = [torch.zeros_like(g) for g in grads]
        return [g + r for g, r in zip(grads, self.residuals, strict=True)]

    def keep(self, corrected: list[torch.Tensor], transmitted: list[torch.Tensor],
             sent: list[torch.Tensor | None] | None = None) -> None:
        """``r = g~ - transmitted`` per layer, and the velocity :meth:`corrected` computed.

        ``sent``: per layer, a boolean mask of the sparsified entries that were sent (None for
        a layer sent whole or approximated densely); with ``masking`` the velocity is zeroed
        there."""
        if self.track_transmitted:
            self.transmitted = [t.clone() for t in transmitted]
        if self.active:
            self.residuals = [c - t for c, t in zip(corrected, transmitted, strict=True)]
        if self.momentum > 0 and self._next_velocity is not None:
            vel = self._next_velocity
            if sent is not None and self.masking:
                vel = [u if s is None else u.masked_fill(s.view(u.shape), 0.0)
                       for u, s in zip(vel, sent, strict=True)]
            self.velocity, self._next_velocity = vel, None

    # ---- on one flat buffer -------------------------------------------------------------------
    def _as_flat(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The state ``name`` as one flat fp32 buffer: the one its views came from when the
        flat path set it last, else a fresh concatenation (zeros when there is none yet)."""
        views = getattr(self, name)
        cached = self._flat.get(name)
        if cached is not None and cached[0] is views:
            return cached[1]
        if views is None:
            return torch.zeros_like(like)
        return flatten(views)

    def _set_flat(self, name: str, flat: torch.Tensor) -> None:
        views = unflatten(flat, self._shapes)
        setattr(self, name, views)
        self._flat[name] = (views, flat)

    def corrected_flat(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`corrected` as one fresh fp32 buffer (the layers end to end), which the
        codec may consume: :meth:`keep_flat` turns it into the residual in place. With a
        residual cap, also notes this step's gradient norm for :meth:`cap_residual`."""
        self._shapes = [tuple(g.shape) for g in grads]
        flat = flatten(grads)
        m = self.momentum
        if not self.active:
            if m > 0:
                flat = torch.mul(self._as_flat("velocity", flat), m).add_(flat)
                self._next_velocity = flat
            self._note_step_norm(grads)
            return flat
        if m > 0:
            # g~ = u + r goes into the concatenation buffer (ours, and distinct from u, which
            # keep_flat keeps as the velocity): no third buffer
            vel = torch.mul(self._as_flat("velocity", flat), m).add_(flat)
            self._next_velocity = vel
            self._note_step_norm(grads)
            return torch.add(vel, self._as_flat("residuals", flat), out=flat)
        self._note_step_norm(grads)
        return flat.add_(self._as_flat("residuals", flat))

    def momentum_flat(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """For codecs without error feedback (dense, casts): the momentum-corrected gradient
        as one flat fp32 buffer, the velocity already kept. With momentum it *is* the new
        velocity: read it, do not write it (copy it before an in-place all-reduce)."""
        flat = self.corrected_flat(grads)
        if self.momentum > 0:
            self.keep_flat(flat, transmitted=flat)
        elif self.track_transmitted:
            self.transmitted = [t.clone() for t in unflatten(flat, self._shapes)]
        return flat

    def keep_flat(self, corrected: torch.Tensor, *, transmitted: torch.Tensor | None = None,
                  split: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> None:
        """:meth:`keep` for :meth:`corrected_flat`'s buffer. Either ``transmitted`` (a dense
        reconstruction: ``r = corrected - transmitted``) or ``split``, the positions sent
        exactly (``r`` = ``corrected`` zeroed there). Both work in place: ``corrected`` is
        consumed and becomes the residual (no gradient-sized allocation per step).
        ``sent``: positions whose velocity is zeroed (momentum masking; default ``split``)."""
        if self.track_transmitted:
            if transmitted is None:
                transmitted = torch.zeros_like(corrected)
                transmitted[split] = corrected[split]
            self.transmitted = [t.clone() for t in unflatten(transmitted, self._shapes)]
        if self.active:
            self._set_flat("residuals", corrected.sub_(transmitted) if split is None
                           else corrected.index_fill_(0, split, 0.0))
        vel = self._next_velocity
        if self.momentum > 0 and vel is not None:
            sent = split if sent is None else sent
            if sent is not None and self.masking:
                vel = vel.index_fill(0, sent, 0.0) if vel is corrected else \
                    vel.index_fill_(0, sent, 0.0)
            self._set_flat("velocity", vel)
            self._next_velocity = None

    # ---- residual cap (``ef_clip``) ----------------------------------------------------------
    def _note_step_norm(self, grads: list[torch.Tensor]) -> None:
        """``||u||``, this step's (momentum-corrected) gradient, for :meth:`cap_residual`;
        read before :meth:`keep_flat` masks the velocity in place."""
        if not self.clip:
            return
        u = self._next_velocity
        self._step_norm = u.norm() if u is not None else \
            torch.cat([g.reshape(-1) for g in grads]).norm()

    def cap_residual(self) -> None:
        """``ef_clip``: scale the flat residual (its per-layer views see it) down to at most
        ``clip * ||u||`` of the step :meth:`corrected_flat` last began. Call it after
        :meth:`keep_flat`; a no-op without a cap or a flat residual."""
        unorm, self._step_norm = self._step_norm, None
        cached = self._flat.get("residuals")
        if unorm is None or cached is None or cached[0] is not self.residuals:
            return
        cap, rn = self.clip * float(unorm), float(cached[1].norm())
        if rn > cap > 0:
            cached[1].mul_(cap / rn)

    # ---- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``residuals`` and ``velocity`` (copies; None when not kept)."""
        return {"residuals": None if self.residuals is None else
                [r.clone() for r in self.residuals],
                "velocity": None if self.velocity is None else
                [u.clone() for u in self.velocity]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s keys (missing ones: nothing kept)."""
        res = state.get("residuals")
        self.residuals = None if res is None else [r.clone() for r in res]
        vel = state.get("velocity")
        self.velocity = None if vel is None else [u.clone() for u in vel]
