"""Reliability of the parameter-server strategies: param_server checkpoints (sync: a killed run
resumes bit-exactly; candidate: the restored state makes every update count exactly once) and
coded_ps (NaN screen, a dead worker as a permanent straggler). Real gloo processes on loopback."""

from __future__ import annotations

import json

import pytest
import torch

import jobs
import ps_jobs
import tandem
from tandem import worker
from tandem.api import prepare_run_dir
from tandem.errors import WorkerFailed
from tandem.launch import spawn
from tandem.workloads.base import partition

BASE = {"workload": {"name": "digits"}, "codec": "dense", "workers": 2, "steps": 24,
        "batch_size": 16, "lr": 0.1, "momentum": 0.9, "seed": 3, "progress": False}


def test_sync_kill_server_then_resume_equals_uninterrupted(tmp_path):
    """The server (rank 2) is SIGKILLed after the checkpoint at step >= 12 of 24; the resumed run
    ends on the parameters of a run that was never interrupted nor checkpointed."""
    strategy = {"name": "param_server", "options": {"mode": "sync"}}
    ref = tandem.train(dict(BASE, strategy=strategy, out=str(tmp_path / "ref")),
                       return_results=True, timeout_s=120)
    cfg = tandem.load_config(dict(BASE, strategy=strategy, out=str(tmp_path / "killed"),
                                  checkpoint_every=6, net="50mbit:2ms", timeout_s=20))
    prepare_run_dir(cfg)
    with pytest.raises(WorkerFailed) as info:
        spawn(worker.main, 3, cfg.model_dump(mode="json"), None, True, timeout_s=120,
              on_start=jobs.kill_after_checkpoint(cfg.run_dir(), 12, victim=2))
    assert 2 in info.value.ranks
    latest = json.loads((cfg.run_dir() / "checkpoints" / "LATEST").read_text())
    assert 12 <= latest["step"] < 24
    resumed = tandem.train(cfg.model_copy(update={"resume": True}), return_results=True,
                           timeout_s=120)
    assert resumed["results"][0]["resumed_from"] == latest["step"]
    for w in (0, 1):
        for a, b in zip(ref["results"][w]["params"], resumed["results"][w]["params"],
                        strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_candidate_resume_restores_model_version_and_unpushed_work(tmp_path):
    """Linear loss (each worker's gradient is a constant c_i): with delay-corrected merging the
    global model must end at -lr/N * steps * sum c_i whatever the timing. A 20-step run
    checkpoints at 8 and 16, then is resumed from 16 up to 40 steps: the end point is exact only
    if the server's model and version and each worker's unpushed sum, candidate model and push
    bookkeeping were all restored (none lost, none applied twice)."""
    work = ps_jobs.constant_gradient_workload()
    base = {"workers": 2, "steps": 20, "batch_size": 32, "lr": 0.1, "momentum": 0.0, "seed": 5,
            "progress": False, "net": "1gbit:4ms", "stragglers": "0.3:exp:0.01",
            "checkpoint_every": 8, "out": str(tmp_path / "cand"),
            "strategy": {"name": "param_server",
                         "options": {"mode": "candidate", "cap": 4, "merge": "delay-corrected"}}}
    first = tandem.train(base, workload=work, return_results=True, timeout_s=120)
    assert first["results"][0]["pushed_steps_total"] == 20
    latest = json.loads((tmp_path / "cand" / "checkpoints" / "LATEST").read_text())
    assert latest["step"] == 16
    out = tandem.train(dict(base, steps=40, resume=True), workload=work, return_results=True,
                       timeout_s=120)
    shards = partition(work.train.y, 2, "iid", seed=5)
    c = sum(work.train.x[s].mean(0) for s in shards)
    expected = -0.1 / 2 * 40 * c
    for w in out["results"][:2]:
        assert w["resumed_from"] == 16
        assert w["pushed_steps_total"] == 40  # restored 16-step history + 24 new steps
        torch.testing.assert_close(w["params"][0], expected, rtol=1e-5, atol=1e-5)


# ---- coded_ps ----------------------------------------------------------------------------------
def _coded(tmp_path, name: str, workers: int, s: int, **kw) -> dict:
    cfg = {"workload": {"name": "digits", "redundancy": s + 1}, "workers": workers,
           "steps": kw.pop("steps", 16), "batch_size": 16, "lr": 0.1, "momentum": 0.0, "seed": 2,
           "progress": False, "timeout_s": 20, "out": str(tmp_path / name),
           "strategy": {"name": "coded_ps", "options": {"s": s}}, **kw}
    return tandem.train(cfg, return_results=True, timeout_s=120)


def test_coded_ps_nan_is_screened_skipped_and_counted(tmp_path):
    """Worker 1's gradient is NaN from step 2 on. skip: each of its answers counts as a
    straggler's, every step still decodes from the other two (s=1), the run counts the skipped
    steps and stays finite; stop: the run ends naming rank and step. (A late worker is handed
    the server's current step, so which steps worker 1 computes depends on timing: the skip run
    injects at every step and checks each one it did compute; the stop run uses s=0.)"""
    out = _coded(tmp_path, "skip", 3, 1, nan_policy="skip",
                 inject_nan=[f"1:{k}" for k in range(2, 16)])
    server = out["results"][3]
    assert server["dropped_steps"] == 0
    assert all(torch.isfinite(p).all() for p in server["params"])

    def records(rank: int) -> list[dict]:
        return [e for e in map(json.loads, (tmp_path / "skip" / f"events.rank{rank}.jsonl")
                               .read_text().splitlines()) if e["kind"] == "step"]

    skipped_at = [e["server_step"] for e in records(1) if e.get("skipped")]
    assert skipped_at and all(s >= 2 for s in skipped_at)
    assert out["skipped_steps"] == out["results"][1]["skipped_steps"] == len(skipped_at)
    survivors = {e["step"]: e["survivors"] for e in records(3)}
    assert all(1 not in survivors[s] for s in skipped_at)
    # stop, with s=0: the server waits for every worker, so worker 1 computes step 2 whatever
    # the timing (with s=1 a late start could leave it no step >= 2: the run finished without it)
    with pytest.raises(WorkerFailed) as info:
        _coded(tmp_path, "stop", 3, 0, inject_nan=["1:2"])
    assert str(info.value).startswith("rank 1 failed: NonFiniteGradient: rank 1: non-finite "
                                      "gradient at step 2"), info.value


def test_coded_ps_dead_worker_is_a_permanent_straggler(tmp_path):
    """s=1: worker 2 is SIGKILLed at the first step from 5 on that it computes (a late worker is
    handed the server's current step, so it may never see step 5 itself); the server drops it
    and decodes every later step from the other three. s=0: nothing can decode without it (the
    server waits for every worker, so step 3 is computed), and the run fails naming rank 2."""
    out = _coded(tmp_path, "s1", 4, 1, inject_crash=[f"2:{k}" for k in range(5, 16)])
    assert out["lost_ranks"] == [2]
    server = out["results"][4]
    assert server["steps"] == 16 and list(server["lost_workers"]) == ["2"]
    assert server["used_per_worker"][2] <= 5
    assert all(server["used_per_worker"][j] >= 10 for j in (0, 1, 3))
    events = (tmp_path / "s1" / "events.rank4.jsonl").read_text().replace(" ", "")
    assert '"lost_worker":2' in events
    with pytest.raises(WorkerFailed) as info:
        _coded(tmp_path, "s0", 3, 0, steps=8, inject_crash=["2:3"])
    assert 2 in info.value.ranks
    assert "rank 2" in str(info.value)
