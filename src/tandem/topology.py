"""Communication graphs for decentralized (gossip) training, and their mixing matrices.

A :class:`Topology` is an undirected connected graph on ``n`` peers plus a mixing matrix ``W``:
peer ``i`` replaces its parameters by ``sum_j W[i, j] x_j`` over itself and its neighbours. For the
network average to be preserved and every peer to reach it, ``W`` must be symmetric, doubly
stochastic (rows and columns sum to 1), non-negative and supported on the graph's edges;
:meth:`Topology.check` verifies all of that.

Graphs (``make_topology(name, n)``):

* ``ring``: i <-> i+-1. Degree 2: cheapest per round, slowest mixing (gap ~ 1/n^2).
* ``torus``: a 2-D wrap-around grid, rows x cols with rows the largest divisor of n <= sqrt(n).
  Degree 4; gap ~ 1/n.
* ``exponential``: i <-> i +- 2^k (mod n) for every power of two below n. Degree ~ 2 log2 n,
  gap that hardly depends on n: a good default past ~16 peers.
* ``erdos_renyi``: every edge present with probability ``edge_p`` (default ``2 ln(n)/n``), drawn
  from ``seed`` and redrawn until connected.
* ``complete``: everyone talks to everyone; one round gives the exact average (gap 1).

Weights (``weights=``): ``metropolis`` (Metropolis-Hastings, the default:
``W_ij = 1/(1 + max(deg_i, deg_j))``, works on any graph, needs only the neighbours' degrees) or
``max_degree`` (``W_ij = 1/(1 + max degree)``, uniform, slightly slower mixing on irregular graphs).

Tune: the *spectral gap* ``1 - |lambda_2(W)|`` says how much one gossip round shrinks the
disagreement between peers; consensus error after Q rounds shrinks roughly like ``(1-gap)^(2Q)``.
A small gap (big rings) calls for more gossip rounds per step (``gossip_rounds``) or a better
connected graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tandem.errors import ConfigError

GRAPHS = ("ring", "torus", "exponential", "erdos_renyi", "complete")
WEIGHTS = ("metropolis", "max_degree")


@dataclass(frozen=True)
class Topology:
    """An undirected graph (boolean ``adjacency``, no self loops) and its mixing matrix ``W``."""

    name: str
    adjacency: np.ndarray
    W: np.ndarray

    @property
    def n(self) -> int:
        return int(self.adjacency.shape[0])

    def neighbors(self, i: int) -> list[int]:
        """Peers that ``i`` exchanges parameters with (sorted, ``i`` excluded)."""
        return [int(j) for j in np.flatnonzero(self.adjacency[i])]

    def degree(self, i: int) -> int:
        return int(self.adjacency[i].sum())

    @cached_property
    def spectral_gap(self) -> float:
        """``1 - max(|lambda_2|, |lambda_n|)`` of W: 1 = exact averaging, 0 = no mixing.

        One dense eigen-decomposition (about a second at n = 1024); computed once."""
        if self.n == 1:
            return 1.0
        ev = np.sort(np.abs(np.linalg.eigvalsh(self.W)))[::-1]
        return float(1.0 - ev[1])

    def check(self, atol: float = 1e-9) -> None:
        """Raise ConfigError unless W is symmetric, doubly stochastic, non-negative, on the graph
        and the graph is connected."""
        W, A = self.W, self.adjacency
        if W.shape != (self.n, self.n):
            raise ConfigError(f"mixing matrix has shape {W.shape}, expected {(self.n, self.n)}")
        if not np.allclose(W, W.T, atol=atol):
            raise ConfigError(f"{self.name}: mixing matrix is not symmetric")
        if (W < -atol).any():
            raise ConfigError(f"{self.name}: mixing matrix has negative weights")
        if not (np.allclose(W.sum(0), 1, atol=atol) and np.allclose(W.sum(1), 1, atol=atol)):
            raise ConfigError(f"{self.name}: mixing matrix is not doubly stochastic")
        off = ~np.eye(self.n, dtype=bool) & ~A
        if (np.abs(W[off]) > atol).any():
            raise ConfigError(f"{self.name}: mixing weight on a pair that is not an edge")
        if not is_connected(A):
            raise ConfigError(f"{self.name}: graph is not connected; gossip cannot reach consensus")

    def describe(self) -> dict[str, object]:
        degs = self.adjacency.sum(1)
        return {"topology": self.name, "peers": self.n, "edges": int(self.adjacency.sum() // 2),
                "min_degree": int(degs.min()), "max_degree": int(degs.max()),
                "spectral_gap": round(self.spectral_gap, 6)}


def is_connected(adjacency: np.ndarray) -> bool:
    """Breadth-first search from peer 0."""
    n = adjacency.shape[0]
    seen = np.zeros(n, dtype=bool)
    seen[0] = True
    frontier = [0]
    while frontier:
        nxt = np.flatnonzero(adjacency[frontier].any(0) & ~seen)
        seen[nxt] = True
        frontier = nxt.tolist()
    return bool(seen.all())


def _ring(n: int) -> np.ndarray:
    a = np.zeros((n, n), dtype=bool)
    for i in range(n):
        for j in ((i + 1) % n, (i - 1) % n):
            if j != i:
                a[i, j] = True
    return a


def _torus(n: int) -> np.ndarray:
    rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0)
    cols = n // rows
    a = np.zeros((n, n), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for j in (((r + 1) % rows) * cols + c, ((r - 1) % rows) * cols + c,
                      r * cols + (c + 1) % cols, r * cols + (c - 1) % cols):
                if j != i:
                    a[i, j] = True
    return a


def _exponential(n: int) -> np.ndarray:
    a = np.zeros((n, n), dtype=bool)
    k = 1
    while k < n:
        for i in range(n):
            for j in ((i + k) % n, (i - k) % n):
                if j != i:
                    a[i, j] = True
        k *= 2
    return a


def _erdos_renyi(n: int, edge_p: float | None, seed: int, tries: int = 1000) -> np.ndarray:
    p = edge_p if edge_p is not None else min(1.0, 2.0 * math.log(max(n, 2)) / n)
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"erdos_renyi: edge_p must lie in (0, 1], got {p}")
    rng = np.random.default_rng([seed, n, 77])
    for _ in range(tries):
        upper = np.triu(rng.random((n, n)) < p, 1)
        a = upper | upper.T
        if is_connected(a):
            return a
    raise ConfigError(f"erdos_renyi: no connected graph in {tries} draws with edge_p={p}; "
                      "raise edge_p (connectivity needs about ln(n)/n)")


def _complete(n: int) -> np.ndarray:
    return ~np.eye(n, dtype=bool)


def mixing_weights(adjacency: np.ndarray, weights: str = "metropolis") -> np.ndarray:
    """Symmetric doubly-stochastic W supported on ``adjacency`` (plus the diagonal)."""
    n = adjacency.shape[0]
    deg = adjacency.sum(1)
    if weights == "metropolis":
        W = np.where(adjacency, 1.0 / (1.0 + np.maximum.outer(deg, deg)), 0.0)
    elif weights == "max_degree":
        W = np.where(adjacency, 1.0 / (1.0 + deg.max(initial=0)), 0.0)
    else:
        raise ConfigError(f"unknown mixing weights {weights!r}; choose one of {list(WEIGHTS)}")
    W[np.arange(n), np.arange(n)] = 1.0 - W.sum(1)
    return W


def make_topology(name: str, n: int, *, weights: str = "metropolis", seed: int = 0,
                  edge_p: float | None = None) -> Topology:
    """Build and check the graph ``name`` on ``n`` peers with the given mixing weights."""
    if n < 1:
        raise ConfigError(f"a topology needs at least one peer, got {n}")
    builders = {"ring": _ring, "torus": _torus, "exponential": _exponential, "complete": _complete}
    if name == "erdos_renyi":
        adj = _erdos_renyi(n, edge_p, seed) if n > 1 else np.zeros((1, 1), dtype=bool)
    elif name in builders:
        adj = builders[name](n)
    else:
        raise ConfigError(f"unknown topology {name!r}; choose one of {list(GRAPHS)}")
    topo = Topology(name, adj, mixing_weights(adj, weights))
    topo.check()
    return topo


__all__ = ["GRAPHS", "WEIGHTS", "Topology", "is_connected", "make_topology", "mixing_weights"]
