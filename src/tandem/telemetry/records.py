"""The event file's lines: how a record becomes JSON, and how a resumed run reads what an
interrupted one left (the latest wall time, which records a resume rolls back). Used by
:class:`~tandem.telemetry.recorder.Recorder` and :mod:`~tandem.telemetry.summary`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def last_wall(path: Path) -> float:
    """The last wall time recorded in an events file (0 if none): where a resumed run goes on."""
    if not path.exists():
        return 0.0
    return max((w for w in map(wall_of, path.read_bytes().splitlines()) if w is not None),
               default=0.0)


def wall_of(line: bytes) -> float | None:
    """The ``wall`` of one JSON line, or None (no wall, or not a record)."""
    try:
        value = json.loads(line).get("wall")
        return None if value is None else float(value)
    except (ValueError, AttributeError, TypeError):
        return None


def split_rolled_back(lines: list[bytes], step: int) -> tuple[list[bytes], list[bytes]]:
    """``(kept, rolled_back)`` lines of an interrupted run resumed before ``step``.

    Rolled back: ``step``/``eval`` records of steps ``>= step``; the ``info`` and ``end`` records
    after the first of them (they describe the lost work); lines that are not JSON (a record torn
    by the kill). ``start`` and earlier ``resume`` records are always kept."""
    kept: list[bytes] = []
    gone: list[bytes] = []
    past = False
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            kind = rec.get("kind")
        except (ValueError, AttributeError):
            gone.append(line)
            continue
        if kind in ("step", "eval") and int(rec.get("step", -1)) >= step:
            past = True
            gone.append(line)
        elif kind == "end" or (past and kind == "info"):
            gone.append(line)
        else:
            kept.append(line)
    return kept, gone


def _json_default(obj: Any) -> Any:
    """Lets method fields be numpy or torch scalars/arrays, paths or sets without a cast."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return repr(obj)


def dumps(record: dict[str, Any]) -> str:
    """One record as one JSON line (non-native scalars converted, NaN kept as ``NaN``)."""
    return json.dumps(record, default=_json_default, separators=(",", ":"))
