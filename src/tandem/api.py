"""The Python API: ``tandem.train(config)`` for whole runs, with bundled or your own workloads.

Example with your own model and data (see ``examples/own_model.py``)::

    import tandem
    work = tandem.Workload.custom(model_fn=make_net, train=train_ds, test=test_ds)
    summary = tandem.train({"strategy": "allreduce", "codec": "topk", "workers": 4,
                            "steps": 200}, workload=work)

``model_fn`` must be importable by the worker processes (a module-level function, not a lambda),
because workers are separate processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tandem.config import RunConfig
from tandem.job import prepare_run_dir, run_job
from tandem.resolve import load_config
from tandem.trainer.final_model import load_model
from tandem.workloads.base import Workload

__all__ = ["load_config", "load_model", "prepare_run_dir", "train"]


def _as_config(config: RunConfig | dict[str, Any] | str | Path) -> RunConfig:
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_config(path=config)
    return load_config(config)


def train(config: RunConfig | dict[str, Any] | str | Path, *, workload: Workload | None = None,
          return_results: bool = False, timeout_s: float | None = None) -> dict[str, Any]:
    """Run a whole job with the local launcher and return its summary (``summary.json``).

    ``return_results=True`` adds ``results``: each process's final figures and parameters.
    """
    return run_job(_as_config(config), workload=workload, return_results=return_results,
                   timeout_s=timeout_s)
