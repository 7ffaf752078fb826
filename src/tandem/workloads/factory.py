"""Your own workload by import path: ``package.module:function``.

``function(**options)`` returns a :class:`~tandem.workloads.base.Workload` (it also gets
``seed=`` when its signature has a ``seed`` parameter). Naming the job by import path is what
lets the run record re-run it: ``config.yaml`` holds the path and the options, so
``tandem train --config runs/X/config.yaml`` trains the same job, on the CLI, in YAML, in
``tandem sweep`` and under ``torchrun`` alike. The module must be importable where the workers
run (installed, or on ``PYTHONPATH``; the current directory is on the path of ``tandem``'s own
workers).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from tandem.errors import ConfigError, DataError


def load_factory(path: str) -> Callable[..., Any]:
    """The function ``package.module:function`` names; ConfigError saying what is wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"workload.name: {path!r} is not package.module:function")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # the user's working directory, as `python -m` would
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"workload.name: cannot import {module_name!r} for {path!r} ({err}); "
                          "install it or add its folder to PYTHONPATH") from None
    fn: Any = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"workload.name: {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ConfigError(f"workload.name: {path!r} is not a function")
    return fn


def check_factory_options(path: str, options: dict[str, Any]) -> None:
    """Refuse options the factory does not take (before any worker starts)."""
    fn = load_factory(path)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    kwargs = dict(options)
    if "seed" in sig.parameters:
        kwargs["seed"] = 0
    try:
        sig.bind(**kwargs)
    except TypeError as err:
        takes = [n for n in sig.parameters if n != "seed"]
        raise ConfigError(f"workload.options: {path} does not take {sorted(options)} ({err}); "
                          f"it takes {takes}") from None


def build_from_factory(path: str, options: dict[str, Any], seed: int) -> Any:
    """Call the factory; it must return a Workload."""
    from tandem.workloads.base import Workload

    fn = load_factory(path)
    kwargs = dict(options)
    try:
        if "seed" in inspect.signature(fn).parameters:
            kwargs["seed"] = seed
    except (TypeError, ValueError):
        pass
    work = fn(**kwargs)
    if not isinstance(work, Workload):
        raise DataError(f"workload factory {path} returned {type(work).__name__}, not a "
                        "tandem.Workload (build one with tandem.Workload.custom(...))")
    return work
