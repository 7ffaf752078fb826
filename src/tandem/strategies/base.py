"""The strategy seam: one class per way of synchronising workers, and the one step loop.

A strategy declares its options, how many processes it needs and what it supports (checkpoints,
lost workers, which codecs), and runs one role per process (worker, server, agent, peer). Each
role gets a :class:`WorkerContext` holding everything a loop needs: the transport (every exchange
goes through it, so bytes are counted), the workload, the codec factory, injected faults and the
recorder, and returns a small dict of final figures.

A role that trains step by step is a :class:`StepLoop`. The loop is written once, here::

    compute -> screen -> exchange -> apply -> record -> evaluate -> checkpoint

and a role overrides only what differs: how it exchanges (``exchange``), how it applies the
result (``apply``), what it evaluates, what its checkpoint holds, what it reports at the end
(as Bagua's algorithms hook into one loop). Compute, the non-finite screen, the step record with
its bytes, the evaluation cadence and the checkpoint cadence are the loop's.

Adding a strategy: write one file (or one folder, for a method with several roles) under
``tandem/strategies/`` with a subclass decorated with ``@register``; the registry finds it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from tandem.checkpoint import StrategyCheckpoints
from tandem.codecs.base import CODECS, Codec
from tandem.errors import ConfigError
from tandem.registry import Registry
from tandem.trainer import evaluate, is_eval_step, screen_gradients, total_steps
from tandem.trainer.context import WorkerContext
from tandem.trainer.final_model import save_final_model

if TYPE_CHECKING:
    from collections.abc import Callable

    from tandem.config import RunConfig
    from tandem.trainer import LocalTrainer

__all__ = ["STRATEGIES", "Computed", "Exchanged", "StepLoop", "Strategy", "StrategyOptions",
           "WorkerContext", "codec_factory", "register"]


class StrategyOptions(BaseModel):
    """Base of every strategy's options model (unknown options are errors)."""

    model_config = ConfigDict(extra="forbid")


def codec_factory(cfg: RunConfig) -> Any:
    """``seed -> Codec`` for the run's codec (what :class:`WorkerContext` is handed)."""
    cls, options = CODECS[cfg.codec.name], dict(cfg.codec.options)

    def build(seed: int) -> Codec:
        return cls(options, seed=seed)

    return build


class Strategy:
    """Base class. Subclasses set ``name`` and ``Options`` and implement :meth:`run`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: the data-holding workers are ranks ``0 .. cfg.workers-1``; extra roles come after them
    #: True when the strategy finishes without some data workers (a parameter server with
    #: ``min_workers``): no closing barrier, and the launcher tolerates those workers' deaths
    tolerates_lost_workers: ClassVar[bool] = False
    #: True when the strategy writes checkpoints and can ``--resume`` from them
    supports_checkpoints: ClassVar[bool] = False
    #: why the strategy moves no codec messages (None: it encodes gradients with the run's
    #: codec); such a strategy refuses any codec but ``dense`` instead of silently ignoring it
    exact_exchange: ClassVar[str | None] = None
    #: True when each peer's code goes point to point to neighbours that decode it alone
    #: (gossip): only codecs whose messages are self-contained qualify (not PowerSGD or LGC)
    peer_codes: ClassVar[bool] = False
    #: True when each worker's code goes point to point to a server that decodes it alone
    #: (param_server): only self-contained codecs qualify, besides one the strategy runs by a
    #: path of its own (LGC-PS: the strategy's ``check`` says when); ``tandem plan`` predicts
    #: the self-contained ones only
    push_codes: ClassVar[bool] = False
    #: True when the number of exchanges is not known in advance (bsp_shared: one per
    #: superstep, ended by time unless ``grads_per_superstep``): a codec that counts its
    #: exchanges (``Codec.counts_exchanges``) then needs its stage lengths given, and
    #: ``tandem plan`` (which models supersteps by time) does not predict it
    exchanges_by_time: ClassVar[bool] = False
    #: True when every worker trains the replica it built itself from the seed (all-reduce,
    #: gossip, bsp_shared, the pipeline): the pre-flight then refuses a model factory that
    #: builds different weights for the same seed. False where the workers take their
    #: parameters from a server (param_server, coded_ps)
    needs_identical_start: ClassVar[bool] = True

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.opts = self.options_of(ctx.cfg)

    @classmethod
    def options_of(cls, cfg: RunConfig) -> Any:
        """This strategy's validated options from the run's config."""
        return cls.Options.model_validate(cfg.strategy.options)

    @classmethod
    def processes(cls, cfg: RunConfig) -> int:
        """How many processes the launcher starts (a parameter server adds its servers)."""
        return cfg.workers

    @classmethod
    def check(cls, cfg: RunConfig, options: Any) -> None:
        """Refuse, before any process starts, what this strategy cannot do with ``cfg`` (raise
        ConfigError naming the field and the fix). The resolve step calls it."""

    @classmethod
    def check_world(cls, cfg: RunConfig, world: int) -> None:
        """Refuse a job whose process count does not fit the config (under torchrun the world
        comes from ``--nnodes x --nproc-per-node``). Elastic membership (``--nnodes MIN:MAX``)
        is not supported: data partitions, topologies and codes are fixed at start."""
        expected = cls.processes(cfg)
        if world != expected:
            raise ConfigError(
                f"workers: strategy {cls.name} with workers={cfg.workers} runs {expected} "
                f"processes, but this job has {world}; set workers (and the strategy's extra "
                "roles) to match --nnodes x --nproc-per-node, with a fixed --nnodes (elastic "
                "membership is not supported)")

    @classmethod
    def check_training(cls, cfg: RunConfig, options: Any, spec: Any) -> None:
        """Refuse a step recipe (:class:`~tandem.trainer.spec.TrainSpec`) this strategy cannot
        honour; pre-flight calls it with the workload's recipe resolved."""

    @classmethod
    def unused_parameters_note(cls) -> str:
        """What this strategy does with parameters that get no gradient (pre-flight says it)."""
        if cls.exact_exchange:
            return "their gradient counts as zero"
        return "dense exchanges send zeros for them every step; sparse codecs send nothing"

    @classmethod
    def sub_configs(cls, cfg: RunConfig) -> list[RunConfig]:
        """Configurations of the jobs this one runs inside it (a pipeline's models), which the
        resolve step checks like the job's own."""
        return []

    @classmethod
    def total_steps(cls, cfg: RunConfig, train_size: int) -> int:
        """Steps per worker: ``--steps``, or ``--epochs`` over this worker's shard."""
        return total_steps(cfg, train_size)

    def eval_every(self, total: int) -> int:
        return self.ctx.cfg.eval_every or max(1, total // 20)

    def setup(self) -> None:
        """Build models, optimizers and codecs before the clock starts (called before the
        start barrier, so one-off costs do not count as training time)."""

    def run(self) -> dict[str, Any]:
        raise NotImplementedError


StrategyT = TypeVar("StrategyT", bound=type[Strategy])

#: every strategy, by name (discovered under ``tandem.strategies``)
STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "tandem.strategies")


def register(cls: StrategyT) -> StrategyT:
    """Class decorator: make a strategy available by its ``name``."""
    STRATEGIES.register(cls)
    return cls


# ---- the one step loop --------------------------------------------------------------------------
@dataclass
class Computed:
    """One step's compute: the loss, this worker's gradients and what it cost."""

    loss: float | None
    grads: list[torch.Tensor]
    compute_s: float
    straggled: bool = False
    #: set by the screen: the gradient was non-finite and ``nan_policy=skip`` replaced it
    skipped: bool = False
    #: extra fields for this step's record
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Exchanged:
    """What the exchange produced: the update to apply (``None``: nothing for :meth:`apply`),
    the seconds spent idle inside it, and extra fields for the step's record. ``comm_s`` is
    measured around :meth:`StepLoop.exchange` (minus ``idle_s``) unless the exchange sets it."""

    update: list[torch.Tensor] | None
    idle_s: float = 0.0
    comm_s: float | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class StepLoop:
    """One process's training loop: compute -> screen -> exchange -> apply -> record ->
    evaluate -> checkpoint, for ``total`` steps from ``start_step``.

    Subclasses implement :meth:`exchange` and override the other hooks where their method
    differs. Build the trainer (and every model: building one reseeds torch) before calling
    :meth:`restore`, which loads a checkpoint when resuming.
    """

    def __init__(self, ctx: WorkerContext, total: int, *, trainer: LocalTrainer | None = None,
                 barrier: Callable[[], Any] | None = None, every: int | None = None) -> None:
        self.ctx = ctx
        self.total = total
        self.trainer = trainer
        self.every = every or ctx.cfg.eval_every or max(1, total // 20)
        self.ckpt = StrategyCheckpoints(ctx, barrier=barrier)
        self.start_step = 0
        self.skipped = 0

    # ---- resume ------------------------------------------------------------------------------
    def restore(self) -> dict[str, Any] | None:
        """Load this rank's checkpoint when resuming (global RNG states included) and roll the
        killed run's later records back; returns the saved state or None on a fresh run."""
        state = self.ckpt.resume()
        if state is not None:
            self.load_state(state)
            self.start_step = int(state["step"])
            self.skipped = int(state.get("skipped", 0))
            self.ctx.recorder.resume_from(self.start_step)
        return state

    def state(self) -> dict[str, Any]:
        """What this role's checkpoint holds (tensors, numbers, strings, lists and dicts)."""
        assert self.trainer is not None
        return {"trainer": self.trainer.state_dict(), "skipped": self.skipped}

    def load_state(self, state: dict[str, Any]) -> None:
        assert self.trainer is not None
        self.trainer.load_state_dict(state["trainer"])

    # ---- the hooks ---------------------------------------------------------------------------
    def compute(self, step: int) -> Computed:
        """Forward/backward on this worker's next minibatch (injected slowness included)."""
        assert self.trainer is not None
        loss, grads, compute_s, straggled = self.trainer.compute(step)
        return Computed(loss, grads, compute_s, straggled)

    def screen(self, step: int, c: Computed) -> Computed:
        """Catch a NaN/Inf gradient before it is sent (``nan_policy``: stop raises naming the
        rank and step, skip sends zeros and counts the step)."""
        flat = self.trainer.flat_grad if self.trainer is not None else None
        c.grads, c.skipped = screen_gradients(c.grads, self.ctx.cfg.nan_policy, self.ctx.rank,
                                              step, flat=flat)
        if c.skipped:
            self.skipped += 1
            c.fields["skipped"] = True
        return c

    def exchange(self, step: int, c: Computed) -> Exchanged:
        raise NotImplementedError

    def apply(self, step: int, c: Computed, ex: Exchanged) -> None:
        """Take the optimizer step on the exchanged update."""
        if ex.update is not None:
            assert self.trainer is not None
            self.trainer.apply(ex.update)

    def record(self, step: int, c: Computed, ex: Exchanged) -> None:
        """One step record: times, the bytes the transport metered this step, loss, fields."""
        b = self.ctx.transport.end_step()
        record = self.ctx.recorder.step(
            step, compute_s=c.compute_s, comm_s=ex.comm_s or 0.0, idle_s=ex.idle_s,
            bytes_sent=b.sent, bytes_recv=b.recv, loss=c.loss, straggled=c.straggled,
            **c.fields, **ex.fields)
        self.step_callbacks(step, record)

    def step_callbacks(self, step: int, record: dict[str, Any]) -> None:
        """Tell the workload's callbacks that ``step`` is recorded."""
        for cb in self.ctx.workload.callbacks:
            cb.on_step_end(step, dict(record))

    def eval_due(self, step: int) -> bool:
        return is_eval_step(step, self.every, self.total)

    def evaluate(self, step: int) -> None:
        """Test accuracy and loss of this worker's model, the test set sharded over the world."""
        assert self.trainer is not None
        ev = evaluate(self.trainer.model, self.ctx.workload, self.ctx.transport)
        self.report_eval(step, ev.record())

    def report_eval(self, step: int, fields: dict[str, Any]) -> None:
        """Write an evaluation record and tell the workload's callbacks."""
        self.ctx.recorder.eval(step, **fields)
        for cb in self.ctx.workload.callbacks:
            cb.on_eval(step, {**fields, "rank": self.ctx.rank})

    def checkpoint_due(self, step: int) -> bool:
        return self.ckpt.due(step, self.total)

    def checkpoint(self, step: int) -> None:
        """Save the state after ``step`` (every rank of the set at the same step)."""
        self.ckpt.save(step + 1, self.state())

    def after_step(self, step: int, c: Computed, ex: Exchanged) -> None:
        """Anything a role does once a step is recorded (nothing by default)."""

    def finish(self) -> dict[str, Any]:
        """This process's final figures (``params``: its final parameters)."""
        assert self.trainer is not None
        return {"steps": self.total, "skipped_steps": self.skipped,
                "params": [p.detach().clone() for p in self.trainer.params]}

    # ---- the loop ----------------------------------------------------------------------------
    def run_step(self, step: int) -> None:
        rec = self.ctx.recorder
        c = self.screen(step, self.compute(step))
        t1 = time.perf_counter()
        ex = self.exchange(step, c)
        if ex.comm_s is None:
            ex.comm_s = time.perf_counter() - t1 - ex.idle_s
        self.apply(step, c, ex)
        self.record(step, c, ex)
        self.after_step(step, c, ex)
        if self.eval_due(step):
            with rec.evaluating():  # evaluation is not training time
                self.evaluate(step)
        if self.checkpoint_due(step):
            with rec.evaluating():  # checkpoint I/O (and its barrier) is not training time
                self.checkpoint(step)

    def save_model(self) -> None:
        """Write the run's final model (``model.pt``): rank 0's trainer model by default."""
        if self.ctx.rank == 0 and self.trainer is not None:
            save_final_model(self.ctx.run_dir, self.trainer.model, self.ctx.cfg,
                             step=self.total)

    def run(self) -> dict[str, Any]:
        for step in range(self.start_step, self.total):
            self.run_step(step)
        self.save_model()
        return self.finish()
