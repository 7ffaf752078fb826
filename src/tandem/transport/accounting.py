"""Byte accounting: the one layer every byte a strategy sends goes through.

Point-to-point messages are charged their exact payload (header included). Collectives are charged
the traffic of the algorithm that moves them (gloo and NCCL expose no wire counters), using the
formulas in :mod:`tandem.transport.costs`, computed in integers so that tests can assert them
exactly. Each record carries a ``category``: ``"train"`` bytes are what a method costs; ``"eval"``
and ``"control"`` bytes (evaluation, telemetry, shutdown) are kept apart so that comparisons between
methods are not polluted by bookkeeping.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class StepBytes:
    """Bytes moved by one process during one step (``train`` category only)."""

    sent: int = 0
    recv: int = 0
    per_peer_sent: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    per_peer_recv: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    ops: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class ByteMeter:
    """Counts bytes per operation, per peer, per step and per category. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.step = 0
        self.current = StepBytes()
        self.totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # category -> [sent, recv]
        self.op_totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def record(
        self,
        op: str,
        sent: int,
        recv: int,
        peer: int | None = None,
        category: str = "train",
    ) -> None:
        sent, recv = int(sent), int(recv)
        with self._lock:
            t = self.totals[category]
            t[0] += sent
            t[1] += recv
            if category != "train":
                return
            o = self.op_totals[op]
            o[0] += sent
            o[1] += recv
            cur = self.current
            cur.sent += sent
            cur.recv += recv
            cur.ops[op] += sent
            if peer is not None:
                cur.per_peer_sent[peer] += sent
                cur.per_peer_recv[peer] += recv

    def end_step(self) -> StepBytes:
        """Return the bytes of the step that just ended and start counting the next one."""
        with self._lock:
            done, self.current = self.current, StepBytes()
            self.step += 1
            return done

    def sent_total(self, category: str = "train") -> int:
        with self._lock:
            return self.totals[category][0]
