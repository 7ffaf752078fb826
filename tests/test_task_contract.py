"""Your training job on every strategy: the recipe (optimizer, schedule, clipping, accumulation)
means the same on each, metrics are exact, runs leave a loadable model, and mistakes are caught
before any worker starts."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tandem
import task_jobs
from tandem.errors import ConfigError
from tandem.launch import spawn

HERE = Path(__file__).parent
RECIPE = {"workload": {"name": "digits", "options": {"hidden": 32}}, "workers": 2, "steps": 12,
          "batch_size": 16, "lr": 0.01, "weight_decay": 0.01, "seed": 4, "progress": False,
          "optimizer": "adamw", "schedule": {"name": "cosine", "warmup_steps": 3},
          "clip_grad_norm": 0.5, "accumulation": 2, "eval_every": 100}


@pytest.fixture(scope="module")
def ddp_params(tmp_path_factory):
    full = tandem.load_config(dict(RECIPE, out=str(tmp_path_factory.mktemp("ddp")))) \
        .model_dump(mode="json")
    return spawn(task_jobs.ddp_recipe_reference, 2, full, timeout_s=120)[0]


def _close(ours, ref):
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("strategy", [
    "allreduce",
    {"name": "pipeline", "options": {"models": [{}], "variant_records": False}},
    {"name": "param_server", "options": {"mode": "sync"}},
], ids=["allreduce", "pipeline", "param_server-sync"])
def test_recipe_equals_ddp_with_the_same_recipe(strategy, ddp_params, tmp_path):
    """AdamW + warm-up/cosine + clipping of the aggregated gradient + 2 accumulated
    micro-batches: the final parameters equal PyTorch DDP's with the same recipe."""
    out = tandem.train(dict(RECIPE, strategy=strategy, out=str(tmp_path / "run")),
                       return_results=True, timeout_s=240)
    _close(out["results"][0]["params"], ddp_params)
    pipelined = isinstance(strategy, dict) and strategy["name"] == "pipeline"
    final = tmp_path / "run" / ("variants/model0" if pipelined else "") / "model.pt"
    _close(list(tandem.load_model(final.parent).parameters()), ddp_params)


def test_recipe_really_changes_the_result(ddp_params, tmp_path):
    """The comparison above would pass vacuously if the recipe were ignored: plain SGD with
    the same lr ends elsewhere."""
    out = tandem.train(dict(RECIPE, optimizer="sgd", schedule=None, clip_grad_norm=None,
                            accumulation=None, out=str(tmp_path / "sgd")), return_results=True)
    diff = max(float((a - b).abs().max())
               for a, b in zip(out["results"][0]["params"], ddp_params, strict=True))
    assert diff > 1e-3


def _losses(run: Path, rank: int = 0) -> list[float]:
    events = [json.loads(line) for line in (run / f"events.rank{rank}.jsonl").open()]
    return [e["loss"] for e in events if e["kind"] == "step" and e.get("loss") is not None]


@pytest.mark.parametrize("strategy", [
    {"name": "bsp_shared", "options": {"grads_per_superstep": 2}},
    {"name": "gossip", "options": {"topology": "ring"}},
], ids=["bsp_shared", "gossip"])
def test_recipe_trains_on_the_other_strategies(strategy, tmp_path):
    """bsp_shared (the agents own AdamW) and gossip (each peer its own AdamW) train with the
    recipe: the test loss falls well below its start.

    bsp_shared's number of updates depends on the machine's load: an agent starved of CPU ends
    each superstep with whatever its workers added meanwhile. Under six CPU burners on two cores
    runs made 1-15 supersteps of the 40 and ended at test loss 0.27-2.5, and one loaded
    ``make test`` ended at 1.25. So its workers sleep 4x their compute after each gradient
    (``stragglers`` 1.0:4): the agent then keeps up, and the same load gave 37-40 supersteps and
    0.17-0.18."""
    slow = {"stragglers": "1.0:4"} if strategy["name"] == "bsp_shared" else {}
    cfg = dict(RECIPE, strategy=strategy, steps=40, lr=0.02, eval_every=40,
               out=str(tmp_path / "run"), **slow)
    summary = tandem.train(cfg, timeout_s=240)
    assert summary["final_test_loss"] < 1.0  # from ~2.3 (10 classes) at the start
    assert (tmp_path / "run" / "model.pt").is_file()


def test_sequence_accuracy_equals_a_hand_count():
    """A (N, V, T) model's accuracy counts positions, not samples: in [0, 1] and equal to the
    hand count (it used to divide by N and report 4.9)."""
    from tandem.trainer.evaluate import evaluate_alone

    work = task_jobs.tiny_seq()
    torch.manual_seed(0)
    model = work.model_fn()
    ev = evaluate_alone(model, work, torch.device("cpu"))
    with torch.no_grad():
        out = model(work.test.x)
    hand = float((out.argmax(1) == work.test.y).float().mean())
    assert 0.0 <= ev.accuracy <= 1.0
    assert ev.accuracy == pytest.approx(hand, abs=1e-12)


def test_token_accuracy_for_n_t_v_outputs():
    out = torch.tensor([[[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]])  # (1, T=3, V=2)
    y = torch.tensor([[1, 1, 1]])
    s, n = tandem.metrics.token_accuracy(out, y)
    assert (float(s), n) == (2.0, 3)
    with pytest.raises(ValueError, match="token_accuracy"):
        tandem.metrics.accuracy(out, y)


def test_model_pt_loads_and_reproduces_the_final_test_loss(tmp_path):
    run = tmp_path / "run"
    summary = tandem.train({"workload": {"name": "digits"}, "workers": 2, "steps": 30,
                            "lr": 0.2, "progress": False, "out": str(run)})
    model = tandem.load_model(run)
    from tandem.trainer.evaluate import evaluate_alone
    from tandem.workloads import build_workload

    work = build_workload(tandem.load_config(path=run / "config.yaml").workload, 0)
    ev = evaluate_alone(model, work, torch.device("cpu"))
    assert ev.loss == pytest.approx(summary["final_test_loss"], rel=1e-6)  # shards sum in
    # another order; a model that were not the final one would differ in the 2nd digit
    assert not model.training


def test_checkpoint_at_the_last_step_and_resume_with_more_steps(tmp_path):
    """10 steps with checkpoints every 4 end with a checkpoint at step 10; resuming with 16
    steps continues from 10 and equals an uninterrupted 16-step run."""
    base = {"workload": {"name": "digits"}, "workers": 2, "lr": 0.1, "momentum": 0.9,
            "progress": False, "seed": 2}
    run = tmp_path / "run"
    tandem.train(dict(base, steps=10, checkpoint_every=4, out=str(run)))
    assert json.loads((run / "checkpoints" / "LATEST").read_text())["step"] == 10
    resumed = tandem.train(dict(base, steps=16, checkpoint_every=4, out=str(run), resume=True),
                           return_results=True)
    whole = tandem.train(dict(base, steps=16, out=str(tmp_path / "whole")), return_results=True)
    for a, b in zip(resumed["results"][0]["params"], whole["results"][0]["params"], strict=True):
        assert torch.equal(a, b)
    records = [json.loads(line) for line in (run / "events.rank0.jsonl").open()]
    assert [r["step"] for r in records if r["kind"] == "resume"] == [10]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _tandem(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("tandem")), *args], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=240)


def test_custom_workload_by_import_path_from_the_cli_and_its_config(tmp_path):
    """--workload module:function trains; config.yaml names it, so --config re-runs that job
    (the same parameters); an option the factory does not take is refused."""
    first = _tandem("train", "--workload", "task_jobs:tiny_seq", "--workers", "2", "--steps",
                    "15", "--lr", "0.05", "--out", str(tmp_path / "a"), "--no-progress",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    cfg = (tmp_path / "a" / "config.yaml").read_text()
    assert "task_jobs:tiny_seq" in cfg
    again = _tandem("train", "--config", str(tmp_path / "a" / "config.yaml"), "--out",
                    str(tmp_path / "b"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    bad = _tandem("train", "--config", str(tmp_path / "a" / "config.yaml"), "--out",
                  str(tmp_path / "c"), "--workload-opt", "depth=3", cwd=tmp_path)
    assert bad.returncode == 2 and "depth" in bad.stderr


def test_custom_workload_in_yaml_and_sweep(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "workload: {factory: 'task_jobs:tiny_seq', options: {hidden: 8}}\nworkers: 2\n"
        "steps: 6\nprogress: false\n")
    done = _tandem("train", "--config", "job.yaml", "--out", str(tmp_path / "y"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    sweep = _tandem("sweep", "--config", "job.yaml", "--lr", "0.05,0.1", "--out",
                    str(tmp_path / "s"), cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    for label in ("lr=0.05", "lr=0.1"):
        assert (tmp_path / "s" / "variants" / label / "model.pt").is_file()


def test_custom_workload_under_torchrun(tmp_path):
    (tmp_path / "job.yaml").write_text(
        f"workload: {{name: 'task_jobs:tiny_seq'}}\nworkers: 2\nsteps: 5\nprogress: false\n"
        f"out: {tmp_path / 'tr'}\n")
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m",
                           "tandem.cli", "worker", "--config", "job.yaml"], cwd=tmp_path,
                          env=dict(_env(), TMPDIR=str(tmp_path)), capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "tr" / "model.pt").is_file()
    assert json.loads((tmp_path / "tr" / "summary.json").read_text())["steps"] == 5


STDIN_SCRIPT = """
import torch, tandem
from torch import nn

def make_net():                      # defined in __main__: travels by value
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

g = torch.Generator().manual_seed(0)
x = torch.randn(256, 4, generator=g)
y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
work = tandem.Workload.custom(make_net, torch.utils.data.TensorDataset(x, y),
                              torch.utils.data.TensorDataset(x[:64], y[:64]))
s = tandem.train({"workers": 2, "steps": 20, "lr": 0.3, "progress": False, "out": OUT},
                 workload=work)
model = tandem.load_model(OUT)
print("RESULT", s["final_test_accuracy"], type(model).__name__)
"""


def test_a_model_factory_fed_on_stdin_trains(tmp_path):
    script = f"OUT = {str(tmp_path / 'stdin')!r}\n" + STDIN_SCRIPT
    done = subprocess.run([sys.executable, "-"], input=script, cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    _, acc, kind = line.split()
    assert 0.0 <= float(acc) <= 1.0 and kind == "Sequential"
    # the record names the object's workload, never the default (digits)
    assert "name: custom" in (tmp_path / "stdin" / "config.yaml").read_text()


def _bad_loss_workload() -> tandem.Workload:
    work = task_jobs.tiny_seq()
    work.loss_fn = torch.nn.functional.cross_entropy  # fine for (N, V, T) ...
    work.model_fn = lambda: torch.nn.Sequential(task_jobs.TinySeq(), _Transpose())  # (N, T, V)
    return work


class _Transpose(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def test_preflight_refuses_a_shape_mistake_before_any_worker_starts(tmp_path):
    with pytest.raises(ConfigError, match="loss_fn"):
        tandem.train({"workers": 2, "steps": 5, "progress": False, "out": str(tmp_path / "r")},
                     workload=_bad_loss_workload())
    assert not list((tmp_path / "r").glob("events*"))  # no worker ever ran


def test_preflight_names_parameters_without_a_gradient(tmp_path, caplog):
    from tandem.preflight import preflight

    class Unused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = torch.nn.Linear(64, 10)
            self.spare = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    from tandem.workloads import build_workload

    cfg = tandem.load_config({})
    work = build_workload(cfg.workload, 0)
    work.model_fn = Unused
    checked = preflight(cfg, work)
    assert checked.unused == ["spare.weight", "spare.bias"]


class _Unseeded(torch.nn.Module):
    """A model whose weights come from a generator Tandem does not seed (numpy's, unseeded)."""

    def __init__(self) -> None:
        import numpy as np

        super().__init__()
        self.lin = torch.nn.Linear(64, 10)
        with torch.no_grad():
            self.lin.weight.copy_(torch.from_numpy(np.random.default_rng().normal(size=(10, 64))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_preflight_refuses_a_model_that_starts_differently_on_each_worker(tmp_path):
    """Every all-reduce or gossip worker builds its own replica from the seed: a factory that
    draws from an unseeded generator would start them apart, silently. Refused before any worker
    starts, naming the first parameter; a parameter server takes its workers' parameters from
    the server, so there the same factory runs."""
    from tandem.preflight import preflight
    from tandem.workloads import build_workload

    cfg = tandem.load_config({})
    work = build_workload(cfg.workload, 0)
    work.model_fn = _Unseeded
    for strategy in ("allreduce", "gossip"):
        with pytest.raises(ConfigError, match="different weights for the same seed.*'lin.weight'"):
            preflight(tandem.load_config({"strategy": strategy}), work)
    preflight(tandem.load_config({"strategy": "param_server"}), work)
    work.model_fn = lambda: torch.nn.Linear(64, 10)  # seeded by Tandem: the same twice
    preflight(cfg, work)
    with pytest.raises(ConfigError, match="different weights"):
        tandem.train({"workers": 2, "steps": 5, "progress": False, "out": str(tmp_path / "r")},
                     workload=dataclasses.replace(work, name="unseeded", model_fn=_Unseeded))
    assert not list((tmp_path / "r").glob("events*"))  # no worker ever ran
