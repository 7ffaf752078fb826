"""Emulated hosts (``net: ...,hosts=N``): the processes of one host share its link, and what
they send each other stays on the host (``tandem.transport.host_link``)."""

from __future__ import annotations

import pytest

import jobs
from tandem.config import NetConfig
from tandem.errors import ConfigError
from tandem.launch import spawn
from tandem.transport.host_link import HostLink, check_hosts, host_of
from tandem.transport.shaping import LinkEmulator

NET = NetConfig.parse("8mbit:0ms")  # 1 MB/s: 100 kB take 0.1 s


def test_the_net_spec_takes_a_number_of_hosts_and_refuses_anything_else():
    assert NetConfig.parse("10mbit:1ms,hosts=4").hosts == 4
    assert NetConfig.parse("10mbit:1ms").hosts is None
    for bad in ("10mbit,hosts=x", "10mbit,host=2", "10mbit,hosts=0"):
        with pytest.raises(ValueError, match="hosts"):
            NetConfig.parse(bad)


def test_hosts_are_refused_under_torchrun_and_beyond_the_processes():
    check_hosts(None, 2, under_torchrun=True)
    check_hosts(4, 8, under_torchrun=False)
    with pytest.raises(ConfigError, match="torchrun"):
        check_hosts(4, 8, under_torchrun=True)
    with pytest.raises(ConfigError, match="more emulated hosts than the job's 2 processes"):
        check_hosts(4, 2, under_torchrun=False)


def test_ranks_go_round_robin_so_server_i_sits_with_worker_i():
    # 4 workers then 4 servers (the local launcher's order) on 4 hosts
    assert [host_of(r, 4) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_two_processes_of_one_host_share_its_egress_and_ingress(tmp_path):
    """Two emulators on one host file (as two processes would map it): two 100 kB messages
    started together both leave after 0.2 s, and the ingress carries one after the other;
    an emulator of its own is not slowed. Breaks if the state is not shared or not locked."""
    a, b = (LinkEmulator(NET, r, host=HostLink(tmp_path / "h0")) for r in (0, 1))
    alone = LinkEmulator(NET, 2)
    ma, _ = a.start_send(100_000, now=0.0)
    mb, _ = b.start_send(100_000, now=0.0)
    m, _ = alone.start_send(100_000, now=0.0)
    assert a.send_progress(ma, now=0.15) == (False, pytest.approx(0.2))
    assert b.send_progress(mb, now=0.25) == (True, pytest.approx(0.2))
    assert a.send_progress(ma, now=0.25) == (True, pytest.approx(0.2))
    assert alone.send_progress(m, now=0.15) == (True, pytest.approx(0.1))
    assert a.recv_done_time(100_000, 0.1, started=0.0) == pytest.approx(0.1)
    assert b.recv_done_time(100_000, 0.1, started=0.0) == pytest.approx(0.2)


def test_duplex_on_a_host_counts_what_any_of_its_processes_sends(tmp_path):
    """``duplex=1.5``: process a's message comes in while process b, on the same host, sends:
    it takes 1.5x its line time. Breaks if the egress's busy period is not kept in the host's
    file (each process would see only its own sends)."""
    net = NetConfig.parse("8mbit:0ms,duplex=1.5")
    a, b = (LinkEmulator(net, r, host=HostLink(tmp_path / "h0")) for r in (0, 1))
    b.start_send(100_000, now=0.0)  # the host's egress is busy 0 .. 0.1
    assert a.recv_done_time(100_000, 0.1, started=0.0) == pytest.approx(0.15)


def test_a_host_file_is_laid_out_once_and_its_name_can_go(tmp_path):
    first = HostLink(tmp_path / "h")
    with first.timelines() as t:
        t.next_id = 7
    second = HostLink(tmp_path / "h")  # opening it again must not wipe the state
    first.unlink()
    first.unlink()  # idempotent
    assert not (tmp_path / "h").exists()
    with second.timelines() as t:
        assert t.next_id == 7


def test_ranks_of_one_emulated_host_share_its_link_and_talk_for_free():
    """Real processes: a message between the two ranks of host 0 charges no link (the host's
    message count stays 0); then its two ranks send 100 kB each to host 1 at once, out of one
    link: both complete no earlier than 0.2 s, where links of their own would take 0.1 s. A
    busy machine can only add delay."""
    rows = spawn(jobs.host_link_sends, 4, "8mbit:0ms,hosts=2", 100_000, timeout_s=120)
    assert [r["host"] for r in rows] == [0, 1, 0, 1]
    assert all(r["after_same_host"] == 0 for r in rows), rows
    assert [r["after_cross_host"] for r in rows] == [2, 0, 2, 0]
    assert all(r["sent"] >= 0.19 for r in rows if "sent" in r), rows
    assert all(r["received"] >= 0.19 for r in rows if "received" in r), rows


def test_more_hosts_than_processes_is_refused_before_any_worker_starts(tmp_path):
    import tandem

    cfg = {"workload": {"name": "mnist5k"}, "workers": 2, "steps": 2, "progress": False,
           "net": "10mbit:1ms,hosts=4", "out": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match="more emulated hosts than the job's 2 processes"):
        tandem.train(cfg)
    assert not (tmp_path / "run").exists()


def test_the_planner_refuses_hosts_and_names_its_own_flags():
    from tandem.plan.network import Tier

    with pytest.raises(ConfigError, match="--per-node"):
        Tier.parse("1gbit:50us,hosts=2")
