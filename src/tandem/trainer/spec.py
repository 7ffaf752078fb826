"""How one optimizer step is made, resolved once from the run's config and the workload.

Precedence, field by field: what the config sets, else what the workload (the task contract,
:class:`~tandem.workloads.base.Workload`) sets, else the built-in default (plain SGD, constant
learning rate, no clipping, one micro-batch, fp32). Every strategy builds its optimizers and
schedules through :class:`TrainSpec`, so a job means the same on each of them (see each
strategy's page for where the optimizer runs: the workers, a server, an agent, each peer).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tandem.config import RunConfig, ScheduleConfig
from tandem.errors import ConfigError
from tandem.workloads.base import Workload

_BUILTIN = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


class WarmupSchedule:
    """``lr_t / lr`` for the built-in schedules: linear warm-up over ``warmup`` steps, then
    constant, cosine or linear decay to ``min_ratio`` at ``total``. A class (not a closure) so
    an LR scheduler holding it pickles and checkpoints."""

    def __init__(self, name: str, warmup: int, total: int, min_ratio: float) -> None:
        self.name, self.warmup, self.total, self.min_ratio = name, warmup, max(1, total), min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        decay = 0.5 * (1.0 + math.cos(math.pi * t)) if self.name == "cosine" else 1.0 - t
        return self.min_ratio + (1.0 - self.min_ratio) * decay


@dataclass(frozen=True)
class TrainSpec:
    """The resolved recipe of one optimizer step (see the module docstring)."""

    lr: float
    momentum: float
    weight_decay: float
    optimizer_name: str | None  # a built-in optimizer, or None for the workload's factory
    optimizer_options: dict[str, Any]
    optimizer_factory: Callable[..., torch.optim.Optimizer] | None
    schedule: ScheduleConfig | None
    scheduler_factory: Callable[..., Any] | None
    clip: float | None
    accumulation: int
    precision: str

    @property
    def elementwise(self) -> bool:
        """A built-in optimizer acts on each element alone, so a parameter server may run it on
        shards of the parameters; a factory may build parameter groups over the whole model."""
        return self.optimizer_factory is None

    @property
    def plain_sgd(self) -> bool:
        """Constant-rate SGD without momentum or clipping: the closed form ``x - lr * g`` (with
        decoupled weight decay) that gossip and coded_ps apply to a flat parameter vector."""
        return (self.optimizer_name == "sgd" and not self.optimizer_options
                and self.momentum == 0 and self.schedule is None
                and self.scheduler_factory is None and self.clip is None)

    def make_optimizer(self, params: torch.nn.Module | list[torch.Tensor]
                       ) -> torch.optim.Optimizer:
        """The optimizer over a model (or, for a built-in one, a list of tensors)."""
        if self.optimizer_factory is not None:
            if not isinstance(params, torch.nn.Module):
                raise ConfigError("the workload's optimizer factory needs the whole model; it "
                                  "cannot run on parameter shards")
            fn = self.optimizer_factory
            takes_lr = "lr" in inspect.signature(fn).parameters
            return fn(params, lr=self.lr) if takes_lr else fn(params)
        tensors = list(params.parameters()) if isinstance(params, torch.nn.Module) else params
        tensors = [p for p in tensors if p.requires_grad]
        kw: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kw["momentum"] = self.momentum
        try:
            return _BUILTIN[self.optimizer_name or "sgd"](tensors, **kw, **self.optimizer_options)
        except TypeError as err:
            raise ConfigError(f"optimizer.options: {err}") from None

    def make_scheduler(self, optimizer: torch.optim.Optimizer, total: int) -> Any:
        """The LR scheduler (stepped once per optimizer step), or None for a constant rate."""
        if self.schedule is not None:
            s = self.schedule
            if s.name == "constant" and s.warmup_steps == 0:
                return None
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, WarmupSchedule(s.name, s.warmup_steps, total, s.min_lr_ratio))
        if self.scheduler_factory is not None:
            return self.scheduler_factory(optimizer, total)
        return None

    def describe(self) -> dict[str, Any]:
        """For the run record."""
        opt = self.optimizer_name or _name(self.optimizer_factory)
        sched = self.schedule.model_dump() if self.schedule is not None else \
            _name(self.scheduler_factory)
        return {"optimizer": opt, "lr": self.lr, "schedule": sched, "clip_grad_norm": self.clip,
                "accumulation": self.accumulation, "precision": self.precision}


def _name(fn: Any) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def training_spec(cfg: RunConfig, workload: Workload) -> TrainSpec:
    """Resolve the step recipe of ``cfg`` with ``workload`` (see the module docstring)."""
    if cfg.optimizer is not None:
        name, options, factory = cfg.optimizer.name, dict(cfg.optimizer.options), None
    elif workload.optimizer is not None:
        name, options, factory = None, {}, workload.optimizer
    else:
        name, options, factory = "sgd", {}, None
    schedule = cfg.schedule
    sched_factory = workload.scheduler if schedule is None else None
    clip = cfg.clip_grad_norm if cfg.clip_grad_norm is not None else workload.clip_grad_norm
    accumulation = cfg.accumulation or workload.accumulation or 1
    precision = cfg.precision or workload.precision or "fp32"
    return TrainSpec(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                     optimizer_name=name, optimizer_options=options, optimizer_factory=factory,
                     schedule=schedule, scheduler_factory=sched_factory, clip=clip,
                     accumulation=int(accumulation), precision=precision)


#: config fields a workload may give defaults for (when the config leaves them unset)
DEFAULTABLE = ("lr", "batch_size", "momentum", "weight_decay", "eval_every", "steps", "epochs")


def apply_workload_defaults(cfg: RunConfig, workload: Workload) -> RunConfig:
    """``cfg`` with the workload's ``defaults`` filled into the fields the user did not set
    (``lr``, ``batch_size``, ...), and its ``eval_every`` when the config leaves it at 0."""
    bad = sorted(set(workload.defaults) - set(DEFAULTABLE))
    if bad:
        raise ConfigError(f"workload {workload.name}: defaults for {bad} are not supported; "
                          f"a workload may default {list(DEFAULTABLE)}")
    update = {k: v for k, v in workload.defaults.items() if k not in cfg.model_fields_set}
    if workload.eval_every and not cfg.eval_every and "eval_every" not in update:
        update["eval_every"] = workload.eval_every
    if not update:
        return cfg
    data = cfg.model_dump(mode="json")
    data.update(update)
    return RunConfig.model_validate(data)
