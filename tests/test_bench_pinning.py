"""bench.cluster --pin: hosts with a core of their own, on the real links and in the twin."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` is a package of the repository, not installed

from bench import cluster, pinning  # noqa: E402


def _affinity_after_start(wait_for_pin: bool) -> list[int]:
    """This worker's cores: once it is on a single one (up to 60 s: the poll's speed is the
    machine's, not what is tested), or at once."""
    deadline = time.monotonic() + 60
    while wait_for_pin and len(os.sched_getaffinity(0)) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to")
def test_the_emulated_twin_puts_rank_r_on_core_r_mod_hosts():
    """The launcher's workers, pinned from the outside while they run; a rank left floating
    (the poll not matching the launcher's process names) fails this."""
    from tandem.launch import spawn

    cores = pinning.usable_cores()
    with pinning.ranks_pinned(2):
        got = spawn(_affinity_after_start, 2, True, timeout_s=120)
    assert got == [[cores[0]], [cores[1]]]
    unpinned = spawn(_affinity_after_start, 2, False, timeout_s=120)
    assert unpinned[0] == sorted(os.sched_getaffinity(0))


def test_the_real_links_run_host_i_under_taskset_on_usable_core_i(monkeypatch):
    """Host i goes on the i-th core this process may use, not core i of the machine (which a
    cgroup or taskset may have taken away)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 3})
    argvs = pinning.pinned_argv([["python", "-m", "a"], ["python", "-m", "b"]])
    assert argvs == [["taskset", "-c", "3", "python", "-m", "a"],
                     ["taskset", "-c", "5", "python", "-m", "b"]]


def test_a_pinned_or_other_host_count_run_writes_its_own_results_file():
    """The docs' main tables render from cluster.json (4 hosts sharing the cores): a run with
    another setting must not merge its rows into them."""
    assert cluster.result_name(4, False, False) == "cluster"
    assert cluster.result_name(2, True, False) == "cluster_2hosts_pinned"
    assert cluster.result_name(2, False, True) == "cluster_2hosts_quick"


def test_pin_refuses_more_hosts_than_cores(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench.cluster", "--pin", "--hosts",
                                      str(len(os.sched_getaffinity(0)) + 1)])
    monkeypatch.setattr(cluster, "measure", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit) as info:
        cluster.main()
    assert info.value.code == 2
    assert "cores" in capsys.readouterr().err


def test_the_steps_cpu_is_taken_between_the_readings_that_bracket_the_steps(tmp_path):
    """The whole-run CPU counts start-up (the compute-only row's real run: 32 s of CPU for at
    most 5.2 s of steps), so the steps' CPU is read between the samples around rank 0's steps
    from the end of step ``skip``. Breaks if the window starts at the run's start, includes the
    warm-up steps, or the readings do not bracket it."""
    from bench import cpu_window

    events = [{"kind": "start", "t0": 1000.0}] + [
        {"kind": "step", "step": s, "wall": 10.0 + s} for s in range(20)]
    (tmp_path / "events.rank0.jsonl").write_text("\n".join(json.dumps(e) for e in events))
    window = cpu_window.steps_window(tmp_path, skip=5)
    assert window == (1015.0, 1029.0, 14)  # end of step 5 to end of step 19

    hz = os.sysconf("SC_CLK_TCK")
    zero = dict.fromkeys(cpu_window.CPU_FIELDS, 0)

    def ticks(busy_s: float) -> dict[str, int]:
        return dict(zero, user=round(busy_s * hz))

    # start-up burns 20 s of CPU before the steps; 2 cores busy during them from t = 1014
    samples = [(1000.0, ticks(0)), (1010.0, ticks(20)), (1014.0, ticks(20)),
               (1030.0, ticks(52)), (1040.0, ticks(52))]
    got = cpu_window.steps_cpu(samples, window)
    assert got["span_s"] == 16.0 and got["user"] == 32.0
    assert got["busy"] == 2.0 and got["ms_per_step"] == 32.0 / 14 * 1e3
    assert cpu_window.steps_cpu(samples[:3], window) is None  # no reading after the steps
    assert cpu_window.steps_window(tmp_path / "missing") is None


def test_the_cpu_sampler_brackets_the_block_it_runs_around():
    """Its first reading is taken before the block and its last after it, however late its
    thread is scheduled, so a window inside the block always has readings around it."""
    from bench import cpu_window

    with cpu_window.CpuSampler(period_s=0.01) as s:
        inside = time.time()
        time.sleep(0.05)
        leaving = time.time()
    times = [t for t, _ in s.samples]
    assert times[0] <= inside and times[-1] >= leaving and times == sorted(times)
    assert all(set(ticks) == set(cpu_window.CPU_FIELDS) for _, ticks in s.samples)
