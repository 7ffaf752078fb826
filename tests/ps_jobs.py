"""Pieces the param_server tests run inside spawned processes (importable by name)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn

from tandem.workloads.base import ArrayDataset, Workload


class Dot(nn.Module):
    """theta . x with theta starting at zero: with ``first_moment`` its gradient is mean(x)."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


def first_moment(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A linear loss: its gradient does not depend on the parameters (deterministic updates)."""
    return out.mean()


def constant_gradient_workload(n: int = 64, dim: int = 4) -> Workload:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, dim, generator=gen)
    y = torch.zeros(n)
    return Workload.custom(model_fn=Dot, train=ArrayDataset(x, y), test=ArrayDataset(x[:8], y[:8]),
                           loss_fn=first_moment, task="regression", name="constant")


def lagging_first_moment(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`first_moment`, but rank 2 takes an extra 0.5 s per call: a slow worker that
    pushes well within any timeout yet finishes seconds after the others."""
    if os.environ.get("RANK") == "2":
        time.sleep(0.5)
    return out.mean()


def lagging_workload() -> Workload:
    work = constant_gradient_workload()
    work.loss_fn = lagging_first_moment
    return work


def run_role(cfg_data: dict, victim: int, after_steps: int, out_dir: str) -> dict:
    """One process of a param_server job, like ``tandem.worker.main`` but without its closing
    world barrier (a dead rank would fail it); rank ``victim`` SIGKILLs itself once it has
    recorded ``after_steps`` steps. Each survivor writes its result to ``out_dir``."""
    from tandem.config import RunConfig
    from tandem.strategies.base import STRATEGIES, WorkerContext, codec_factory
    from tandem.telemetry.recorder import Recorder
    from tandem.trainer.stragglers import ComputeFaults
    from tandem.transport.env import transport_from_env
    from tandem.workloads import build_workload

    cfg = RunConfig.model_validate(cfg_data)
    t = transport_from_env(timeout_s=cfg.timeout_s, seed=cfg.seed, backend="gloo")
    run_dir = Path(out_dir)
    rec = Recorder(run_dir, t.rank, world=t.world, progress=False)
    ctx = WorkerContext(cfg=cfg, transport=t, workload=build_workload(cfg.workload, cfg.seed),
                        recorder=rec, faults=ComputeFaults.from_config(cfg, t.rank),
                        run_dir=run_dir, codec_factory=codec_factory(cfg))
    strategy = STRATEGIES[cfg.strategy.name](ctx)
    strategy.setup()
    t.barrier().wait()
    rec.start()
    if t.rank == victim:
        def killer() -> None:
            while rec.steps < after_steps:
                time.sleep(0.002)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=killer, daemon=True).start()
    result = strategy.run()
    rec.close()
    result.pop("params", None)
    (run_dir / f"result{t.rank}.json").write_text(json.dumps(result))
    t.close(graceful=False)
    return result


# ---- the codec spy of tests/test_codec_pairs.py -----------------------------------------------
def _install_codec_spy(log_dir: str) -> None:
    """In this process: every codec's encode/decode/add_decoded/exchange, and LGC-PS's two
    halves, append their name to ``log_dir/calls.<rank>.txt`` the first time they run."""
    from tandem.codecs.base import CODECS
    from tandem.codecs.lgc.psserver import PSServerCode
    from tandem.codecs.lgc.remote import PSWorkerCode

    seen: set[str] = set()
    path = Path(log_dir) / f"calls.{os.environ['RANK']}.txt"

    def wrap(owner: type, method: str, label: str) -> None:
        inner = getattr(owner, method)

        def spy(self, *args, **kwargs):
            if label not in seen:
                seen.add(label)
                with path.open("a") as f:
                    f.write(label + "\n")
            return inner(self, *args, **kwargs)

        setattr(owner, method, spy)

    for name, cls in CODECS.items():
        for method in ("encode", "decode", "add_decoded", "exchange"):
            wrap(cls, method, f"{name}.{method}")
    wrap(PSWorkerCode, "encode", "lgc.ps_push")
    wrap(PSServerCode, "decode_round", "lgc.ps_decode")


def spy_model(log_dir: str, inner):
    """The workload's model, after installing the codec spy in a worker process (every role
    builds the model; the launcher's pre-flight, without RANK, is left alone)."""
    if "RANK" in os.environ and not getattr(spy_model, "installed", False):
        _install_codec_spy(log_dir)
        spy_model.installed = True
    return inner()


def spy_workload(log_dir: str) -> Workload:
    """digits (hidden 8) whose model factory installs the codec spy first."""
    from functools import partial

    from tandem.config import WorkloadConfig
    from tandem.workloads import build_workload

    work = build_workload(WorkloadConfig(name="digits", options={"hidden": 8}), 0)
    work.model_fn = partial(spy_model, log_dir, work.model_fn)
    return work
