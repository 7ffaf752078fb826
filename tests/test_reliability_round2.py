"""Reliability, round two: the true cause first, no stuck launcher, the divergence watch, no
leaked semaphore, ``tandem worker``'s progress and summary.

Everything here asserts what cannot depend on the machine's speed (which rank is named, exact
counts, what a stream prints), so it holds under ``make test-stress`` as well.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import tandem
from tandem.errors import (
    DivergenceError,
    NonFiniteGradient,
    PeerTimeout,
    TandemError,
    WorkerFailed,
    first_cause,
    is_secondary,
)
from tandem.launch import spawn
from tandem.telemetry.divergence import DivergenceWatch
from tandem.trainer.screen import raise_non_finite
from tandem.transport.env import transport_from_env
from tandem.transport.store_barrier import abandon

BIN = Path(sys.executable).parent

# ---- jobs run inside spawned processes (importable by name) -----------------------------------


def fail_amid_collectives(victim: int, how: str) -> int:
    """Rank ``victim`` fails at step 3 (``how``: raise, nan or kill) while the others are in an
    all-reduce. Rank 0 runs its all-reduces straight on the engine, as code that calls gloo
    directly does: the victim's exit reaches it as a raw gloo error (a connection closed by the
    peer), which used to be named as the cause because rank 0 is the lowest rank."""
    t = transport_from_env(timeout_s=30, backend="gloo")
    x = torch.ones(256)
    for step in range(400):
        if t.rank == victim and step == 3:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "nan":
                raise_non_finite(t.rank, step)
            raise ValueError(f"rank {t.rank}: a bad batch at step {step}")
        if t.rank == 0:
            dist.all_reduce(x)
        else:
            t.all_reduce(x).wait()
    t.close()
    return t.rank


def abandoned_peer(grace_s: float) -> str:
    """Rank 1 hangs outside any wait; rank 0 records that it goes on without it and finishes."""
    t = transport_from_env(timeout_s=30, backend="gloo")
    t.barrier().wait()  # both connected: rank 1 hangs, it does not fail to connect
    if t.rank == 1:
        time.sleep(3600)
    abandon(t, 1, "rank 0 went on without it", grace_s)
    t.close(graceful=False)
    return "done"


def abandoned_then_closed() -> str:
    """Rank 0 abandons rank 1 and goes; rank 1 then fails with the error an abandoned rank gets
    when its peer closes the connection it was still opening (what CI once saw of
    :func:`abandoned_peer`, whose rank 1 was still in gloo's connect when rank 0 closed)."""
    t = transport_from_env(timeout_s=30, backend="gloo")
    store = t.liveness.store
    if t.rank == 0:
        abandon(t, 1, "rank 0 went on without it", 0.5)
        store.set("test/gone", "1")
        t.close(graceful=False)
        return "done"
    store.wait(["test/gone"])
    raise RuntimeError("Gloo connectFullMesh failed with [pair.cc:553] Connection closed by peer "
                       "[127.0.0.1]:45257. This is typically caused by a remote worker crashing.")


# ---- errors carry their time; primary and secondary -------------------------------------------


def test_errors_carry_the_time_they_were_raised_also_across_processes():
    before = time.time()
    err = PeerTimeout("no answer", ranks=[3])
    assert before <= err.at <= time.time()
    back = pickle.loads(pickle.dumps(err))
    assert back.at == err.at and back.ranks == [3] and str(back) == "no answer"
    failed = pickle.loads(pickle.dumps(WorkerFailed("x", ranks=[1], details={1: "y"})))
    assert failed.details == {1: "y"} and isinstance(failed.at, float)
    assert isinstance(DivergenceError("d"), TandemError)
    assert not issubclass(DivergenceError, NonFiniteGradient)


def test_secondary_errors_are_consequences_of_a_peers_exit():
    gloo = ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection "
            "closed by peer [127.0.0.1]:41237")
    for text in [gloo, "Traceback ...\nRuntimeError: Read error: Connection reset by peer",
                 "BrokenPipeError: [Errno 32] Broken pipe",
                 "RuntimeError: ... This is typically caused by a remote worker crashing.",
                 "WorkerFailed: all_reduce: worker rank(s) [2] died", "PeerTimeout: no answer"]:
        assert is_secondary(text), text
    for text in ["NonFiniteGradient: rank 1: non-finite gradient at step 4",
                 "worker 2 killed by SIGKILL without reporting", "ValueError: bad batch",
                 "DivergenceError: rank 0: the training loss is nan at step 3: diverging"]:
        assert not is_secondary(text), text


def test_the_first_cause_is_the_earliest_primary_failure():
    reports = {0: "RuntimeError: Connection closed by peer", 1: "WorkerFailed: rank 2 died",
               2: "worker 2 killed by SIGKILL without reporting", 3: "ValueError: late"}
    times = {0: 10.0, 1: 10.5, 2: 11.0, 3: 12.0}  # rank 0's consequence arrived first
    assert first_cause(reports, times) == 2
    assert first_cause(reports, {**times, 3: 10.9}) == 3  # an earlier primary wins
    assert first_cause({0: reports[0], 1: reports[1]}, times) == 0  # all secondary: earliest
    assert first_cause({4: "ValueError: a", 2: "ValueError: b"}, {}) == 2  # no times: lowest


# ---- the launcher names the true cause -----------------------------------------------------


@pytest.mark.parametrize(("how", "text"), [
    ("nan", "NonFiniteGradient: rank 2: non-finite gradient at step 3"),
    ("raise", "ValueError: rank 2: a bad batch at step 3"),
    ("kill", "worker 2 killed by SIGKILL without reporting"),
])
def test_a_nan_stop_a_crash_and_a_kill_each_name_the_failed_rank(how, text):
    with pytest.raises(WorkerFailed) as info:
        spawn(fail_amid_collectives, 3, 2, how, timeout_s=120, failure_grace_s=60)
    err = info.value
    assert str(err).startswith("rank 2 failed: "), str(err)[:600]
    assert text in err.details[2]
    assert sorted(err.ranks) == [0, 1, 2]
    # the others failed *because* rank 2 did: rank 0 with the engine's own error
    assert is_secondary(err.details[0]) and is_secondary(err.details[1]), err.details


def test_a_nan_stop_under_tandem_train_names_the_rank_and_step(tmp_path):
    """allreduce, 3 workers, rank 1's gradient is NaN at step 4: named first, with its step."""
    with pytest.raises(WorkerFailed) as info:
        tandem.train({"workload": {"name": "digits"}, "workers": 3, "steps": 8,
                      "progress": False, "inject_nan": ["1:4"], "out": str(tmp_path / "r")})
    assert str(info.value).startswith(
        "rank 1 failed: NonFiniteGradient: rank 1: non-finite gradient at step 4")


# ---- no stuck launcher ---------------------------------------------------------------------


def test_an_abandoned_rank_is_ended_once_every_other_rank_has_reported():
    assert spawn(abandoned_peer, 2, 0.0, timeout_s=120, tolerate_death=lambda r: r == 1) == \
        ["done", None]
    with pytest.raises(WorkerFailed) as info:  # not tolerated: it fails the job, named
        spawn(abandoned_peer, 2, 0.5, timeout_s=120)
    assert str(info.value).startswith("rank 1 failed: worker 1 was abandoned by its peers "
                                      "(rank 0 went on without it)")


def test_an_abandoned_rank_that_then_fails_names_the_abandonment_first():
    """Its error (a connection closed by peer) is the consequence; being abandoned the cause."""
    with pytest.raises(WorkerFailed) as info:
        spawn(abandoned_then_closed, 2, timeout_s=120)
    assert str(info.value).startswith("rank 1 failed: worker 1 was abandoned by its peers "
                                      "(rank 0 went on without it); then: RuntimeError"), \
        str(info.value)[:400]
    assert info.value.ranks == [1]
    # tolerated, it is lost, and the job completes
    assert spawn(abandoned_then_closed, 2, timeout_s=120, tolerate_death=lambda r: r == 1) == \
        ["done", None]


@pytest.mark.parametrize("strategy", [
    {"name": "param_server", "options": {"min_workers": 2}},
    {"name": "bsp_shared"},
])
def test_a_stuck_tolerated_worker_is_listed_lost_and_the_run_completes(tmp_path, strategy):
    """Worker 2 sleeps forever in its first step (``--slow-worker 2:1000000``): the parameter
    server counts it lost after ``timeout_s``, bsp_shared's budget is reached without it; each
    marks it abandoned, and the launcher ends it once every other rank has finished (it used to
    wait for the job's deadline)."""
    out = tandem.train({"workload": {"name": "digits"}, "strategy": strategy, "workers": 3,
                        "steps": 20, "timeout_s": 5, "slow_workers": ["2:1000000"],
                        "progress": False, "out": str(tmp_path / "run")}, timeout_s=600)
    assert out["lost_ranks"] == [2]
    assert out["results"][2] == {"lost": True}
    assert out["final_test_accuracy"] is not None
    if strategy["name"] == "param_server":
        assert [r["steps"] for r in out["results"][:2]] == [20, 20]
        server = (tmp_path / "run" / "events.rank3.jsonl").read_text().replace(" ", "")
        assert server.count('"lost_worker":2') == 1
    else:
        agent = out["results"][3]
        assert agent["applied"] >= 20 * 3
        assert agent["per_worker"][2] == 0  # it never handed in a gradient


# ---- the divergence watch ------------------------------------------------------------------


def test_the_watch_fires_once_on_a_blow_up_and_never_on_noise():
    watch = DivergenceWatch()
    gen = torch.Generator().manual_seed(0)
    losses = [2.3 * math.exp(-0.05 * k) * (1 + 0.5 * float(torch.rand(1, generator=gen)))
              for k in range(300)]  # down from 2.3 to ~0.001, noisy (a 50% band)
    assert [watch.check(k, x) for k, x in enumerate(losses)] == [None] * 300
    assert watch.fired_at is None
    watch = DivergenceWatch(cause="lower the lr")
    said = [watch.check(k, x) for k, x in enumerate([3.0, 2.5, 2.0, 1.5, 1.5, 400, 900, 1e9])]
    assert [k for k, s in enumerate(said) if s] == [5] and watch.fired_at == 5
    slower = DivergenceWatch()  # smoothed: one step 24x the best does not fire, the next does
    assert [slower.check(k, x) is None for k, x in enumerate([2.0, 1.0, 40.0, 40.0])] == \
        [True, True, True, False]
    assert "step 5" in said[5] and "lower the lr" in said[5]
    nan = DivergenceWatch()
    assert nan.check(0, 2.0) is None and "nan at step 1" in nan.check(1, math.nan)
    assert nan.check(2, math.inf) is None  # once per run
    negative = DivergenceWatch()  # an objective that is negative at its best: only non-finite
    assert [negative.check(k, x) for k, x in enumerate([0.0, -1.0, -2.0, 50.0])] == [None] * 4
    with pytest.raises(ValueError):
        DivergenceWatch(factor=1.0)


def test_the_likely_cause_names_the_learning_rate_and_a_codec_with_momentum():
    plain = DivergenceWatch.for_run(tandem.load_config({"lr": 0.5}))
    assert "(0.5)" in plain.cause and "codec" not in plain.cause and not plain.stop
    qsgd = DivergenceWatch.for_run(tandem.load_config(
        {"lr": 0.5, "momentum": 0.9, "codec": "qsgd", "stop_on_divergence": True}))
    assert "qsgd with momentum 0.9" in qsgd.cause and qsgd.stop


def _divergent(tmp_path: Path, name: str, **kw) -> dict:
    return {"workload": {"name": "digits"}, "workers": 2, "steps": 12, "lr": 20.0,
            "nan_policy": "skip", "progress": False, "out": str(tmp_path / name), **kw}


def test_a_run_at_a_huge_learning_rate_warns_once_per_rank_or_stops(tmp_path):
    tandem.train(_divergent(tmp_path, "warn"))
    for rank in (0, 1):
        lines = (tmp_path / "warn" / f"events.rank{rank}.jsonl").read_text().splitlines()
        marks = [json.loads(ln)["divergence"] for ln in lines if '"divergence"' in ln]
        assert len(marks) == 1, marks  # once per run per rank
        assert "the learning rate (20) is likely too high" in marks[0]["message"]
    with pytest.raises(WorkerFailed) as info:
        tandem.train(_divergent(tmp_path, "stop", stop_on_divergence=True))
    lead = int(str(info.value).split()[1])
    assert str(info.value).startswith(f"rank {lead} failed: DivergenceError: rank {lead}: ")
    assert "stop_on_divergence" in str(info.value)


def test_the_cli_flag_and_the_warning_line(tmp_path):
    """``tandem train --stop-on-divergence`` prints the warning line (at most once per rank) and
    exits with status 2 naming DivergenceError."""
    r = subprocess.run([str(BIN / "tandem"), "train", "--workers", "2", "--steps", "12", "--lr",
                        "20", "--no-progress", "--stop-on-divergence", "--out",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "diverging" in ln and "WARNING" in ln]
    ranks = [int(ln.split("[rank ")[1].split("]")[0]) for ln in lines]
    assert ranks and len(ranks) == len(set(ranks)), lines  # each rank says it once
    assert "DivergenceError" in r.stderr and "stop_on_divergence" in r.stderr


# ---- the semaphore warning; tandem worker under torchrun -----------------------------------


def test_an_api_run_with_a_progress_bar_leaves_no_semaphore(tmp_path):
    """tqdm's lock is a multiprocessing semaphore made in rank 0; the launcher used to end the
    worker after its report but before its exit finalizers had unlinked it."""
    code = ("import tandem; tandem.train({'workload': {'name': 'digits'}, 'workers': 2, "
            f"'steps': 10, 'progress': True, 'out': {str(tmp_path / 'run')!r}}})")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train:" in r.stderr  # the bar was drawn
    assert "leaked semaphore" not in r.stderr, r.stderr[-2000:]


def test_tandem_worker_under_torchrun_shows_progress_and_prints_the_summary(tmp_path):
    cfg = tandem.load_config({"workload": {"name": "digits"}, "workers": 2, "steps": 10,
                              "out": str(tmp_path / "run")})
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    r = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node=2", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", "127.0.0.1:0", "-m", "tandem.cli", "worker",
                        "--config", str(path)], capture_output=True, text=True, timeout=240,
                       cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train:" in r.stderr and "10/10" in r.stderr  # rank 0's bar, to the end
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    printed = dict(line.strip().split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert printed["strategy"] == "allreduce" and printed["workers"] == "2"
    assert printed["steps"] == str(summary["steps"])
    assert printed["run record"] == str(tmp_path / "run")
    assert r.stdout.count("run record") == 1  # rank 0 only
