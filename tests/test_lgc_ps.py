"""LGC-PS on the parameter server (issue 20): the server decodes (one decoder per worker), the
leader pushes its latent and the next support, the others only their innovation; stages on the
server's schedule; exact error feedback; bytes per direction; resume; a killed worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tandem
from tandem.codecs import make_codec
from tandem.codecs.lgc.psserver import PSServerCode
from tandem.codecs.lgc.remote import PSWorkerCode, push_nbytes
from tandem.codecs.positions import positions_nbytes
from tandem.errors import ConfigError
from tandem.flat import flatten
from tandem.transport.packing import header_of, pack, spec_of, unpack

SHAPES = [(16, 8), (16,), (24, 16), (24,), (4, 24), (4,)]
BASE = {"workload": {"name": "digits"}, "workers": 3, "batch_size": 16, "lr": 0.1,
        "momentum": 0.9, "seed": 3, "progress": False, "timeout_s": 60}
LGC = {"variant": "ps", "dense_first_last": False, "ratio": 0.05}


def _wire(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return unpack(pack(tensors), spec_of(tensors))


def _nodes(n: int, steps: int, **opts):
    def codec():
        c = make_codec("lgc", {"variant": "ps", "ratio": 0.1, "ef_clip": 0.0, **opts}, seed=4)
        c.set_total_steps(steps)
        return c
    workers = [PSWorkerCode(codec(), i, n, SHAPES) for i in range(n)]
    return workers, PSServerCode(codec(), SHAPES, n)


@pytest.mark.parametrize("dense_first_last", [True, False])
def test_error_feedback_is_exactly_what_the_server_did_not_reconstruct(dense_first_last):
    """Three workers with correlated gradients through all three stages, in process: after
    every round (once the pull's correction is in) each worker's residual equals its corrected
    gradient minus the server's reconstruction of it, bitwise; every push's payload is
    :func:`push_nbytes`; the leader rotates; the compressed stage predicts (a_i > 0)."""
    n, steps = 3, 30
    workers, server = _nodes(n, steps, dense_first_last=dense_first_last)
    gen = torch.Generator().manual_seed(1)
    stages = []
    for _ in range(steps):
        common = [torch.randn(s, generator=gen) for s in SHAPES]
        pushes, xs = {}, {}
        for i, w in enumerate(workers):
            g = [c + 0.3 * torch.randn(c.shape, generator=gen) for c in common]
            xs[i] = flatten(g) + (w.residual if w.residual is not None else 0)
            ts, stage, lead = w.encode(g)
            k_t = ts[0].numel() if stage == 1 else None
            assert sum(t.numel() * t.element_size() for t in ts) == push_nbytes(
                w.p, stage, lead, k_t)
            pushes[i] = (lead, stage, _wire(ts), 1)
        assert sum(lead for lead, *_ in pushes.values()) == 1
        stages.append(pushes[0][1])
        flat = server.decode_round(pushes, list(range(n)))
        for i, w in enumerate(workers):
            w.pulled(_wire(server.extras(i)))
            assert torch.equal(w.residual, xs[i] - flat[i])
    assert stages[0] == 1 and 2 in stages and stages[-1] == 3
    assert server.first_round[3] == stages.index(3)
    assert all(w.corrections == stages.count(3) for w in workers)  # every compressed round


def test_a_round_without_its_leader_applies_the_innovations_alone():
    workers, server = _nodes(3, 10, dense_first_last=False, warmup_steps=1, ae_steps=1)
    gen = torch.Generator().manual_seed(2)
    for _ in range(6):  # into the compressed stage
        pushes = {}
        for i, w in enumerate(workers):
            ts, stage, lead = w.encode([torch.randn(s, generator=gen) for s in SHAPES])
            pushes[i] = (lead, stage, _wire(ts), 1)
        server.decode_round(pushes, [0, 1, 2])
        for i, w in enumerate(workers):
            w.pulled(_wire(server.extras(i)))
    assert pushes[0][1] == 3
    pushes = {}
    for i, w in enumerate(workers):
        ts, stage, lead = w.encode([torch.randn(s, generator=gen) for s in SHAPES])
        if not lead:
            pushes[i] = (lead, stage, _wire(ts), 1)
    flat = server.decode_round(pushes, sorted(pushes))
    assert server.leaderless == 1
    m = workers[0].p.m
    assert all(int((f != 0).sum()) <= m for f in flat.values())  # the innovations only


def test_refused_pairs_on_the_parameter_server_say_why():
    def cfg(codec: dict, **opts):
        return dict(BASE, steps=4, codec=codec,
                    strategy={"name": "param_server", "options": opts})

    with pytest.raises(ConfigError, match="variant=ps"):
        tandem.load_config(cfg({"name": "lgc", "options": {"variant": "rar"}}))
    with pytest.raises(ConfigError, match="mode=sync or mode=candidate"):
        tandem.load_config(cfg({"name": "lgc", "options": {"variant": "ps"}}, mode="async"))
    with pytest.raises(ConfigError, match="servers=1"):
        tandem.load_config(cfg({"name": "lgc", "options": {"variant": "ps"}}, servers=2))
    with pytest.raises(ConfigError, match="PowerSGD"):
        tandem.load_config(cfg({"name": "powersgd"}))
    tandem.load_config(cfg({"name": "lgc", "options": {"variant": "ps"}}, mode="sync"))


def _events(run: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"events.rank{rank}.jsonl").read_text()
            .splitlines()]


def _message_bytes(shapes_dtypes: list[tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """Bytes of one ``Transport.send_message``: the count, the header, the payload."""
    payload = sum(torch.empty(s, dtype=d).numel() * torch.empty((), dtype=d).element_size()
                  for d, s in shapes_dtypes)
    return 8 + 8 * header_of(shapes_dtypes).numel() + payload


def test_tandem_train_runs_lgc_ps_on_the_server_with_exact_bytes(tmp_path):
    """`tandem train --strategy param_server --codec lgc --codec-opt variant=ps`, 3 workers,
    sync: the run record shows the stage events and the server's decoder; in the compressed
    stage the leader's push is its latent + scale + next support + innovation and the others'
    only their innovation, byte for byte; the pulls carry the support and the correction."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tandem.cli", "train", "--workload", "digits", "--workers", "3",
           "--strategy", "param_server", "--strategy-opt", "mode=sync", "--codec", "lgc",
           "--codec-opt", "variant=ps", "--codec-opt", "dense_first_last=false",
           "--codec-opt", "ratio=0.05", "--steps", "30", "--batch-size", "16",
           "--seed", "3", "--no-progress", "--out", str(run)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(Path(tandem.__file__).parents[1])))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    info = summary["info"]
    assert info["lgc_stage2_round"] == 3 and info["lgc_stage3_round"] == 9  # 30 steps: 3 + 6
    assert info["lgc_ae_train_rounds"] == 6 and info["lgc_leaderless_rounds"] == 0
    codec = make_codec("lgc", LGC)
    shapes = [(128, 64), (128,), (10, 128), (10,)]  # digits' MLP
    p = codec.plan(shapes)
    k, m, z, dc = p.k, p.m, p.z, p.stop - p.start
    assert info["lgc_k"] == k and info["lgc_latent_floats"] == z
    head = (torch.int64, (5,))
    inno = [(torch.float32, (m,)), (torch.uint8, (positions_nbytes(m, k),)),
            (torch.float32, (0,))]
    lead_extra = [(torch.float32, (z,)), (torch.float32, (1,)),
                  (torch.uint8, (positions_nbytes(k, dc),))]
    others, leader = _message_bytes([head, *inno]), _message_bytes([head, *inno, *lead_extra])
    assert others < 200 and leader - others == 4 * z + 4 + positions_nbytes(k, dc) + 8 * 9
    seen = {True: 0, False: 0}
    for rank in range(3):
        for e in _events(run, rank):
            if e["kind"] == "step" and e.get("lgc_stage") == 3 and e["step"] < 29:
                assert e["bytes_sent"] == (leader if e["lgc_lead"] else others)
                seen[e["lgc_lead"]] += 1
    assert seen[True] == 20 and seen[False] == 40  # rounds 9..28, one leader each
    server = [e for e in _events(run, 3) if e["kind"] == "step"]
    assert [e["lgc_stage"] for e in server[:10]] == [1, 1, 1, 2, 2, 2, 2, 2, 2, 3]
    assert len({e["lgc_next_leader"] for e in server[:-1]}) == 3  # it rotates
    assert summary["final_test_accuracy"] > 0.2  # 30 steps at lr 0.05: the all-gather
    # emulation (allreduce, variant=ps) reached 0.32 on this config


def _lgc_ps(tmp_path, name: str, **over) -> dict:
    opts = over.pop("opts", {"mode": "sync"})
    cfg = dict(BASE, codec={"name": "lgc", "options": dict(LGC, **over.pop("codec", {}))},
               strategy={"name": "param_server", "options": opts}, out=str(tmp_path / name),
               **over)
    return tandem.train(cfg, return_results=True, timeout_s=240)


def test_sync_resume_equals_the_uninterrupted_run(tmp_path):
    """Checkpoints at 6, 12, 18 of 24 (stages change at 2 and 7); a resume from 18 restores the
    server's autoencoder, its optimiser, the schedule and support, and every worker's residual,
    stage and decoder, so it ends on the uninterrupted run's parameters."""
    ref = _lgc_ps(tmp_path, "ref", steps=24)
    _lgc_ps(tmp_path, "ck", steps=24, checkpoint_every=6)
    latest = json.loads((tmp_path / "ck" / "checkpoints" / "LATEST").read_text())
    assert latest["step"] == 18
    resumed = _lgc_ps(tmp_path, "ck", steps=24, checkpoint_every=6, resume=True)
    assert resumed["results"][0]["resumed_from"] == 18
    for w in range(3):
        for a, b in zip(resumed["results"][w]["params"], ref["results"][w]["params"],
                        strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_candidate_mode_runs_every_stage_while_the_server_decodes(tmp_path):
    """candidate, with coded pulls too (the LGC extras ride behind the pull's code)."""
    out = _lgc_ps(tmp_path, "cand", steps=80, net="1gbit:2ms", codec={"ae_steps": 12},
                  opts={"mode": "candidate", "cap": 3, "pull": "topk",
                        "pull_options": {"ratio": 0.2}})
    info = out["info"]
    assert {"lgc_stage2_round", "lgc_stage3_round"} <= info.keys()
    assert info["lgc_ae_train_rounds"] >= 10
    workers = out["results"][:3]
    assert all(w["local_steps_per_round"] > 1 for w in workers)
    assert all(w["pushed_steps_total"] == 80 for w in workers)
    assert out["final_test_accuracy"] > 0.5


def test_a_killed_worker_leaves_the_others_training_with_min_workers_2(tmp_path):
    """Worker 2 is SIGKILLed at step 15 (in the compressed stage); the server drops it, the
    leader rotates over the two others, and the run completes."""
    out = _lgc_ps(tmp_path, "kill", steps=30, timeout_s=20, inject_crash=["2:15"],
                  opts={"mode": "sync", "min_workers": 2})
    assert out["lost_ranks"] == [2]
    assert [r.get("steps") for r in out["results"][:2]] == [30, 30]
    server = [e for e in _events(tmp_path / "kill", 3) if e["kind"] == "step"]
    after = [e for e in server if 2 not in e["contributors"]]
    assert after and all(e["lgc_next_leader"] in (0, 1, None) for e in after[1:])
    assert out["final_test_accuracy"] is not None


def test_codec_momentum_keeps_a_velocity_masked_where_entries_were_sent():
    workers, server = _nodes(2, 20, dense_first_last=True, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        pushes = {}
        for i, w in enumerate(workers):
            ts, stage, lead = w.encode([torch.randn(s, generator=gen) for s in SHAPES])
            pushes[i] = (lead, stage, _wire(ts), 1)
        server.decode_round(pushes, [0, 1])
        for i, w in enumerate(workers):
            w.pulled(_wire(server.extras(i)))
    w = workers[0]
    assert stage == 3 and w.velocity is not None and torch.isfinite(w.velocity).all()
    support = w.support
    assert support is not None
    state = w.state_dict()
    assert torch.equal(state["velocity"], w.velocity)
    ts, stage, lead = w.encode([torch.zeros(s) for s in SHAPES])  # masked where sent exactly
    v = ts[0]
    comp = w.velocity[w.p.start: w.p.stop]
    assert int((comp[support] == 0).sum()) >= v.numel()
