"""Which ranks of a ``param_server`` job serve and which train, on which node.

Under the local launcher (one machine): workers are ranks ``0 .. workers-1`` and the servers
follow them, as always. Under torchrun (``GROUP_RANK``, ``LOCAL_WORLD_SIZE``, ``WORLD_SIZE`` set,
and no ``TANDEM_STORE_HOSTED=1``) a single server would put every pull and push of the job on one
node's link, so by default every node gets one server: the last local rank of each node serves a
balanced shard of the parameters (:mod:`.sharding`), and every other rank is a worker.
``servers=S`` asks for another number (spread over the nodes round robin, from the last local
rank down); ``server_ranks=[...]`` names the global ranks that serve. Either way ``workers`` in the
config must equal ``world - servers``; a mismatch is refused before any process joins, with the
numbers that would fit.

Worker index i (its data shard, its slow-worker and crash faults) is the i-th worker rank in
rank order; server index s holds shard s. Under torchrun global ranks are contiguous per node
(rank = node * processes per node + local rank), which is how torchrun assigns them to equal nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tandem.errors import ConfigError


@dataclass(frozen=True)
class Placement:
    """Worker and server ranks (each in index order) and the node of every rank."""

    worker_ranks: list[int]
    server_ranks: list[int]
    node_of: list[int]

    @property
    def world(self) -> int:
        return len(self.node_of)

    def is_server(self, rank: int) -> bool:
        return rank in self.server_ranks

    def worker_index(self, rank: int) -> int:
        return self.worker_ranks.index(rank)

    def server_index(self, rank: int) -> int:
        return self.server_ranks.index(rank)

    def describe(self) -> dict[str, Any]:
        """The info record: which ranks serve, on which node."""
        return {"ps_server_ranks": list(self.server_ranks),
                "ps_server_nodes": [self.node_of[r] for r in self.server_ranks],
                "ps_worker_ranks": list(self.worker_ranks),
                "ps_nodes": len(set(self.node_of))}


def under_torchrun() -> bool:
    """True in a process torchrun started (not Tandem's own launcher)."""
    return os.environ.get("TANDEM_STORE_HOSTED") != "1" and "GROUP_RANK" in os.environ


def local_servers(opts: Any) -> int:
    """Servers under the local launcher (``processes = workers + this``)."""
    if opts.server_ranks is not None:
        return len(opts.server_ranks)
    return opts.servers or 1


def local_placement(workers: int, opts: Any) -> Placement:
    """Workers first, then the servers (the local launcher tolerates lost ranks < workers)."""
    servers = local_servers(opts)
    tail = list(range(workers, workers + servers))
    if opts.server_ranks is not None and sorted(opts.server_ranks) != tail:
        raise ConfigError(f"strategy.options.server_ranks: {opts.server_ranks}: under tandem "
                          f"train the servers are the ranks after the workers ({tail}); "
                          "server_ranks places servers under torchrun")
    if opts.servers is not None and opts.servers != servers:
        raise ConfigError(f"strategy.options: servers={opts.servers} but server_ranks names "
                          f"{servers}; give one of them")
    return Placement(list(range(workers)), tail, [0] * (workers + servers))


def torchrun_placement(workers: int, opts: Any, world: int, local_world: int) -> Placement:
    """One server per node by default (see the module docstring); refuses what cannot fit."""
    if local_world < 1 or world % local_world:
        raise ConfigError(f"param_server under torchrun needs equal nodes (world {world}, "
                          f"{local_world} per node); name the servers with "
                          "--strategy-opt server_ranks=[...]" if opts.server_ranks is None
                          else f"param_server: world {world} is not a multiple of {local_world}")
    nodes = world // local_world
    node_of = [r // local_world for r in range(world)]
    if opts.server_ranks is not None:
        ranks = list(opts.server_ranks)
        bad = [r for r in ranks if not 0 <= r < world]
        if bad or len(set(ranks)) != len(ranks) or not ranks:
            raise ConfigError(f"strategy.options.server_ranks: {ranks}: give distinct ranks in "
                              f"0..{world - 1}")
        if opts.servers is not None and opts.servers != len(ranks):
            raise ConfigError(f"strategy.options: servers={opts.servers} but server_ranks names "
                              f"{len(ranks)}; give one of them")
    else:
        servers = opts.servers or nodes
        if servers > world - 1:
            raise ConfigError(f"strategy.options.servers={servers}: torchrun starts {world} "
                              "processes; leave at least one worker")
        ranks = [(s % nodes) * local_world + local_world - 1 - s // nodes
                 for s in range(servers)]
    ranks = sorted(ranks)
    if workers != world - len(ranks):
        raise ConfigError(
            f"param_server under torchrun: workers={workers} in the config, but torchrun starts "
            f"{world} processes ({nodes} node(s) x {local_world}) of which {len(ranks)} serve "
            f"(ranks {ranks}); set workers: {world - len(ranks)} in the config, or start "
            f"{workers + len(ranks)} processes in all")
    return Placement([r for r in range(world) if r not in ranks], ranks, node_of)


def placement_for(workers: int, opts: Any, world: int | None = None) -> Placement:
    """The placement of this job: torchrun's (from the environment) or the local launcher's."""
    if under_torchrun():
        env_world = int(os.environ.get("WORLD_SIZE", world or 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env_world))
        place = torchrun_placement(workers, opts, world or env_world, local_world)
        if "RANK" in os.environ:  # ranks must be contiguous per node for node_of to hold
            want = int(os.environ["GROUP_RANK"]) * local_world + \
                int(os.environ.get("LOCAL_RANK", "0"))
            if int(os.environ["RANK"]) != want:
                raise ConfigError(f"param_server under torchrun: rank {os.environ['RANK']} is "
                                  f"not node {os.environ['GROUP_RANK']} x {local_world} + local "
                                  "rank; start equal nodes (the same --nproc-per-node)")
        return place
    place = local_placement(workers, opts)
    if world is not None and world != place.world:
        raise ConfigError(f"param_server needs {workers} workers + {len(place.server_ranks)} "
                          f"servers = {place.world} processes, got {world}")
    return place
