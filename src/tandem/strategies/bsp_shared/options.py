"""Options of ``bsp_shared`` (``--strategy-opt key=value``); the package docstring explains
each one and how to tune it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tandem.strategies.base import StrategyOptions


class BspSharedOptions(StrategyOptions):
    machines: int = Field(default=1, ge=1, description="emulated machines under the local "
                          "launcher (torchrun: one per node)")
    split: list[int] | None = Field(default=None, description="workers per machine, e.g. "
                                    "[1,3]; must sum to workers")
    period_s: float = Field(default=0.05, gt=0, description="superstep length in seconds: "
                            "shorter = fresher models, more messages")
    grads_per_superstep: int | None = Field(default=None, ge=1, description="end a superstep "
                                            "after this many gradients instead of by time")
    normalize: Literal["mean", "sum"] = Field("mean", description="mean: divide the summed "
                                              "gradients by their count; sum: apply the sum")
    max_staleness: int | None = Field(default=None, ge=0, description="drop gradients "
                                      "computed on a model more than this many versions old")

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
