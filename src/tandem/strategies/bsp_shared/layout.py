"""Who is who in a ``bsp_shared`` job: each machine's agent and workers, under the local
launcher (workers first, then the agents) or under torchrun (one node = one machine)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tandem.config import RunConfig
from tandem.errors import ConfigError
from tandem.strategies.bsp_shared.options import BspSharedOptions


@dataclass(frozen=True)
class Layout:
    """Who is who: each machine's agent rank and worker ranks, and each rank's worker index."""

    agent_ranks: list[int]
    worker_ranks: list[list[int]]
    worker_index: dict[int, int]

    @property
    def machines(self) -> int:
        return len(self.agent_ranks)

    def role(self, rank: int) -> tuple[str, int, int]:
        """``("agent", machine, -1)`` or ``("worker", machine, local_index)``."""
        for m, a in enumerate(self.agent_ranks):
            if a == rank:
                return "agent", m, -1
            if rank in self.worker_ranks[m]:
                return "worker", m, self.worker_ranks[m].index(rank)
        raise ConfigError(f"rank {rank} has no role in bsp_shared's layout {self}")


def machine_split(workers: int, opts: BspSharedOptions) -> list[int]:
    if opts.split is not None:
        if sum(opts.split) != workers:
            raise ConfigError(f"bsp_shared: split {opts.split} sums to {sum(opts.split)}, "
                              f"not workers={workers}")
        return list(opts.split)
    if opts.machines > workers:
        raise ConfigError(f"bsp_shared: machines={opts.machines} > workers={workers}; every "
                          "machine needs at least one worker")
    base, extra = divmod(workers, opts.machines)
    return [base + (m < extra) for m in range(opts.machines)]


def local_layout(workers: int, opts: BspSharedOptions) -> Layout:
    """The local launcher's layout: workers first (rank = worker index), then the agents."""
    sizes = machine_split(workers, opts)
    worker_ranks, r = [], 0
    for n in sizes:
        worker_ranks.append(list(range(r, r + n)))
        r += n
    return Layout([workers + m for m in range(len(sizes))], worker_ranks,
                  {w: w for w in range(workers)})


def torchrun_layout(workers: int, world: int, local_world: int) -> Layout:
    """One node = one machine: local rank 0 is the agent, the others the workers."""
    if local_world < 2 or world % local_world:
        raise ConfigError(f"bsp_shared under torchrun needs >= 2 processes per node and equal "
                          f"nodes (world {world}, per node {local_world})")
    nodes = world // local_world
    if nodes * (local_world - 1) != workers:
        raise ConfigError(f"bsp_shared: workers={workers} but torchrun starts {nodes} node(s) x "
                          f"{local_world - 1} worker(s) (+1 agent each); set workers="
                          f"{nodes * (local_world - 1)} or --nproc-per-node={workers // nodes + 1}")
    agents = [n * local_world for n in range(nodes)]
    wranks = [[n * local_world + i for i in range(1, local_world)] for n in range(nodes)]
    index = {r: n * (local_world - 1) + i for n, rs in enumerate(wranks) for i, r in enumerate(rs)}
    return Layout(agents, wranks, index)


def layout_for(cfg: RunConfig, opts: BspSharedOptions, world: int) -> Layout:
    if os.environ.get("TANDEM_STORE_HOSTED") != "1" and "GROUP_RANK" in os.environ:
        return torchrun_layout(cfg.workers, world, int(os.environ["LOCAL_WORLD_SIZE"]))
    layout = local_layout(cfg.workers, opts)
    if world != cfg.workers + layout.machines:
        raise ConfigError(f"bsp_shared needs workers + machines = "
                          f"{cfg.workers + layout.machines} processes, got {world}")
    return layout
