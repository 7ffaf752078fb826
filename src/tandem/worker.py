"""The worker entry point: one process of a run, under Tandem's launcher or under torchrun.

``main(config)`` joins the job (transport from the environment), builds the workload, the
recorder and the strategy for this rank, runs it, and leaves the run record behind. Under
torchrun (``tandem worker --config run.yaml``) rank 0 also writes the summary and plots once
everyone has finished; under the local launcher the launcher does it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from tandem.allocator import tune_allocator
from tandem.codecs.base import CODECS
from tandem.config import RunConfig
from tandem.resolve import resolve
from tandem.strategies.base import STRATEGIES, codec_factory
from tandem.telemetry.divergence import DivergenceWatch
from tandem.telemetry.recorder import Recorder
from tandem.trainer import apply_workload_defaults
from tandem.trainer.context import WorkerContext
from tandem.trainer.stragglers import ComputeFaults
from tandem.transport.env import env_rank_world, transport_from_env
from tandem.workloads import WORKLOADS, build_workload
from tandem.workloads.base import Workload

# The fork server imports this module once (tandem.launch): find every plugin there, so that a
# forked worker does not import them again.
for _registry in (STRATEGIES, CODECS, WORKLOADS):
    _registry.discover()


def main(cfg_data: dict[str, Any], workload: Workload | bytes | None = None,
         return_params: bool = False, finalize: bool = False) -> dict[str, Any]:
    """Run this process's role of the job described by ``cfg_data``; return its final figures."""
    tune_allocator()  # under torchrun too (see tandem.allocator; TANDEM_MALLOC=0 turns it off)
    cfg = RunConfig.model_validate(cfg_data)
    if isinstance(workload, bytes):
        workload = pickle.loads(workload)  # noqa: S301 - our own launcher's payload
    torch.set_num_threads(cfg.threads_per_worker)
    resolve(cfg, object_workload=workload is not None).strategy.check_world(
        cfg, env_rank_world()[1])  # before joining: a mismatched job fails fast, on every rank
    transport = transport_from_env(net=cfg.net, timeout_s=cfg.timeout_s, seed=cfg.seed,
                                   backend=cfg.backend)
    if not cfg.resume and transport.attempt > 0 and \
            (cfg.run_dir() / "checkpoints" / "LATEST").is_file():
        cfg = cfg.model_copy(update={"resume": True})  # torchrun restarted us: go on
    graceful = False
    try:
        strategy_cls = resolve(cfg, object_workload=workload is not None).strategy
        work = workload or build_workload(cfg.workload, cfg.seed)
        cfg = apply_workload_defaults(cfg, work)  # under torchrun the launcher did not
        run_dir = cfg.run_dir()
        run_dir.mkdir(parents=True, exist_ok=True)
        total = strategy_cls.total_steps(cfg, len(work.train))
        recorder = Recorder(run_dir, transport.rank, world=transport.world,
                            tensorboard=cfg.tensorboard, progress_total=total,
                            progress=cfg.progress, append=cfg.resume,
                            divergence=DivergenceWatch.for_run(cfg))
        ctx = WorkerContext(cfg=cfg, transport=transport, workload=work, recorder=recorder,
                            faults=ComputeFaults.from_config(cfg, transport.rank), run_dir=run_dir,
                            codec_factory=codec_factory(cfg))
        _prewarm()
        strategy = strategy_cls(ctx)
        strategy.setup()
        transport.barrier().wait()
        recorder.start()
        result = strategy.run()
        recorder.close()
        tolerant = strategy_cls.tolerates_lost_workers
        lost: list[int] = []
        if not tolerant:  # a closing barrier would wait for a worker the strategy let go
            transport.barrier().wait()
        elif finalize:  # torchrun: no launcher tells rank 0 who finished and who was lost
            transport.liveness.mark_finished()
            if transport.rank == 0:
                lost = transport.liveness.await_finished(cfg.timeout_s)
        if finalize and transport.rank == 0:
            from tandem.telemetry.summary import finalize_run

            result["summary"] = finalize_run(run_dir, cfg.model_dump(mode="json"),
                                             target_accuracy=cfg.target_accuracy,
                                             extra={"lost_ranks": lost})
        graceful = not tolerant
    finally:
        transport.close(graceful=graceful)
    if not return_params:
        result.pop("params", None)
    return result


def _prewarm() -> None:
    """Pay one-off lazy imports before the clock starts: the first optimizer built in a process
    imports torch's compiler stack (seconds on a loaded machine), which is not training time.
    Under the local launcher the fork server has imported it already (``tandem.launch``)."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def torchrun_main(config_path: str) -> tuple[dict[str, Any], Path] | None:
    """Entry for ``torchrun ... -m tandem.cli worker --config run.yaml``: this process's role,
    with rank 0's progress bar. Returns ``(summary, run_dir)`` on global rank 0, which writes the
    summary once every rank has finished; None on the others."""
    from tandem.preflight import preflight
    from tandem.resolve import load_config

    cfg = preflight(load_config(path=config_path)).cfg  # each process, before it joins
    if os.environ.get("RANK") == "0":
        cfg.run_dir().mkdir(parents=True, exist_ok=True)
        (cfg.run_dir() / "config.yaml").write_text(cfg.to_yaml())
    summary = main(cfg.model_dump(mode="json"), finalize=True).get("summary")
    return None if summary is None else (summary, cfg.run_dir())
