"""Units in the compact strings users type: rates (``100mbit``), durations (``1ms``) and sizes
(``4kb``).

Pure functions, used by :mod:`tandem.config` (``net="100mbit:1ms"``) and anything else that reads
such a string. A unit is always required: a bare number is refused, never guessed.
"""

from __future__ import annotations

import re

_UNITS_BPS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_UNITS_BYTES = {"b": 8, "kb": 8e3, "mb": 8e6, "gb": 8e9}
_UNITS_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
#: a number (decimal point and exponent allowed) and the letters of its unit
_QUANTITY = re.compile(r"\s*([0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*([a-zA-Z]*)\s*")


def parse_rate(text: str) -> float:
    """``"100mbit"`` -> bits per second. Accepts bit/kbit/mbit/gbit and b/kb/mb/gb (bytes)."""
    m = _QUANTITY.fullmatch(text)
    if not m or not m.group(2):
        raise ValueError(f"cannot read a rate from {text!r}; write e.g. 100mbit or 1gbit")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit.endswith("ps"):
        unit = unit[:-2] + "it" if unit.endswith("bps") else unit[:-2]
    factor = _UNITS_BPS.get(unit) or _UNITS_BYTES.get(unit)
    if factor is None:
        raise ValueError(f"unknown rate unit {unit!r}; use one of {sorted(_UNITS_BPS)}")
    if value <= 0:
        raise ValueError("a rate must be positive")
    return value * factor  # an infinite one is refused by the model (allow_inf_nan=False)


def parse_duration(text: str) -> float:
    """``"1ms"`` -> 0.001 seconds. Accepts s, ms, us, ns; the unit is required (``100mbit:1``
    surely meant 1 ms, not a silent second of latency per message)."""
    m = _QUANTITY.fullmatch(text)
    if not m:
        raise ValueError(f"cannot read a duration from {text!r}; write e.g. 1ms or 200us")
    if m.group(2).lower() not in _UNITS_S:
        raise ValueError(f"duration {text!r} needs a unit, one of {list(_UNITS_S)}: e.g. "
                         f"{m.group(1)}ms")
    return float(m.group(1)) * _UNITS_S[m.group(2).lower()]


def parse_bytes(text: str) -> int:
    """``"4kb"`` -> 4000 bytes. Accepts b, kb, mb, gb, decimal (``tc`` reads ``kb`` as 1024
    bytes: to match a ``tc`` burst, give it in bytes, e.g. ``4125b``); the unit is required. 0
    is allowed (no burst)."""
    m = _QUANTITY.fullmatch(text)
    if not m:
        raise ValueError(f"cannot read a size from {text!r}; write e.g. 4kb or 4125b")
    unit = m.group(2).lower()
    if unit not in _UNITS_BYTES:
        raise ValueError(f"size {text!r} needs a unit, one of {list(_UNITS_BYTES)}: e.g. "
                         f"{m.group(1)}kb")
    return round(float(m.group(1)) * _UNITS_BYTES[unit] / 8)
