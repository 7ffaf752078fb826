"""How the training set is split over workers.

Three schemes, chosen by ``workload.partition`` in the config:

* ``iid``: a seeded random split into ``parts`` near-equal shards (sizes differ by at most one).
* ``label`` (non-iid): each worker sees only a few classes, the shard scheme of McMahan et al.
  (FedAvg): sort by label, cut into ``parts * labels_per_worker`` shards, deal ``labels_per_worker``
  shards to each worker at random. Cuts fall on class boundaries (a class is split into one or more
  shards, in proportion to its size), so a worker holds at most ``labels_per_worker`` classes.
  When there are more classes than shards (e.g. 10 classes, 4 workers x 2), every sample can only
  be used if some workers hold more: ``labels_per_worker`` is raised to ``ceil(classes / parts)``.
  Floating-point targets (regression) are cut into equal runs of the sorted order instead.
  Tune: fewer labels per worker = more skew = harder for methods that average rarely.
* ``redundant``: the data is cut into ``parts`` iid partitions and worker ``i`` holds partitions
  ``i, i+1, ..., i+d-1 (mod parts)`` (cyclic repetition, ``d = redundancy``), as gradient coding
  needs. :func:`cyclic_allocation` and :func:`partition_indices` expose the two halves, so a
  gradient-coding module can compute one gradient per partition.

Every function is a pure function of its arguments and ``seed``: all ranks compute the same split.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tandem.errors import ConfigError

SCHEMES = ("iid", "label", "redundant")


def _check_parts(n: int, parts: int) -> None:
    if parts < 1:
        raise ConfigError(f"cannot split data into {parts} parts; use at least 1")
    if n < parts:
        raise ConfigError(f"cannot split {n} samples over {parts} workers: use fewer workers "
                          "or a larger dataset (workload.options n / n_train)")


def partition_indices(labels: Tensor, parts: int, seed: int = 0) -> list[Tensor]:
    """A seeded iid split of ``range(len(labels))`` into ``parts`` partitions (sorted indices)."""
    n = len(labels)
    _check_parts(n, parts)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [p.sort().values for p in torch.tensor_split(perm, parts)]


def cyclic_allocation(parts: int, d: int) -> list[list[int]]:
    """Partition ids per worker, cyclic repetition: worker i holds i, i+1, ..., i+d-1 (mod parts).

    Each partition is then held by exactly ``d`` workers, so any ``d - 1`` stragglers can be
    tolerated by a gradient code.
    """
    if not 1 <= d <= parts:
        raise ConfigError(f"redundancy d={d} must lie between 1 and the number of workers "
                          f"({parts})")
    return [[(i + j) % parts for j in range(d)] for i in range(parts)]


def _label_shards(labels: Tensor, parts: int, labels_per_worker: int,
                  gen: torch.Generator) -> tuple[list[Tensor], int]:
    """Cut the (shuffled, label-sorted) samples into shards; return them and shards per worker."""
    n = len(labels)
    order = torch.randperm(n, generator=gen)  # random order inside each class
    if labels.is_floating_point() or labels.is_complex():
        order = order[torch.sort(labels[order], stable=True).indices]
        return list(torch.tensor_split(order, parts * labels_per_worker)), labels_per_worker
    classes, counts = torch.unique(labels, return_counts=True)
    per_worker = max(labels_per_worker, math.ceil(len(classes) / parts))
    total = parts * per_worker
    # every class gets one shard, the rest in proportion to class size (largest remainder)
    extra = (total - len(classes)) * counts.double() / n
    alloc = 1 + extra.floor().long()
    left = total - int(alloc.sum())
    if left > 0:
        alloc[torch.argsort(extra - extra.floor(), descending=True, stable=True)[:left]] += 1
    shards: list[Tensor] = []
    for c, k in zip(classes, alloc.tolist(), strict=True):
        members = order[labels[order] == c]
        shards.extend(torch.tensor_split(members, k))
    return shards, per_worker


def partition(labels: Tensor, parts: int, scheme: str = "iid", *, redundancy: int = 1,
              labels_per_worker: int = 2, seed: int = 0) -> list[Tensor]:
    """For each of ``parts`` workers, a LongTensor of the sample indices it holds.

    ``labels``: the training targets (class ids, or any per-sample values; only their order and
    equality matter). See the module docstring for the schemes.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown partition scheme {scheme!r}; choose one of {list(SCHEMES)}")
    labels = torch.as_tensor(labels)
    labels = labels.reshape(len(labels), -1)[:, 0] if labels.dim() > 1 else labels
    _check_parts(len(labels), parts)
    if scheme == "iid":
        return partition_indices(labels, parts, seed)
    if scheme == "redundant":
        pieces = partition_indices(labels, parts, seed)
        held = cyclic_allocation(parts, redundancy)
        return [torch.cat([pieces[p] for p in ids]) for ids in held]
    if labels_per_worker < 1:
        raise ConfigError(f"labels_per_worker must be at least 1, got {labels_per_worker}")
    gen = torch.Generator().manual_seed(seed)
    shards, per_worker = _label_shards(labels, parts, labels_per_worker, gen)
    deal = torch.randperm(len(shards), generator=gen).tolist()
    out = []
    for w in range(parts):
        mine = [shards[s] for s in deal[w * per_worker:(w + 1) * per_worker]]
        out.append(torch.cat(mine).sort().values)
    return out
