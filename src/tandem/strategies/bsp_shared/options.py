"""Options of ``bsp_shared`` (``--strategy-opt key=value``); the package docstring explains
each one and how to tune it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tandem.strategies.base import StrategyOptions


class BspSharedOptions(StrategyOptions):
    machines: int = Field(default=1, ge=1)
    split: list[int] | None = None
    period_s: float = Field(default=0.05, gt=0)
    grads_per_superstep: int | None = Field(default=None, ge=1)
    normalize: Literal["mean", "sum"] = "mean"
    max_staleness: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _split(self) -> BspSharedOptions:
        if self.split is not None:
            if len(self.split) != self.machines and self.machines != 1:
                raise ValueError(f"split {self.split} names {len(self.split)} machines but "
                                 f"machines={self.machines}")
            if any(n < 1 for n in self.split):
                raise ValueError(f"split {self.split}: every machine needs at least one worker")
            self.machines = len(self.split)
        return self
