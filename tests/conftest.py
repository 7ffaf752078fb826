"""Shared test fixtures: every process a test starts must be gone when the test ends."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned children import tests' job modules


def child_pids(pid: int | None = None) -> list[int]:
    """Live child processes of ``pid`` (default: this process), excluding Python's helpers."""
    pid = pid or os.getpid()
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    keep = []
    for c in out:
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{c}/stat").read_text().split()[2]
        except OSError:
            continue
        if "resource_tracker" in cmd or "forkserver" in cmd or state == "Z":
            continue
        keep.append(c)
    return keep


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    deadline = time.monotonic() + 10
    while child_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = child_pids()
    assert not left, f"processes left behind: {left}"
