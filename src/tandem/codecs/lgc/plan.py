"""The layout every LGC round works on (:class:`Plan`) and what a round needs of the codec
(:class:`RoundState`), kept apart from the codec class so the rounds need not import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from tandem.codecs.lgc.autoencoder import AETrainer


@dataclass
class Plan:
    shapes: list[tuple[int, ...]]
    dense: list[int]
    comp: list[int]
    sizes: list[int]
    k: int
    m: int
    z: int
    #: the compressed layers are one contiguous range of the flat gradient: [start, stop)
    start: int = 0
    stop: int = 0


class RoundState(Protocol):
    """The parts of :class:`~tandem.codecs.lgc.codec.LGCCodec` the rounds read and write."""

    opts: Any
    step: int
    codec_s: list[float]
    fallbacks: int
    _sent_idx: torch.Tensor | None

    def trainer(self, p: Plan, size: int) -> AETrainer: ...

    def shared_positions(self, x: torch.Tensor, p: Plan, ctx: Any,
                         extra: list[torch.Tensor] | None = None,
                         specs: list[tuple[torch.dtype, tuple[int, ...]]] | None = None,
                         order: torch.Tensor | None = None) -> list[torch.Tensor]: ...

    def warmup_ratio(self, step: int) -> float: ...
