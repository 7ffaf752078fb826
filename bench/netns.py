"""Real rate-limited links on one machine: N "hosts" (network namespaces) behind a switch.

::

    with Cluster(4, rate="10mbit") as net:        # root only; always torn down
        p = net.popen(0, ["python", "-c", "..."])    # runs inside host 0's namespace
        print(net.hosts[0].addr, net.hosts[0].dev)   # 10.213.8.1 veth0

Layout: a switch namespace holds a Linux bridge ``br0``; each host namespace is joined to it by
one veth pair (``veth0`` in the host, ``p<i>`` on the bridge). Every host's link is limited both
ways by ``tc qdisc tbf``: egress of the host's ``veth0`` (host -> switch) and egress of the
switch's ``p<i>`` (switch -> host). That is the emulator's model (:mod:`tandem.transport.shaping`):
a full-duplex link of one rate per process, contention only where two flows share one port.
``lo`` is up in every namespace; addresses come from ``10.213.8.0/24`` (host i is ``.i+1``),
which exists only inside these namespaces.

The token bucket's burst is a few milliseconds of line rate (``burst_bytes``: 3.3 ms, so 4 KB at
10 Mbit/s and 40 KB at 100 Mbit/s), not the 128 KB often used: with a large burst a message of a
few KB crosses at veth speed and small-message methods look faster than the wire allows. This
kernel has no ``netem``, so the links add no latency beyond serialisation and queueing.

Safety: the constructor refuses to run without root (:class:`NetnsUnavailable`, with what to do).
Teardown runs on any exit from the ``with`` block (exception, Ctrl-C, and SIGTERM, which is turned
into an exception while the block runs): it kills every process started with :meth:`popen` (each
in its own session, so its whole tree), then deletes the namespaces, which removes the veths,
bridge and qdiscs with them. Namespaces are named ``tbn<pid>-...``; ones left by a process that
no longer exists (it was SIGKILLed) are deleted on the next start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "tbn"
SUBNET = "10.213.8"
#: the host's side of its veth pair, as seen inside the host namespace
HOST_DEV = "veth0"
_NETNS_DIR = Path("/run/netns")


class NetnsUnavailable(RuntimeError):
    """Real links cannot be built here (not root, no iproute2, or the kernel refused)."""


def unavailable_reason() -> str | None:
    """Why :class:`Cluster` cannot run here, or None when it can (root and iproute2 present)."""
    if os.geteuid() != 0:
        return ("real links need root (network namespaces, veth pairs and tc qdiscs): run as "
                "root, e.g. `sudo .venv/bin/python -m bench.cluster`, or in CI")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return (f"real links need iproute2 ({', '.join(missing)} not found): "
                "apt-get install iproute2")
    return None


def machine_congestion() -> str:
    """The TCP congestion control a new namespace starts with (the root namespace's)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


def parse_rate_bps(rate: str) -> float:
    """``"10mbit"`` -> 1e7 (bits per second), as tc reads it (k/m/g are powers of 1000)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(bit|kbit|mbit|gbit)\s*", rate.lower())
    if not m:
        raise ValueError(f"rate {rate!r}: write e.g. 10mbit or 1gbit")
    return float(m.group(1)) * {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m.group(2)]


def burst_bytes(rate: str, ms: float = 3.3) -> int:
    """The token bucket's size: ``ms`` of line rate, at least two full frames (tbf drops a packet
    larger than its bucket). 10mbit -> 4125 B, 100mbit -> 41250 B."""
    return max(3028, round(parse_rate_bps(rate) / 8 * ms / 1000))


@dataclass(frozen=True)
class Host:
    index: int
    netns: str
    dev: str  # the veth inside the host namespace (GLOO_SOCKET_IFNAME)
    addr: str


def _run(*argv: str) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed ({out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()}")
    return out.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def own_namespaces() -> list[str]:
    """Names of the namespaces this module created and that still exist (any process)."""
    if not _NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in _NETNS_DIR.iterdir() if re.fullmatch(rf"{PREFIX}\d+-\w+", p.name))


def remove_stale() -> list[str]:
    """Delete namespaces of ours whose creating process is gone (it was SIGKILLed)."""
    removed = []
    for name in own_namespaces():
        pid = int(name[len(PREFIX):].split("-")[0])
        if not _alive(pid):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            removed.append(name)
    return removed


class Cluster:
    """``n`` host namespaces behind a switch namespace, every link ``rate`` both ways.

    Use it as a context manager; the namespaces exist only inside the ``with`` block.
    ``rate=None`` leaves the links unshaped (veth speed).
    """

    def __init__(self, n: int, rate: str | None = "10mbit", *, burst: int | None = None,
                 queue_latency: str = "100ms", congestion: str | None = None) -> None:
        why = unavailable_reason()
        if why:
            raise NetnsUnavailable(why)
        if not 1 <= n <= 250:
            raise ValueError(f"hosts: {n} (1..250)")
        self.n, self.rate = n, rate
        self.burst = burst if burst is not None else (burst_bytes(rate) if rate else None)
        self.queue_latency = queue_latency
        self.congestion = congestion
        tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{tag}-sw"
        self.hosts = [Host(i, f"{tag}-h{i}", HOST_DEV, f"{SUBNET}.{i + 1}") for i in range(n)]
        self._procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self._old_term: Any = None

    # ---- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        self._old_term = _install_term_handler()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netns_add(self, name: str) -> None:
        if (_NETNS_DIR / name).exists():  # our own pid's leftover (a reused pid): start clean
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        _run("ip", "netns", "add", name)
        self._made.append(name)

    def _create(self) -> None:
        remove_stale()
        sw = self.switch
        self._netns_add(sw)
        _run("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", sw, "link", "set", "br0", "up")
        _run("ip", "-n", sw, "link", "set", "lo", "up")
        for h in self.hosts:
            self._netns_add(h.netns)
            port = f"p{h.index}"
            # both ends are created inside their namespaces: nothing appears in the root one
            _run("ip", "-n", h.netns, "link", "add", h.dev, "type", "veth", "peer", "name", port,
                 "netns", sw)
            _run("ip", "-n", sw, "link", "set", port, "master", "br0")
            _run("ip", "-n", sw, "link", "set", port, "up")
            _run("ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.dev)
            _run("ip", "-n", h.netns, "link", "set", h.dev, "up")
            _run("ip", "-n", h.netns, "link", "set", "lo", "up")
            if self.congestion:  # per namespace; a new one inherits the root namespace's
                _run("ip", "netns", "exec", h.netns, "sysctl", "-q", "-w",
                     f"net.ipv4.tcp_congestion_control={self.congestion}")
            if self.rate:
                for ns, dev in ((h.netns, h.dev), (sw, port)):
                    _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                         self.rate, "burst", str(self.burst), "latency", self.queue_latency)
        self._wait_reachable()

    def _wait_reachable(self, timeout_s: float = 15.0) -> None:
        """The bridge forwards once its ports are up: wait until host 0 reaches every host."""
        for h in self.hosts[1:]:
            self.rtt_s(0, h.index, count=1, timeout_s=timeout_s)

    def rtt_s(self, a: int, b: int, count: int = 20, timeout_s: float = 15.0) -> float:
        """The smallest round trip of a 1-byte TCP message from host ``a`` to host ``b`` (s):
        what the links add beyond serialisation (there is no netem here). Pure Python, so it
        needs no ping binary."""
        port = 5399
        server = self.popen(b, [sys.executable, "-c", _ECHO, str(port)],
                            stdout=subprocess.PIPE, text=True)
        try:
            out = subprocess.run(
                ["ip", "netns", "exec", self.hosts[a].netns, sys.executable, "-c", _PING,
                 self.hosts[b].addr, str(port), str(count), str(timeout_s)],
                capture_output=True, text=True, timeout=timeout_s + 30)
        finally:
            self.reap(server)
        if out.returncode != 0:
            raise NetnsUnavailable(f"host {a} cannot reach {self.hosts[b].addr} across the "
                                   f"bridge: {out.stderr.strip()[-300:]}")
        return float(out.stdout.strip())

    def close(self) -> None:
        """Kill what :meth:`popen` started, delete every namespace made. Idempotent; a second
        Ctrl-C during it is ignored so that nothing is left half torn down."""
        old_int = _ignore_sigint()
        try:
            for p in self._procs:
                _kill_tree(p)
            self._procs.clear()
            for name in reversed(self._made):
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            self._made.clear()
        finally:
            _restore(signal.SIGINT, old_int)
            _restore(signal.SIGTERM, self._old_term)
            self._old_term = None

    # ---- use ------------------------------------------------------------------------------
    def popen(self, host: int, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` inside host ``host``'s namespace (``ip netns exec``), in its own
        session so that :meth:`close` can end its whole process tree."""
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts[host].netns, *argv],
                             start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def run_ranks(self, module: str, func: str, args: str, *, port: int, pythonpath: str,
                  cwd: Path, timeout_s: float = 300.0) -> list[Any]:
        """One process per host, the ranks of one ``torch.distributed`` job rendezvousing at
        host 0's ``port``: each calls ``module.func(<args>)`` (``args`` as Python source) and
        the JSON-able results come back in rank order. A rank still running at ``timeout_s``
        is killed (its missing result then raises)."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            procs = []
            for rank, host in enumerate(self.hosts):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(len(self.hosts)),
                           LOCAL_RANK="0", MASTER_ADDR=self.hosts[0].addr, MASTER_PORT=str(port),
                           GLOO_SOCKET_IFNAME=host.dev, PYTHONPATH=pythonpath)
                env.pop("TANDEM_STORE_HOSTED", None)
                out = Path(tmp) / f"r{rank}.json"
                code = (f"import json; from {module} import {func}; "
                        f"json.dump({func}({args}), open({str(out)!r}, 'w'))")
                procs.append((self.popen(rank, [sys.executable, "-c", code], env=env, cwd=cwd),
                              out))
            for p, _ in procs:
                try:
                    p.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self.reap(p)
            return [json.loads(out.read_text()) for _, out in procs]

    def reap(self, p: subprocess.Popen) -> None:
        """Forget a finished process started by :meth:`popen` (killing its tree if it is not)."""
        _kill_tree(p)
        if p in self._procs:
            self._procs.remove(p)

    def counters(self) -> list[dict[str, int]]:
        """Bytes and packets each host's veth has sent and received so far (kernel counters:
        every byte on the wire, headers and retransmissions included)."""
        out = []
        for h in self.hosts:
            info = json.loads(_run("ip", "-n", h.netns, "-s", "-j", "link", "show", "dev",
                                   h.dev))[0]
            s = info.get("stats64") or info.get("stats") or {}
            out.append({"tx_bytes": int(s["tx"]["bytes"]), "rx_bytes": int(s["rx"]["bytes"]),
                        "tx_packets": int(s["tx"]["packets"]),
                        "rx_packets": int(s["rx"]["packets"])})
        return out

    def qdisc_drops(self) -> int:
        """Packets the token buckets dropped (queue full) on every link, both directions."""
        total = 0
        for ns, dev in [(h.netns, h.dev) for h in self.hosts] + \
                [(self.switch, f"p{h.index}") for h in self.hosts]:
            for q in json.loads(_run("tc", "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev)):
                total += int(q.get("drops", 0))
        return total


# an echo server and a client timing round trips of 1 byte (TCP_NODELAY), for Cluster.rtt_s
_ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); print("ready", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (b := c.recv(1)):
    c.sendall(b)
"""
_PING = """
import socket, sys, time
addr, port, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + limit
while True:
    try:
        c = socket.create_connection((addr, port), timeout=1); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.1)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
best = float("inf")
for _ in range(count):
    t = time.perf_counter(); c.sendall(b"x"); c.recv(1); best = min(best, time.perf_counter() - t)
print(best)
"""


def _kill_tree(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: the process group is its tree
        except (ProcessLookupError, PermissionError):
            pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class _Terminated(BaseException):
    """SIGTERM while a cluster exists: unwinds through ``with`` like Ctrl-C does."""


def _on_term(signum: int, frame: object) -> None:
    raise _Terminated(f"signal {signum}")


def _install_term_handler() -> Any:
    try:
        return signal.signal(signal.SIGTERM, _on_term)
    except ValueError:  # not the main thread: teardown still runs on exceptions and Ctrl-C
        return None


def _ignore_sigint() -> Any:
    try:
        return signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:
        return None


def _restore(sig: int, handler: Any) -> None:
    if handler is None:
        return
    try:
        signal.signal(sig, handler)
    except ValueError:
        pass
