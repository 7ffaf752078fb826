"""The rendezvous store: hosted by Tandem's launcher, by torchrun's agent, or by rank 0.

The store carries the process-group handshake, heartbeats and ``dead/<rank>`` marks (see
:mod:`.liveness`). It binds to 127.0.0.1 unless an address is given: ``torch.distributed`` has no
authentication, so it belongs on a trusted network only.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist


def host_store(addr: str, world: int, timeout_s: float = 300.0) -> Any:
    """Host a store on a free port (the OS picks it: no race); ``.port`` tells which."""
    return dist.TCPStore(addr, 0, world + 1, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def store_from_env(rank: int, world: int, timeout_s: float) -> Any:
    """Connect to the store the launcher (or torchrun) started, or host it on rank 0."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    hosted = os.environ.get("TANDEM_STORE_HOSTED") == "1"
    agent = hosted or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(addr, port, world, is_master=(not agent and rank == 0),
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    if hosted:
        return base
    # torchrun restarts reuse the agent's store: keep each attempt's keys apart.
    return dist.PrefixStore(f"tandem/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


def mark_dead(store: Any, rank: int, why: str) -> None:
    store.set(f"live/dead/{rank}", why)
