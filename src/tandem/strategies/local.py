"""One process, no communication: the compute-only limit every benchmark reports against.

It runs the same per-worker step (same batch size, same model, any injected slowness) with no
exchange at all, so its step time is the floor no distributed strategy can beat; a method's
``step time / local step time`` is its communication overhead.
"""

from __future__ import annotations

from typing import Any

from tandem.strategies.base import Strategy
from tandem.strategies.registry import register
from tandem.strategies.training import LocalTrainer, evaluate, is_eval_step


@register
class LocalStrategy(Strategy):
    name = "local"

    @classmethod
    def processes(cls, cfg: Any) -> int:
        return 1

    def setup(self) -> None:
        self.trainer = LocalTrainer(self.ctx, worker=0)

    def run(self) -> dict[str, Any]:
        ctx = self.ctx
        trainer = self.trainer
        total = self.total_steps(ctx.cfg, len(ctx.workload.train))
        every = self.eval_every(total)
        rec = ctx.recorder
        for step in range(total):
            loss, grads, compute_s, straggled = trainer.compute(step)
            trainer.apply(grads)
            ctx.transport.end_step()
            rec.step(step, compute_s=compute_s, comm_s=0.0, idle_s=0.0, bytes_sent=0,
                     bytes_recv=0, loss=loss, straggled=straggled)
            if is_eval_step(step, every, total):
                with rec.evaluating():
                    acc, tloss = evaluate(trainer.model, ctx.workload, ctx.transport)
                rec.eval(step, accuracy=acc, loss=tloss)
        return {"steps": total, "params": [p.detach().clone() for p in trainer.params]}
