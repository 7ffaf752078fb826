"""One process, no communication: the compute-only limit every benchmark reports against.

It runs the same per-worker step (same batch size, same model, any injected slowness) with no
exchange at all, so its step time is the floor no distributed strategy can beat; a method's
``step time / local step time`` is its communication overhead.

Reliability: ``--checkpoint-every N`` saves the model, optimizer, data position and RNG states
every N steps; ``--resume`` continues bit-exactly (the same parameters as an uninterrupted run).
"""

from __future__ import annotations

from typing import Any

from tandem.checkpoint import StrategyCheckpoints, check_resume
from tandem.strategies.base import Strategy, register
from tandem.trainer import LocalTrainer, evaluate, is_eval_step


@register
class LocalStrategy(Strategy):
    name = "local"
    supports_checkpoints = True
    exact_exchange = "one process, no communication"

    @classmethod
    def processes(cls, cfg: Any) -> int:
        check_resume(cfg)
        return 1

    def setup(self) -> None:
        self.trainer = LocalTrainer(self.ctx, worker=0)
        self.ckpt = StrategyCheckpoints(self.ctx, barrier=lambda: None)  # one process
        self.start_step = 0
        state = self.ckpt.resume()
        if state is not None:
            self.trainer.load_state_dict(state["trainer"])
            self.start_step = int(state["step"])
            self.ctx.recorder.resume_from(self.start_step)  # later steps: rolled back

    def run(self) -> dict[str, Any]:
        ctx = self.ctx
        trainer = self.trainer
        total = self.total_steps(ctx.cfg, len(ctx.workload.train))
        every = self.eval_every(total)
        rec = ctx.recorder
        for step in range(self.start_step, total):
            loss, grads, compute_s, straggled = trainer.compute(step)
            trainer.apply(grads)
            ctx.transport.end_step()
            rec.step(step, compute_s=compute_s, comm_s=0.0, idle_s=0.0, bytes_sent=0,
                     bytes_recv=0, loss=loss, straggled=straggled)
            if is_eval_step(step, every, total):
                with rec.evaluating():
                    acc, tloss = evaluate(trainer.model, ctx.workload, ctx.transport)
                rec.eval(step, accuracy=acc, loss=tloss)
            if self.ckpt.due(step, total):
                with rec.evaluating():  # checkpoint I/O is not training time
                    self.ckpt.save(step + 1, {"trainer": trainer.state_dict()})
        return {"steps": total, "params": [p.detach().clone() for p in trainer.params]}
