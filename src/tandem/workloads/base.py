"""What a workload is: a model factory, in-memory train/test tensors and a loss.

Every bundled dataset is small enough to live in memory as two tensors, so a worker's minibatch is
one fancy-indexing operation (no DataLoader processes, nothing to re-seed) and every process that
builds the same workload with the same seed holds bit-identical data.

Your own data fits the same shape: :meth:`Workload.custom` wraps any ``torch.utils.data.Dataset``
(it is materialised once with :meth:`ArrayDataset.from_dataset`).

The partitioners and the minibatch iterator live in :mod:`~tandem.workloads.partition` and
:mod:`~tandem.workloads.loader`; they are re-exported here so callers need one import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from tandem.errors import ConfigError, DataError
from tandem.registry import Registry
from tandem.workloads.dataset import ArrayDataset
from tandem.workloads.loader import ShardLoader
from tandem.workloads.metrics import Metric, accuracy, token_accuracy
from tandem.workloads.partition import cyclic_allocation, partition, partition_indices

__all__ = [
    "WORKLOADS", "ArrayDataset", "Callback", "Options", "ShardLoader", "Workload", "WorkloadSpec",
    "cyclic_allocation", "parse_options", "partition", "partition_indices", "register_workload",
    "split_indices",
]

Task = Literal["classification", "regression", "language"]
Precision = Literal["fp32", "bf16", "fp16"]


class Callback:
    """Hooks into every training process's loop (subclass and override what you need).

    Called in each worker process (not in servers or agents), after the step record is
    written and after each evaluation; ``record`` holds what the run record holds. Keep them
    cheap: they run inside the timed loop (evaluation ones do not count as training time)."""

    def on_step_end(self, step: int, record: dict[str, Any]) -> None:
        """After step ``step`` (0-based) of this worker."""

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """After an evaluation at step ``step``; ``metrics``: loss, accuracy and the others,
        and ``rank`` (every rank that evaluates calls it: print on rank 0 only)."""


@dataclass
class Workload:
    """The task contract: everything about *your* training job a strategy needs.

    Only ``model_fn`` and the data are required; everything else has a default that reproduces
    plain SGD training with cross-entropy (integer targets) or MSE (floating targets).

    * ``model_fn()`` builds a fresh model; it is called right after ``torch.manual_seed(seed)``
      so every rank starts from the same weights. Workers are separate processes: define it at
      module level, or in ``__main__`` (a script, a notebook: it then travels by value).
    * ``train`` / ``test``: any map-style ``torch.utils.data.Dataset`` of ``(x, y)`` pairs.
      An :class:`ArrayDataset` (two tensors) takes a fast path; any other dataset is read
      through a ``DataLoader`` every epoch, so its transforms run every epoch. ``loader``
      optionally builds that DataLoader: ``loader(dataset, batch_sampler) -> iterable``.
    * ``loss_fn(output, target)`` -> scalar mean loss.
    * ``metrics``: name -> :data:`~tandem.workloads.metrics.Metric` (``(sum, count)`` per batch,
      reduced exactly); default ``{"accuracy": accuracy}`` for classification.
    * ``optimizer(model)`` -> any ``torch.optim`` optimizer (parameter groups allowed); default:
      the config's optimizer (SGD with ``lr``, ``momentum``, ``weight_decay``).
    * ``scheduler(optimizer, total_steps)`` -> an LR scheduler, stepped once per optimizer step;
      default: the config's ``schedule`` (constant).
    * ``clip_grad_norm``: clip the *aggregated* gradient's global norm before each optimizer
      step; ``accumulation``: micro-batches per step (each of ``batch_size`` samples);
      ``precision``: ``fp32``, ``bf16`` (autocast; CPU or GPU) or ``fp16`` (GPU, grad scaler).
      The config's values, when set, win over these.
    * ``eval_every`` (steps), ``callbacks`` (:class:`Callback`), ``defaults`` (config fields such
      as ``lr`` or ``batch_size`` to use when the config leaves them unset).
    * ``optimum`` (regression only): the exact minimiser as a flat vector, so runs report their
      distance to it.
    """

    name: str
    model_fn: Callable[[], torch.nn.Module]
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    task: Task
    num_classes: int | None
    optimum: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Metric] | None = None
    optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer] | None = None
    scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None
    clip_grad_norm: float | None = None
    accumulation: int | None = None
    precision: Precision | None = None
    loader: Callable[..., Any] | None = None
    eval_every: int | None = None
    callbacks: list[Callback] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)

    def metric_fns(self) -> dict[str, Metric]:
        """The metrics evaluation computes (accuracy by default on classification)."""
        if self.metrics is not None:
            return dict(self.metrics)
        if self.task == "classification":
            return {"accuracy": accuracy}
        if self.task == "language":
            return {"accuracy": token_accuracy}
        return {}

    @classmethod
    def custom(cls, model_fn: Callable[[], torch.nn.Module], train: torch.utils.data.Dataset,
               test: torch.utils.data.Dataset, *,
               loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
               task: Task | None = None, num_classes: int | None = None, name: str = "custom",
               meta: dict[str, Any] | None = None, materialize: bool = True,
               **contract: Any) -> Workload:
        """Wrap your own model and datasets (``contract``: the optional fields of the class).

        Integer targets mean classification (cross-entropy); floating targets mean regression
        (MSE). Pass ``task``/``loss_fn`` to override. ``materialize=True`` (default) reads a
        small dataset into two tensors once (the fast path); ``False`` keeps it as it is, read
        through a DataLoader every epoch (transforms run every epoch).
        """
        if materialize:
            tr, te = ArrayDataset.from_dataset(train), ArrayDataset.from_dataset(test)
        else:
            tr, te = train, test
        y0 = _first_target(tr)
        if task is None:
            task = "regression" if y0.is_floating_point() else "classification"
        if task == "classification" and num_classes is None and isinstance(tr, ArrayDataset) \
                and isinstance(te, ArrayDataset) and tr.y.dim() == 1:
            num_classes = int(max(tr.y.max(), te.y.max())) + 1
        if loss_fn is None:
            loss_fn = F.cross_entropy if task != "regression" else F.mse_loss
        unknown = set(contract) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"Workload.custom: unknown field(s) {sorted(unknown)}")
        return cls(name=name, model_fn=model_fn, train=tr, test=te, loss_fn=loss_fn, task=task,
                   num_classes=num_classes if task == "classification" else None,
                   meta=dict(meta or {}), **contract)


def _first_target(ds: torch.utils.data.Dataset) -> Tensor:
    if isinstance(ds, ArrayDataset):
        return ds.y[:1]
    try:
        item = ds[0]
    except (IndexError, KeyError, TypeError) as err:
        raise DataError(f"cannot read the first item of the dataset: {err}") from None
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise DataError(f"dataset items must be (x, y) pairs; got {type(item).__name__}")
    return torch.as_tensor(item[1])


class Options(BaseModel):
    """Base of each workload's options (``cfg.options``): unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


OptionsT = TypeVar("OptionsT", bound=Options)


def parse_options(model: type[OptionsT], options: dict[str, Any], workload: str) -> OptionsT:
    """Validate ``options`` against ``model``; raise ConfigError naming the allowed keys."""
    try:
        return model.model_validate(options or {})
    except ValidationError as err:
        allowed = ", ".join(sorted(model.model_fields)) or "(none)"
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "options"
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown option {key!r}")
            else:
                problems.append(f"option {key!r}: {e['msg']}")
        raise ConfigError(f"workload {workload}: {'; '.join(problems)}. "
                          f"Allowed options: {allowed}") from None


def split_indices(labels: Tensor, test_fraction: float, seed: int,
                  stratify: bool = True) -> tuple[Tensor, Tensor]:
    """A seeded train/test split of ``range(len(labels))``, stratified by label by default.

    Each class contributes ``round(count * test_fraction)`` samples to the test set, so the class
    mix of both sides matches the whole. Returns sorted (train_idx, test_idx).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    labels = labels.reshape(len(labels), -1)[:, 0]
    groups = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)] if stratify \
        else [torch.arange(len(labels))]
    test = []
    for g in groups:
        g = g[torch.randperm(len(g), generator=gen)]
        test.append(g[: round(len(g) * test_fraction)])
    test_idx = torch.cat(test).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[test_idx] = False
    return torch.nonzero(mask).flatten(), test_idx


@dataclass(frozen=True)
class WorkloadSpec:
    """A registered workload: its name, its builder and its options model."""

    name: str
    build: Callable[..., Workload]
    options: type[Options]
    summary: str


#: every bundled workload, by name (discovered under ``tandem.workloads``)
WORKLOADS: Registry[WorkloadSpec] = Registry("workload", "tandem.workloads")

BuildT = TypeVar("BuildT", bound=Callable[..., Workload])


def register_workload(name: str, options: type[Options] = Options) -> Callable[[BuildT], BuildT]:
    """Decorator for a ``build(cfg, seed) -> Workload`` function: a new workload is one file::

        @register_workload("mine", options=MineOptions)
        def build(cfg: WorkloadConfig, seed: int = 0) -> Workload: ...

    The first line of the module's docstring is its summary in ``tandem workloads``."""

    def add(build: BuildT) -> BuildT:
        import sys

        module = sys.modules.get(build.__module__)
        doc = (getattr(module, "__doc__", None) or build.__doc__ or "").strip()
        WORKLOADS.register(WorkloadSpec(name, build, options, doc.splitlines()[0] if doc else ""),
                           name=name)
        return build

    return add
