"""allreduce ``delay=1``: one-step-stale synchronous SGD with the exchange overlapping the next
step's compute (tandem.strategies.allreduce.delayed).

Exact against a one-step-stale PyTorch DDP reference; the replicas stay equal with a compressing
codec; a kill and resume lands on the uninterrupted run's parameters (the checkpoint holds the
mean in flight); the exchange of step t is still in flight when step t + 1's compute starts; and
``delay`` with ``overlap`` is refused before any worker starts.
"""

from __future__ import annotations

import json

import pytest
import torch

import jobs
import tandem
from tandem.errors import ConfigError, WorkerFailed
from tandem.launch import spawn


def _cfg(out, codec="dense", **kw):
    base = {"workload": {"name": "digits"}, "codec": codec, "workers": 2, "steps": 20,
            "batch_size": 16, "lr": 0.1, "momentum": 0.9, "seed": 3, "progress": False,
            "out": str(out), "strategy": {"name": "allreduce", "options": {"delay": 1}}}
    base.update(kw)
    return base


def _far(ours: list, other: list) -> bool:
    return max(float((a - b).abs().max()) for a, b in zip(ours, other, strict=True)) > 1e-4


@pytest.mark.parametrize("predict", [True, False])
def test_delay_equals_one_step_stale_ddp(tmp_path, predict):
    """Breaks if a mean is applied at the wrong step, twice, or not at all (the first step
    applies nothing, the last its own mean too), if the replicas drift apart, or (predict)
    if a gradient is not computed at ``w + (w - w_prev)`` or the weights are not restored
    exactly after it."""
    cfg = _cfg(tmp_path / "run", eval_every=7,  # evaluations drain the exchange mid-run
               strategy={"name": "allreduce", "options": {"delay": 1, "predict": predict}})
    summary = tandem.train(cfg, return_results=True)
    ours, theirs = summary["results"][0]["params"], summary["results"][1]["params"]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    full = tandem.load_config(cfg).model_dump(mode="json")
    ref = spawn(jobs.ddp_delayed_reference, 2, full, timeout_s=120)[0]
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert _far(ours, spawn(jobs.ddp_reference, 2, full, timeout_s=120)[0])
    if predict:  # the prediction changes the run: not the plain one-step-stale result
        full["strategy"]["options"]["predict"] = False
        assert _far(ours, spawn(jobs.ddp_delayed_reference, 2, full, timeout_s=120)[0])


def test_predict_needs_delay_and_heavy_momentum_under_delay_is_warned(tmp_path, caplog):
    """``predict`` without ``delay=1`` is refused before any worker starts (it would do
    nothing); ``delay=1`` with heavy-ball SGD momentum is warned about, with the fix, and
    Nesterov momentum or no momentum is not."""
    import logging

    from tandem.preflight import preflight

    cfg = _cfg(tmp_path / "run", strategy={"name": "allreduce", "options": {"predict": False}})
    with pytest.raises(ConfigError, match="predict .* needs delay=1"):
        tandem.train(cfg)
    assert not (tmp_path / "run").exists()
    logger = logging.getLogger("tandem.strategies.allreduce")
    logger.addHandler(caplog.handler)
    try:
        for momentum, options, warned in [(0.9, {}, True), (0.9, {"nesterov": True}, False),
                                          (0.0, {}, False)]:
            caplog.clear()
            preflight(tandem.load_config(_cfg(tmp_path / "x", momentum=momentum, optimizer={
                "name": "sgd", "options": options})))
            assert ("--optimizer-opt nesterov=true" in caplog.text) is warned, (momentum, options)
    finally:
        logger.removeHandler(caplog.handler)


def test_delay_with_powersgd_keeps_replicas_equal_and_resumes_exactly(tmp_path):
    """A kill -9 after a checkpoint, then --resume: equal to the uninterrupted run, which
    needs the checkpoint to hold the mean in flight and PowerSGD's memory after that exchange."""
    opts = {"codec": {"name": "powersgd", "options": {"rank": 1}}, "steps": 30,
            "checkpoint_every": 8, "net": "50mbit:1ms"}
    ref = tandem.train(_cfg(tmp_path / "ref", **opts), return_results=True)
    a, b = ref["results"][0]["params"], ref["results"][1]["params"]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    resumed = jobs.kill_then_resume(tandem.load_config(_cfg(tmp_path / "killed", **opts)), 16)
    for x, y in zip(a, resumed, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_exchange_overlaps_the_next_compute(tmp_path):
    """On a link where every collective takes >= 150 ms, step t's exchange finishes after step
    t + 1's compute has started (an ordering, not a speed: the compute starts right after the
    hand-over, the exchange cannot end before the link's delay has passed)."""
    cfg = _cfg(tmp_path / "run", steps=8, net="1gbit:150ms", eval_every=1000)
    tandem.train(cfg)
    lines = (tmp_path / "run" / "events.rank0.jsonl").read_text().splitlines()
    steps = [r for r in map(json.loads, lines) if r.get("kind") == "step"]
    assert [r["step"] for r in steps] == list(range(8))
    assert steps[0]["t_prev_comm_done"] is None  # nothing was in flight before step 0
    for r in steps[1:]:
        assert r["t_prev_comm_done"] > r["t_compute_start"], r


def test_delay_with_overlap_is_refused_before_any_worker_starts(tmp_path):
    cfg = _cfg(tmp_path / "run", strategy={"name": "allreduce",
                                           "options": {"delay": 1, "overlap": True}})
    with pytest.raises(ConfigError, match="delay=1 and overlap=true"):
        tandem.train(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run directory or a worker


def test_a_dead_peer_mid_exchange_is_named_not_waited_for(tmp_path):
    """Worker 1 dies while worker 0's exchange runs in the background thread: the run ends with
    WorkerFailed naming rank 1 (the thread's error reaches the worker), never a hang."""
    cfg = _cfg(tmp_path / "run", steps=20, inject_crash=["1:6"], timeout_s=10,
               codec={"name": "powersgd", "options": {"rank": 1}})
    with pytest.raises(WorkerFailed, match=r"^rank 1 failed: worker 1 killed by SIGKILL") as info:
        tandem.train(cfg)
    assert 1 in info.value.ranks
