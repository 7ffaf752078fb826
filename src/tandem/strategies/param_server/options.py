"""Options of ``param_server`` (``--strategy-opt key=value``); see the package docstring for
what each mode does and docs/param_server.md for tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tandem.strategies.base import StrategyOptions


class ParamServerOptions(StrategyOptions):
    """Options of ``param_server`` (``--strategy-opt key=value``)."""

    mode: Literal["sync", "ssp", "async", "candidate"] = "candidate"
    merge: Literal["overwrite", "delay-corrected", "compensated"] = "delay-corrected"
    servers: int = Field(default=1, ge=1, description="parameter server processes")
    cap: int = Field(default=32, ge=1, description="candidate: most steps between merges")
    staleness: int = Field(default=3, ge=0, description="ssp: bound s in pushes")
    pull: Literal["dense", "fp16"] = "dense"
    min_workers: int | None = Field(default=None, ge=1,
                                    description="go on while this many workers live (default all)")
    compensation: float = Field(default=0.5, ge=0, description="compensated: lambda")
