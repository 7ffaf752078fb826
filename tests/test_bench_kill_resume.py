"""bench.kill_resume's helpers, without starting any run: the (strategy, role) table, --only,
the event-log tail and what counts as a record of a loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` is a package of the repository, not installed

from bench import kill_resume as kr  # noqa: E402
from bench import killer  # noqa: E402


def test_every_strategy_and_role_is_covered_and_every_config_resolves():
    from tandem.config import load_config
    from tandem.resolve import resolve

    pairs = {(c.strategy, c.role) for c in kr.cases()}
    assert pairs == {("allreduce", "worker"), ("pipeline", "worker"),
                     ("param_server/sync", "worker"), ("param_server/sync", "server"),
                     ("param_server/candidate", "worker"), ("param_server/candidate", "server"),
                     ("bsp_shared", "worker"), ("bsp_shared", "agent"),
                     ("bsp_shared", "controller"), ("gossip", "peer"), ("coded_ps", "worker"),
                     ("coded_ps", "server")}
    for c in kr.cases():
        cfg = load_config(dict(c.cfg, steps=40, out="unused"))
        world = resolve(cfg).strategy.processes(cfg)
        assert all(0 <= v < world for v in c.victims), c
        # workers and peers are ranks 0..W-1 under the local launcher; every other role follows
        assert (max(c.victims) < cfg.workers) == (c.role in ("worker", "peer")), c
        assert c.inject == (c.role in ("worker", "peer")), c  # only those honour inject_crash
        if c.resume:
            assert cfg.checkpoint_every > 0


def test_only_selects_by_strategy_prefix_and_role():
    cases = kr.cases()
    got = {(c.strategy, c.role) for c in kr.select(cases, "param_server:server,gossip")}
    assert got == {("param_server/sync", "server"), ("param_server/candidate", "server"),
                   ("gossip", "peer")}
    assert len(kr.select(cases, "bsp_shared")) == 3
    assert kr.select(cases, None) == cases
    with pytest.raises(SystemExit, match="matches none"):
        kr.select(cases, "gossip:server")


def test_tail_reads_only_whole_new_lines(tmp_path):
    path = tmp_path / "events.rank0.jsonl"
    tail = killer.Tail(path)
    assert tail.records() == []  # not written yet
    path.write_text(json.dumps({"kind": "step", "step": 0}) + "\n" + '{"kind": "st')
    assert tail.records() == [{"kind": "step", "step": 0}]
    with path.open("a") as fh:
        fh.write('ep", "step": 1}\n')
    assert tail.records() == [{"kind": "step", "step": 1}]
    assert tail.records() == []


def test_records_of_a_loss():
    assert killer.mentions_loss({"kind": "info", "lost_worker": 2, "lost_reason": "x"}, 2)
    assert killer.mentions_loss({"kind": "info", "lost_worker": 0, "lost_rank": 2}, 2)
    assert killer.mentions_loss({"kind": "info", "gossip_reweighted": [1, 3], "at_step": 9}, 3)
    assert killer.mentions_loss({"kind": "info", "checkpoints_stopped_at_step": 9,
                             "lost_peers": [1]}, 1)
    assert not killer.mentions_loss({"kind": "info", "lost_worker": 1}, 2)
    assert not killer.mentions_loss({"kind": "step", "lost_worker": 2}, 2)


def test_dead_sees_an_exited_process():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert not killer.dead(os.getpid())
        p.wait(30)
        assert killer.dead(p.pid)  # reaped: gone from /proc
    finally:
        p.kill()
        p.wait()


def test_torchrun_trial_is_not_run_without_namespaces_and_a_merge_keeps_the_rest(
        tmp_path, monkeypatch):
    """`--only torchrun --merge` without root: the trial's target is NOT RUN with the reason,
    and the kept kill trials, their targets and notes stay. Breaks if the merge drops a kept row,
    target or note, or if the trial runs (or is called MET) without root."""
    from bench import harness, netns

    name = ("torchrun on network namespaces: a killed node's job restarts and resumes "
            "(|final test loss - uninterrupted run's|)")
    old = {"rows": [{"strategy": "gossip", "role": "peer", "ok": True, "outcome": "lost"}],
           "targets": [{"name": "hangs (every strategy and role)", "value": 0, "goal": "<= 0",
                        "met": True, "state": "MET"}],
           "notes": ["gossip peer: 1 kills: 1 lost; 1 as promised", "10 kills per (strategy, "
                     "role), 40 steps"], "git": {"commit": "c" * 40}, "date": "then"}
    (tmp_path / "kill_resume.json").write_text(json.dumps(old))
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.setattr(netns, "unavailable_reason", lambda: "needs root")
    monkeypatch.setattr(sys, "argv", ["kill_resume", "--only", "torchrun", "--merge"])
    kr.main()
    rec = json.loads((tmp_path / "kill_resume.json").read_text())
    assert rec["rows"] == [dict(r, run="then") for r in old["rows"]]  # the run that measured it
    by = {t["name"]: t for t in rec["targets"]}
    assert by[name]["state"] == "NOT RUN" and "needs root" in by[name]["reason"]
    assert by["hangs (every strategy and role)"]["value"] == 0
    assert old["notes"][0] in rec["notes"] and old["notes"][1] in rec["notes"]


def test_the_exactness_targets_skip_the_torchrun_row_which_compares_losses():
    """A full run as root adds the torchrun row (strategy allreduce, no max_param_diff): the
    report used to fail on it with a KeyError after every trial had run."""
    from bench.kill_resume import max_param_diffs

    rows = [{"strategy": "allreduce", "max_param_diff": 0.0},
            {"strategy": "allreduce", "max_param_diff": 2e-7},
            {"strategy": "allreduce", "role": "torchrun node (2 netns)", "loss_diff": 0.0},
            {"strategy": "gossip", "max_param_diff": "not resumed (completed)"}]
    assert max_param_diffs(rows, ["allreduce", "gossip", "allreduce"]) == \
        {"allreduce": 2e-7, "gossip": None}
