"""bsp_shared reliability: a torn add is discarded and counted; kill -9 after a checkpoint, then
resume from exactly the checkpointed model with exact gradient counts.

Real processes throughout: a SIGKILLed child on a shared segment, and whole jobs (workers + one
agent per emulated machine) over gloo on loopback.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time

import pytest
import torch

import bsp_jobs
import tandem
from tandem import worker
from tandem.api import prepare_run_dir
from tandem.errors import WorkerFailed
from tandem.launch import spawn
from tandem.strategies.bsp_shared.agent import model_digest
from tandem.strategies.bsp_shared.segment import MachineSegment


def test_torn_add_is_detected_and_discarded_in_shared_memory():
    """A worker SIGKILLed in the middle of its 4th add (holding the lock): the lock is free at
    once, the accumulator really holds half a gradient, the agent's swap reports the worker as
    torn, applies nothing and counts its 3 complete gradients as discarded; the segment then
    works normally."""
    numel, complete = 1000, 3
    seg = MachineSegment.create(numel, 2, tag="test")
    try:
        with pytest.raises(WorkerFailed, match="SIGKILL") as info:
            spawn(bsp_jobs.torn_add_job, 1, str(seg.path), numel, complete, timeout_s=60)
        assert info.value.ranks == [0]
        fd = os.open(seg.path, os.O_RDWR)  # the dead worker's flock was dropped by the kernel
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        acc = seg.acc[0]
        assert float(acc[: numel // 2].min()) == complete + 1  # the partial add is really there
        assert float(acc[numel // 2:].max()) == complete
        assert seg.pending_count() == complete  # its count was never bumped
        out = seg.swap(1)
        assert out["torn"] == [0]
        assert out["count"] == 0 and out["per_worker"] == [0, 0]
        assert float(out["sum"].abs().max()) == 0.0
        assert out["discarded_per_worker"] == [complete, 0]
        # afterwards: exact adds and a clean read-out (worker 1 adds twice into the new buffer)
        assert seg.add(torch.full((numel,), 2.0), 1, 1)[0] == "added"
        assert seg.add(torch.full((numel,), 2.0), 1, 1)[0] == "added"
        out = seg.swap(2)
        assert out["torn"] == [] and out["count"] == 2 and out["per_worker"] == [0, 2]
        assert float(out["sum"].min()) == float(out["sum"].max()) == 4.0
        assert float(seg.swap(3)["sum"].abs().max()) == 0.0  # the torn buffer was zeroed
    finally:
        seg.unlink()
        seg.close()


def test_worker_killed_mid_add_is_discarded_and_counted(tmp_path, monkeypatch):
    """Worker 1 SIGKILLs itself in the middle of adding its gradient of step 5 (test hook
    TANDEM_BSP_DIE_MID_ADD): the agent discards that read-out (``torn_adds``, ``discarded``), the
    run finishes without it (``lost_ranks``), and every gradient a worker handed in is applied,
    left over or discarded, exactly once."""
    steps, victim, at = 40, 1, 5
    monkeypatch.setenv("TANDEM_BSP_DIE_MID_ADD", f"{victim}:{at}")
    summary = tandem.train({
        "workload": {"name": "digits"}, "workers": 2, "steps": steps, "batch_size": 16,
        "lr": 0.1, "seed": 1, "progress": False, "out": str(tmp_path / "run"), "timeout_s": 30,
        "stragglers": "1.0:exp:0.02",  # ~20 ms per gradient: the death lands mid-run
        "strategy": {"name": "bsp_shared", "options": {"grads_per_superstep": 2}}},
        return_results=True, timeout_s=150)
    assert summary["lost_ranks"] == [victim]
    res = summary["results"]
    agent = res[2]
    assert agent["torn_adds"] == [victim] and agent["lost_workers"] == [victim]
    assert agent["discarded"] >= 1  # a count-mode read-out holds >= 1 complete gradient
    kept, thrown = agent["per_worker"], agent["discarded_per_worker"]
    assert kept[victim] + thrown[victim] == at  # its steps 0..4; the torn 5th never counted
    assert res[0]["dropped"] == 0
    assert kept[0] + thrown[0] == res[0]["gradients"] > 0
    assert sum(kept.values()) == agent["applied"] + agent["leftover"]
    assert agent["budget"] == steps + kept[victim]  # steps x survivors + what it contributed
    assert agent["applied"] >= agent["budget"]
    events = (tmp_path / "run" / "events.rank2.jsonl").read_text().replace(" ", "")
    assert f'"torn_add":[{victim}]' in events
    assert all(torch.isfinite(p).all() for p in agent["params"])
    assert summary["final_test_accuracy"] > 0.5


def _kill_controller_after(run_dir, controller, min_step, dead_local):
    """SIGKILL the controller once LATEST names a set >= ``min_step`` whose controller file
    already lists local worker ``dead_local`` as dead (so the resume must retire it)."""
    def on_start(procs, _store):
        def killer():
            latest = run_dir / "checkpoints" / "LATEST"
            seen = None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    meta = json.loads(latest.read_text())
                    if meta["step"] >= min_step and meta["step"] != seen:
                        seen = meta["step"]
                        state = torch.load(run_dir / "checkpoints" / meta["dir"] / "rank0.pt",
                                           weights_only=True)
                        if dead_local in state["agent"]["dead"]:
                            os.kill(procs[controller].pid, signal.SIGKILL)
                            return
                except (OSError, ValueError, KeyError, RuntimeError):
                    pass  # not written yet, or pruned while we read: look again
                time.sleep(0.01)
        threading.Thread(target=killer, daemon=True).start()
    return on_start


def test_kill_controller_then_resume_from_checkpoint(tmp_path):
    """Two machines (workers 0,1 | worker 2), top-k between the agents, worker 1 crashes at its
    step 2, a checkpoint every 5 supersteps; the controller is SIGKILLed after a checkpoint that
    knows worker 1 is dead. The resumed run starts from exactly the saved model (digest of the
    files), keeps worker 1 out, ends at the first superstep where the budget 2 x steps + 2 is
    reached, and every survivor's gradients are counted exactly once over the two runs."""
    steps, victim = 80, 1  # ~40 supersteps: the kill after the 10th lands well before the end
    cfg = tandem.load_config({
        "workload": {"name": "digits"}, "workers": 3, "steps": steps, "batch_size": 16,
        "lr": 0.1, "seed": 3, "progress": False, "out": str(tmp_path / "run"), "timeout_s": 30,
        "stragglers": "1.0:exp:0.02", "inject_crash": [f"{victim}:2"], "checkpoint_every": 5,
        "codec": {"name": "topk", "options": {"ratio": 0.1}},
        "strategy": {"name": "bsp_shared",
                     "options": {"split": [2, 1], "grads_per_superstep": 3}}})
    run_dir = prepare_run_dir(cfg)
    with pytest.raises(WorkerFailed) as info:
        spawn(worker.main, 5, cfg.model_dump(mode="json"), None, True, timeout_s=150,
              on_start=_kill_controller_after(run_dir, 3, 10, victim),
              tolerate_death=lambda r: r < 3)
    assert 3 in info.value.ranks
    meta = json.loads((run_dir / "checkpoints" / "LATEST").read_text())
    folder = run_dir / "checkpoints" / meta["dir"]
    saved = [torch.load(folder / f"rank{m}.pt", weights_only=True)["agent"] for m in (0, 1)]
    assert saved[0]["superstep"] == meta["step"] >= 10 and saved[0]["dead"] == [victim]
    assert saved[1]["codec"]["residuals"] is not None  # top-k error feedback is in the set
    digest = model_digest(saved[0]["params"])
    assert model_digest(saved[1]["params"]) == digest

    summary = tandem.train(cfg.model_copy(update={"resume": True}), return_results=True,
                           timeout_s=150)
    res = summary["results"]
    agents = res[3:]
    assert summary["lost_ranks"] == [] and res[victim]["retired"] is True
    for a in agents:
        assert a["resumed_from"] == {"superstep": meta["step"], "applied": saved[0]["applied"],
                                     "model_sha256": digest}
        assert a["budget"] == steps * 2 + 2
        assert a["discarded"] == 0 and a["dropped"] == 0
    assert agents[0]["lost_workers"] == [victim] and agents[1]["lost_workers"] == []
    assert all(torch.equal(x, y)
               for x, y in zip(agents[0]["params"], agents[1]["params"], strict=True))
    assert agents[0]["per_worker"][victim] == saved[0]["per_worker"][victim] == 2
    for w, a in ((0, agents[0]), (2, agents[1])):  # survivors: counters restored + new ones
        assert a["per_worker"][w] == res[w]["gradients"] > 0
    applied = agents[0]["applied"]
    supers = [json.loads(ln) for ln in (run_dir / "events.rank3.jsonl").read_text().splitlines()]
    supers = [e for e in supers if e["kind"] == "step"]
    assert supers[-1]["applied_total"] == applied
    assert applied - supers[-1]["gradients"] < agents[0]["budget"] <= applied
    assert summary["final_test_accuracy"] > 0.5
