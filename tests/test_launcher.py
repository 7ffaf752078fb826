"""The launcher reaps every child: on success, on a worker's error, and on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jobs
from conftest import child_pids
from tandem.errors import WorkerFailed
from tandem.launch import spawn


def test_error_in_one_worker_is_reported_with_its_rank_and_text():
    with pytest.raises(WorkerFailed) as info:
        spawn(jobs.raise_on_rank, 3, 1, timeout_s=60)
    assert info.value.ranks[0] == 1 or 1 in info.value.ranks
    assert "boom on rank 1" in str(info.value)


def test_ctrl_c_reaps_all_workers(tmp_path):
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "tandem"), "train", "--workers", "3", "--steps",
         "100000", "--no-progress", "--out", str(tmp_path / "r")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(child_pids(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.3)
        kids = child_pids(proc.pid)
        assert len(kids) >= 3, "workers did not start"
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        proc.wait(timeout=30)
        for k in kids:
            assert not Path(f"/proc/{k}").exists() or \
                Path(f"/proc/{k}/stat").read_text().split()[2] == "Z", f"worker {k} left running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
