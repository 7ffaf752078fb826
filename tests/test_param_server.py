"""param_server (M3): equalities with allreduce and between modes, exact update accounting, the
SSP bound, sharding, and losing a worker or a server. Real gloo processes on loopback."""

from __future__ import annotations

import pytest
import torch

import ps_jobs
import tandem
from tandem.errors import WorkerFailed, is_secondary
from tandem.launch import spawn
from tandem.strategies.param_server.sharding import join, plan_shards, split
from tandem.workloads.base import partition

BASE = {"workload": {"name": "digits"}, "codec": "dense", "workers": 2, "steps": 12,
        "batch_size": 16, "lr": 0.1, "momentum": 0.9, "seed": 3, "progress": False}


def ps(tmp_path, name: str, base: dict | None = None, workload=None, **opts) -> dict:
    cfg = dict(base or BASE, strategy={"name": "param_server", "options": opts},
               out=str(tmp_path / name))
    return tandem.train(cfg, workload=workload, return_results=True, timeout_s=240)


def assert_params_close(a: list, b: list, atol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def sync_params(tmp_path_factory):
    out = ps(tmp_path_factory.mktemp("ps"), "sync", mode="sync")
    workers = [r for r in out["results"] if r["role"] == "worker"]
    assert len(workers) == 2 and out["results"][2]["role"] == "server"
    assert_params_close(workers[0]["params"], workers[1]["params"], 0.0)
    assert out["results"][2]["staleness_max"] == 0
    return workers[0]["params"]


def test_sync_equals_allreduce(sync_params, tmp_path):
    ref = tandem.train(dict(BASE, strategy="allreduce", out=str(tmp_path / "ar")),
                       return_results=True, timeout_s=240)["results"][0]["params"]
    assert_params_close(sync_params, ref, 1e-5)
    from tandem.trainer import build_model
    from tandem.workloads import build_workload

    cfg = tandem.load_config(BASE)
    init = [p.detach() for p in build_model(build_workload(cfg.workload, 3), 3).parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(sync_params, init, strict=True)) > 1e-3


def test_candidate_cap1_equals_sync(sync_params, tmp_path):
    out = ps(tmp_path, "cand", mode="candidate", cap=1, merge="delay-corrected")
    assert out["results"][0]["local_steps_per_round"] == 1.0
    assert_params_close(out["results"][0]["params"], sync_params, 1e-6)


def test_two_servers_equal_one(sync_params, tmp_path):
    out = ps(tmp_path, "two", mode="sync", servers=2)
    servers = [r for r in out["results"] if r["role"] == "server"]
    assert len(servers) == 2 and min(s["params_held"] for s in servers) > 4000  # balanced
    assert_params_close(out["results"][0]["params"], sync_params, 1e-6)


def test_delay_corrected_counts_each_update_once(tmp_path):
    """Linear loss: each worker's gradient is the constant mean of its shard, so the global model
    must end at -lr/N * steps * sum_i c_i whatever the timing, the rounds or the local steps."""
    work = ps_jobs.constant_gradient_workload()
    base = {"workers": 2, "steps": 40, "batch_size": 32, "lr": 0.1, "momentum": 0.0, "seed": 5,
            "progress": False, "net": "1gbit:4ms", "stragglers": "0.3:exp:0.01"}
    out = ps(tmp_path, "dc", base=base, workload=work, mode="candidate", cap=4,
             merge="delay-corrected")
    shards = partition(work.train.y, 2, "iid", seed=5)
    c = sum(work.train.x[s].mean(0) for s in shards)
    expected = -0.1 / 2 * 40 * c
    workers = out["results"][:2]
    for w in workers:
        torch.testing.assert_close(w["params"][0], expected, rtol=1e-5, atol=1e-5)
        assert w["pushed_steps_total"] == 40
    assert max(w["local_steps_per_round"] for w in workers) > 1.5  # candidates really happened
    assert out["results"][2]["local_steps_mean"] > 1.5


def test_ssp_never_exceeds_bound(tmp_path):
    base = dict(BASE, workers=3, steps=20, momentum=0.0, slow_workers=["2:8"])
    out = ps(tmp_path, "ssp", base=base, mode="ssp", staleness=1)
    server = out["results"][3]
    assert server["max_clock_gap"] <= 1
    assert server["deferred_replies"] > 0  # the bound was what held the fast workers back
    assert server["updates"] == 60


def test_sharding_is_balanced_and_round_trips():
    shapes = [(128, 64), (128,), (10, 128), (10,), ()]
    for servers in (1, 2, 3, 5):
        plan = plan_shards(shapes, servers)
        loads = plan.loads()
        assert sum(loads) == 64 * 128 + 128 + 1280 + 10 + 1
        assert max(loads) - min(loads) <= 128  # at most about one row apart
        tensors = [torch.randn(s) for s in shapes]
        back = join(split(tensors, plan), plan)
        assert all(torch.equal(a, b) for a, b in zip(tensors, back, strict=True))
    assert len(plan_shards(shapes, 1).servers[0]) == len(shapes)  # one server: whole tensors


def _job(tmp_path, victim: int, after: int, workers: int, **opts):
    cfg = tandem.load_config(dict(BASE, workers=workers, steps=30, momentum=0.0,
                                  timeout_s=20, strategy={"name": "param_server",
                                                          "options": opts},
                                  out=str(tmp_path))).model_dump(mode="json")
    with pytest.raises(WorkerFailed) as info:
        spawn(ps_jobs.run_role, workers + 1, cfg, victim, after, str(tmp_path), timeout_s=120)
    return info.value


def test_dead_server_stops_every_worker_naming_it(tmp_path):
    """The launcher names the killed server first, and each worker's own error follows from it:
    normally a WorkerFailed naming the server; a worker that issues a receive just after the
    server's exit may get the engine's own error instead (gloo's irecv raises at once on a
    closed connection, "... typically caused by a remote worker crashing"), a consequence all
    the same. Sync mode: 30 rounds, so the server dies with 27 still to serve. (In the default
    candidate mode the cap starts at max_staleness, 64, until a round trip is measured: 30 steps
    could fit in 3 rounds, and a server killed after recording its third could already have sent
    the final models; the workers then finished and only rank 2 was named.)"""
    err = _job(tmp_path, victim=2, after=3, workers=2, mode="sync")
    assert sorted(err.ranks) == [0, 1, 2]
    assert str(err).startswith("rank 2 failed: worker 2 killed by SIGKILL without reporting")
    for w in (0, 1):
        assert "parameter server 0 (rank 2)" in err.details[w] or is_secondary(err.details[w])


def test_tandem_train_finishes_without_a_killed_worker(tmp_path):
    """End to end through the launcher: worker 2 is SIGKILLed at step 5; with min_workers=2 the
    run completes, the summary names the lost rank, and the survivors ran all their steps."""
    summary = tandem.train(dict(BASE, workers=3, steps=30, momentum=0.0, timeout_s=20,
                                inject_crash=["2:5"], out=str(tmp_path / "run"),
                                strategy={"name": "param_server",
                                          "options": {"min_workers": 2}}))
    assert summary["lost_ranks"] == [2]
    assert [r.get("steps") for r in summary["results"][:2]] == [30, 30]
    assert summary["final_test_accuracy"] is not None
    events = (tmp_path / "run" / "events.rank3.jsonl").read_text()  # the server's record
    assert '"lost_worker":2' in events.replace(" ", "")


def test_a_slow_worker_that_finishes_long_after_the_others_is_waited_for(tmp_path):
    """Rank 2 pushes every 0.5 s (within the 1.5 s timeout) and finishes ~4 s after the fast
    workers, whose final model waits for it: that wait is as long as the server lives, not
    ``timeout_s`` (it used to fail the fast workers with a receive timeout)."""
    out = ps(tmp_path, "slow", dict(BASE, workers=3, steps=8, momentum=0.0, timeout_s=1.5),
             workload=ps_jobs.lagging_workload())
    assert out["lost_ranks"] == []
    fast = [r["final_sync_s"] for r in out["results"][:2]]
    assert min(fast) > 1.5, fast  # each waited longer than timeout_s for the final model
    assert_params_close(out["results"][0]["params"], out["results"][2]["params"], 0.0)


CODEC_CASES = [("dense", {}), ("fp16", {}), ("bf16", {}), ("topk", {"ratio": 0.1}),
               ("randomk", {"ratio": 0.1}), ("qsgd", {}), ("powersgd", {"rank": 2}),
               ("signsgd", {}), ("lgc", {"total_steps": 10}),
               ("lgc", {"total_steps": 10, "dense_first_last": False})]


@pytest.mark.parametrize(("name", "opts"), CODEC_CASES)
def test_message_metadata_travels_as_json(name, opts):
    """Breaks if a codec's message metadata stops surviving the parameter server's wire format
    (JSON, never pickle): the server would decode with the wrong shapes or fail; also if LGC's
    message level fails on a model where every layer stays dense (no compressed layer)."""
    from tandem.codecs import make_codec
    from tandem.codecs.base import Message
    from tandem.strategies.param_server.wire import meta_from_bytes, meta_to_bytes

    shapes = [(4, 1, 3, 3), (4,), (6, 36), (6,)]  # two weight layers: LGC keeps both dense
    gen = torch.Generator().manual_seed(0)
    msg = make_codec(name, opts, seed=0).encode([torch.randn(s, generator=gen) for s in shapes])
    wire = meta_to_bytes(msg.meta)
    assert wire.startswith(b"{") and b"shapes" in wire
    got = make_codec(name, opts, seed=0).decode(Message(msg.tensors, meta_from_bytes(wire)))
    want = make_codec(name, opts, seed=0).decode(Message(msg.tensors, dict(msg.meta)))
    assert [tuple(t.shape) for t in got] == shapes
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_metadata_that_is_not_an_object_is_refused():
    from tandem.strategies.param_server.wire import meta_from_bytes

    with pytest.raises(ValueError, match="JSON object"):
        meta_from_bytes(b"[1, 2]")
