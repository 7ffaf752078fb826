"""param_server's ``local_step``: the candidate's local steps with the run's own optimizer.

Under ``local_step=optimizer`` each worker steps its optimizer (Adam's moments, the clip, the
schedule) and pushes the parameter change; the servers average it. The invariants below hold
whatever the timing, so they are checked with stragglers and a link that makes candidates
happen. Real gloo processes on loopback."""

from __future__ import annotations

import pytest
import torch

import ps_jobs
import tandem
from tandem.errors import ConfigError
from tandem.strategies.param_server.options import ParamServerOptions, local_step_of
from tandem.trainer.spec import training_spec
from tandem.workloads.base import partition

LINEAR = {"workers": 2, "steps": 40, "batch_size": 32, "lr": 0.1, "momentum": 0.0, "seed": 5,
          "progress": False, "net": "1gbit:4ms", "stragglers": "0.3:exp:0.01"}


def _run(tmp_path, name: str, base: dict, **opts) -> dict:
    cfg = dict(base, out=str(tmp_path / name),
               strategy={"name": "param_server", "options": {"mode": "candidate", **opts}})
    return tandem.train(cfg, workload=ps_jobs.constant_gradient_workload(),
                        return_results=True, timeout_s=180)


def _shard_gradients() -> list[torch.Tensor]:
    """Each worker's constant gradient: the mean of its shard's inputs."""
    work = ps_jobs.constant_gradient_workload()
    return [work.train.x[s].mean(0) for s in partition(work.train.y, 2, "iid", seed=5)]


def test_adam_local_steps_enter_the_global_model_exactly_once(tmp_path):
    """Adam on a constant gradient c moves each coordinate by lr * c / (|c| + eps) every step,
    whatever its state: 40 local steps on each of 2 workers must end the global model at
    -lr/2 * 40 * sum_i c_i / (|c_i| + eps), however the steps fell into rounds. Two servers
    (each averaging its shard) and a clip that never bites, which one server used to need.
    Under ``local_step=sgd`` the servers' Adam takes one step per round instead, so this end
    point would depend on how many rounds there were."""
    base = dict(LINEAR, optimizer={"name": "adam"}, lr=0.01, clip_grad_norm=100.0)
    out = _run(tmp_path, "adam", base, cap=4, servers=2)
    eps = 1e-8
    expected = -0.01 / 2 * 40 * sum(c / (c.abs() + eps) for c in _shard_gradients())
    workers = [r for r in out["results"] if r["role"] == "worker"]
    assert len(workers) == 2
    for w in workers:
        torch.testing.assert_close(w["params"][0], expected, rtol=1e-5, atol=1e-5)
        assert w["pushed_steps_total"] == 40
    assert sum(r["role"] == "server" for r in out["results"]) == 2
    events = (tmp_path / "adam" / "events.jsonl").read_text().replace(" ", "")
    assert '"ps_local_step":"optimizer"' in events  # what auto picked, on record
    assert max(w["local_steps_per_round"] for w in workers) > 1.5  # candidates really happened


def test_adam_local_steps_resume_from_a_checkpoint_without_loss(tmp_path):
    """The servers hold no optimizer under ``local_step=optimizer``; a checkpoint must still
    restore their model and each worker's optimizer and unpushed change: a 20-step run that
    checkpoints at 8 and 16, resumed from 16 up to 40 steps, ends where 40 steps must."""
    base = dict(LINEAR, steps=20, optimizer={"name": "adam"}, lr=0.01, checkpoint_every=8)
    first = _run(tmp_path, "ckpt", base, cap=4)
    assert first["results"][0]["pushed_steps_total"] == 20
    out = _run(tmp_path, "ckpt", dict(base, steps=40, resume=True), cap=4)
    expected = -0.01 / 2 * 40 * sum(c / (c.abs() + 1e-8) for c in _shard_gradients())
    for w in out["results"][:2]:
        assert w["resumed_from"] == 16
        assert w["pushed_steps_total"] == 40
        torch.testing.assert_close(w["params"][0], expected, rtol=1e-5, atol=1e-5)


def test_sgd_through_the_optimizer_equals_the_closed_form(tmp_path):
    """Plain SGD: the optimizer's step is the closed form lr * g, so ``local_step=optimizer``
    must reach the same end point as ``local_step=sgd`` (-lr/N * steps * sum c_i)."""
    out = _run(tmp_path, "sgd", LINEAR, cap=4, local_step="optimizer")
    expected = -0.1 / 2 * 40 * sum(_shard_gradients())
    for w in out["results"][:2]:
        torch.testing.assert_close(w["params"][0], expected, rtol=1e-5, atol=1e-5)
        assert w["pushed_steps_total"] == 40


def test_auto_picks_the_optimizer_for_adam_and_sgd_for_sgd():
    work = ps_jobs.constant_gradient_workload()
    sgd = training_spec(tandem.load_config({"workload": {"name": "digits"}}), work)
    adamw = training_spec(tandem.load_config({"workload": {"name": "digits"},
                                              "optimizer": {"name": "adamw"}}), work)
    cand = ParamServerOptions()
    assert local_step_of(cand, sgd) == "sgd"
    assert local_step_of(cand, adamw) == "optimizer"
    assert local_step_of(ParamServerOptions(local_step="sgd"), adamw) == "sgd"
    assert local_step_of(ParamServerOptions(mode="sync"), adamw) == "sgd"  # pushes gradients


def test_combinations_that_cannot_work_are_refused_before_start(tmp_path):
    def cfg(**opts):
        return {"workload": {"name": "digits"}, "workers": 2, "steps": 2, "progress": False,
                "out": str(tmp_path / "refused"), "optimizer": {"name": "adamw"},
                "strategy": {"name": "param_server", "options": opts}}

    with pytest.raises(ConfigError, match="only mode=candidate takes local steps"):
        tandem.load_config(cfg(mode="sync", local_step="optimizer"))
    with pytest.raises(ConfigError, match="merge=compensated corrects local SGD steps"):
        tandem.train(cfg(merge="compensated"))  # auto picks optimizer for adamw
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
