"""Synchronous data-parallel training: the DDP-equivalent baseline.

Every step each worker computes its gradient, the codec's ``exchange`` returns the group mean
(dense: one all-reduce of the flattened gradient, exactly what DDP computes), and every worker
applies the same update. With the dense codec and the same seeds the parameters equal DDP's.

Any codec works here: summable codes are all-reduced, the others all-gathered (see
:mod:`tandem.codecs.base`). Everyone waits for the slowest worker each step, which is what the
straggler-tolerant strategies are measured against.

Reliability: ``--checkpoint-every N`` saves model, optimizer, codec memory, data position and RNG
states every N steps; ``--resume`` continues bit-exactly. A NaN/Inf gradient is caught before it
is sent: ``--nan-policy stop`` ends the run with an error naming the rank and step, ``skip`` sends
zeros for that worker's step instead (its contribution is dropped) and counts the step.
"""

from __future__ import annotations

import time
from typing import Any

from tandem.checkpoint import Checkpointer, config_fingerprint, rng_state, set_rng_state
from tandem.strategies.base import Strategy
from tandem.strategies.registry import register
from tandem.strategies.training import (
    LocalTrainer,
    evaluate,
    is_eval_step,
    screen_gradients,
)


@register
class AllReduceStrategy(Strategy):
    name = "allreduce"
    supports_checkpoints = True

    def setup(self) -> None:
        ctx = self.ctx
        self.trainer = LocalTrainer(ctx)
        self.codec = ctx.make_codec()
        self.total = self.total_steps(ctx.cfg, len(ctx.workload.train))
        if hasattr(self.codec, "set_total_steps"):
            self.codec.set_total_steps(self.total)
        self.ckpt = Checkpointer(ctx.run_dir, ctx.rank,
                                 config_fingerprint(ctx.cfg.model_dump(mode="json")),
                                 every=ctx.cfg.checkpoint_every)
        self.start_step = 0
        self.skipped = 0
        if ctx.cfg.resume:
            state = self.ckpt.load()
            self.trainer.load_state_dict(state["trainer"])
            self.codec.load_state_dict(state["codec"])
            set_rng_state(state["rng"])
            self.start_step, self.skipped = int(state["step"]), int(state["skipped"])

    def _save(self, next_step: int) -> None:
        state = {"trainer": self.trainer.state_dict(), "codec": self.codec.state_dict(),
                 "rng": rng_state(), "skipped": self.skipped}
        self.ckpt.save(next_step, state, lambda: self.ctx.transport.barrier().wait())

    def run(self) -> dict[str, Any]:
        ctx, trainer, codec, total = self.ctx, self.trainer, self.codec, self.total
        every = self.eval_every(total)
        rec = ctx.recorder
        for step in range(self.start_step, total):
            loss, grads, compute_s, straggled = trainer.compute(step)
            extra: dict[str, Any] = {}
            grads, skipped = screen_gradients(grads, ctx.cfg.nan_policy, ctx.rank, step)
            if skipped:
                self.skipped += 1
                extra["skipped"] = True
            t1 = time.perf_counter()
            mean = codec.exchange(grads, ctx.transport)
            comm_s = time.perf_counter() - t1
            trainer.apply(mean)
            b = ctx.transport.end_step()
            rec.step(step, compute_s=compute_s, comm_s=comm_s, idle_s=0.0, bytes_sent=b.sent,
                     bytes_recv=b.recv, loss=loss, straggled=straggled, **extra)
            if is_eval_step(step, every, total):
                with rec.evaluating():
                    acc, tloss = evaluate(trainer.model, ctx.workload, ctx.transport)
                rec.eval(step, accuracy=acc, loss=tloss)
            if self.ckpt.due(step, total):
                with rec.evaluating():  # checkpoint I/O is not training time either
                    self._save(step + 1)
        info = codec.describe()
        if info:
            rec.info(codec=info)
        return {"steps": total, "skipped_steps": self.skipped,
                "params": [p.detach().clone() for p in trainer.params]}
