"""Point-to-point patterns on real links between four hosts, against the emulator and its model.

Why: the emulator gives each process a full-duplex link whose point-to-point messages in flight
share its egress rate equally (``transport.shaping.SharedEgress``; before 2026-12-04 it served
them one after another, which ``coded_ps`` on real links showed wrong). What a real link (gloo
over TCP through ``tbf``) does with several transfers at once decides what ``gossip``,
``coded_ps`` and the parameter server cost:

* **a swap**: every host sends a message to each ring neighbour and receives one from each. If
  the sends are posted before the receives, the two directions take turns: gloo does not read a
  pair's socket for a message whose receive is not posted yet. Tandem's strategies post their
  receives first (see ``Transport.send``); the ``sends first`` row shows what that avoids. The
  ``one way at a time`` row sends to the right neighbours first, then to the left ones (what
  ``gossip`` does since 2026-12-04, :mod:`tandem.strategies.gossip.swap`): one flow each way per
  link at a time.
* **a fan-out**: host 0 sends a message to each of the three others at once. TCP shares host 0's
  rate between the three flows, unevenly and differently each time: the whole fan-out takes the
  three messages' line time, and a receiver may have its message before that.
* **a fan-in**: the three others send to host 0 at once; its link in is the bottleneck.
* **an all-reduce**: gloo's all-reduce of one message-sized tensor over the four hosts (dense
  all-reduce, DDP, ``bsp_shared``'s agents, ``pipeline``); the model is the ring's ``2(N-1)/N``
  messages each way. Every link carries data both ways throughout, as in a swap, but the
  emulator charges a collective its model as it is, so this row is what its ``collective``
  factor is taken from (the twins of ``bench/cluster.py``). It reduces one buffer in place, as
  training does, runs first, and is timed from the last rank's start (the collective's join).

Rows: the pattern (per receiver and whole for the fan-out), ``model_ms`` (the emulator's model:
messages in flight share the line rate, no latency), ``emulated_ms`` (loopback + the emulator)
and ``real_ms`` (four network namespaces behind a switch namespace, :mod:`bench.netns`), each the
best of ``--reps``; ``real_median_ms`` the median rep on the real links (what a run of many
steps meets: a rep that loses packets waits for TCP to recover). Run as root; without root
the real columns and their targets are NOT RUN. About a minute.

    sudo .venv/bin/python -m bench.p2p [--rate 100mbit] [--bytes 800000] [--reps 5] [--hosts 4]

A rate other than 100mbit writes ``bench/results/p2p_<rate>.json`` (``--rate 10mbit``: ten times
the line time, about three minutes); ``--hosts N`` other than 4 adds ``_<N>hosts``, the file
``bench/cluster --hosts N`` takes its twins' ``duplex`` and ``collective`` from. On two hosts the
ring's swap is one message each way, and a fan-out, a fan-in and an all-to-all are one message.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

from bench.harness import CHILD_PYTHONPATH, Bench
from bench.netns import (
    Cluster,
    NetnsUnavailable,
    machine_congestion,
    parse_rate_bps,
    unavailable_reason,
)

HOSTS = 4
#: the collective (what the emulator's ``collective`` factor is taken from)
ALL_REDUCE = "all-reduce"
ROOT = Path(__file__).resolve().parent.parent


def model_messages(hosts: int) -> dict[str, float]:
    """Pattern -> how many messages' line time the model gives it on ``hosts`` hosts (messages
    in flight on one egress share it; a receiver's ingress takes them one after another). A
    ring's swap has one neighbour per host on two hosts, two from three on."""
    ring, others = len(ring_neighbours(0, hosts)), hosts - 1
    return {"swap, receives first": ring, "swap, sends first": ring,
            "swap, one way at a time": ring,
            **{f"fan-out, receiver {j}": others for j in range(1, hosts)},
            "fan-out, all received": others, "fan-in, receiver": others,
            "all-to-all": others, "all-to-all after idle": others,
            ALL_REDUCE: 2 * (hosts - 1) / hosts}


def ring_neighbours(rank: int, hosts: int) -> list[int]:
    """``rank``'s neighbours on a ring of ``hosts``: left then right (one on two hosts)."""
    left, right = (rank - 1) % hosts, (rank + 1) % hosts
    return [left] if left == right else [left, right]


MODEL_MESSAGES = model_messages(HOSTS)
#: the patterns in which a link carries data both ways at once (what ``duplex`` models)
BIDIRECTIONAL = ("swap, receives first", "swap, one way at a time", "all-to-all")
#: seconds every connection idles before a rep of ``all-to-all after idle``: past TCP's smallest
#: retransmission timeout (200 ms), after which Linux restarts a connection's congestion window
#: (``net.ipv4.tcp_slow_start_after_idle``), as between a parameter server's rounds at 10 Mbit/s
IDLE_S = 0.5


def measure(net: str | None, nbytes: int, reps: int) -> dict[str, Spans]:
    """Inside a rank of four: per pattern, per rep, ``[start, end]`` of this rank's part on the
    machine's monotonic clock (the swaps: all four of its transfers; the fan-out: a receiver's
    message). The clock is one for every process on the machine, network namespaces included, so
    :func:`by_pattern` measures a receiver from the moment its sender started, not from its own
    exit from the barrier (ranks leave a barrier up to milliseconds apart)."""
    import torch

    from tandem.config import NetConfig
    from tandem.transport.env import transport_from_env

    t = transport_from_env(net=NetConfig.parse(net) if net else None, timeout_s=120)
    r, w = t.rank, t.world
    nbrs = ring_neighbours(r, w)
    n = nbytes // 4

    def swap(receives_first: bool) -> None:
        recvs: list[Any] = []
        if receives_first:
            recvs = [t.recv(torch.empty(n), j) for j in nbrs]
        sends = [t.send(torch.zeros(n), j) for j in nbrs]
        if not receives_first:
            recvs = [t.recv(torch.empty(n), j) for j in nbrs]
        for p in recvs + sends:
            p.wait()

    def swap_phased() -> None:
        """The ring's two directions one after the other: every link carries one flow each
        way at a time, where the swap above puts two on each (on two hosts, the one swap)."""
        for src, dst in ((nbrs, nbrs[::-1]) if len(nbrs) == 2 else ((nbrs[0], nbrs[0]),)):
            recv = t.recv(torch.empty(n), src)
            t.send(torch.zeros(n), dst).wait()
            recv.wait()

    def fan_out() -> None:
        if r == 0:
            for p in [t.send(torch.zeros(n), j) for j in range(1, w)]:
                p.wait()
        else:
            t.recv(torch.empty(n), 0).wait()

    def fan_in() -> None:
        if r == 0:
            for p in [t.recv(torch.empty(n), j) for j in range(1, w)]:
                p.wait()
        else:
            t.send(torch.zeros(n), 0).wait()

    def all_to_all() -> None:
        """Every host sends a message to each other host and receives one from each, the
        receives posted first: a parameter server's round with one server per host (the pushes
        of its workers, or the pulls of its shards)."""
        others = [j for j in range(w) if j != r]
        recvs = [t.recv(torch.empty(n), j) for j in others]
        for p in recvs + [t.send(torch.zeros(n), j) for j in others]:
            p.wait()

    out: dict[str, list[list[float]]] = {}
    # the all-reduce works in place on one buffer, as DDP's buckets and Tandem's flat gradient
    # do: on a fresh tensor every call it took 1.18x its model at 100 Mbit/s in the median rep,
    # on the same one 1.06x (15 reps each, a probe script); first or last made no difference
    # that was measured apart (1.17-1.20x either way, both times on fresh tensors)
    bucket = torch.zeros(n)
    for name, fn, idle_s in ((ALL_REDUCE, lambda: t.all_reduce(bucket).wait(), 0.0),
                             ("swap, receives first", lambda: swap(True), 0.0),
                             ("swap, sends first", lambda: swap(False), 0.0),
                             ("swap, one way at a time", swap_phased, 0.0),
                             ("fan-out", fan_out, 0.0), ("fan-in", fan_in, 0.0),
                             ("all-to-all", all_to_all, 0.0),
                             ("all-to-all after idle", all_to_all, IDLE_S)):
        times = []
        for _ in range(reps + 1):  # the first rep warms the pairs' connections up
            time.sleep(idle_s)
            t.barrier().wait()
            t0 = time.monotonic()
            fn()
            times.append([t0, time.monotonic()])
        out[name] = times[1:]
    t.barrier().wait()
    t.close()
    return out


Spans = list[list[float]]


def by_pattern(per_rank: list[dict[str, Spans]]) -> dict[str, list[float]]:
    """Each row's time (s) in every rep: a swap from the first rank's start to the last rank's
    end; a fan-out receiver from the sender's (rank 0's) start to its own end (which flow TCP
    serves first varies: a receiver's best rep and another's may differ), the whole fan-out to
    its last receiver's end; the fan-in from the first sender's start to the receiver's end; the
    all-reduce from the *last* rank's start (a collective cannot begin before every rank has
    joined it, and the emulator charges its model from that join) to the last rank's end."""
    reps = range(len(per_rank[0]["fan-out"]))

    def span(name: str, starts: list[int], end: list[int], first: bool = True) -> list[float]:
        pick = min if first else max
        return [max(per_rank[r][name][i][1] for r in end)
                - pick(per_rank[r][name][i][0] for r in starts) for i in reps]

    everyone = list(range(len(per_rank)))
    rows = {name: span(name, everyone, everyone)
            for name in ("swap, receives first", "swap, sends first", "swap, one way at a time")}
    for j in everyone[1:]:
        rows[f"fan-out, receiver {j}"] = span("fan-out", [0], [j])
    rows["fan-out, all received"] = span("fan-out", [0], everyone[1:])
    rows["fan-in, receiver"] = span("fan-in", everyone[1:], [0])
    for name in ("all-to-all", "all-to-all after idle"):
        rows[name] = span(name, everyone, everyone)
    rows[ALL_REDUCE] = span(ALL_REDUCE, everyone, everyone, first=False)
    return rows


def result_name(rate: str, hosts: int = HOSTS) -> str:
    """The results file of a run at ``rate`` on ``hosts`` hosts (without ``--result``): ``p2p``
    at the default 100mbit, ``p2p_<rate>`` otherwise; ``_<N>hosts`` added for other than 4."""
    name = "p2p" if rate == "100mbit" else f"p2p_{rate}"
    return name if hosts == HOSTS else f"{name}_{hosts}hosts"


def run_real(rate: str, nbytes: int, reps: int, congestion: str | None = None,
             hosts: int = HOSTS) -> list[dict[str, Spans]]:
    """One rank per namespace over the shaped links: every rank's measurements."""
    with Cluster(hosts, rate, congestion=congestion) as net:
        return net.run_ranks("bench.p2p", "measure", f"None, {nbytes}, {reps}", port=29631,
                             pythonpath=CHILD_PYTHONPATH, cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--bytes", type=int, default=800_000, help="each message's size")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--congestion", default=None,
                    help="TCP congestion control in the namespaces (default: the machine's)")
    ap.add_argument("--hosts", type=int, default=HOSTS, help="hosts (2 or more; a result name "
                    "of its own when not 4, read by bench/cluster --hosts N)")
    ap.add_argument("--result", default=None, help="result name (default p2p or p2p_<rate>)")
    args = ap.parse_args()
    if args.hosts < 2:
        ap.error(f"--hosts {args.hosts}: the patterns need at least 2 hosts")
    from tandem.launch import spawn

    line_s = args.bytes / (parse_rate_bps(args.rate) / 8)
    emulated = by_pattern(spawn(measure, args.hosts, f"{args.rate}:0ms", args.bytes, args.reps,
                                timeout_s=600))
    real, why = None, unavailable_reason()
    if why is None:
        try:
            real = by_pattern(run_real(args.rate, args.bytes, args.reps, args.congestion,
                                       args.hosts))
        except (NetnsUnavailable, OSError, ValueError, KeyError) as err:
            why = f"the real links failed: {err}"
            print(why)
    result = args.result or result_name(args.rate, args.hosts)
    messages = model_messages(args.hosts)
    b = Bench(result, ["pattern", "model_ms", "emulated_ms", "real_ms", "real_median_ms",
                      "emulated/model", "real/model", "real median/model"])
    for name, k in messages.items():
        model = k * line_s
        em = min(emulated[name])
        rl = min(real[name]) if real else None
        med = statistics.median(real[name]) if real else None
        b.row(pattern=name, model_ms=model * 1e3, emulated_ms=em * 1e3,
              real_ms=rl * 1e3 if rl else None, real_median_ms=med * 1e3 if med else None,
              **{"emulated/model": em / model, "real/model": rl / model if rl else None,
                 "real median/model": med / model if med else None})
    swap = "swap, receives first"
    one_way = "swap, one way at a time"
    goals = [("real: swap with the sends first / with the receives first (why the strategies "
              "post receives first)", "swap, sends first", swap, min, ">= 1.2"),
             ("real: swap with the receives first / its model", swap, None, min, "<= 1.5"),
             ("real, median reps: swap posted at once (receives first) / one way at a time "
              "(why gossip swaps one way at a time)", swap, one_way, statistics.median, ">= 1.0"),
             ("real: swap one way at a time / its model", one_way, None, min, "<= 1.3")]
    for name, num, den, pick, goal in goals:
        value = None
        if real:
            value = pick(real[num]) / (pick(real[den]) if den else messages[num] * line_s)
        b.target(name, value, goal, not_run=None if real else (why or "no result"))
    b.note(f"{args.hosts} hosts, {args.rate} tbf both ways (burst 3.3 ms of line rate), "
           f"messages of {args.bytes:,} B, the best (and the real links' median) of "
           f"{args.reps} reps after one warm-up; the emulator with "
           "0 latency (the real links add none: no netem on this kernel); TCP congestion "
           f"control on the real links: {args.congestion or machine_congestion()}")
    if real is None:
        b.note(f"real-link rows not measured: {why}")
    b.finish()


if __name__ == "__main__":
    main()
