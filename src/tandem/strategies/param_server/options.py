"""Options of ``param_server`` (``--strategy-opt key=value``); see the package docstring for
what each mode does and docs/param_server.md for tuning."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tandem.strategies.base import StrategyOptions

#: pull codecs that send the whole model (as today), not its change with error feedback
WHOLE_MODEL_PULLS = ("dense", "fp16")


class ParamServerOptions(StrategyOptions):
    """Options of ``param_server`` (``--strategy-opt key=value``)."""

    mode: Literal["sync", "ssp", "async", "candidate"] = "candidate"
    merge: Literal["overwrite", "delay-corrected", "compensated"] = "delay-corrected"
    servers: int | None = Field(default=None, ge=1, description="parameter server processes "
                                "(default: 1 under the local launcher, one per node under "
                                "torchrun)")
    server_ranks: list[int] | None = Field(default=None, description="torchrun: the global "
                                           "ranks that serve (default: the last local rank of "
                                           "each node)")
    local_step: Literal["auto", "sgd", "optimizer"] = Field(
        default="auto", description="candidate: a local step is sgd (theta - lr*g; workers "
        "push gradients, the servers' optimizer applies them) or optimizer (the run's optimizer "
        "on the worker; workers push their parameter change, the servers average it); auto: "
        "sgd when the optimizer is SGD, else optimizer")
    cap: int | Literal["auto"] = Field(default="auto", description="candidate: most steps "
                                       "between merges; auto: about round trip / compute, "
                                       "at most max_staleness")
    max_staleness: int = Field(default=64, ge=1, description="cap=auto: the most local steps "
                               "between merges")
    staleness: int = Field(default=3, ge=0, description="ssp: bound s in pushes")
    pull: str = Field(default="dense", description="pull codec: dense or fp16 (the whole "
                      "model), or any self-contained codec (the model's change since the "
                      "worker's last pull, error feedback on the server)")
    pull_options: dict[str, Any] = Field(default_factory=dict,
                                         description="options of the pull codec")
    min_workers: int | None = Field(default=None, ge=1,
                                    description="go on while this many workers live (default all)")
    compensation: float = Field(default=0.5, ge=0, description="compensated: lambda")

    @field_validator("cap")
    @classmethod
    def _cap_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("cap must be auto or an integer >= 1")
        return v


def local_step_of(opts: ParamServerOptions, spec: Any) -> str:
    """The candidate's local step as run: ``sgd`` or ``optimizer`` (``auto`` resolved).

    ``sgd`` is the spec's theta - lr*g: the workers push gradients and the servers' optimizer
    applies the round's mean, so a pushed sum of k gradients is *one* step of that optimizer.
    For SGD that equals k local steps; for Adam-like optimizers, which normalise a step's size,
    it is about one step's progress for k gradients, and the local SGD steps use a rate meant
    for Adam. ``optimizer`` runs the run's own optimizer (its state, clip and schedule) on each
    worker and pushes the parameter change, which the servers average; with plain SGD the two
    compute the same model. Every mode but ``candidate`` pushes gradients (``sgd``).
    """
    if opts.mode != "candidate":
        return "sgd"
    if opts.local_step != "auto":
        return opts.local_step
    return "sgd" if spec.optimizer_name == "sgd" else "optimizer"
