"""Options of ``bsp_shared`` (``--strategy-opt key=value``; the package docstring explains each
one and how to tune it) and what an agent runs with once they are resolved."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class AgentConfig:
    """How an agent runs its supersteps (the strategy's options, resolved)."""

    budget: int                          # stop once this many gradients were applied, all machines
    period_s: float = 0.05               # superstep length (time mode)
    grads_per_superstep: int | None = None  # count mode: gradients per superstep, all machines
    share: float = 1.0                   # this machine's fraction of the workers (count mode)
    normalize: str = "mean"              # "mean": sum(G)/sum(c); "sum": sum(G)
    eval_every_grads: int = 0            # evaluate each time this many more gradients applied
    stall_timeout_s: float = 60.0
    poll_s: float = 0.0005
    worker_ids: list[int] = field(default_factory=list)  # global worker index of each local one
    steps_per_worker: int | None = None  # set: recompute the budget when workers die
    worker_ranks: list[int] = field(default_factory=list)  # transport rank of each local worker
    liveness_every_s: float = 0.1        # how often to ask the store who died (a round trip each)
    checkpoint_every: int = 0            # supersteps between checkpoints (0: none)
