"""Time the transport's operations on this process's link: what a link check measures.

Used by ``bench/links.py`` (emulated versus real rate-limited links) and by the tests that hold
the emulator to its model. Ranks 0 and 1 do the point-to-point part; every rank all-reduces.
"""

from __future__ import annotations

import time

import torch

from tandem.transport.transport import Transport


def time_operations(t: Transport, sizes: list[int], reps: int = 3) -> list[dict[str, float]]:
    """Per size in bytes: every rep's all-reduce time and send + 4-byte reply round-trip time."""
    rows = []
    for n in sizes:
        ar, p2p = [], []
        for _ in range(reps):
            x = torch.zeros(n // 4)
            t.barrier().wait()
            t0 = time.monotonic()
            t.all_reduce(x).wait()
            ar.append(time.monotonic() - t0)
            t.barrier().wait()
            t0 = time.monotonic()
            if t.rank == 0:
                t.send(x, 1).wait()
                t.recv(torch.zeros(1), 1).wait()
            elif t.rank == 1:
                t.recv(x, 0).wait()
                t.send(torch.zeros(1), 0).wait()
            p2p.append(time.monotonic() - t0)
        rows.append({"bytes": n, "all_reduce_s": ar, "send_s": p2p})
    return rows
