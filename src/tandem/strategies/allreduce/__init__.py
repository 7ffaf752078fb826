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

from typing import Any

from pydantic import Field

from tandem.strategies.allreduce.buckets import BucketedAllReduce
from tandem.strategies.base import (
    Computed,
    Exchanged,
    StepLoop,
    Strategy,
    StrategyOptions,
    WorkerContext,
    register,
)
from tandem.strategies.correlation import gradient_correlation
from tandem.trainer import LocalTrainer


class AllReduceOptions(StrategyOptions):
    overlap: bool = Field(False, description="dense codec: all-reduce gradient buckets during "
                          "backward (steps aside for nan_policy=skip and injected faults); off "
                          "by default: on an oversubscribed CPU the engine's thread slows "
                          "backward more than it hides")
    bucket_kb: float = Field(0.0, ge=0, description="overlap bucket size in KB; 0: auto (a "
                             "quarter of the gradient, 64 KB to 25 MB)")
    correlation_every: int = Field(0, ge=0, description="every N steps record how alike the "
                                   "workers' gradients are (per-layer cosine, top-k overlap; "
                                   "one all-gather, metered as telemetry); 0: off")
    correlation_ratio: float = Field(0.01, gt=0, le=1, description="top-k density of the "
                                     "support overlap")


@register
class AllReduceStrategy(Strategy):
    name = "allreduce"
    Options = AllReduceOptions
    supports_checkpoints = True

    def setup(self) -> None:
        self.loop = AllReduceWorker(self.ctx, self.opts,
                                    self.total_steps(self.ctx.cfg, len(self.ctx.workload.train)))

    def run(self) -> dict[str, Any]:
        return self.loop.run()


class AllReduceWorker(StepLoop):
    """Every step: the codec's exchange returns the group mean; every worker applies it."""

    def __init__(self, ctx: WorkerContext, opts: AllReduceOptions, total: int) -> None:
        trainer = LocalTrainer(ctx)
        super().__init__(ctx, total, trainer=trainer)
        self.codec = ctx.make_codec()
        self.overlap: BucketedAllReduce | None = None
        if getattr(self.codec, "zero_copy_gradients", False) and \
                trainer.use_flat_gradients():  # DDP's gradient_as_bucket_view
            cfg, faults = ctx.cfg, ctx.faults
            quiet = (cfg.nan_policy == "stop" and not cfg.inject_nan and faults.slow_factor == 1.0
                     and (faults.stragglers is None or faults.stragglers.p <= 0))
            if opts.overlap and quiet and ctx.world > 1 and self.codec.opts.momentum == 0:
                self.overlap = BucketedAllReduce(trainer, ctx.transport,
                                                 int(opts.bucket_kb * 1024))
        self.codec.set_total_steps(total)
        self.correlation = (opts.correlation_every, opts.correlation_ratio)
        self.names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        self.restore()

    def state(self) -> dict[str, Any]:
        return {**super().state(), "codec": self.codec.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.codec.load_state_dict(state["codec"])

    def compute(self, step: int) -> Computed:
        if self.overlap is not None:
            self.overlap.arm(step)  # buckets leave from gradient hooks during this backward
        return super().compute(step)

    def screen(self, step: int, c: Computed) -> Computed:
        if self.overlap is not None:
            return c  # every bucket was screened before it left (BucketedAllReduce)
        return super().screen(step, c)

    def exchange(self, step: int, c: Computed) -> Exchanged:
        every, ratio = self.correlation
        if every and ((step + 1) % every == 0 or step == 0) and self.ctx.world > 1:
            fields = gradient_correlation(c.grads, self.names, self.ctx.transport, ratio)
            if self.ctx.rank == 0:  # before the exchange: dense averages in place
                c.fields.update(fields)
        if self.overlap is not None:
            mean = self.overlap.finish()
            self.codec.step += 1
            return Exchanged(mean)
        return Exchanged(self.codec.exchange(c.grads, self.ctx.transport))

    def finish(self) -> dict[str, Any]:
        info = self.codec.describe()
        if self.overlap is not None:
            info = {**info, "overlap_buckets": self.overlap.count}
        if info:
            self.ctx.recorder.info(codec=info)
        return super().finish()
