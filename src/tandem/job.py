"""One whole job on this machine: resolve the config, prepare the run directory, start one
process per role with the local launcher, and write the summary when they are done.

:func:`tandem.api.train` and :func:`tandem.sweep.run_sweep` both run their job through
:func:`run_job`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import cloudpickle

from tandem import worker
from tandem.checkpoint import check_resume
from tandem.config import RunConfig
from tandem.errors import ConfigError
from tandem.launch import spawn
from tandem.main_guard import check_main_guard
from tandem.preflight import preflight
from tandem.resolve import resolve
from tandem.telemetry.summary import finalize_run
from tandem.trainer.final_model import save_model_factory
from tandem.transport.host_link import check_hosts
from tandem.workloads.base import Workload


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory, write the resolved config, drop a previous run's events."""
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in list(run_dir.glob("events*.jsonl")) + [run_dir / "summary.json"]:
        old.unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tb", ignore_errors=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    return run_dir


def run_job(cfg: RunConfig, *, workload: Workload | None = None, return_results: bool = False,
            timeout_s: float | None = None) -> dict[str, Any]:
    """Run ``cfg`` with the local launcher and return its summary (``summary.json``).

    ``return_results=True`` adds ``results``: each process's final figures and parameters.
    """
    check_main_guard()  # first: every worker would run an unguarded script's launch again
    checked = preflight(cfg, workload)  # resolves the plugins; one batch through the job
    cfg = checked.cfg
    if workload is not None:
        cfg = _name_object_workload(cfg, workload)
    strategy_cls = resolve(cfg, object_workload=workload is not None).strategy
    for sub in strategy_cls.sub_configs(cfg):
        if workload is not None and sub.workload != cfg.workload:
            raise ConfigError("a variant changes the workload, but the job's workload was "
                              "passed as an object; name it by import path "
                              "(workload: {name: package.module:function, options: ...}) so "
                              "variants can rebuild it with other options")
        resolve(sub, object_workload=workload is not None)
    procs = strategy_cls.processes(cfg)
    check_hosts(cfg.net.hosts if cfg.net else None, procs, under_torchrun=False)
    if cfg.resume:  # the one resume check, before any process starts (the strategy supports
        check_resume(cfg)  # checkpoints: resolve() refused it otherwise)
        run_dir = cfg.run_dir()
    else:
        run_dir = prepare_run_dir(cfg)
    tolerate = (lambda r: r < cfg.workers) if strategy_cls.tolerates_lost_workers else None
    limit = timeout_s if timeout_s is not None else 24 * 3600.0
    env = {"TANDEM_THREADS": str(cfg.threads_per_worker)}
    # Pickled bytes: tensors are copied, not shared through multiprocessing's machinery (which
    # would leave shared-memory handles and semaphores to clean up); cloudpickle sends functions
    # defined in a script, `python -c` or a notebook (__main__) by value.
    payload = cloudpickle.dumps(workload) if workload is not None else None
    if workload is not None:
        save_model_factory(run_dir, workload.model_fn)
    results = spawn(worker.main, procs, cfg.model_dump(mode="json"), payload, return_results,
                    timeout_s=limit, addr=cfg.master_addr, env=env, tolerate_death=tolerate,
                    failure_grace_s=cfg.timeout_s + 15.0)  # survivors' waits end and report
    lost = [r for r, res in enumerate(results) if res is None]
    results = [res if res is not None else {"lost": True} for res in results]
    summary = finalize_run(run_dir, cfg.model_dump(mode="json"),
                           target_accuracy=cfg.target_accuracy,
                           extra={"results": [{k: v for k, v in r.items() if k != "params"}
                                              for r in results],
                                  "skipped_steps": sum(int(r.get("skipped_steps", 0))
                                                       for r in results),
                                  "lost_ranks": lost, "preflight": checked.report})
    if return_results:
        summary = dict(summary, results=results)
    return summary


def _name_object_workload(cfg: RunConfig, workload: Workload) -> RunConfig:
    """Record a workload passed as an object under its own name, never the config's default
    (``digits``): a re-run from ``config.yaml`` must not silently train something else. A name
    that is registered or an import path is kept (the user gave it); anything else is refused
    by the resolve step on a re-run, with the advice to name the job by import path."""
    from tandem.workloads.base import WORKLOADS

    name = workload.name
    if name in WORKLOADS:
        name = f"{name}-object"
    data = cfg.model_dump(mode="json")
    data["workload"]["name"] = name
    return RunConfig.model_validate(data)
