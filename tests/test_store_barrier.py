"""``store_gather`` (checkpoint barriers on the rendezvous store): a rank that the launcher saw
stop with a consequence error ends the wait at once instead of at the deadline, and is named."""

from __future__ import annotations

import threading
import time

import pytest
import torch.distributed as dist

from tandem.errors import WorkerFailed, is_secondary
from tandem.transport.store_barrier import CheckpointAbandoned, store_gather


class _Live:
    """The liveness view store_gather reads: ``dead/<r>`` and ``stopped/<r>`` marks."""

    def __init__(self, store) -> None:
        self.store, self.rank, self.store_lock = store, 0, threading.Lock()

    def _marked(self, kind: str, peers) -> list[int]:
        return [r for r in peers if self.store.check([f"{kind}/{r}"])]

    def dead_ranks(self, peers):
        return self._marked("dead", peers)

    def stopped_ranks(self, peers):
        return self._marked("stopped", peers)


class _Transport:
    def __init__(self) -> None:
        self.store = dist.HashStore()
        self.rank = 0
        self.liveness = _Live(self.store)


def test_a_stopped_rank_ends_the_wait_at_once_and_is_named():
    t = _Transport()
    t.store.set("ckpt/10/1", "10")  # rank 1 arrived; rank 2 died; rank 3 stopped on an error
    t.store.set("dead/2", "killed")
    t.store.set("stopped/3", "WorkerFailed: server gone")
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"\[3\] stopped with an error.*\[2\] died") as info:
        store_gather(t, "10", 10, [1, 2, 3], timeout_s=30)
    assert time.monotonic() - t0 < 5  # not the 30 s deadline
    assert sorted(info.value.ranks) == [2, 3]
    assert is_secondary(f"WorkerFailed: {info.value}")  # the launcher still names the cause


def test_only_dead_ranks_missing_still_abandons_the_checkpoint():
    t = _Transport()
    t.store.set("ckpt/5/1", "5")
    t.store.set("dead/2", "killed")
    with pytest.raises(CheckpointAbandoned):
        store_gather(t, "5", 5, [1, 2], timeout_s=30)


def test_a_stopped_rank_that_had_arrived_counts_as_arrived():
    t = _Transport()
    t.store.set("ckpt/7/1", "7")
    t.store.set("stopped/1", "WorkerFailed: later")
    assert store_gather(t, "7", 7, [1], timeout_s=30) == {1: 7}
