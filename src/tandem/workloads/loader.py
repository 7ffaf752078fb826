"""An endless, seeded minibatch iterator over one worker's shard.

Why not ``DataLoader``: a worker needs "the next batch" forever (steps, not epochs, drive the
strategies), the sequence must be a pure function of the seed so runs repeat, and a checkpoint must
resume it exactly. Here the order of epoch ``e`` is a permutation drawn from a generator seeded by
``(seed, e)``, so the whole state is two integers: ``epoch`` and ``position``.

Tune: ``batch_size`` is per worker (the global batch is ``workers x batch_size`` for synchronous
methods). ``drop_last=True`` keeps every batch the same size, which keeps step times and gradient
scales comparable; with ``drop_last=False`` the last batch of an epoch may be smaller.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from tandem.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from tandem.workloads.dataset import ArrayDataset


class ShardLoader:
    """Endless seeded minibatch iterator over one worker's shard; reshuffles each epoch.

    ``epoch`` counts completed passes over the shard and ``position`` is the offset of the next
    batch within the current pass; ``state_dict``/``load_state_dict`` save and restore them.
    """

    def __init__(self, data: ArrayDataset, indices: Tensor, batch_size: int, seed: int,
                 drop_last: bool = True) -> None:
        self.data = data
        self.indices = torch.as_tensor(indices, dtype=torch.long).flatten()
        n = len(self.indices)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if n == 0:
            raise ConfigError("this worker's shard is empty: use fewer workers or more data")
        if drop_last and n < batch_size:
            raise ConfigError(f"this worker's shard holds {n} samples, fewer than batch_size "
                              f"{batch_size}: lower batch_size, use fewer workers, or more data")
        self.batch_size = batch_size
        self.seed = int(seed)
        self.drop_last = drop_last
        self.steps_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> Tensor:
        # SeedSequence mixes (seed, epoch) so nearby seeds/epochs give unrelated orders.
        entropy = [self.seed % 2**63, epoch]
        state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return self.indices[torch.randperm(len(self.indices), generator=gen)]

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next_batch()

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next ``(x, y)`` minibatch; starts a freshly shuffled epoch when one ends."""
        idx = self._order[self.position:self.position + self.batch_size]
        self.position += len(idx)
        remaining = len(self._order) - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        return self.data.x[idx], self.data.y[idx]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "drop_last": self.drop_last,
                "shard_size": len(self.indices)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume where ``d`` was taken; the batches that follow are exactly those that followed."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "drop_last", "shard_size"):
            if key in d and d[key] != mine[key]:
                raise CheckpointError(f"loader state has {key}={d[key]!r} but this run uses "
                                      f"{mine[key]!r}: resume with the same config and workers")
        epoch, position = int(d["epoch"]), int(d["position"])
        if epoch < 0 or not 0 <= position < len(self.indices):
            raise CheckpointError(f"loader state epoch={epoch} position={position} is out of range")
        self.epoch, self.position = epoch, position
        self._order = self._permutation(epoch)


class DatasetShardLoader(ShardLoader):
    """:class:`ShardLoader` over any map-style dataset, read through a ``DataLoader``.

    The order of epoch ``e`` is the same seeded permutation :class:`ShardLoader` draws, so the
    minibatch sequence is a pure function of the seed and a checkpoint resumes it exactly; the
    items are read by the dataset's own ``__getitem__`` every epoch, so random transforms run
    every epoch. ``loader(dataset, batch_sampler)`` builds the DataLoader (default: a plain
    ``DataLoader`` in this process); give it ``num_workers`` or a ``collate_fn`` there.
    """

    def __init__(self, data: Any, indices: Tensor, batch_size: int, seed: int,
                 drop_last: bool = True, loader: Any = None) -> None:
        self.dataset = data
        self.make_loader = loader
        self._iter: Any = None
        super().__init__(data, indices, batch_size, seed, drop_last)

    def _batches(self) -> list[list[int]]:
        """The rest of this epoch's batches (index lists), from the current position."""
        order = self._order[self.position:].tolist()
        n = len(order) if not self.drop_last else len(order) // self.batch_size * self.batch_size
        return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]

    def _open(self) -> None:
        batches = self._batches()
        if self.make_loader is not None:
            self._iter = iter(self.make_loader(self.dataset, batches))
        else:
            self._iter = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=batches))

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if self._iter is None:
            self._open()
        try:
            x, y = next(self._iter)
        except StopIteration:  # drop_last=False end, or a custom loader that stopped early
            self._iter = None
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
            return self.next_batch()
        n = len(y)
        self.position += n
        remaining = len(self._order) - self.position
        if remaining == 0 or (self.drop_last and remaining < self.batch_size):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
            self._iter = None
        return torch.as_tensor(x), torch.as_tensor(y)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        self._iter = None  # reopen at the restored position


def shard_loader(data: Any, indices: Tensor, batch_size: int, seed: int,
                 loader: Any = None) -> ShardLoader:
    """The fast in-memory loader for two-tensor datasets, a DataLoader-backed one otherwise."""
    from tandem.workloads.dataset import ArrayDataset

    if isinstance(data, ArrayDataset) and loader is None:
        return ShardLoader(data, indices, batch_size, seed)
    return DatasetShardLoader(data, indices, batch_size, seed, loader=loader)


def targets_of(data: Any) -> Tensor:
    """Per-sample targets of a dataset, for partitioning: an ArrayDataset's ``y``, a
    ``targets``/``labels`` attribute, else a placeholder that only an iid split may use."""
    from tandem.workloads.dataset import ArrayDataset

    if isinstance(data, ArrayDataset):
        return data.y
    for attr in ("targets", "labels"):
        if hasattr(data, attr):
            return torch.as_tensor(getattr(data, attr))
    return torch.full((len(data),), -1, dtype=torch.long)
