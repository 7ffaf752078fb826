"""A dataset held in memory as two tensors, the form every bundled workload takes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tandem.errors import DataError


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
