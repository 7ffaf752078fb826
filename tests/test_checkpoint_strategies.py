"""Checkpoint and resume for ``local``, ``pipeline`` and ``gossip``: a run stopped after a
checkpoint (SIGKILL, or for gossip, which outlives a killed peer, a shorter run) and resumed ends
with the same parameters as an uninterrupted run; mismatched resumes are refused."""

from __future__ import annotations

import json

import pytest
import torch

import tandem
from tandem.errors import CheckpointError, WorkerFailed
from tandem.strategies.gossip import check_peer_state


def _latest(out) -> int:
    return json.loads((out / "checkpoints" / "LATEST").read_text())["step"]


def _assert_same(ref: dict, resumed: dict, ranks: int) -> None:
    for r in range(ranks):
        a, b = ref["results"][r]["params"], resumed["results"][r]["params"]
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def _kill_and_resume(tmp_path, base: dict, ranks: int, crash: str,
                     latest: int) -> tuple[dict, dict]:
    """Reference run; the same run SIGKILLed (``inject_crash``) after a checkpoint; resume."""
    ref = tandem.train(dict(base, out=str(tmp_path / "ref")), return_results=True)
    cfg = tandem.load_config(dict(base, out=str(tmp_path / "run"), inject_crash=[crash]))
    with pytest.raises(WorkerFailed) as info:
        tandem.train(cfg)
    assert int(crash.split(":")[0]) in info.value.ranks
    assert _latest(tmp_path / "run") == latest  # killed after this checkpoint, before the next
    resumed = tandem.train(cfg.model_copy(update={"resume": True}), return_results=True)
    _assert_same(ref, resumed, ranks)
    # the record keeps the killed run's steps and goes on from the checkpoint to the end
    events = (tmp_path / "run" / "events.rank0.jsonl").read_text().splitlines()
    steps = [json.loads(e)["step"] for e in events if json.loads(e).get("kind") == "step"]
    assert steps[:latest] == list(range(latest)) and steps[-1] == base["steps"] - 1
    assert steps[-(base["steps"] - latest):] == list(range(latest, base["steps"]))
    return ref, resumed


def test_local_kill_then_resume_equals_uninterrupted(tmp_path):
    base = {"workload": {"name": "digits"}, "strategy": "local", "workers": 2, "steps": 30,
            "batch_size": 16, "lr": 0.1, "momentum": 0.9, "seed": 3, "progress": False,
            "checkpoint_every": 10}
    _kill_and_resume(tmp_path, base, 1, "0:23", 20)


def test_pipeline_two_models_kill_then_resume_equals_uninterrupted(tmp_path):
    """K=2 models (one with top-k, whose error-feedback memory must come back) on 2 workers;
    rank 1 dies in round 19, after the round-16 checkpoint."""
    models = [{"lr": 0.1}, {"lr": 0.05, "codec": {"name": "topk", "options": {"ratio": 0.1}}}]
    base = {"workload": {"name": "digits"}, "workers": 2, "steps": 24, "batch_size": 16,
            "momentum": 0.9, "seed": 5, "progress": False, "checkpoint_every": 8,
            "strategy": {"name": "pipeline", "options": {"models": models}}}
    ref, resumed = _kill_and_resume(tmp_path, base, 2, "1:19", 16)
    counts = ref["results"][0]["params_per_model"]
    assert len(counts) == 2 and resumed["results"][0]["params_per_model"] == counts
    # the two models really differ, so a swapped or shared state would be caught
    p = ref["results"][0]["params"]
    assert not torch.equal(p[0], p[counts[0]])
    # each model's own record also goes on from the checkpoint
    paths = sorted((tmp_path / "run" / "variants").glob("*/events.rank0.jsonl"))
    assert len(paths) == 2
    for path in paths:
        steps = [json.loads(e)["step"] for e in path.read_text().splitlines()
                 if json.loads(e).get("kind") == "step"]
        assert steps[:16] == list(range(16)) and steps[-8:] == list(range(16, 24))
    with pytest.raises(CheckpointError, match="strategy.options.models"):
        other = [{"lr": 0.2}, models[1]]
        tandem.train(dict(base, out=str(tmp_path / "run"), resume=True,
                          strategy={"name": "pipeline", "options": {"models": other}}))


@pytest.mark.parametrize(("codec", "overlap", "mix_every"),
                         [("dense", False, 1), ("randomk", False, 1), ("randomk", True, 1),
                          ("randomk", True, 3)])
def test_gossip_resume_equals_uninterrupted_and_refuses_other_topologies(tmp_path, codec,
                                                                         overlap, mix_every):
    """Gossip goes on without a killed peer, so the first run stops by its step count (12; a
    checkpoint is written at the last step too) and the resume with more steps runs to 20:
    every peer of a 4-ring equals the uninterrupted
    20-step run. With random-k (compressed gossip) the public copies of the neighbours and the
    codec's step (the shared positions) must come back too; with ``overlap`` the mixing that
    runs beside each step's gradient starts again from the restored state; with ``mix_every=3``
    the mixing steps (2, 5, 8, 11, 14, ...) go on where they were."""
    opts = {"topology": "ring", "overlap": overlap, "mix_every": mix_every}
    base = {"strategy": {"name": "gossip", "options": opts},
            "workload": {"name": "regression", "redundancy": 2, "options": {"n": 512}},
            "workers": 4, "batch_size": 16, "lr": 0.05, "momentum": 0.0, "seed": 2,
            "progress": False, "checkpoint_every": 4,
            "codec": {"name": codec, "options": {"ratio": 0.3} if codec == "randomk" else {}}}
    ref = tandem.train(dict(base, steps=20, out=str(tmp_path / "ref")), return_results=True)
    run = tmp_path / "run"
    tandem.train(dict(base, steps=12, out=str(run)))
    assert _latest(run) == 12
    resumed = tandem.train(dict(base, steps=20, out=str(run), resume=True), return_results=True)
    _assert_same(ref, resumed, 4)
    for r in range(4):  # counters and per-step records come back with the state
        a, b = ref["results"][r], resumed["results"][r]
        assert b["steps"] == 20 and len(b["trajectory"]) == 20
        assert b["trajectory"] == pytest.approx(a["trajectory"], rel=1e-6, abs=1e-9)
    # the peers are independent models (a 4-ring does not average exactly): equality per peer
    # is not trivial
    assert not torch.equal(ref["results"][0]["params"][0], ref["results"][2]["params"][0])
    # another topology or worker count: refused before any process starts
    with pytest.raises(CheckpointError, match=r"strategy\.options\.topology: 'ring' -> 'complete'"):
        tandem.train(dict(base, steps=20, out=str(run), resume=True,
                          strategy={"name": "gossip",
                                    "options": {**opts, "topology": "complete"}}))
    with pytest.raises(CheckpointError, match="workers: 4 -> 5"):
        tandem.train(dict(base, workers=5, steps=20, out=str(run), resume=True))


def test_gossip_peer_state_check_refuses_what_the_fingerprint_cannot_see():
    """Worker-side check (also under torchrun): lost peers, another world, matrix, allocation."""
    w = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    now = {"world": 3, "W": w, "held": [0, 1], "weight": 0.5}
    check_peer_state({**now, "lost": []}, now)
    with pytest.raises(CheckpointError, match=r"after peers \[2\] were lost"):
        check_peer_state({**now, "lost": [2]}, now)
    with pytest.raises(CheckpointError, match="same number of workers"):
        check_peer_state({**now, "world": 4}, now)
    with pytest.raises(CheckpointError, match="another topology"):
        check_peer_state({**now, "W": torch.eye(3, dtype=torch.float64)}, now)
    with pytest.raises(CheckpointError, match="another topology"):
        check_peer_state({**now, "W": torch.eye(2, dtype=torch.float64)}, now)
    with pytest.raises(CheckpointError, match="partitions"):
        check_peer_state({**now, "held": [1, 2]}, now)
