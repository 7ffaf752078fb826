"""The strategy seam: one class per way of synchronising workers.

A strategy owns the step loop of one process's role (worker, server, controller, peer). It gets a
:class:`WorkerContext` holding everything a loop needs: the transport (every exchange goes through
it, so bytes are counted), the workload, the codec factory, injected faults and the recorder. It
reports per step compute / communication / idle seconds and bytes, and returns a small dict of
final figures.

Adding a strategy: write one file (or one folder, for a method with several roles) under
``tandem/strategies/`` with a subclass decorated with ``@register``; the registry finds it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from tandem.codecs.base import CODECS, Codec
from tandem.registry import Registry
from tandem.trainer.context import WorkerContext

if TYPE_CHECKING:
    from tandem.config import RunConfig

__all__ = ["STRATEGIES", "Strategy", "StrategyOptions", "WorkerContext", "codec_factory",
           "register"]


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
    def sub_configs(cls, cfg: RunConfig) -> list[RunConfig]:
        """Configurations of the jobs this one runs inside it (a pipeline's models), which the
        resolve step checks like the job's own."""
        return []

    @classmethod
    def total_steps(cls, cfg: RunConfig, train_size: int) -> int:
        """Steps per worker: ``--steps``, or ``--epochs`` over this worker's shard."""
        if cfg.steps is not None:
            return cfg.steps
        epochs = cfg.epochs if cfg.epochs is not None else 1.0
        shard = max(1, train_size // max(1, cfg.workers))
        return max(1, math.ceil(epochs * shard / cfg.batch_size))

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
