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

``Message.nbytes`` is the exact payload size; the transport's byte meter charges the same bytes.
Bit-level codes (QSGD levels, signs) are packed into uint8 tensors (see :mod:`.bits`).

Error feedback and momentum correction (what was not sent, kept and added to the next gradient;
DGC's local velocity) live in one object per codec, :class:`~tandem.codecs.memory.ErrorFeedback`
(``codec.memory``); its module says when to use them and how to tune them. ``state_dict`` holds
its residuals and velocity and any learned state, so checkpoints restore a codec exactly.
Codecs talk to the group through :class:`~tandem.codecs.collectives.Collectives`, which both
the transport and the DDP adapter provide; gradients are flattened with :mod:`tandem.flat`.

Randomness: ``seed`` is the same on every worker (shared choices such as random-k's indices and
PowerSGD's initial Q must agree); private randomness (QSGD's rounding) also mixes in ``rank``,
which :meth:`Codec.exchange` sets to the caller's rank in the group.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from tandem.codecs.memory import ErrorFeedback
from tandem.flat import flatten
from tandem.registry import Registry
from tandem.transport.packing import TensorSpec, pack, spec_of, unpack

if TYPE_CHECKING:
    from tandem.codecs.collectives import Collectives
    from tandem.transport.transport import Group

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


def group_rank(transport: Collectives, group: Group | None) -> tuple[int, int]:
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
    """Base class: subclasses set ``name``, ``transfer``, ``Options``; implement encode/decode.

    What a codec remembers of the gradients it sent (residual, momentum-correction velocity)
    lives in :attr:`memory`, an :class:`~tandem.codecs.memory.ErrorFeedback` built by
    :meth:`new_memory`."""

    name: ClassVar[str] = ""
    transfer: ClassVar[Transfer] = "gather"
    #: whether the codec keeps a residual (its options may still turn it off)
    error_feedback: ClassVar[bool] = False
    #: a message any receiver decodes alone, from the model's shapes and the step (no collective
    #: protocol, no learned state): what gossip needs, where each peer's code goes to neighbours
    self_contained: ClassVar[bool] = True
    #: its schedule counts exchanges (LGC's warm-up and autoencoder stages): the run length
    #: its strategy gives :meth:`set_total_steps` must be the number of exchanges it will make;
    #: such a codec's ``stage_lengths()`` raises ConfigError while they are unknown
    counts_exchanges: ClassVar[bool] = False
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
        self.memory = self.new_memory()

    def new_memory(self) -> ErrorFeedback:
        """This codec's residual and velocity. Codecs whose options offer ``error_feedback``
        or ``ef_clip`` override it to pass them on."""
        o = self.opts
        return ErrorFeedback(o.momentum, o.momentum_masking, residual=self.error_feedback)

    @property
    def feedback(self) -> bool:
        """False turns error feedback off for this instance whatever the options say: a
        strategy that keeps its own memory of what was sent (compressed gossip's public
        copies) sets it."""
        return self.memory.enabled

    @feedback.setter
    def feedback(self, on: bool) -> None:
        self.memory.enabled = bool(on)

    @property
    def residuals(self) -> list[torch.Tensor] | None:
        """What error feedback still owes, per layer (None before the first code, or when no
        residual is kept)."""
        return self.memory.residuals

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
        """One worker's gradient as the receivers reconstruct it from its code."""
        raise NotImplementedError

    def add_decoded(self, msg: Message, flat: torch.Tensor) -> None:
        """``flat += flatten(decode(msg))``, in place: CHOCO-gossip adds every code into a
        public copy (:mod:`tandem.strategies.gossip.choco`). Sparse codecs override it to add
        their entries only, the same values without a dense temporary."""
        flat += flatten(self.decode(msg))

    def aggregate(self, msgs: list[Message]) -> list[torch.Tensor]:
        """Mean of the decoded messages (codecs whose codes sum override this to sum first)."""
        decoded = [self.decode(m) for m in msgs]
        return [torch.stack(parts).mean(0) for parts in zip(*decoded, strict=True)]

    # ---- exchange level -----------------------------------------------------------------------
    def exchange(self, grads: list[torch.Tensor], transport: Collectives,
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
        """The step, the run length, the rank and the memory's ``residuals`` / ``velocity``
        (codecs that learn add their own keys)."""
        return {"step": self.step, "total_steps": self.total_steps, "rank": self.rank,
                **self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.total_steps = state.get("total_steps", self.total_steps)
        self.rank = int(state.get("rank", self.rank))
        self.memory.load_state_dict(state)

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
