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

Overlap (``--strategy-opt overlap=true``; off by default): with the dense codec the gradients live
in one flat buffer and each bucket's all-reduce starts from a gradient hook as soon as backward
has filled it (:mod:`tandem.strategies.allreduce.buckets`), as DDP does; the update is the same
mean. It steps aside (one all-reduce after backward) with ``--nan-policy skip``, with injected
stragglers,
slow workers or NaNs (their effects come after backward), and for every other codec.
``bucket_kb`` sets the bucket size (0: auto).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from tandem.checkpoint import StrategyCheckpoints, check_resume
from tandem.strategies.allreduce.buckets import BucketedAllReduce
from tandem.strategies.base import Strategy, StrategyOptions, register
from tandem.trainer import (
    LocalTrainer,
    evaluate,
    is_eval_step,
    screen_gradients,
)


class AllReduceOptions(StrategyOptions):
    overlap: bool = Field(False, description="dense codec: all-reduce gradient buckets during "
                          "backward (steps aside for nan_policy=skip and injected faults); off "
                          "by default: on an oversubscribed CPU the engine's thread slows "
                          "backward more than it hides")
    bucket_kb: float = Field(0.0, ge=0, description="overlap bucket size in KB; 0: auto (a "
                             "quarter of the gradient, 64 KB to 25 MB)")


@register
class AllReduceStrategy(Strategy):
    name = "allreduce"
    Options = AllReduceOptions
    supports_checkpoints = True

    @classmethod
    def processes(cls, cfg: Any) -> int:
        check_resume(cfg)  # a mismatched --resume fails here, before any process starts
        return cfg.workers

    def setup(self) -> None:
        ctx = self.ctx
        self.trainer = LocalTrainer(ctx)
        self.codec = ctx.make_codec()
        self.overlap: BucketedAllReduce | None = None
        if getattr(self.codec, "zero_copy_gradients", False) and \
                self.trainer.use_flat_gradients():  # DDP's gradient_as_bucket_view
            cfg = ctx.cfg
            faults = ctx.faults
            quiet = (cfg.nan_policy == "stop" and not cfg.inject_nan and faults.slow_factor == 1.0
                     and (faults.stragglers is None or faults.stragglers.p <= 0))
            if self.opts.overlap and quiet and ctx.world > 1 and self.codec.opts.momentum == 0:
                self.overlap = BucketedAllReduce(self.trainer, ctx.transport,
                                                 int(self.opts.bucket_kb * 1024))
        self.total = self.total_steps(ctx.cfg, len(ctx.workload.train))
        if hasattr(self.codec, "set_total_steps"):
            self.codec.set_total_steps(self.total)
        self.ckpt = StrategyCheckpoints(ctx)
        self.start_step = 0
        self.skipped = 0
        state = self.ckpt.resume()
        if state is not None:
            self.trainer.load_state_dict(state["trainer"])
            self.codec.load_state_dict(state["codec"])
            self.start_step, self.skipped = int(state["step"]), int(state["skipped"])
            ctx.recorder.resume_from(self.start_step)  # the killed run's later steps: rolled back

    def _save(self, next_step: int) -> None:
        self.ckpt.save(next_step, {"trainer": self.trainer.state_dict(),
                                   "codec": self.codec.state_dict(), "skipped": self.skipped})

    def _after_step(self, step: int, total: int, every: int) -> None:
        ctx, rec = self.ctx, self.ctx.recorder
        if is_eval_step(step, every, total):
            with rec.evaluating():
                acc, tloss = evaluate(self.trainer.model, ctx.workload, ctx.transport)
            rec.eval(step, accuracy=acc, loss=tloss)
        if self.ckpt.due(step, total):
            with rec.evaluating():  # checkpoint I/O is not training time either
                self._save(step + 1)

    def run(self) -> dict[str, Any]:
        ctx, trainer, codec, total = self.ctx, self.trainer, self.codec, self.total
        every = self.eval_every(total)
        rec = ctx.recorder
        for step in range(self.start_step, total):
            if self.overlap is not None:
                self.overlap.arm(step)
                loss, grads, compute_s, straggled = trainer.compute(step)
                t1 = time.perf_counter()
                mean = self.overlap.finish()
                codec.step += 1
                comm_s = time.perf_counter() - t1
                trainer.apply(mean)
                b = ctx.transport.end_step()
                rec.step(step, compute_s=compute_s, comm_s=comm_s, idle_s=0.0, bytes_sent=b.sent,
                         bytes_recv=b.recv, loss=loss, straggled=straggled)
                self._after_step(step, total, every)
                continue
            loss, grads, compute_s, straggled = trainer.compute(step)
            extra: dict[str, Any] = {}
            grads, skipped = screen_gradients(grads, ctx.cfg.nan_policy, ctx.rank, step,
                                              flat=trainer.flat_grad)
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
            self._after_step(step, total, every)
        info = codec.describe()
        if self.overlap is not None:
            info = {**info, "overlap_buckets": self.overlap.count}
        if info:
            rec.info(codec=info)
        return {"steps": total, "skipped_steps": self.skipped,
                "params": [p.detach().clone() for p in trainer.params]}
