"""Strategies: how workers synchronise. Each file one strategy, registered by name.

Every module in this package is imported here, so a new strategy is one file with ``@register``.
"""

import importlib
import pkgutil

from tandem.strategies.registry import STRATEGIES, register

_SUPPORT = {"base", "registry", "training", "bsp_roles", "bsp_worker", "ps_server", "ps_worker",
            "sharding", "gossip_data", "pipeline_lanes", "overlap"}
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SUPPORT and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["STRATEGIES", "register"]
