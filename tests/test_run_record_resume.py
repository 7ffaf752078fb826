"""The run record after kill -9 + ``--resume``: each step once, lost steps kept aside."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter

import pytest

import tandem
from tandem import worker
from tandem.api import prepare_run_dir
from tandem.errors import WorkerFailed
from tandem.launch import spawn
from tandem.telemetry import recorder as recorder_mod
from tandem.telemetry.recorder import Recorder
from tandem.telemetry.summary import merge_events, summarize


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write_interrupted(path):
    """A rank file as a run killed after its checkpoint at step 4 leaves it: steps 0..6 (walls
    1..7), evals at 1, 3 and 5, a trailing info and a torn last line."""
    lines = [{"kind": "start", "rank": 0, "wall": 0.0, "t0": 1.0, "role": "worker", "world": 1},
             {"kind": "info", "rank": 0, "wall": 0.0, "params": 10}]
    for s in range(7):
        lines.append({"kind": "step", "rank": 0, "step": s, "wall": float(s + 1),
                      "compute_s": 1.0, "comm_s": 0.0, "idle_s": 0.0, "bytes_sent": 100,
                      "bytes_recv": 100, "loss": 1.0 / (s + 1), "role": "worker"})
        if s % 2:
            lines.append({"kind": "eval", "rank": 0, "step": s, "wall": float(s + 1),
                          "test_accuracy": 0.1 * s, "test_loss": 1.0, "role": "worker"})
    lines.append({"kind": "info", "rank": 0, "wall": 7.0, "codec": {"x": 1}})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind":"step","ra')


def test_resume_from_moves_lost_steps_aside_and_continues_at_the_checkpoint(tmp_path,
                                                                             monkeypatch):
    path = tmp_path / "events.rank0.jsonl"
    _write_interrupted(path)
    clock = [100.0]
    monkeypatch.setattr(recorder_mod, "_now", lambda: clock[0])
    rec = Recorder(tmp_path, 0, world=1, progress=False, append=True)
    assert rec.resume_from(4) == 6  # steps 4, 5, 6, eval 5, the trailing info, the torn line
    rec.start()
    for s in (4, 5):
        clock[0] += 1.0
        rec.step(s, compute_s=1.0, comm_s=0.0, idle_s=0.0, bytes_sent=100, bytes_recv=100,
                 loss=0.5)
    rec.eval(5, accuracy=0.9, loss=0.2)
    rec.close()

    records = _read(path)
    steps = [r["step"] for r in records if r["kind"] == "step"]
    assert steps == [0, 1, 2, 3, 4, 5]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [1, 3, 5]
    (resume,) = [r for r in records if r["kind"] == "resume"]
    assert resume["step"] == 4 and resume["rolled_back"] == 6
    assert resume["wall"] == 4.0 and resume["lost_wall_s"] == pytest.approx(3.0)
    walls = [r["wall"] for r in records]
    assert walls == sorted(walls)  # the axis goes on from the checkpoint (step 3 at wall 4)
    assert [r["wall"] for r in records if r["kind"] == "step"][-2:] == [5.0, 6.0]

    gone = (tmp_path / "events.rank0.rolled_back.jsonl").read_text().splitlines()
    assert gone[-1] == '{"kind":"step","ra'  # nothing is lost, the torn line neither
    moved = [json.loads(x) for x in gone[:-1]]
    assert [(r["kind"], r.get("step")) for r in moved] == [
        ("step", 4), ("step", 5), ("eval", 5), ("step", 6), ("info", None)]

    s = summarize(tmp_path, {"workers": 1})
    assert s["steps"] == 6 and s["bytes_sent_total"] == 600
    assert s["resumes"] == 1 and s["resumed_at_steps"] == [4]
    assert s["final_test_accuracy"] == 0.9 and s["wall_time_s"] == 6.0
    assert not (tmp_path / "events.rank0.jsonl.tmp").exists()


def test_resume_after_start_shifts_own_records(tmp_path, monkeypatch):
    """A strategy that restores its checkpoint after the clock started (gossip) still gets one
    monotone axis: the records this Recorder already wrote move onto it."""
    path = tmp_path / "events.rank0.jsonl"
    _write_interrupted(path)
    clock = [100.0]
    monkeypatch.setattr(recorder_mod, "_now", lambda: clock[0])
    rec = Recorder(tmp_path, 0, world=1, progress=False, append=True)
    rec.start()
    clock[0] += 0.5
    rec.info(topology="ring")
    rec.resume_from(2)
    clock[0] += 0.5
    rec.step(2, compute_s=1.0, comm_s=0.0, idle_s=0.0, bytes_sent=1, bytes_recv=1, loss=0.5)
    rec.close()
    records = _read(path)
    assert [r["step"] for r in records if r["kind"] == "step"] == [0, 1, 2]
    assert [r["wall"] for r in records] == sorted(r["wall"] for r in records)
    starts = [r for r in records if r["kind"] == "start"]
    assert starts[-1]["wall"] == 2.0  # step 1 was recorded at wall 2
    assert records[-2]["kind"] == "step" and records[-2]["wall"] == pytest.approx(3.0)


def _kill_past_checkpoint(run_dir, min_step: int, extra: int, victim: int = 1):
    """SIGKILL ``victim`` once LATEST names a step S >= ``min_step`` and rank 0 has recorded
    step S + ``extra``: the killed run certainly wrote steps after its checkpoint."""
    def on_start(procs, _store):
        def killer():
            latest = run_dir / "checkpoints" / "LATEST"
            events = run_dir / "events.rank0.jsonl"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if latest.is_file() and events.is_file():
                    s = json.loads(latest.read_text())["step"]
                    if s >= min_step and f'"step":{s + extra},' in events.read_text():
                        os.kill(procs[victim].pid, signal.SIGKILL)
                        return
                time.sleep(0.005)
        threading.Thread(target=killer, daemon=True).start()
    return on_start


def test_kill_and_resume_counts_every_step_once(tmp_path):
    steps = 30
    cfg = tandem.load_config({
        "workload": {"name": "digits"}, "strategy": "allreduce", "workers": 2, "steps": steps,
        "batch_size": 16, "lr": 0.1, "seed": 5, "progress": False, "out": str(tmp_path),
        "name": "run", "checkpoint_every": 10, "eval_every": 2, "net": "20mbit:2ms"})
    prepare_run_dir(cfg)
    run_dir = cfg.run_dir()
    with pytest.raises(WorkerFailed):
        spawn(worker.main, 2, cfg.model_dump(mode="json"), None, True, timeout_s=120,
              on_start=_kill_past_checkpoint(run_dir, 10, 3))
    start = json.loads((run_dir / "checkpoints" / "LATEST").read_text())["step"]
    assert 10 <= start < steps
    summary = tandem.train(cfg.model_copy(update={"resume": True}), return_results=True)

    merged = _read(run_dir / "events.jsonl")
    count = Counter((r["rank"], r["step"]) for r in merged if r["kind"] == "step")
    assert count == Counter({(r, s): 1 for r in (0, 1) for s in range(steps)})
    evals = Counter((r["rank"], r["step"]) for r in merged if r["kind"] == "eval")
    assert evals and max(evals.values()) == 1
    assert summary["steps"] == steps and summary["resumed_at_steps"] == [start]
    assert summary["bytes_sent_total"] == sum(r["bytes_sent"] for r in merged
                                              if r["kind"] == "step")
    for rank in (0, 1):
        own = _read(run_dir / f"events.rank{rank}.jsonl")
        (resume,) = [r for r in own if r["kind"] == "resume"]
        assert resume["step"] == start and resume["role"] == "worker"
        walls = [r["wall"] for r in own if r["kind"] in ("step", "eval")]
        assert walls == sorted(walls)
        gone = _read(run_dir / f"events.rank{rank}.rolled_back.jsonl")
        lost = [r["step"] for r in gone if r["kind"] == "step"]
        assert lost and min(lost) == start and resume["rolled_back"] == len(gone)
    # merging again (e.g. `tandem report`) is idempotent
    assert len(merge_events(run_dir)) == len(merged)


def test_bsp_agent_start_record_says_controller(tmp_path):
    tandem.train({"workload": {"name": "digits"}, "workers": 2, "steps": 4, "batch_size": 16,
                  "lr": 0.1, "seed": 1, "progress": False, "out": str(tmp_path), "name": "bsp",
                  "timeout_s": 30, "strategy": {"name": "bsp_shared",
                                                "options": {"grads_per_superstep": 2}}})
    starts = {r["rank"]: r["role"] for p in tmp_path.rglob("events.rank?.jsonl")
              for r in _read(p) if r["kind"] == "start"}
    assert starts == {0: "worker", 1: "worker", 2: "controller"}
