"""Strategies: how workers synchronise. Each file one strategy, registered by name."""

from tandem.strategies.registry import STRATEGIES, register

from tandem.strategies import allreduce, local  # noqa: E402,F401  (registers)

__all__ = ["STRATEGIES", "register"]
