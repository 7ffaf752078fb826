"""Set-up inside a worker process: the transport from the environment the launcher left.

The same code runs under Tandem's launcher (``TANDEM_STORE_HOSTED=1``: the launcher hosts the
store), under ``torchrun`` (``TORCHELASTIC_USE_AGENT_STORE=True``: torchrun's agent hosts it) and
under anything else that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (rank 0 hosts
the store).
"""

from __future__ import annotations

import os

import torch

from tandem.config import NetConfig
from tandem.errors import ConfigError
from tandem.transport.rendezvous import store_from_env
from tandem.transport.transport import Transport, as_net


def env_rank_world() -> tuple[int, int]:
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as missing:
        raise ConfigError(f"environment variable {missing} is not set: start workers with "
                          "`tandem train` or `torchrun`") from None


def transport_from_env(*, net: NetConfig | str | None = None, timeout_s: float = 60.0,
                       seed: int = 0, backend: str = "auto") -> Transport:
    """Join the job described by the environment and return this process's transport.
    ``net``: an emulated link, as a :class:`NetConfig` or a spec string like ``"100mbit:1ms"``
    (checked before joining, so a bad one fails at once on every rank)."""
    net = as_net(net)
    rank, world = env_rank_world()
    store, attempt = store_from_env(rank, world, timeout_s)
    name, device = pick_backend(backend)
    transport = Transport(rank, world, store, backend=name, net=net, timeout_s=timeout_s,
                          seed=seed, device=device)
    transport.attempt = attempt  # > 0: torchrun restarted the job (see store_from_env)
    return transport


def pick_backend(requested: str) -> tuple[str, torch.device]:
    """``auto`` -> NCCL on this process's GPU when CUDA is present, gloo on CPU otherwise."""
    if requested == "nccl" or (requested == "auto" and torch.cuda.is_available()):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return "nccl", torch.device("cuda", local)
    return "gloo", torch.device("cpu")
