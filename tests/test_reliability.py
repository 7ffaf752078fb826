"""Reliability: kill -9 then resume equals an uninterrupted run; NaN gradients; bad checkpoints."""

from __future__ import annotations

import json
import os

import pytest
import torch

import jobs
import tandem
from tandem.checkpoint import Checkpointer, config_fingerprint
from tandem.codecs import CODECS
from tandem.errors import CheckpointError, WorkerFailed


def _cfg(out, codec="dense", **kw):
    base = {"workload": {"name": "digits"}, "strategy": "allreduce", "codec": codec,
            "workers": 2, "steps": 40, "batch_size": 16, "lr": 0.1, "momentum": 0.9, "seed": 5,
            "progress": False, "out": str(out), "checkpoint_every": 8, "net": "50mbit:1ms"}
    base.update(kw)
    return tandem.load_config(base)


CODEC_OPTIONS = {
    "dense": {},
    "topk": {"ratio": 0.05},
    # LGC-PS, checkpointed at step 16 (inside its autoencoder stage, steps 4-23) or later: the
    # resumed run must restore the AE, its Adam state and the stage schedule to match
    "lgc": {"variant": "ps", "dense_first_last": False, "ratio": 0.05, "ae_fraction": 0.5},
}


@pytest.mark.parametrize("codec", ["dense", "topk", "lgc"])
def test_kill_then_resume_equals_uninterrupted(tmp_path, codec):
    if codec not in CODECS:
        pytest.skip(f"codec {codec} not available")
    opts = {"codec": {"name": codec, "options": CODEC_OPTIONS[codec]}}
    ref = tandem.train(_cfg(tmp_path / "ref", **opts), return_results=True)
    resumed = jobs.kill_then_resume(_cfg(tmp_path / "killed", **opts), 16)
    for a, b in zip(ref["results"][0]["params"], resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_nan_gradient_is_skipped_and_counted(tmp_path):
    s = tandem.train(_cfg(tmp_path / "nan", steps=20, checkpoint_every=0, net=None,
                          nan_policy="skip", inject_nan=["1:7"]), return_results=True)
    assert s["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in s["results"][0]["params"])
    with pytest.raises(WorkerFailed, match="non-finite gradient at step 7"):
        tandem.train(_cfg(tmp_path / "stop", steps=20, checkpoint_every=0, net=None,
                          inject_nan=["1:7"]))


def test_resume_without_checkpoint_is_refused(tmp_path):
    cfg = _cfg(tmp_path / "c", steps=25, net=None)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        tandem.train(cfg.model_copy(update={"resume": True}))


def test_corrupt_truncated_or_mismatched_checkpoint_is_rejected(tmp_path):
    fp = config_fingerprint({"lr": 0.1})
    saver = Checkpointer(tmp_path, 0, fp, every=1)
    state = {"w": torch.arange(4.0), "nested": {"step": 3, "xs": [1, 2]}}
    saver.save(3, state, barrier=lambda: None)
    loaded = saver.load()
    assert torch.equal(loaded["w"], state["w"]) and loaded["nested"] == state["nested"]
    # a checkpoint from another configuration is refused, never used
    with pytest.raises(CheckpointError, match="different configuration"):
        Checkpointer(tmp_path, 0, config_fingerprint({"lr": 0.5})).load()
    # the set has no file for another rank
    with pytest.raises(CheckpointError, match="no file for rank 1"):
        Checkpointer(tmp_path, 1, fp).load()
    # a truncated file is reported as corrupt
    path = tmp_path / "checkpoints" / "step-00000003" / "rank0.pt"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="corrupt"):
        saver.load()
    # a LATEST that is not JSON is reported too
    (tmp_path / "checkpoints" / "LATEST").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt"):
        saver.load()
    # fields that do not shape the trajectory may change on resume
    assert config_fingerprint({"lr": 0.1, "steps": 10, "out": "a"}) == \
        config_fingerprint({"lr": 0.1, "steps": 99, "out": "b"})


def test_checkpoint_refuses_code_execution(tmp_path):
    """weights_only loading: a pickle that would run code is refused as corrupt."""
    fp = config_fingerprint({})
    saver = Checkpointer(tmp_path, 0, fp, every=1)
    saver.save(1, {"x": torch.zeros(1)}, barrier=lambda: None)
    path = tmp_path / "checkpoints" / "step-00000001" / "rank0.pt"
    torch.save({"step": 1, "config": fp, "evil": Exploit(tmp_path / "pwned")}, path)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        saver.load()
    assert not (tmp_path / "pwned").exists()


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_torchrun_max_restarts_resumes_from_checkpoint(tmp_path):
    """A worker dies at step 13; torchrun restarts the job, which resumes from step 10 and ends
    with the same test loss as an uninterrupted run."""
    import subprocess
    import sys
    from pathlib import Path

    ref = tandem.train(_cfg(tmp_path / "ref", steps=24, net=None))
    cfg = _cfg(tmp_path / "tr", steps=24, net=None, inject_crash=["1:13"])
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "--max-restarts=1", "--rdzv-backend",
                        "c10d", "--rdzv-endpoint", "127.0.0.1:0", "-m", "tandem.cli", "worker",
                        "--config", str(path)], capture_output=True, text=True, timeout=240,
                       cwd=tmp_path, env=dict(os.environ, TMPDIR=str(tmp_path)))  # its folders
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert summary["final_test_loss"] == pytest.approx(ref["final_test_loss"], abs=1e-6)
    assert "exitcode: -9" in r.stderr  # the injected crash really happened, and was survived


def test_screen_gradients_policies():
    """The one NaN screen every strategy calls: stop names rank and step, skip sends zeros."""
    from tandem.errors import NonFiniteGradient
    from tandem.trainer import screen_gradients

    good = [torch.ones(3), torch.ones(2)]
    assert screen_gradients(good, "stop", 0, 1) == (good, False)
    bad = [torch.ones(3), torch.tensor([1.0, float("inf")])]
    with pytest.raises(NonFiniteGradient, match="rank 4: non-finite gradient in m at step 9"):
        screen_gradients(bad, "stop", 4, 9, " in m")
    zeros, skipped = screen_gradients(bad, "skip", 4, 9)
    assert skipped and all(float(z.abs().sum()) == 0 for z in zeros)


def test_finite_check_is_exact_around_its_fast_path():
    """check_finite trusts a finite sum; an overflowing sum of finite values is still finite,
    and a +Inf/-Inf pair (whose sum is NaN) or a lone NaN is still caught."""
    from tandem.trainer import check_finite

    big = torch.full((10,), 3e38)  # finite elements whose float32 sum overflows to inf
    assert not torch.isfinite(big.sum()) and check_finite([big])
    assert not check_finite([torch.tensor([float("inf"), float("-inf")])])
    assert not check_finite([torch.ones(4), torch.tensor([0.0, float("nan")])])
    assert check_finite([torch.randn(1000), torch.zeros(3)])


def test_restart_attempt_is_the_same_on_every_node_whatever_their_restart_counts(monkeypatch):
    """torchrun's agent store outlives a restart, and TORCHELASTIC_RESTART_COUNT is per node (an
    agent restarted because another node failed keeps 0): the attempt that keeps each start's
    keys apart must agree across ranks anyway, or the restarted ranks wait for each other under
    different prefixes until the timeout (seen on a 2-host job across network namespaces)."""
    from tandem.transport.rendezvous import host_store, store_from_env

    server = host_store("127.0.0.1", 2)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.delenv("TANDEM_STORE_HOSTED", raising=False)
    for attempt, counts in enumerate([("0", "0"), ("0", "1")]):  # node 1 failed, node 0 did not
        stores = []
        for rank, count in enumerate(counts):
            monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", count)
            store, got = store_from_env(rank, 2, 10.0)
            assert got == attempt
            stores.append(store)
        stores[0].set("hello", f"from attempt {attempt}")
        assert stores[1].get("hello") == f"from attempt {attempt}".encode()
