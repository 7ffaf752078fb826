"""The network a plan predicts for: link tiers, and what each collective costs on them.

Why a model of its own: ``tandem.transport.costs`` charges one flat ring per operation on one
per-process link, which is what the emulator (``tandem train --net``) does and what the byte meter
counts. A cluster has two tiers (a fast one inside a node, the node's NIC between nodes), and the
libraries pick other algorithms at scale. Bytes here are always Tandem's meter's
(:mod:`tandem.transport.costs`, the ring's traffic: what ``tandem train`` would record); times
follow the algorithm of the chosen ``backend``:

* ``nccl``: all-reduce = the faster of ring (``2(N-1)/N * s/B + 2(N-1) L``) and the double binary
  tree (``2 s/B + 2 ceil(log2 N) L``: log latency, for small messages and many ranks); all-gather
  = ring (``(N-1) s/B + (N-1) L``); broadcast = pipelined chain (``s/B + (N-1) L``).
* ``gloo``: ring all-reduce and all-gather; binomial-tree broadcast (``ceil(log2 N)(s/B + L)``).
* ``tandem``: exactly what the emulator charges (ring all-reduce and all-gather, the root's link
  carries every broadcast copy, ``(N-1) s/B + L``; a barrier costs ``2(N-1)`` latencies): the
  backend to validate predictions against ``tandem train --net`` runs. The emulator charges a
  collective from the moment its last rank joined while the loopback collective runs meanwhile,
  so the software's cost counts only where it outlasts the modelled time:
  ``max(model, max(hops, 2(N-1)) * overhead)`` (the real engines pay it on every hop, on top of
  the latency). The ``2(N-1)``: beside every collective the emulator all-reduces the ranks' issue
  times on loopback (its join clock), a ring of ``2(N-1)`` hops on a group of its own, so a
  collective of few hops (an all-gather, a broadcast) costs the software the clock's ring.
  Until 2026-12-05 13:21 the clock ran first, on the collective's own group, and the two rings'
  hops added up; ``bench/plan`` then measured 48 of its 54 rows within 20 %, and 52 of 54 after
  the clock moved beside the collective and this model with it (``docs/scaling.md``).
  With ``--net-inter`` and ``--per-node P`` it charges what the emulator's shared hosts
  (``--net ...,hosts=M``) do: the P processes of a host charge their collectives to its one
  link (``--net-inter``), one after another, each its flat ring's traffic over all N ranks, so a
  host's link carries P times one rank's (an all-reduce or all-gather; a broadcast is paced by
  the root's own link); the intra-node ``--net`` plays no part, since the emulator has none.

Two tiers (``inter`` given, ``per_node`` P > 1, N > P, nodes M = ceil(N/P)): the hierarchical
algorithm NCCL and Horovod use. All-reduce = reduce-scatter inside the node, an all-reduce of
``s/P`` per process across nodes with the node's P processes sharing the NIC (the NIC carries
``2(M-1)/M * s``), and an all-gather inside the node. All-gather moves ``(M-1) P s`` through each
NIC and ``(N-1) s`` into each process over its intra-node link. A broadcast crosses the nodes
once, then fans out inside each node.

Tune: ``bytes_per_s`` / ``latency_s`` per tier (``--net``, ``--net-inter``); ``overhead_s`` is the
software's cost per message hop, added to every hop's latency (a ring all-reduce pays it
``2(N-1)`` times: kernel launches, gloo's bookkeeping, thread wake-ups; a few microseconds on an
idle host, milliseconds on an oversubscribed CPU, where ``bench/plan.py`` calibrates it), and
``p2p_overhead_s`` the same for a gossip round's point-to-point messages (default: the same);
``adds_per_s`` the memory speed of element-wise adds (``bsp_shared``'s shared-memory
accumulation, a parameter server's aggregation; 2.5e9 measured on the development machine).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tandem.config import NetConfig
from tandem.errors import ConfigError
from tandem.transport import costs

BACKENDS = ("nccl", "gloo", "tandem")
#: the intra-node tier when only ``--net-inter`` is given (PCIe / shared-memory class)
DEFAULT_INTRA = "100gbit:2us"


@dataclass(frozen=True)
class Tier:
    """One kind of link: bytes per second each way (full duplex) and one-way latency."""

    bytes_per_s: float
    latency_s: float

    @classmethod
    def parse(cls, text: str, flag: str = "--net") -> Tier:
        """``"1gbit:50us"`` (``tandem.config.NetConfig`` syntax; jitter is ignored here)."""
        try:
            net = NetConfig.parse(text)
        except ValueError as err:  # pydantic's ValidationError is a ValueError
            raise ConfigError(f"{flag} {text!r}: {' '.join(str(err).split())[:200]}") from None
        if net.hosts is not None:
            raise ConfigError(f"{flag} {text!r}: the planner takes processes per node as "
                              "--per-node with the node's link as --net-inter, not hosts=")
        unmodelled = [name for name, on in (("duplex", net.duplex != 1.0),
                                            ("duplex_after", net.duplex_after_s > 0),
                                            ("collective", net.collective != 1.0),
                                            ("burst", net.burst_bytes > 0)) if on]
        if unmodelled:
            raise ConfigError(f"{flag} {text!r}: the planner charges every byte the line rate "
                              f"both ways and does not model {', '.join(unmodelled)}=; drop "
                              "it (the emulator does: tandem train --net)")
        return cls(net.bytes_per_s, net.latency_s)

    def seconds(self, nbytes: float, hops: float = 1.0) -> float:
        return nbytes / self.bytes_per_s + hops * self.latency_s

    def describe(self) -> str:
        bits = 8 * self.bytes_per_s
        rate = f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s"
        return f"{rate}, {self.latency_s * 1e6:g} us"


@dataclass(frozen=True)
class Cost:
    """An operation's time for the slowest rank and the bytes a rank sends on average (the
    meter's count, averaged over the group: a broadcast's root sends, the others do not)."""

    seconds: float
    sent: float


@dataclass(frozen=True)
class Network:
    """Where the workers sit: ``link`` is each process's own link (one tier) or the link inside a
    node (two tiers); ``inter`` the node's NIC, shared by its ``per_node`` processes."""

    link: Tier
    inter: Tier | None = None
    per_node: int = 1
    backend: str = "nccl"
    overhead_s: float = 0.0
    adds_per_s: float = 2.5e9
    #: software cost of one round of point-to-point messages (gossip); None: ``overhead_s``
    p2p_overhead_s: float | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r}: choose one of {list(BACKENDS)}")
        if self.per_node < 1:
            raise ConfigError(f"--per-node {self.per_node}: at least 1")
        if self.per_node > 1 and self.inter is None:
            raise ConfigError(f"--per-node {self.per_node}: several processes per node need the "
                              "link between nodes too: add --net-inter BANDWIDTH:LATENCY")

    @classmethod
    def parse(cls, net: str | None = None, net_inter: str | None = None, per_node: int = 1,
              **kw: object) -> Network:
        """From the CLI's strings: ``net`` alone is one tier; with ``net_inter`` it is the
        intra-node tier (default :data:`DEFAULT_INTRA`)."""
        if net_inter is None:
            return cls(Tier.parse(net or "1gbit:50us"), None, per_node, **kw)  # type: ignore[arg-type]
        return cls(Tier.parse(net or DEFAULT_INTRA), Tier.parse(net_inter, "--net-inter"),
                   per_node, **kw)  # type: ignore[arg-type]

    def with_bandwidth(self, factor: float) -> Network:
        """Every tier ``factor`` x faster (monotonicity checks, what-ifs)."""
        inter = None if self.inter is None else replace(
            self.inter, bytes_per_s=self.inter.bytes_per_s * factor)
        return replace(self, link=replace(self.link, bytes_per_s=self.link.bytes_per_s * factor),
                       inter=inter)

    # ---- layout -----------------------------------------------------------------------------
    def nodes(self, n: int) -> int:
        return math.ceil(n / self.per_node) if self.inter is not None else n

    def two_tier(self, n: int) -> bool:
        return self.inter is not None and self.per_node > 1 and n > self.per_node

    @property
    def nic(self) -> Tier:
        """The link a process's traffic to another node crosses (shared by ``per_node``)."""
        return self.inter if self.inter is not None else self.link

    def describe(self) -> str:
        if self.inter is None:
            return f"one tier: {self.link.describe()} per process ({self.backend})"
        return (f"two tiers: {self.per_node} per node on {self.link.describe()}, nodes on "
                f"{self.inter.describe()} ({self.backend})")

    # ---- flat (one-tier) algorithms ---------------------------------------------------------
    def hop(self, t: Tier) -> float:
        """One message hop: the link's latency plus the software's cost per message."""
        return t.latency_s + self.overhead_s

    def _charged(self, wire_s: float, hops: int, t: Tier, n: int) -> float:
        """A flat collective of ``wire_s`` line time and ``hops`` message hops on ``t`` among
        ``n`` ranks."""
        if self.backend == "tandem":  # the emulator's model runs alongside the real collective
            software = max(hops, join_hops(n)) * self.overhead_s  # its join clock beside it
            return max(wire_s + hops * t.latency_s, software)
        return wire_s + hops * self.hop(t)

    def p2p_hop(self, t: Tier) -> float:
        """One round of point-to-point messages (a gossip peer's sends and receives)."""
        extra = self.overhead_s if self.p2p_overhead_s is None else self.p2p_overhead_s
        return t.latency_s + extra

    def _flat_all_reduce(self, s: float, n: int, t: Tier) -> float:
        if n <= 1:
            return 0.0
        moved = 2 * (n - 1) * s // n if isinstance(s, int) else 2 * (n - 1) / n * s  # as metered
        ring = self._charged(moved / t.bytes_per_s, 2 * (n - 1), t, n)
        if self.backend != "nccl":
            return ring
        tree = 2 * s / t.bytes_per_s + 2 * math.ceil(math.log2(n)) * self.hop(t)
        return min(ring, tree)

    def _flat_all_gather(self, s: float, n: int, t: Tier) -> float:
        return self._charged((n - 1) * s / t.bytes_per_s, n - 1, t, n) if n > 1 else 0.0

    def _flat_broadcast(self, s: float, n: int, t: Tier) -> float:
        if n <= 1:
            return 0.0
        if self.backend == "nccl":
            return s / t.bytes_per_s + (n - 1) * self.hop(t)
        if self.backend == "gloo":
            return math.ceil(math.log2(n)) * (s / t.bytes_per_s + self.hop(t))
        return self._charged(costs.broadcast_root_seconds(int(s), n, t.bytes_per_s, 0.0), 1, t,
                             n)

    def _tier(self) -> Tier:
        """The one tier a flat collective runs on."""
        return self.nic if self.inter is not None and self.per_node == 1 else self.link

    def _emulated_hosts(self, n: int) -> int:
        """The tandem backend with a node's link: how many of the ``n`` ranks share one host's
        link (the emulator's ``hosts``); 0 otherwise."""
        return min(self.per_node, n) if self.backend == "tandem" and self.inter else 0

    # ---- collectives ------------------------------------------------------------------------
    def all_reduce(self, nbytes: int, n: int) -> Cost:
        """Sum of ``nbytes`` over ``n`` ranks (hierarchical across two tiers)."""
        sent = costs.all_reduce(nbytes, n).sent
        if n <= 1:
            return Cost(0.0, 0)
        if share := self._emulated_hosts(n):  # every process's ring, in turns on the host
            return Cost(self._flat_all_reduce(nbytes * share, n, self.nic), sent)
        if not self.two_tier(n):
            return Cost(self._flat_all_reduce(nbytes, n, self._tier()), sent)
        p, m, ti, te = self.per_node, self.nodes(n), self.link, self.nic
        inside = 2 * ((p - 1) / p * nbytes / ti.bytes_per_s + (p - 1) * self.hop(ti))
        across = self._flat_all_reduce(nbytes, m, te)  # the NIC carries the node's share
        return Cost(inside + across, sent)

    def all_gather(self, nbytes_each: int, n: int) -> Cost:
        """Every rank's ``nbytes_each`` to every rank."""
        sent = costs.all_gather(nbytes_each, n).sent
        if n <= 1:
            return Cost(0.0, 0)
        if share := self._emulated_hosts(n):
            return Cost(self._flat_all_gather(nbytes_each * share, n, self.nic), sent)
        if not self.two_tier(n):
            return Cost(self._flat_all_gather(nbytes_each, n, self._tier()), sent)
        p, m, ti, te = self.per_node, self.nodes(n), self.link, self.nic
        nic = (m - 1) * (p * nbytes_each / te.bytes_per_s + self.hop(te))
        inside = (n - 1) * nbytes_each / ti.bytes_per_s + (p - 1) * self.hop(ti)
        return Cost(max(nic, inside), sent)

    def broadcast(self, nbytes: int, n: int) -> Cost:
        """One root's ``nbytes`` to every rank (sent bytes: the root's, averaged over ranks)."""
        sent = costs.broadcast(nbytes, n, True).sent / max(1, n)
        if n <= 1:
            return Cost(0.0, 0)
        if self._emulated_hosts(n):  # the root's link carries every copy
            return Cost(self._flat_broadcast(nbytes, n, self.nic), sent)
        if not self.two_tier(n):
            return Cost(self._flat_broadcast(nbytes, n, self._tier()), sent)
        across = self._flat_broadcast(nbytes, self.nodes(n), self.nic)
        inside = self._flat_broadcast(nbytes, self.per_node, self.link)
        return Cost(across + inside, sent)

    def barrier(self, n: int) -> Cost:
        if n <= 1:
            return Cost(0.0, 0)
        if self.backend == "tandem":
            t = self.nic if self.inter is not None else self.link
            return Cost(self._charged(0.0, costs.barrier(n).hops, t, n), 0)
        return Cost(self.all_reduce(4, n).seconds, 0)

    def op(self, kind: str, nbytes: int, n: int) -> Cost:
        """The cost of one recorded collective (:class:`tandem.plan.measure.Op`)."""
        if kind == "all_reduce":
            return self.all_reduce(nbytes, n)
        if kind == "all_gather":
            return self.all_gather(nbytes, n)
        if kind == "broadcast":
            return self.broadcast(nbytes, n)
        raise ValueError(f"unknown collective {kind!r}")

    def exchange(self, ops: list[tuple[str, int]], n: int) -> Cost:
        """A codec's exchange: its collectives one after the other (each waits for the last)."""
        parts = [self.op(kind, nbytes, n) for kind, nbytes in ops]
        return Cost(sum(c.seconds for c in parts), sum(c.sent for c in parts))


def join_hops(n: int) -> int:
    """Hops of the emulator's join clock, the loopback all-reduce of the ranks' issue times
    that runs beside every collective on an emulated link, on a group of its own
    (``Transport._join_clock``: one float64 each; before it ran first, on the same group, and
    its hops added to the collective's)."""
    return costs.all_reduce(8, n).hops


def ring_all_reduce_bytes(nbytes: int, n: int) -> int:
    """Bytes one rank sends in a ring all-reduce: ``2(N-1)`` steps of ``s/N`` (integers, as
    the meter counts them)."""
    return 2 * (n - 1) * nbytes // n if n > 1 else 0
