"""bench.cluster --pin: hosts with a core of their own, on the real links and in the twin."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` is a package of the repository, not installed

from bench import cluster, pinning  # noqa: E402


def _affinity_after_start() -> list[int]:
    time.sleep(1.0)  # the poll pins a worker within milliseconds of its start
    return sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to")
def test_the_emulated_twin_puts_rank_r_on_core_r_mod_hosts():
    """The launcher's workers, pinned from the outside while they run; a rank left floating
    (the poll not matching the launcher's process names) fails this."""
    from tandem.launch import spawn

    with pinning.ranks_pinned(2):
        got = spawn(_affinity_after_start, 2, timeout_s=120)
    assert got == [[0], [1]]
    unpinned = spawn(_affinity_after_start, 2, timeout_s=120)
    assert unpinned[0] == sorted(os.sched_getaffinity(0))


def test_the_real_links_run_host_i_under_taskset_on_core_i():
    argvs = pinning.pinned_argv([["python", "-m", "a"], ["python", "-m", "b"]])
    assert argvs == [["taskset", "-c", "0", "python", "-m", "a"],
                     ["taskset", "-c", "1", "python", "-m", "b"]]


def test_a_pinned_or_other_host_count_run_writes_its_own_results_file():
    """The docs' main tables render from cluster.json (4 hosts sharing the cores): a run with
    another setting must not merge its rows into them."""
    assert cluster.result_name(4, False, False) == "cluster"
    assert cluster.result_name(2, True, False) == "cluster_2hosts_pinned"
    assert cluster.result_name(2, False, True) == "cluster_2hosts_quick"


def test_pin_refuses_more_hosts_than_cores(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.cluster", "--pin", "--hosts",
                                      str((os.cpu_count() or 1) + 1)])
    monkeypatch.setattr(cluster, "measure", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit) as info:
        cluster.main()
    assert info.value.code == 2
    assert "cores" in capsys.readouterr().err
