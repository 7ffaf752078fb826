"""Tandem: distributed deep-learning training that sends far fewer bytes and never waits for the
slowest machine. See README.md for the commands and docs/ for each method."""

from tandem.config import RunConfig
from tandem.errors import ConfigError, PeerTimeout, TandemError, WorkerFailed

__version__ = "0.1.0"
__all__ = ["ConfigError", "PeerTimeout", "RunConfig", "TandemError", "WorkerFailed",
           "Workload", "load_config", "train"]


def __getattr__(name: str):  # lazy: `import tandem` stays cheap
    if name in ("train", "load_config"):
        from tandem import api

        return getattr(api, name)
    if name == "Workload":
        from tandem.workloads.base import Workload

        return Workload
    raise AttributeError(name)
