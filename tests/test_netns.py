"""bench.netns: real rate-limited links between network namespaces (root only), always torn down.

As root: two hosts behind the switch at 10 Mbit/s move 1.25 MB in about a second (a generous
bound: 0.7x to 2x the line-rate time), the processes started in them end with the block, and no
namespace is left, also when the block raises. Without root the cluster refuses with a message
that says to run as root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` is a package of the repository, not installed

from bench import netns  # noqa: E402

NEEDS_ROOT = pytest.mark.skipif(netns.unavailable_reason() is not None,
                                reason=f"{netns.unavailable_reason()}")

_SINK = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(); print("ready", flush=True)
c, _ = s.accept(); t = time.perf_counter(); n = 0
while (b := c.recv(1 << 20)):
    n += len(b)
print(n, time.perf_counter() - t, flush=True)
"""
_SEND = """
import socket, sys, time
for _ in range(100):
    try:
        s = socket.create_connection((sys.argv[1], 5001), timeout=1); break
    except OSError:
        time.sleep(0.1)
s.sendall(b"x" * int(sys.argv[2])); s.close()
"""


def _mine() -> list[str]:
    return [n for n in netns.own_namespaces() if n.startswith(f"{netns.PREFIX}{os.getpid()}-")]


def test_refuses_without_root(monkeypatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in (netns.unavailable_reason() or "")
    with pytest.raises(netns.NetnsUnavailable, match="need root"):
        netns.Cluster(2, "10mbit")


def test_burst_is_a_few_milliseconds_of_line_rate() -> None:
    assert netns.burst_bytes("10mbit") == 4125
    assert netns.burst_bytes("100mbit") == 41250
    assert netns.burst_bytes("1mbit") == 3028  # never below two full frames


@NEEDS_ROOT
def test_transfer_respects_the_rate_and_teardown_leaves_nothing() -> None:
    nbytes = 1_250_000  # 1 s at 10 Mbit/s
    with netns.Cluster(2, "10mbit") as net:
        assert len(_mine()) == 3  # the switch and two hosts
        sink = net.popen(1, [sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True)
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        send = subprocess.run(["ip", "netns", "exec", net.hosts[0].netns, sys.executable, "-c",
                               _SEND, net.hosts[1].addr, str(nbytes)],
                              capture_output=True, text=True, timeout=60)
        assert send.returncode == 0, send.stderr
        sink.wait(timeout=30)
        got, took = sink.stdout.read().split()
        assert int(got) == nbytes  # timed by the receiver: accept to the last byte
        assert 0.7 <= float(took) <= 2.0, f"{nbytes} B at 10 Mbit/s took {took} s"
        wire = net.counters()
        assert wire[0]["tx_bytes"] >= nbytes and wire[1]["rx_bytes"] >= nbytes
        sleeper = net.popen(0, [sys.executable, "-c", "import time; time.sleep(600)"])
    assert sleeper.poll() is not None  # ended with the block
    assert _mine() == []


@NEEDS_ROOT
def test_teardown_on_an_exception() -> None:
    with pytest.raises(RuntimeError, match="boom"), netns.Cluster(2, None) as net:
        p = net.popen(1, [sys.executable, "-c", "import time; time.sleep(600)"])
        assert net.rtt_s(0, 1, count=3) < 0.5
        raise RuntimeError("boom")
    deadline = time.monotonic() + 10
    while p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert p.poll() is not None
    assert _mine() == []
