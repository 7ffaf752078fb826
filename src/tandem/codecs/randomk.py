"""randomk: send the gradient's entries at ``k`` random positions that every worker draws alike
(shared seed, new draw per step), so only the values travel and they are summed by all-reduce.

When to use: like top-k but cheaper to encode (no sort) and summable, so it rides a ring
all-reduce (bandwidth per worker independent of N) instead of an all-gather (grows with N). It
carries less signal per byte than top-k, so it needs error feedback (default on) and typically a
ratio 2-10x higher than top-k for the same accuracy. Tuning: ``ratio`` (density); keep
``error_feedback`` on unless you rescale the learning rate yourself. At a density well under
1 % an entry waits ~1/ratio steps and its residual can land as one burst: ``ef_clip`` (as in
top-k and LGC; 2 is LGC's default) caps the residual's norm at that multiple of the step's
gradient norm. On Fashion-MNIST's CNN at 0.34 % with codec momentum 0.9 and lr 0.05 random-k
without a cap diverged to a non-finite gradient by step 223 (``bench/lgc.py``).

The positions never travel: every worker regenerates them from ``(seed, step)``, which is why the
codec's ``seed`` must be the same on every worker (the strategies pass the run seed).

Bytes per worker per step: all-reduce of ``4 * k`` bytes, ``k = ceil(ratio * D)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from tandem.codecs.base import (
    Codec,
    CodecOptions,
    Message,
    group_rank,
    register,
    step_generator,
)
from tandem.codecs.memory import ErrorFeedback
from tandem.codecs.topk import keep_count
from tandem.flat import unflatten

if TYPE_CHECKING:
    from tandem.codecs.collectives import Collectives
    from tandem.transport.transport import Group


class RandomKOptions(CodecOptions):
    ratio: float = Field(0.01, gt=0, le=1, description="fraction of entries sent each step")
    error_feedback: bool = Field(True, description="accumulate what was not sent")
    ef_clip: float = Field(0.0, ge=0, description="cap the residual's norm at ef_clip x the "
                           "norm of this step's (momentum-corrected) gradient; 0 = off")


@register
class RandomKCodec(Codec):
    """randomk: values at shared random positions (fp32), error feedback, summed by all-reduce."""

    name = "randomk"
    transfer = "sum"
    error_feedback = True
    Options = RandomKOptions

    def __init__(self, options: Any = None, *, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self._pos_key: tuple[int, int] | None = None
        self._pos = torch.empty(0, dtype=torch.int64)

    def new_memory(self) -> ErrorFeedback:
        o = self.opts
        return ErrorFeedback(o.momentum, o.momentum_masking, residual=o.error_feedback,
                             clip=o.ef_clip)

    def positions(self, dim: int, step: int) -> torch.Tensor:
        """The positions of ``step``: the same on every worker with the same seed."""
        if self._pos_key == (dim, step):
            return self._pos
        self._pos_key, self._pos = (dim, step), self._draw(dim, step)
        return self._pos

    def _draw(self, dim: int, step: int) -> torch.Tensor:
        gen = step_generator(self.seed, step, 0x52414E44)
        k = keep_count(dim, self.opts.ratio)
        if 4 * k > dim:
            return torch.randperm(dim, generator=gen)[:k].sort().values
        # k << dim: draw with replacement, drop repeats, pick k of them at random (O(k log k)).
        pool = torch.randint(dim, (k + k // 4 + 16,), generator=gen).unique()
        while pool.numel() < k:
            more = torch.randint(dim, (k + k // 4 + 16,), generator=gen)
            pool = torch.cat([pool, more]).unique()
        return pool[torch.randperm(pool.numel(), generator=gen)[:k]].sort().values

    def encode(self, grads: list[torch.Tensor]) -> Message:
        shapes = [tuple(g.shape) for g in grads]
        flat = self.memory.corrected_flat(grads)
        idx = self.positions(flat.numel(), self.step)
        msg = Message([flat.index_select(0, idx)], {"shapes": shapes, "dim": flat.numel()})
        self.memory.keep_flat(flat, split=idx)
        self.memory.cap_residual()
        return msg

    def decode(self, msg: Message) -> list[torch.Tensor]:
        """Values onto the positions of the codec's current ``step`` (the message's step: a
        receiver sets ``step`` before decoding, so the positions never travel)."""
        out = torch.zeros(msg.meta["dim"], dtype=torch.float32)
        out.index_copy_(0, self.positions(msg.meta["dim"], self.step), msg.tensors[0].float())
        return unflatten(out, msg.meta["shapes"])

    def add_decoded(self, msg: Message, flat: torch.Tensor) -> None:
        """The values added at the positions of the codec's current ``step`` (distinct
        positions: bit for bit the dense decode's sum)."""
        flat.index_add_(0, self.positions(msg.meta["dim"], self.step), msg.tensors[0].float())

    def exchange(self, grads: list[torch.Tensor], transport: Collectives,
                 group: Group | None = None) -> list[torch.Tensor]:
        self.rank, size = group_rank(transport, group)
        msg = self.encode(grads)
        if size > 1:
            transport.all_reduce(msg.tensors[0], group=group).wait()
            msg.tensors[0] /= size
        out = self.decode(msg)
        self.step += 1
        return out
