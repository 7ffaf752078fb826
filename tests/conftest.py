"""Shared test fixtures: every process a test starts must be gone when the test ends."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned children import tests' job modules


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _describe(pid: int) -> tuple[str, str] | None:
    """(command line, state letter) of a process, or None once it is gone."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return cmd, Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return None


def child_pids(pid: int | None = None) -> list[int]:
    """Live child processes of ``pid`` (default: this process), excluding Python's helpers. The
    launcher's workers are forked by multiprocessing's fork server (and share its command line):
    the server's children count as the launcher's, the server itself does not."""
    keep = []
    for c in _children(pid or os.getpid()):
        info = _describe(c)
        if info is None or info[1] == "Z" or "resource_tracker" in info[0]:
            continue
        if "forkserver" in info[0]:
            keep += [w for w in _children(c) if (i := _describe(w)) is not None and i[1] != "Z"]
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
