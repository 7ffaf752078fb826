"""The benchmark harness every ``bench/NAME.py`` uses.

A benchmark measures its rows side by side in one run (never against a number from another run),
prints a table, checks its targets and writes ``bench/results/NAME.json``::

    {"name": ..., "when": ..., "command": ..., "machine": {...},
     "rows": [{"config": ..., <measured columns>}, ...],
     "targets": [{"name": ..., "value": ..., "goal": "<= 1.05", "met": true}, ...]}
"""

from __future__ import annotations

import json
import operator
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_PROCESS_STARTED = time.time()  # benchmarks import this first: their whole run is timed
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def goal_met(value: float | None, goal: str) -> bool:
    """``goal`` is ``"<= 1.05"``-style text; a missing value never meets it."""
    op, _, bound = goal.strip().partition(" ")
    if value is None or op not in _OPS:
        return False
    return bool(_OPS[op](float(value), float(bound)))


class Bench:
    """Collect rows and targets, then :meth:`finish` prints and writes the JSON."""

    def __init__(self, name: str, columns: list[str]) -> None:
        self.name = name
        self.columns = columns
        self.rows: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.started = _PROCESS_STARTED

    def row(self, **cols: Any) -> None:
        self.rows.append(cols)
        print(f"[{self.name}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in cols.items()), flush=True)

    def target(self, name: str, value: float | None, goal: str) -> bool:
        met = goal_met(value, goal)
        self.targets.append({"name": name, "value": value, "goal": goal, "met": met})
        return met

    def note(self, text: str) -> None:
        self.notes.append(text)

    def table(self) -> str:
        cols = self.columns
        cells = [[_fmt(r.get(c)) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
                  for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)

    def finish(self) -> Path:
        print()
        print(f"== {self.name} ==")
        print(self.table())
        for t in self.targets:
            print(f"target {t['name']}: {_fmt(t['value'])} (goal {t['goal']}) "
                  f"{'MET' if t['met'] else 'NOT MET'}")
        for n in self.notes:
            print(f"note: {n}")
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{self.name}.json"
        out.write_text(json.dumps({
            "name": self.name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "duration_s": round(time.time() - self.started, 1),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "rows": self.rows, "targets": self.targets, "notes": self.notes,
        }, indent=2, default=str))
        print(f"wrote {out}")
        return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
