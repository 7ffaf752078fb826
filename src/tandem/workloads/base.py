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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from tandem.errors import ConfigError, DataError
from tandem.workloads.loader import ShardLoader
from tandem.workloads.partition import cyclic_allocation, partition, partition_indices

__all__ = [
    "ArrayDataset", "Options", "ShardLoader", "Workload", "cyclic_allocation", "parse_options",
    "partition", "partition_indices", "split_indices",
]

Task = Literal["classification", "regression"]


class ArrayDataset(torch.utils.data.Dataset):
    """A dataset held as two tensors: inputs ``x`` (N, ...) and targets ``y`` (N, ...).

    Indexing returns ``(x[i], y[i])``, so it also works with a plain ``DataLoader``.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.shape[0] != y.shape[0]:
            raise DataError(f"inputs hold {x.shape[0]} samples but targets hold {y.shape[0]}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: Any) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def __repr__(self) -> str:
        return (f"ArrayDataset(n={len(self)}, x={tuple(self.x.shape[1:])} {self.x.dtype}, "
                f"y={tuple(self.y.shape[1:])} {self.y.dtype})")

    def subset(self, idx: Tensor | Sequence[int]) -> ArrayDataset:
        """The samples at ``idx`` (a copy; order kept)."""
        index = torch.as_tensor(idx, dtype=torch.long)
        return ArrayDataset(self.x[index], self.y[index])

    @classmethod
    def from_dataset(cls, ds: torch.utils.data.Dataset) -> ArrayDataset:
        """Materialise any map-style dataset whose items are ``(x, y)`` pairs into two tensors.

        Numbers become tensors (int labels -> int64), so a torchvision-style dataset works as is.
        This reads every item once; for large datasets build the tensors yourself.
        """
        if isinstance(ds, ArrayDataset):
            return ds
        try:
            n = len(ds)  # type: ignore[arg-type]
        except TypeError:
            raise DataError("from_dataset needs a map-style dataset with a length") from None
        if n == 0:
            raise DataError("the dataset is empty")
        xs, ys = [], []
        for i in range(n):
            item = ds[i]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise DataError(f"item {i} is not an (x, y) pair: got {type(item).__name__}")
            xs.append(torch.as_tensor(item[0]))
            ys.append(torch.as_tensor(item[1]))
        try:
            return cls(torch.stack(xs), torch.stack(ys))
        except RuntimeError as exc:
            raise DataError(f"dataset items differ in shape and cannot be stacked: {exc}") from None


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
