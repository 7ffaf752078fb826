"""What a codec's ``exchange`` needs of a communication layer: three collectives and who we are.

Two classes provide it: Tandem's :class:`~tandem.transport.transport.Transport` (asynchronous,
metered, deadline-bounded, optionally over an emulated link) and
:class:`~tandem.transport.process_group.ProcessGroupTransport` (a synchronous adapter over a
plain ``torch.distributed`` process group, for the DDP communication hook). Codecs are typed
against this protocol, not either class, so a test or a benchmark can stand in with anything of
the same shape (threads in ``tests/codec_jobs.py``, a zero-cost fake in ``bench/codec_cost.py``).

The protocol is structural (nothing inherits from it); it lives with the codecs because the
transport layer must not import codecs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from tandem.transport.transport import Group


class Handle(Protocol):
    """An operation in flight; ``wait`` returns its result (the reduced tensor, the gathered
    list) or raises the transport's error (e.g. a peer that did not answer in time)."""

    def wait(self, timeout: float | None = None) -> Any: ...


@runtime_checkable
class Collectives(Protocol):
    """The collectives codecs call. Byte accounting is the provider's business: a codec only
    moves tensors. ``group=None`` means every rank (``world_group``); ranks are global."""

    #: this process's global rank, and the number of ranks
    rank: int
    world: int
    #: the group of every rank (``ranks`` lists the global ranks in group order)
    world_group: Group

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, group: Group | None = None,
                   category: str = "train", caller_waits: bool = False) -> Handle:
        """Reduce ``tensor`` in place over ``group`` (``op``: sum, max or min). A caller that
        waits at once may say so with ``caller_waits`` (the transport may then skip a thread
        hand-off); results are the same either way."""
        ...

    def all_gather(self, tensor: torch.Tensor, *, group: Group | None = None,
                   category: str = "train") -> Handle:
        """Every rank's equal-size ``tensor``; the result is a list in group order."""
        ...

    def broadcast(self, tensor: torch.Tensor, src: int, *, group: Group | None = None,
                  category: str = "train") -> Handle:
        """``src``'s (a global rank) ``tensor`` into every rank's ``tensor``, in place."""
        ...
