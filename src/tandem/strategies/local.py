"""One process, no communication: the compute-only limit every benchmark reports against.

It runs the same per-worker step (same batch size, same model, any injected slowness) with no
exchange at all, so its step time is the floor no distributed strategy can beat; a method's
``step time / local step time`` is its communication overhead.

Reliability: ``--checkpoint-every N`` saves the model, optimizer, data position and RNG states
every N steps; ``--resume`` continues bit-exactly (the same parameters as an uninterrupted run).
"""

from __future__ import annotations

from typing import Any

from tandem.strategies.base import Computed, Exchanged, StepLoop, Strategy, register
from tandem.trainer import LocalTrainer


@register
class LocalStrategy(Strategy):
    name = "local"
    supports_checkpoints = True
    exact_exchange = "one process, no communication"

    @classmethod
    def processes(cls, cfg: Any) -> int:
        return 1

    def setup(self) -> None:
        ctx = self.ctx
        self.loop = LocalWorker(ctx, self.total_steps(ctx.cfg, len(ctx.workload.train)))

    def run(self) -> dict[str, Any]:
        return self.loop.run()


class LocalWorker(StepLoop):
    """Applies its own gradient: the step loop with nothing to exchange."""

    def __init__(self, ctx: Any, total: int) -> None:
        super().__init__(ctx, total, trainer=LocalTrainer(ctx, worker=0),
                         barrier=lambda: None)  # one process: no barrier
        self.restore()

    def exchange(self, step: int, c: Computed) -> Exchanged:
        return Exchanged(c.grads, comm_s=0.0)
