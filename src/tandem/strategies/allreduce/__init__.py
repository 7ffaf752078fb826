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

Delay (``--strategy-opt delay=1``; any codec): step ``t``'s exchange runs in a background thread
while step ``t + 1`` computes, and its mean is applied one step late (one-step-stale synchronous
SGD; the replicas stay equal, the result is no longer DDP's). A step then costs about
max(compute, exchange) instead of their sum: use it when the exchange is a large share of the
step (a slow link, a compressing codec whose bytes still take longer than the compute) and the
model tolerates one step of staleness. ``predict`` (on by default with ``delay=1``) computes
each gradient at ``w + (w - w_prev)``, the weights it will be applied near
(:mod:`tandem.strategies.allreduce.prediction`). Heavy momentum and a stale gradient can
oscillate: on the cluster benchmark's CNN (SGD, lr 0.05, momentum 0.9) plain ``delay=1``
ended at chance in 8 of 9 runs; with ``predict`` and Nesterov momentum (``optimizer: {name:
sgd, options: {nesterov: true}}``) every run trained, the dense codec to within a point of
``delay=0`` and top-k and PowerSGD 1.2 and 2.0 points below it (``bench/delay.py``, three
seeds). Pre-flight warns when ``delay=1`` meets heavy-ball SGD momentum. Check the accuracy
against ``delay=0`` on your model. Not with ``overlap=true`` (both claim the time of backward;
refused). See :mod:`tandem.strategies.allreduce.delayed`.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field, model_validator

from tandem.strategies.allreduce.buckets import BucketedAllReduce
from tandem.strategies.allreduce.delayed import CLOCK0, DelayedExchange
from tandem.strategies.allreduce.prediction import WeightPrediction
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
from tandem.telemetry.log import get_logger
from tandem.trainer import LocalTrainer

log = get_logger(__name__)


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
    delay: int = Field(0, ge=0, le=1, description="1: apply each step's mean one step late, "
                       "its exchange running during the next step's compute (one-step-stale "
                       "SGD, any codec); 0: synchronous, DDP-equal")
    predict: bool = Field(True, description="delay=1: compute each gradient at w + (w - "
                          "w_prev), the weights it is applied near (linear weight "
                          "prediction); false: at w (plain one-step-stale SGD)")

    @model_validator(mode="after")
    def _one_overlap(self) -> AllReduceOptions:
        if self.delay and self.overlap:
            raise ValueError("allreduce: delay=1 and overlap=true both hide communication "
                             "behind compute and cannot be combined; choose one (overlap: "
                             "dense codec, exact; delay: any codec, one step stale)")
        if "predict" in self.model_fields_set and not self.delay:
            raise ValueError("allreduce: predict shifts the weights a stale gradient is "
                             "computed on; it needs delay=1 (with delay=0 nothing is stale)")
        return self


@register
class AllReduceStrategy(Strategy):
    name = "allreduce"
    Options = AllReduceOptions
    supports_checkpoints = True

    @classmethod
    def check_training(cls, cfg: Any, options: Any, spec: Any) -> None:
        nesterov = bool(spec.optimizer_options.get("nesterov"))
        if options.delay and spec.optimizer_name == "sgd" and spec.momentum > 0 and \
                not nesterov:
            log.warning("allreduce delay=1 with heavy-ball momentum %g: a stale gradient fed "
                        "through momentum can oscillate (mnist5k's CNN at momentum 0.9 ended "
                        "at chance, bench/delay.py); Nesterov momentum compensates the delay: "
                        "--optimizer sgd --optimizer-opt nesterov=true", spec.momentum)

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
        self.delayed = (DelayedExchange(lambda g: self.codec.exchange(g, ctx.transport),
                                        ctx.rank, ctx.cfg.timeout_s) if opts.delay else None)
        self._final: list | None = None  # delay=1: the last step's own mean
        self.predict = (WeightPrediction(trainer.params) if opts.delay and opts.predict
                        else None)
        self._compute_started = 0.0
        self.codec.set_total_steps(total)
        self.correlation = (opts.correlation_every, opts.correlation_ratio)
        self.names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        self.restore()

    def state(self) -> dict[str, Any]:
        extra = {"delayed": self.delayed.state_dict()} if self.delayed is not None else {}
        if self.predict is not None:
            extra["predict"] = self.predict.state_dict()
        return {**super().state(), "codec": self.codec.state_dict(), **extra}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.codec.load_state_dict(state["codec"])
        if self.delayed is not None:
            self.delayed.load_state_dict(state.get("delayed", {}))
        if self.predict is not None:
            self.predict.load_state_dict(state.get("predict", {}))

    def compute(self, step: int) -> Computed:
        if self.delayed is not None:  # for the record's overlap fields
            self._compute_started = time.perf_counter() - CLOCK0
        if self.overlap is not None:
            self.overlap.arm(step)  # buckets leave from gradient hooks during this backward
        if self.predict is None:
            return super().compute(step)
        self.predict.shift()  # the gradient at the weights it will be applied near
        try:
            return super().compute(step)
        finally:
            self.predict.restore()

    def screen(self, step: int, c: Computed) -> Computed:
        if self.overlap is not None:
            return c  # every bucket was screened before it left (BucketedAllReduce)
        return super().screen(step, c)

    def exchange(self, step: int, c: Computed) -> Exchanged:
        every, ratio = self.correlation
        waited = self.delayed.drain() if self.delayed is not None else 0.0
        if every and ((step + 1) % every == 0 or step == 0) and self.ctx.world > 1:
            fields = gradient_correlation(c.grads, self.names, self.ctx.transport, ratio)
            if self.ctx.rank == 0:  # before the exchange: dense averages in place
                c.fields.update(fields)
        if self.overlap is not None:
            mean = self.overlap.finish()
            self.codec.step += 1
            return Exchanged(mean)
        if self.delayed is not None:  # apply step-1's mean; step's leaves during step+1
            timing = {"t_compute_start": self._compute_started,
                      "t_prev_comm_done": self.delayed.pending_done_at}
            update = self.delayed.take()
            self.delayed.submit(step, c.grads)
            if step == self.total - 1:  # the last step applies its own mean too
                waited += self.delayed.drain()
                self._final = self.delayed.take()
            return Exchanged(update, comm_s=waited, fields=timing)
        return Exchanged(self.codec.exchange(c.grads, self.ctx.transport))

    def apply(self, step: int, c: Computed, ex: Exchanged) -> None:
        super().apply(step, c, ex)
        if self.predict is not None:
            self.predict.applied()
        if self._final is not None:
            assert self.trainer is not None
            self.trainer.apply(self._final)
            self._final = None

    def evaluate(self, step: int) -> None:
        if self.delayed is not None:
            self.delayed.drain()  # the group is the evaluation's now
        super().evaluate(step)

    def checkpoint(self, step: int) -> None:
        if self.delayed is not None:
            self.delayed.drain()  # the checkpoint holds the mean in flight
        super().checkpoint(step)

    def finish(self) -> dict[str, Any]:
        info = self.codec.describe()
        if self.overlap is not None:
            info = {**info, "overlap_buckets": self.overlap.count}
        if self.delayed is not None:
            self.delayed.close()
        if info:
            self.ctx.recorder.info(codec=info)
        return super().finish()
