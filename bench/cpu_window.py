"""The machine's CPU while a run's steps ran, not over the whole run (``bench.cluster``).

A run's whole-run CPU (``/proc/stat`` around it) counts its start-up: on the real links four
torchrun agents and every worker's interpreter, where the emulated twin forks its workers from
one. That hides what the steps themselves cost: the compute-only row's real run used 32 s of CPU
for at most 5.2 s of steps. :class:`CpuSampler` reads ``/proc/stat`` every ``period_s`` while a
run goes on, each reading stamped with the wall clock (``time.time()``, the clock the run's
records start from), and :func:`steps_cpu` takes the difference between the readings that
bracket the steps of rank 0's records (from the end of step ``skip`` to the end of the last
step; evaluations between them included).
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq")


def cpu_ticks() -> dict[str, int]:
    """The whole machine's CPU time so far by kind (the ``cpu`` line of ``/proc/stat``, in clock
    ticks): what a run used is the difference around it, everything else on the machine
    included (the benchmark wants it alone)."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return dict(zip(CPU_FIELDS, map(int, first[1:1 + len(CPU_FIELDS)]), strict=True))


def cpu_spent(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Seconds of CPU between two :func:`cpu_ticks`: ``user`` (nice included), ``system``,
    ``softirq`` (hardware interrupts included: where the kernel moves packets through veths,
    the bridge and the token buckets, or through loopback) and ``idle`` (iowait included)."""
    hz = os.sysconf("SC_CLK_TCK")
    d = {k: (after[k] - before[k]) / hz for k in CPU_FIELDS}
    return {"user": d["user"] + d["nice"], "system": d["system"],
            "softirq": d["irq"] + d["softirq"], "idle": d["idle"] + d["iowait"]}


class CpuSampler:
    """``with CpuSampler() as s:`` reads :func:`cpu_ticks` every ``period_s`` in a thread;
    ``s.samples`` is [(wall time, ticks)], in time order."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-cpu", daemon=True)

    def _read(self) -> None:
        self.samples.append((time.time(), cpu_ticks()))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._read()

    def __enter__(self) -> CpuSampler:
        self._read()  # the first and the last reading bracket the block, whatever the thread does
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()


def steps_window(run_dir: Path, skip: int = 5) -> tuple[float, float, int] | None:
    """(start, end, steps) on the wall clock: from the end of rank 0's step ``skip`` to the end
    of its last step, from ``events.rank0.jsonl`` (its ``start`` record's ``t0`` plus each
    step's ``wall``); None without such records or with fewer than ``skip + 2`` steps."""
    path = run_dir / "events.rank0.jsonl"
    if not path.is_file():
        return None
    t0, walls = None, []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "start" and t0 is None:
            t0 = rec.get("t0")
        elif rec.get("kind") == "step" and rec.get("wall") is not None:
            walls.append((rec["step"], rec["wall"]))
    walls = [w for s, w in sorted(walls) if s >= skip]
    if t0 is None or len(walls) < 2:
        return None
    return t0 + walls[0], t0 + walls[-1], len(walls) - 1


def steps_cpu(samples: list[tuple[float, dict[str, int]]],
              window: tuple[float, float, int] | None) -> dict[str, Any] | None:
    """The CPU between the last reading at or before the window's start and the first at or
    after its end: seconds by kind, the span those readings cover, the steps in the window,
    and ``busy`` (user + system + softirq over the span: how many cores were busy)."""
    if window is None or not samples:
        return None
    start, end, steps = window
    times = [t for t, _ in samples]
    i = bisect.bisect_right(times, start) - 1
    j = bisect.bisect_left(times, end)
    if i < 0 or j >= len(samples) or j <= i:
        return None
    spent = cpu_spent(samples[i][1], samples[j][1])
    span = times[j] - times[i]
    used = spent["user"] + spent["system"] + spent["softirq"]
    return {**spent, "span_s": span, "steps": steps, "busy": used / span if span > 0 else None,
            "ms_per_step": 1e3 * used / steps if steps else None}
