"""Emulated links versus a real rate-limited link between two network namespaces.

Run as root (``sudo make bench`` or CI): it joins two namespaces through a switch namespace with
:mod:`bench.netns` (one veth pair per host, ``tc qdisc tbf`` at ``--rate`` on both ends of each,
a burst of 3.3 ms of line rate; this kernel has no netem, so the real link adds no latency and the
emulation runs with 0 latency too), runs a 2-rank gloo job across them and the same job on loopback
with the emulator, and prints predicted versus measured time per size. Without root it measures
the emulator only and the real-link target is NOT RUN. Namespaces are deleted at the end, also on
failure or Ctrl-C.

    python -m bench.links [--rate 200mbit]

The targets hold over the sizes of 1 MB and more; the small sizes (4 KB, 64 KB) are rows to read:
there a fixed per-operation cost (gloo's, the namespaces') is a large part of the time, which
neither the model nor the emulator counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.harness import CHILD_PYTHONPATH, Bench
from bench.netns import Cluster, NetnsUnavailable, unavailable_reason
from tandem.config import NetConfig
from tandem.transport import costs

SIZES = [4_000, 64_000, 1_000_000, 4_000_000, 16_000_000, 32_000_000]
#: sizes the targets are computed over (above any per-operation overhead)
TARGET_FROM = 1_000_000
ROOT = Path(__file__).resolve().parent.parent


def measure(net: str | None, sizes: list[int], reps: int = 3) -> list[dict]:
    """Inside a rank: the fastest of ``reps`` all-reduce and send round-trip times per size
    (machine load only ever adds delay, so the fastest rep is the cleanest measurement)."""
    from tandem.transport.env import transport_from_env
    from tandem.transport.probe import time_operations

    t = transport_from_env(net=NetConfig.parse(net) if net else None, timeout_s=120)
    rows = [{"bytes": r["bytes"], "all_reduce_s": min(r["all_reduce_s"]),
             "send_s": min(r["send_s"])} for r in time_operations(t, sizes, reps)]
    t.close()
    return rows


def run_real(rate: str, sizes: list[int]) -> list[dict]:
    """Two ranks in two namespaces over the shaped links (rank 0's measurements)."""
    with Cluster(2, rate) as net:
        return net.run_ranks("bench.links", "measure", f"None, {sizes!r}", port=29611,
                             pythonpath=CHILD_PYTHONPATH, cwd=ROOT)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", default="200mbit")
    args = ap.parse_args()
    from tandem.launch import spawn

    net = NetConfig.parse(f"{args.rate}:0ms")
    emulated = spawn(measure, 2, f"{args.rate}:0ms", SIZES, timeout_s=600)[0]
    real = None
    why = unavailable_reason()
    if why is None:
        try:
            real = run_real(args.rate, SIZES)
        except (NetnsUnavailable, OSError, json.JSONDecodeError) as err:
            why = f"the real link failed: {err}"
            print(why)
    b = Bench("links", ["bytes", "op", "model_s", "emulated_s", "real_s", "emulated/model",
                        "real/model"])
    worst_emu, worst_real = 0.0, 0.0
    for i, n in enumerate(SIZES):
        model_ar = costs.all_reduce(n, 2).seconds(net.bytes_per_s, 0.0)
        model_p2p = (n + 4) / net.bytes_per_s
        ops = (("all_reduce", model_ar, "all_reduce_s"), ("send", model_p2p, "send_s"))
        for op, model, key in ops:
            emu = emulated[i][key]
            rl = real[i][key] if real else None
            b.row(bytes=n, op=op, model_s=model, emulated_s=emu, real_s=rl,
                  **{"emulated/model": emu / model, "real/model": (rl / model) if rl else None})
            if n < TARGET_FROM:
                continue
            worst_emu = max(worst_emu, abs(emu / model - 1))
            if rl:
                worst_real = max(worst_real, abs(rl / model - 1))
    big = f"sizes >= {TARGET_FROM:,} B"
    b.target(f"emulator max relative error vs model, {big}", worst_emu, "<= 0.25")
    if real:
        b.target(f"real tbf link max relative error vs model, {big}", worst_real, "<= 0.35")
    else:
        b.target(f"real tbf link max relative error vs model, {big}", None, "<= 0.35",
                 not_run=why or "the real link gave no result")
        b.note(f"real-link rows not measured: {why}")
    b.finish()


if __name__ == "__main__":
    main()
