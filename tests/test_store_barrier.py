"""``store_gather`` (checkpoint barriers on the rendezvous store): a rank that the launcher saw
stop with a consequence error ends the wait at once instead of at the deadline, and is named.

The marks are written as the launcher writes them (``rendezvous.mark_dead`` / ``mark_stopped``
on the raw store) and read through the real :class:`Liveness` (a ``live`` prefix store), so the
keys of both ends are checked too."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from tandem.errors import WorkerFailed
from tandem.transport.liveness import Liveness
from tandem.transport.rendezvous import mark_dead, mark_stopped
from tandem.transport.store_barrier import CheckpointAbandoned, store_gather


class _Transport:
    """What store_gather reads of a Transport: the store, this rank and its liveness."""

    def __init__(self) -> None:
        self.store = dist.HashStore()
        self.rank = 0
        self.liveness = Liveness(dist.PrefixStore("live", self.store), 0, 4)


@pytest.fixture
def transport():
    t = _Transport()
    yield t
    t.liveness.stop()


def test_a_stopped_rank_ends_the_wait_at_once_and_is_named(transport):
    transport.store.set("ckpt/10/1", "10")  # rank 1 arrived; rank 2 died; rank 3 stopped
    mark_dead(transport.store, 2, "killed by SIGKILL")
    mark_stopped(transport.store, 3, "WorkerFailed: server gone")
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"\[3\] stopped with an error.*\[2\] died") as info:
        store_gather(transport, "10", 10, [1, 2, 3], timeout_s=30)
    assert time.monotonic() - t0 < 5  # not the 30 s deadline
    assert sorted(info.value.ranks) == [2, 3]


def test_a_live_rank_still_missing_keeps_the_wait_until_its_deadline(transport):
    mark_stopped(transport.store, 3, "WorkerFailed: server gone")  # rank 1 is alive, silent
    with pytest.raises(Exception, match=r"did not reach it") as info:
        store_gather(transport, "11", 11, [1, 3], timeout_s=0.5)
    assert not isinstance(info.value, WorkerFailed)


def test_only_dead_ranks_missing_still_abandons_the_checkpoint(transport):
    transport.store.set("ckpt/5/1", "5")
    mark_dead(transport.store, 2, "killed by SIGKILL")
    with pytest.raises(CheckpointAbandoned):
        store_gather(transport, "5", 5, [1, 2], timeout_s=30)


def test_a_stopped_rank_that_had_arrived_counts_as_arrived(transport):
    transport.store.set("ckpt/7/1", "7")
    mark_stopped(transport.store, 1, "WorkerFailed: later")
    assert store_gather(transport, "7", 7, [1], timeout_s=30) == {1: 7}
