"""The transport seam on real gloo processes over loopback: byte accounting, emulated links,
and failures that name the rank responsible."""

from __future__ import annotations

import time

import pytest

import jobs
from tandem.config import NetConfig
from tandem.errors import WorkerFailed
from tandem.launch import spawn
from tandem.transport import costs


def test_byte_counts_exact_for_all_reduce_broadcast_and_p2p():
    world = 3
    res = spawn(jobs.byte_counts, world, world, timeout_s=60)
    ar = costs.all_reduce(4000, world)
    for rank, r in enumerate(res):
        assert r["sum_ok"]
        # ring all-reduce: 2(N-1)/N * 4000 bytes each way
        assert r["all_reduce"] == (ar.sent, ar.recv) == (2 * 2 * 4000 // 3,) * 2
        # broadcast of 2000 bytes: the root sends one copy per peer, each peer receives one
        assert r["broadcast"] == ((2 * 2000, 0) if rank == 0 else (0, 2000))
    assert res[0]["p2p"] == (400, 0)
    assert res[1]["p2p"] == (0, 400)
    assert res[2]["p2p"] == (0, 0)


def test_emulated_link_time_matches_model():
    net = "20mbit:2ms"
    sizes = [100_000, 400_000, 1_600_000]
    rows = spawn(jobs.link_timing, 2, net, sizes, timeout_s=120)[0]
    link = NetConfig.parse(net)
    for n, ar, p2p in rows:
        want_ar = costs.all_reduce(n, 2).seconds(link.bytes_per_s, link.latency_s)
        # p2p round trip: n bytes one way plus a 4-byte reply, two latencies
        want_p2p = n / link.bytes_per_s + 4 / link.bytes_per_s + 2 * link.latency_s
        assert ar == pytest.approx(want_ar, rel=0.25), (n, ar, want_ar)
        assert p2p == pytest.approx(want_p2p, rel=0.25), (n, p2p, want_p2p)


@pytest.mark.parametrize("caller_waits", [False, True])
def test_killed_worker_is_named_by_survivors_within_timeout(caller_waits):
    timeout = 20
    t0 = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        spawn(jobs.die_mid_run, 3, 2, 200, caller_waits, timeout_s=120)
    elapsed = time.monotonic() - t0
    err = info.value
    assert 2 in err.ranks and "rank 2" in str(err)
    survivors = {r: msg for r, msg in err.details.items() if r != 2}
    for msg in survivors.values():  # the others' own errors name the dead rank
        assert "[2]" in msg, msg
    assert elapsed < timeout + 10


@pytest.mark.parametrize("caller_waits", [False, True])
def test_silent_peer_is_named_on_timeout(caller_waits):
    with pytest.raises(WorkerFailed) as info:
        spawn(jobs.silent_peer, 2, 4.0, caller_waits, timeout_s=60)
    msg = info.value.details[0]
    assert "PeerTimeout" in msg and "[1]" in msg, msg
