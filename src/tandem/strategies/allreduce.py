"""Synchronous data-parallel training: the DDP-equivalent baseline.

Every step each worker computes its gradient, the codec's ``exchange`` returns the group mean
(dense: one all-reduce of the flattened gradient, exactly what DDP computes), and every worker
applies the same update. With the dense codec and the same seeds the parameters equal DDP's.

Any codec works here: summable codes are all-reduced, the others all-gathered (see
:mod:`tandem.codecs.base`). Everyone waits for the slowest worker each step, which is what the
straggler-tolerant strategies are measured against.
"""

from __future__ import annotations

import time
from typing import Any

from tandem.strategies.base import Strategy
from tandem.strategies.registry import register
from tandem.strategies.training import (
    LocalTrainer,
    check_finite,
    evaluate,
    is_eval_step,
    raise_non_finite,
)


@register
class AllReduceStrategy(Strategy):
    name = "allreduce"

    def setup(self) -> None:
        self.trainer = LocalTrainer(self.ctx)

    def run(self) -> dict[str, Any]:
        ctx = self.ctx
        trainer = self.trainer
        codec = ctx.make_codec()
        total = self.total_steps(ctx.cfg, len(ctx.workload.train))
        if hasattr(codec, "set_total_steps"):
            codec.set_total_steps(total)
        every = self.eval_every(total)
        skipped = 0
        rec = ctx.recorder
        for step in range(total):
            loss, grads, compute_s, straggled = trainer.compute(step)
            extra: dict[str, Any] = {}
            if not check_finite(grads):
                if ctx.cfg.nan_policy == "stop":
                    raise_non_finite(ctx.rank, step)
                grads = [g.nan_to_num(0.0, 0.0, 0.0).zero_() for g in grads]
                skipped += 1
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
        info = codec.describe()
        if info:
            rec.info(codec=info)
        return {"steps": total, "skipped_steps": skipped,
                "params": [p.detach().clone() for p in trainer.params]}
