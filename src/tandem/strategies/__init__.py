"""Strategies: how workers synchronise. One file (or one folder per method with several roles)
per strategy, registered by name in :data:`STRATEGIES` (found without any import line here)."""

from tandem.strategies.base import STRATEGIES, Strategy, StrategyOptions, register

__all__ = ["STRATEGIES", "Strategy", "StrategyOptions", "register"]
