"""Reading event logs back and turning them into curves (pure data, no plotting).

Shared by :mod:`tandem.telemetry.summary` and :mod:`tandem.telemetry.report` so that a summary's
numbers and the plotted curves come from the same computation.

Conventions:

* **Cumulative bytes** at a point are train bytes *sent*, summed over all ranks. A rank's share is
  what its step records up to that moment add up to; "up to that moment" is the later of the
  point's wall time and, for ranks with the same role as the point's, the point's step index (in a
  synchronous method every worker's step ``s`` is paid for when step ``s`` is recorded, even if
  another rank wrote its line a millisecond later).
* **Several ranks evaluating the same step** (decentralised methods: each peer its own model) give
  one point: mean accuracy, mean loss, latest wall.
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_right
from collections import defaultdict
from pathlib import Path
from typing import Any

from tandem.telemetry.log import get_logger

log = get_logger(__name__)

RANK_FILE = re.compile(r"events\.rank(\d+)\.jsonl$")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of one JSONL file. A malformed last line (a worker killed mid-write) is dropped
    silently; a malformed line elsewhere is dropped with a warning."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    out: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                log.warning("%s line %d is not valid JSON; skipped", path, i + 1)
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def rank_files(run_dir: Path) -> list[tuple[int, Path]]:
    """``(rank, path)`` of every ``events.rank<R>.jsonl`` in ``run_dir``, by rank."""
    found = []
    for p in Path(run_dir).glob("events.rank*.jsonl"):
        m = RANK_FILE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def sort_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stable sort by ``(wall, rank)``; records without a wall sort first."""
    return sorted(records, key=lambda r: (_num(r.get("wall"), -1.0), _num(r.get("rank"), -1)))


def load_events(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run, sorted by ``(wall, rank)``, without writing anything: the per-rank
    files when present, else the merged ``events.jsonl``. Empty list when there are neither."""
    files = rank_files(run_dir)
    if files:
        records = [rec for _, p in files for rec in read_jsonl(p)]
        return sort_records(records)
    merged = Path(run_dir) / "events.jsonl"
    return read_jsonl(merged) if merged.is_file() else []


def _num(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class ByteIndex:
    """Answers "how many train bytes had all ranks sent by (wall, step)?" from step records."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        by_rank: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            if r.get("kind") == "step":
                by_rank[int(r.get("rank", 0))].append(r)
        self._ranks = []
        for rank, recs in sorted(by_rank.items()):
            role = recs[0].get("role", "worker")
            by_wall = sorted(recs, key=lambda r: _num(r.get("wall"), 0.0))
            by_step = sorted(recs, key=lambda r: _num(r.get("step"), 0.0))
            self._ranks.append((
                rank, role,
                [_num(r.get("wall"), 0.0) for r in by_wall], _prefix(by_wall),
                [_num(r.get("step"), 0.0) for r in by_step], _prefix(by_step),
            ))

    def at(self, wall: float, step: int | None = None, role: str | None = None) -> int:
        """Bytes sent by all ranks up to ``wall`` (or through ``step`` for ranks of ``role``)."""
        total = 0
        for _, r_role, walls, cum_w, steps, cum_s in self._ranks:
            sent = cum_w[bisect_right(walls, wall)]
            if step is not None and r_role == role:
                sent = max(sent, cum_s[bisect_right(steps, step)])
            total += sent
        return total


def _prefix(recs: list[dict[str, Any]]) -> list[int]:
    out = [0]
    for r in recs:
        out.append(out[-1] + int(r.get("bytes_sent") or 0))
    return out


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def train_curve(records: list[dict[str, Any]], index: ByteIndex | None = None) -> list[dict]:
    """Training loss per step index: ``{step, wall, loss, bytes}``, mean loss over the ranks that
    reported one, latest wall of those ranks, sorted by wall."""
    index = index or ByteIndex(records)
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "step" and r.get("loss") is not None:
            groups[int(r["step"])].append(r)
    points = []
    for step, recs in groups.items():
        wall = max(_num(r.get("wall"), 0.0) for r in recs)
        role = recs[0].get("role", "worker")
        points.append({"step": step, "wall": wall, "loss": _mean([float(r["loss"]) for r in recs]),
                       "bytes": index.at(wall, step, role)})
    return sorted(points, key=lambda p: (p["wall"], p["step"]))


def eval_curve(records: list[dict[str, Any]], index: ByteIndex | None = None) -> list[dict]:
    """Test metrics per evaluated step: ``{step, wall, accuracy, loss, bytes, ranks}`` sorted by
    wall; ``accuracy`` is None for regression workloads."""
    index = index or ByteIndex(records)
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "eval":
            groups[int(r.get("step", 0))].append(r)
    points = []
    for step, recs in groups.items():
        wall = max(_num(r.get("wall"), 0.0) for r in recs)
        role = recs[0].get("role", "worker")
        accs = [r.get("test_accuracy") for r in recs]
        losses = [r.get("test_loss") for r in recs]
        points.append({
            "step": step, "wall": wall,
            "accuracy": _mean([float(a) for a in accs if a is not None]),
            "loss": _mean([float(v) for v in losses if v is not None]),
            "bytes": index.at(wall, step, role),
            "ranks": sorted(int(r.get("rank", 0)) for r in recs),
            "averaging_s": max(_num(r.get("averaging_s"), 0.0) for r in recs),
        })
    return sorted(points, key=lambda p: (p["wall"], p["step"]))


def time_at(point: dict) -> float:
    """Seconds of training until the model evaluated at ``point`` existed: its wall, plus what
    assembling that model costs where no worker holds it (``averaging_s``: gossip's one
    all-reduce of the peers' parameters, 0 elsewhere)."""
    return float(point["wall"]) + float(point.get("averaging_s") or 0.0)


def first_reaching(points: list[dict], *, accuracy: float | None = None,
                   loss: float | None = None) -> dict | None:
    """The first eval point (by wall) with accuracy >= ``accuracy`` or loss <= ``loss``."""
    for p in points:
        if accuracy is not None and p["accuracy"] is not None and p["accuracy"] >= accuracy:
            return p
        if loss is not None and p["loss"] is not None and math.isfinite(p["loss"]) \
                and p["loss"] <= loss:
            return p
    return None
