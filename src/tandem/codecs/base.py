"""The codec seam: how a worker's gradient becomes bytes and how the group's mean comes back.

A gradient is a list of tensors, one per parameter ("layers"), so codecs can act per layer
(top-k per layer, PowerSGD per weight matrix, LGC keeping the first and last layers dense).

A codec has two levels of API:

* the *message* level, ``encode`` -> :class:`Message` -> ``decode`` / ``aggregate``, used by
  strategies that move codes point to point (a parameter server decodes each worker's push);
* the *exchange* level, ``exchange(grads, transport, group)`` -> the group's mean gradient, used
  by collective strategies (all-reduce, pipeline, BSP across machines). The default follows the
  codec's ``transfer`` flag: ``"sum"`` codes are all-reduced, ``"gather"`` codes are all-gathered
  and decoded one by one. Codecs with several phases (PowerSGD's P and Q, LGC's leader) override
  it; ``"led"`` says a leader broadcasts shared state (indices) before the workers send.

Error feedback: a codec with ``error_feedback`` keeps per-layer residuals (what was not sent) and
adds them to the next gradient, so nothing is lost, only delayed. ``state_dict`` holds the
residuals and any learned state so that checkpoints restore a codec exactly.

``Message.nbytes`` is the exact payload size; the transport's byte meter charges the same bytes.
Bit-level codes (QSGD levels, signs) are packed into uint8 tensors (see :mod:`.bits`).

Momentum correction (every codec's ``momentum`` option, Deep Gradient Compression, Lin et al.
2018): error feedback delays what it does not send, and an optimizer's heavy momentum (0.9) on
the decoded mean integrates those delayed bursts again, which destabilises sparse and sign codes
(random-k at 1 % and EF-signSGD diverge on the small CNN at lr 0.05). With ``momentum=m`` the
codec keeps a local velocity ``u = m * u + g`` and compresses ``u + r`` instead of ``g + r``;
the run's optimizer must then use momentum 0 (``--momentum 0``), otherwise momentum is applied
twice. Sparse codecs (top-k, random-k, LGC's sparsified layers) also zero ``u`` where they sent
(momentum factor masking, ``momentum_masking``), so a sent entry does not keep pushing. For the
dense codec local momentum equals the optimizer's exactly (the mean of the velocities is the
velocity of the mean).

Randomness: ``seed`` is the same on every worker (shared choices such as random-k's indices and
PowerSGD's initial Q must agree); private randomness (QSGD's rounding) also mixes in ``rank``,
which :meth:`Codec.exchange` sets to the caller's rank in the group.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from tandem.registry import Registry
from tandem.transport.packing import TensorSpec, pack, spec_of, unpack

if TYPE_CHECKING:
    from tandem.transport.transport import Group, Transport

Transfer = Literal["sum", "gather", "led"]


@dataclass
class Message:
    """A worker's code: payload tensors plus shape metadata that never travels.

    ``meta`` holds what the receiver already knows (layer shapes, k, shared random indices),
    derived from the model and the step, so it is not charged.
    """

    tensors: list[torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def specs(self) -> list[TensorSpec]:
        return spec_of(self.tensors)

    def pack(self) -> torch.Tensor:
        return pack(self.tensors)

    @classmethod
    def unpack(cls, buf: torch.Tensor, specs: list[TensorSpec], meta: dict[str, Any]) -> Message:
        return cls(unpack(buf, specs), dict(meta))


class CodecOptions(BaseModel):
    """Base of every codec's options model (unknown options are errors)."""

    model_config = ConfigDict(extra="forbid")

    momentum: float = Field(0.0, ge=0, lt=1, description="DGC momentum correction: momentum "
                            "applied locally before compression (then run the optimizer with "
                            "momentum 0)")
    momentum_masking: bool = Field(True, description="sparse codecs: zero the local momentum "
                                   "where entries were sent (DGC momentum factor masking)")


@lru_cache(maxsize=256)
def _likes(shapes: tuple[tuple[int, ...], ...]) -> tuple[list[torch.Tensor], int]:
    """Storage-free (meta) tensors of ``shapes``, the templates of torch's C++ unflatten."""
    return [torch.empty(s, device="meta") for s in shapes], sum(math.prod(s) for s in shapes)


def unflat(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Per-layer views of a flat buffer (no copy): torch's C++ unflatten (DDP's), about half
    the cost of a Python-level ``split`` + ``view`` per layer."""
    likes, total = _likes(tuple(tuple(s) for s in shapes))
    if flat.numel() != total:
        raise ValueError(f"flat buffer of {flat.numel()} entries for layers of {total}")
    return list(_unflatten_dense_tensors(flat, likes))


def concat(grads: list[torch.Tensor]) -> torch.Tensor:
    """The layers end to end in one fresh fp32 buffer (never a view of ``grads``).

    Uses torch's C++ flatten (DDP's bucket flatten): one call instead of a Python-level
    ``reshape`` per layer before ``torch.cat``, which costs more than the copy on small models."""
    if len(grads) > 1 and not any(g.requires_grad for g in grads):
        flat = _flatten_dense_tensors(grads)
    else:
        flat = torch.cat([g.detach().reshape(-1) for g in grads])
    return flat.float()


def group_rank(transport: Transport, group: Group | None) -> tuple[int, int]:
    """(this process's rank inside ``group``, the group's size)."""
    g = group or transport.world_group
    return g.ranks.index(transport.rank), g.size


def step_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers (stateless per step: checkpoints need no RNG state)."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h * 0x100000001B3 ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h & 0x7FFFFFFFFFFFFFFF)


class Codec:
    """Base class: subclasses set ``name``, ``transfer``, ``Options``; implement encode/decode."""

    name: ClassVar[str] = ""
    transfer: ClassVar[Transfer] = "gather"
    error_feedback: ClassVar[bool] = False
    #: a message any receiver decodes alone, from the model's shapes and the step (no collective
    #: protocol, no learned state): what gossip needs, where each peer's code goes to neighbours
    self_contained: ClassVar[bool] = True
    Options: ClassVar[type[CodecOptions]] = CodecOptions

    def __init__(self, options: CodecOptions | dict[str, Any] | None = None, *,
                 seed: int = 0) -> None:
        if options is None or isinstance(options, dict):
            options = self.Options.model_validate(options or {})
        self.opts = options
        self.seed = seed
        self.step = 0
        self.rank = 0
        self.total_steps: int | None = None
        self.residuals: list[torch.Tensor] | None = None
        #: False turns error feedback off for this instance whatever the options say: a strategy
        #: that keeps its own memory of what was sent (compressed gossip's public copies) sets it
        self.feedback = True
        #: momentum correction: the local velocity, and the one the current encode computed
        self.velocity: list[torch.Tensor] | None = None
        self._velocity_next: list[torch.Tensor] | None = None
        #: tests set this to keep the last ``transmitted`` (what receivers reconstruct of ours)
        self.track_transmitted = False
        self.transmitted: list[torch.Tensor] | None = None
        self._shapes: list[tuple[int, ...]] = []
        #: attr -> (the per-layer views last set, their flat buffer): see :meth:`corrected_flat`
        self._flat_cache: dict[str, tuple[Any, torch.Tensor]] = {}

    def set_total_steps(self, n: int) -> None:
        """The strategy tells the codec the run length (LGC and warm-up ramps scale with it)."""
        self.total_steps = int(n)

    # ---- message level ------------------------------------------------------------------------
    def encode(self, grads: list[torch.Tensor]) -> Message:
        """The code of this worker's gradient.

        The message's tensors must be fresh (not views of ``grads`` or of the codec's memory):
        a ``sum`` exchange all-reduces them in place, without a defensive copy.
        """
        raise NotImplementedError

    def decode(self, msg: Message) -> list[torch.Tensor]:
        raise NotImplementedError

    def aggregate(self, msgs: list[Message]) -> list[torch.Tensor]:
        """Mean of the decoded messages (codecs whose codes sum override this to sum first)."""
        decoded = [self.decode(m) for m in msgs]
        return [torch.stack(parts).mean(0) for parts in zip(*decoded, strict=True)]

    # ---- error feedback -----------------------------------------------------------------------
    def uses_error_feedback(self) -> bool:
        return self.feedback and self.error_feedback and \
            bool(getattr(self.opts, "error_feedback", True))

    def with_residual(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """g~ = g + r (or g itself when error feedback is off); with momentum correction
        ``g`` is first replaced by the local velocity ``m * u + g``. No state changes until
        :meth:`keep_residual` (calling this twice gives the same result)."""
        grads = [g.detach() for g in grads]
        m = float(self.opts.momentum)
        if m > 0:
            if self.velocity is None:
                self.velocity = [torch.zeros_like(g, dtype=torch.float32) for g in grads]
            grads = [m * u + g.float() for u, g in zip(self.velocity, grads, strict=True)]
            self._velocity_next = grads
        if not self.uses_error_feedback():
            return grads
        if self.residuals is None:
            self.residuals = [torch.zeros_like(g) for g in grads]
        return [g + r for g, r in zip(grads, self.residuals, strict=True)]

    def keep_residual(self, corrected: list[torch.Tensor], transmitted: list[torch.Tensor],
                      sent: list[torch.Tensor | None] | None = None) -> None:
        """r = g~ - (what the receivers will reconstruct from this worker's code).

        ``sent``: per layer, a boolean mask of the sparsified entries that were sent (None for a
        layer sent whole or approximated densely); with momentum correction and
        ``momentum_masking`` the velocity is zeroed there."""
        if self.track_transmitted:
            self.transmitted = [t.clone() for t in transmitted]
        if self.uses_error_feedback():
            self.residuals = [c - t for c, t in zip(corrected, transmitted, strict=True)]
        if self.opts.momentum > 0 and self._velocity_next is not None:
            vel = self._velocity_next
            if sent is not None and self.opts.momentum_masking:
                vel = [u if s is None else u.masked_fill(s.view(u.shape), 0.0)
                       for u, s in zip(vel, sent, strict=True)]
            self.velocity, self._velocity_next = vel, None

    # ---- error feedback on one flat buffer (the fast path of the sparse and sign codecs) -------
    # The same state as above (``residuals`` / ``velocity`` are per-layer views of one flat
    # buffer), in a few whole-buffer operations instead of a few per layer: on a small model
    # the per-operation overhead, not the arithmetic, is the codec's cost.
    def _flat(self, attr: str, like: torch.Tensor) -> torch.Tensor:
        views = getattr(self, attr)
        cached = self._flat_cache.get(attr)
        if cached is not None and cached[0] is views:
            return cached[1]
        if views is None:
            return torch.zeros_like(like)
        return torch.cat([v.reshape(-1).float() for v in views])

    def _set_flat(self, attr: str, flat: torch.Tensor) -> None:
        views = unflat(flat, self._shapes)
        setattr(self, attr, views)
        self._flat_cache[attr] = (views, flat)

    def corrected_flat(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`with_residual` as one fresh fp32 buffer (the layers concatenated)."""
        self._shapes = [tuple(g.shape) for g in grads]
        flat = concat(grads)
        m = float(self.opts.momentum)
        if not self.uses_error_feedback():
            if m > 0:
                flat = torch.mul(self._flat("velocity", flat), m).add_(flat)
                self._velocity_next = flat
            return flat
        if m > 0:
            # g~ = u + r goes into the concatenation buffer (ours, and distinct from u, which
            # keep_flat keeps as the velocity): no third buffer
            vel = torch.mul(self._flat("velocity", flat), m).add_(flat)
            self._velocity_next = vel
            return torch.add(vel, self._flat("residuals", flat), out=flat)
        return flat.add_(self._flat("residuals", flat))

    def momentum_flat(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Codecs without error feedback (dense, casts): the momentum-corrected gradient as one
        flat fp32 buffer, the velocity already kept. With momentum it *is* the new velocity:
        read it, do not write it (copy before an in-place all-reduce)."""
        flat = self.corrected_flat(grads)
        if self.opts.momentum > 0:
            self.keep_flat(flat, transmitted=flat)
        elif self.track_transmitted:
            self.transmitted = [t.clone() for t in unflat(flat, self._shapes)]
        return flat

    def keep_flat(self, corrected: torch.Tensor, *, transmitted: torch.Tensor | None = None,
                  split: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> None:
        """:meth:`keep_residual` for :meth:`corrected_flat`'s buffer. Either ``transmitted``
        (a dense reconstruction: ``r = corrected - transmitted``) or ``split``, the positions
        sent exactly (``r`` = ``corrected`` zeroed there). Both work in place: ``corrected`` is
        consumed and becomes the residual (no gradient-sized allocation per step).
        ``sent``: positions whose velocity is zeroed (momentum masking; default ``split``)."""
        if self.track_transmitted:
            if transmitted is None:
                transmitted = torch.zeros_like(corrected)
                transmitted[split] = corrected[split]
            self.transmitted = [t.clone() for t in unflat(transmitted, self._shapes)]
        if self.uses_error_feedback():
            self._set_flat("residuals", corrected.sub_(transmitted) if split is None
                           else corrected.index_fill_(0, split, 0.0))
        vel = self._velocity_next
        if self.opts.momentum > 0 and vel is not None:
            sent = split if sent is None else sent
            if sent is not None and self.opts.momentum_masking:
                vel = vel.index_fill(0, sent, 0.0) if vel is corrected else \
                    vel.index_fill_(0, sent, 0.0)
            self._set_flat("velocity", vel)
            self._velocity_next = None

    # ---- residual cap (``ef_clip``, error-feedback codecs that offer it) -----------------------
    def step_norm(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """``||u||``, this step's gradient (momentum-corrected: the new velocity) for the
        residual cap, or None when the codec's ``ef_clip`` is 0 or absent. Call it after
        :meth:`corrected_flat` and before :meth:`keep_flat`."""
        if not getattr(self.opts, "ef_clip", 0):
            return None
        u = self._velocity_next
        return u.norm() if u is not None else torch.cat([g.reshape(-1) for g in grads]).norm()

    def cap_residual(self, unorm: torch.Tensor | None) -> None:
        """``ef_clip``: scale the flat residual (the per-layer views see it) down to at most
        ``ef_clip * ||u||``. At a density of 1e-3 an entry can wait hundreds of steps; its
        accumulated value then lands as one burst that can throw the model back to chance
        (seen on the benchmark CNN right after a DGC warm-up ramp). The cap forgets the oldest
        part of such entries instead. Costs one norm; sends nothing."""
        cached = self._flat_cache.get("residuals")
        if unorm is None or cached is None or cached[0] is not self.residuals:
            return
        cap, rn = float(self.opts.ef_clip) * float(unorm), float(cached[1].norm())
        if rn > cap > 0:
            cached[1].mul_(cap / rn)

    # ---- exchange level -----------------------------------------------------------------------
    def exchange(self, grads: list[torch.Tensor], transport: Transport,
                 group: Group | None = None) -> list[torch.Tensor]:
        """Return the group's mean gradient, moving only this codec's codes."""
        self.rank, size = group_rank(transport, group)
        msg = self.encode(grads)
        self.step += 1
        if size == 1:
            return self.decode(msg)
        if self.transfer == "sum":
            buf = msg.tensors  # encode's tensors are ours (see Codec.encode): reduce in place
            pendings = [transport.all_reduce(t, group=group) for t in buf]
            for p in pendings:
                p.wait()
            summed = self.decode(Message(buf, msg.meta))
            return [s / size for s in summed]
        packed = msg.pack()
        bufs = transport.all_gather(packed, group=group).wait()
        msgs = [Message.unpack(b, msg.specs(), msg.meta) for b in bufs]
        return self.aggregate(msgs)

    # ---- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "rank": self.rank,
                "residuals": None if self.residuals is None else
                [r.clone() for r in self.residuals],
                "velocity": None if self.velocity is None else
                [u.clone() for u in self.velocity]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.total_steps = state.get("total_steps", self.total_steps)
        self.rank = int(state.get("rank", self.rank))
        res = state.get("residuals")
        self.residuals = None if res is None else [r.clone() for r in res]
        vel = state.get("velocity")
        self.velocity = None if vel is None else [u.clone() for u in vel]

    def describe(self) -> dict[str, Any]:
        """Codec-specific figures for the run record (e.g. LGC's autoencoder cost)."""
        return {}


#: every codec, by name (discovered under ``tandem.codecs``)
CODECS: Registry[type[Codec]] = Registry("codec", "tandem.codecs")

CodecT = TypeVar("CodecT", bound=type[Codec])


def register(cls: CodecT) -> CodecT:
    """Class decorator: make a codec available by its ``name`` (CLI, config, registry)."""
    CODECS.register(cls)
    return cls


def make_codec(name: str, options: dict[str, Any] | None = None, *, seed: int = 0) -> Codec:
    """A fresh codec by name; an unknown name raises ConfigError listing the known ones."""
    return CODECS[name](options, seed=seed)


def describe_codecs() -> list[dict[str, Any]]:
    """Every registered codec: name, transfer kind, one-line summary, options with defaults."""
    rows = []
    for name, cls in sorted(CODECS.items()):
        opts = {}
        for key, f in cls.Options.model_fields.items():
            default = None if f.is_required() else f.get_default(call_default_factory=True)
            opts[key] = {"default": default, "type": getattr(f.annotation, "__name__",
                                                             str(f.annotation)),
                         "description": f.description or ""}
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
        rows.append({"name": name, "transfer": cls.transfer, "error_feedback": cls.error_feedback,
                     "summary": doc.splitlines()[0] if doc else "", "options": opts})
    return rows
