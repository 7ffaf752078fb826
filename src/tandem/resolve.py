"""Resolve a run's configuration against the registries, before any worker starts.

:mod:`tandem.config` checks the shape of values; this step checks what only the plugins know:
that the strategy, codec and workload exist, that their options are valid, and that they go
together (a strategy that moves no codec messages refuses a codec other than ``dense``; gossip
needs codecs a peer decodes alone; checkpoints need a strategy that writes them). The API, the
sweep and the worker entry under torchrun call :func:`resolve`, so a bad combination is refused
with a :class:`~tandem.errors.ConfigError` naming the field, never by a worker's traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from tandem import config as config_mod
from tandem.codecs.base import CODECS, Codec
from tandem.config import RunConfig
from tandem.errors import ConfigError
from tandem.strategies.base import STRATEGIES, Strategy
from tandem.workloads.base import WORKLOADS, parse_options
from tandem.workloads.factory import check_factory_options


@dataclass(frozen=True)
class Resolved:
    """A run's configuration with its plugins looked up and their options validated."""

    cfg: RunConfig
    strategy: type[Strategy]
    strategy_options: BaseModel
    codec: type[Codec]
    codec_options: BaseModel


def _options(kind: str, name: str, model: type[BaseModel], options: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(options)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: "
            f"{e['msg'].removeprefix('Value error, ')}" for e in err.errors())
        raise ConfigError(f"invalid configuration: {kind}: {name} option {problems}") from None


def check_workload(cfg: RunConfig) -> None:
    """The workload is registered (with valid options) or an importable factory that takes
    the options given."""
    name = cfg.workload.name
    if cfg.workload.is_factory:
        check_factory_options(name, cfg.workload.options)
        return
    if name not in WORKLOADS:
        raise ConfigError(f"invalid configuration: workload.name: unknown workload {name!r}; "
                          f"choose one of {WORKLOADS.names()}, or name your own by import "
                          "path (package.module:function)")
    parse_options(WORKLOADS[name].options, cfg.workload.options, name)


def resolve(cfg: RunConfig, *, object_workload: bool = False) -> Resolved:
    """Look up and validate the run's plugins; raise ConfigError naming the field otherwise.
    ``object_workload``: the workload comes as an object (``tandem.train(workload=...)``), not
    from the config's name."""
    try:
        strategy = STRATEGIES[cfg.strategy.name]
    except ConfigError as err:
        raise ConfigError(f"invalid configuration: strategy: {err}") from None
    try:
        codec = CODECS[cfg.codec.name]
    except ConfigError as err:
        raise ConfigError(f"invalid configuration: codec: {err}") from None
    sopts = _options("strategy", cfg.strategy.name, strategy.Options, cfg.strategy.options)
    copts = _options("codec", cfg.codec.name, codec.Options, cfg.codec.options)
    if not object_workload:
        check_workload(cfg)
    if (cfg.checkpoint_every or cfg.resume) and not strategy.supports_checkpoints:
        ok = sorted(n for n, c in STRATEGIES.items() if c.supports_checkpoints)
        raise ConfigError(f"invalid configuration: checkpoint_every/resume: strategy "
                          f"{strategy.name!r} does not write checkpoints yet; strategies that "
                          f"do: {ok}")
    if strategy.exact_exchange and codec.name != "dense":
        ok = sorted(n for n, c in STRATEGIES.items() if not c.exact_exchange)
        raise ConfigError(f"invalid configuration: codec: {codec.name!r}: strategy "
                          f"{strategy.name!r} uses no codec ({strategy.exact_exchange}); use "
                          f"codec 'dense' with it, or a strategy that encodes gradients: {ok}")
    if strategy.peer_codes and not codec.self_contained:
        ok = sorted(n for n, c in CODECS.items() if c.self_contained)
        raise ConfigError(f"invalid configuration: codec: {codec.name!r}: strategy "
                          f"{strategy.name!r} sends each peer's code to its neighbours, who "
                          "decode it alone; this codec needs a collective across all workers. "
                          f"Codecs that work here: {ok}")
    strategy.check(cfg, sopts)
    return Resolved(cfg, strategy, sopts, codec, copts)


def load_config(data: dict[str, Any] | None = None, path: str | Path | None = None,
                **overrides: Any) -> RunConfig:
    """:func:`tandem.config.load_config`, then :func:`resolve`: a config that will run."""
    cfg = config_mod.load_config(data, path=path, **overrides)
    resolve(cfg)
    return cfg
