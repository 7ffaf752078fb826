"""Tandem: distributed deep-learning training that sends far fewer bytes and never waits for the
slowest machine. See README.md for the commands and docs/ for each method."""

from tandem.config import RunConfig
from tandem.errors import ConfigError, PeerTimeout, TandemError, WorkerFailed

__version__ = "0.1.0"
__all__ = ["Callback", "ConfigError", "PeerTimeout", "RunConfig", "TandemError", "WorkerFailed",
           "Workload", "load_config", "load_model", "metrics", "recipes", "train"]


def __getattr__(name: str):  # lazy: `import tandem` stays cheap
    if name in ("train", "load_config", "load_model"):
        from tandem import api

        return getattr(api, name)
    if name in ("Workload", "Callback"):
        from tandem.workloads import base

        return getattr(base, name)
    if name in ("metrics", "recipes"):  # tandem.metrics.accuracy, tandem.recipes.adamw_groups
        import importlib

        return importlib.import_module(f"tandem.workloads.{name}")
    raise AttributeError(name)
