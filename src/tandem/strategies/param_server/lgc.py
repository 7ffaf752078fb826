"""LGC-PS on the parameter server (placeholder while being built)."""

from __future__ import annotations

from typing import Any

from tandem.codecs.base import CODECS
from tandem.errors import ConfigError
from tandem.strategies.param_server.placement import (
    local_servers,
    placement_for,
    under_torchrun,
)


def check_codec(cfg: Any, options: Any) -> None:
    """Refuse a push codec the parameter server cannot run as documented."""
    name = cfg.codec.name
    cls = CODECS[name]
    if name == "lgc":
        o = cls.Options.model_validate(cfg.codec.options)
        if o.variant != "ps":
            raise ConfigError("codec: 'lgc' variant=rar all-reduces the workers' latents, a "
                              "collective a parameter server does not run; on param_server use "
                              "--codec-opt variant=ps (LGC-PS: the server decodes), or run rar "
                              "under --strategy allreduce")
        if options.mode not in ("sync", "candidate"):
            raise ConfigError(f"codec: 'lgc' (LGC-PS) decodes a round of pushes at once (the "
                              f"leader's latent with every worker's innovation); mode="
                              f"{options.mode} applies pushes one by one: use mode=sync or "
                              "mode=candidate")
        servers = len(placement_for(cfg.workers, options).server_ranks) if under_torchrun() \
            else local_servers(options)
        if servers != 1:
            raise ConfigError(f"codec: 'lgc' (LGC-PS) trains one autoencoder over the whole "
                              f"top-k support on one server; got {servers} servers: use "
                              "servers=1")
        if o.momentum:
            raise ConfigError("codec.options.momentum: LGC-PS on param_server takes no codec "
                              "momentum; the server's optimizer applies the run's --momentum")
        return
    if not cls.self_contained:
        ok = sorted(n for n, c in CODECS.items() if c.self_contained)
        raise ConfigError(f"codec: {name!r}: its documented exchange needs a collective among "
                          "the workers (PowerSGD all-reduces its factors with a shared Q), but a "
                          "parameter server's push is one worker's message that the server "
                          f"decodes alone; use one of {ok}, lgc with variant=ps, or a "
                          "collective strategy (allreduce, bsp_shared, pipeline)")


class LGCWorkerSide:  # filled in by Part B
    def __init__(self, worker: Any) -> None:
        raise NotImplementedError


class LGCServerSide:  # filled in by Part B
    def __init__(self, server: Any) -> None:
        raise NotImplementedError
