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

from tandem.errors import ConfigError
from tandem.registry import Registry
from tandem.workloads.dataset import ArrayDataset
from tandem.workloads.loader import ShardLoader
from tandem.workloads.partition import cyclic_allocation, partition, partition_indices

__all__ = [
    "WORKLOADS", "ArrayDataset", "Options", "ShardLoader", "Workload", "WorkloadSpec",
    "cyclic_allocation", "parse_options", "partition", "partition_indices", "register_workload",
    "split_indices",
]

Task = Literal["classification", "regression"]


@dataclass
class Workload:
    """A model factory, its data and its loss: everything a strategy needs to train.

    ``model_fn`` builds a fresh model; call it right after ``torch.manual_seed(seed)`` so every rank
    starts from the same weights. It must be picklable (a class or module-level function, possibly
    in a ``functools.partial``) because workers are spawned.
    ``optimum`` (regression only) is the exact minimiser of the training loss as a flat vector in
    ``model.parameters()`` order, so runs can report their distance to it.
    """

    name: str
    model_fn: Callable[[], torch.nn.Module]
    train: ArrayDataset
    test: ArrayDataset
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    task: Task
    num_classes: int | None
    optimum: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def custom(cls, model_fn: Callable[[], torch.nn.Module], train: torch.utils.data.Dataset,
               test: torch.utils.data.Dataset, *,
               loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
               task: Task | None = None, num_classes: int | None = None, name: str = "custom",
               meta: dict[str, Any] | None = None) -> Workload:
        """Wrap your own model and datasets.

        Integer targets mean classification (cross-entropy, ``num_classes`` = largest label + 1);
        floating targets mean regression (MSE). Pass ``task``/``loss_fn`` to override.
        """
        tr, te = ArrayDataset.from_dataset(train), ArrayDataset.from_dataset(test)
        if task is None:
            task = "regression" if tr.y.is_floating_point() else "classification"
        if task == "classification" and num_classes is None:
            num_classes = int(max(tr.y.max(), te.y.max())) + 1
        if loss_fn is None:
            loss_fn = F.cross_entropy if task == "classification" else F.mse_loss
        return cls(name=name, model_fn=model_fn, train=tr, test=te, loss_fn=loss_fn, task=task,
                   num_classes=num_classes if task == "classification" else None,
                   meta=dict(meta or {}))


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

        doc = (sys.modules[build.__module__].__doc__ or build.__doc__ or "").strip()
        WORKLOADS.register(WorkloadSpec(name, build, options, doc.splitlines()[0] if doc else ""),
                           name=name)
        return build

    return add
