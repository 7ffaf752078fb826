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

Lost peers: :meth:`Topology.without` removes dead peers and recomputes the weights on the surviving
subgraph (same ``weights`` rule), keeping rank numbering: a removed peer is isolated with
``W[d, d] = 1`` and ignored by :meth:`~Topology.check`, ``spectral_gap`` and ``describe``. If the
survivors are no longer connected it raises :class:`~tandem.errors.TandemError` (gossip could never
reach consensus again). :func:`fold` is the coordination-free stop-gap the gossip strategy uses
until every survivor has switched: each peer adds its dead neighbours' weights to its own diagonal,
which keeps the survivors' matrix symmetric and doubly stochastic with no agreement needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from tandem.errors import ConfigError, TandemError

GRAPHS = ("ring", "torus", "exponential", "erdos_renyi", "complete")
WEIGHTS = ("metropolis", "max_degree")


@dataclass(frozen=True)
class Topology:
    """An undirected graph (boolean ``adjacency``, no self loops) and its mixing matrix ``W``."""

    name: str
    adjacency: np.ndarray
    W: np.ndarray
    weights: str = "metropolis"
    removed: frozenset[int] = frozenset()

    @property
    def n(self) -> int:
        return int(self.adjacency.shape[0])

    @property
    def alive(self) -> list[int]:
        """Peers not removed by :meth:`without` (all of them for a fresh topology)."""
        return [i for i in range(self.n) if i not in self.removed]

    def without(self, dead: set[int] | frozenset[int]) -> Topology:
        """This graph minus ``dead`` peers (and their edges), weights recomputed on the rest.

        Ranks keep their numbers; a removed peer is isolated with ``W[d, d] = 1``. Raises
        TandemError naming the pieces when the survivors are split (no consensus possible)."""
        gone = frozenset(int(d) for d in dead) | self.removed
        if not gone:
            return self
        if len(gone) >= self.n:
            raise TandemError(f"{self.name}: every peer is gone, nothing left to gossip")
        adj = self.adjacency.copy()
        idx = sorted(gone)
        adj[idx, :] = False
        adj[:, idx] = False
        live = [i for i in range(self.n) if i not in gone]
        parts = components(adj[np.ix_(live, live)])
        if len(parts) > 1:
            pieces = [[live[i] for i in part] for part in parts]
            raise TandemError(
                f"{self.name}: without peer(s) {idx} the surviving graph splits into {pieces}; "
                "gossip cannot reach consensus. Use a better connected topology "
                "(exponential, torus, complete) to survive this many losses.")
        W = mixing_weights(adj, self.weights)
        return Topology(self.name, adj, W, self.weights, gone)

    def neighbors(self, i: int) -> list[int]:
        """Peers that ``i`` exchanges parameters with (sorted, ``i`` excluded)."""
        return [int(j) for j in np.flatnonzero(self.adjacency[i])]

    def degree(self, i: int) -> int:
        return int(self.adjacency[i].sum())

    @cached_property
    def spectral_gap(self) -> float:
        """``1 - max(|lambda_2|, |lambda_n|)`` of W: 1 = exact averaging, 0 = no mixing.

        One dense eigen-decomposition (about a second at n = 1024); computed once."""
        live = self.alive
        if len(live) == 1:
            return 1.0
        ev = np.sort(np.abs(np.linalg.eigvalsh(self.W[np.ix_(live, live)])))[::-1]
        return float(1.0 - ev[1])

    def check(self, atol: float = 1e-9) -> None:
        """Raise ConfigError unless W is symmetric, doubly stochastic, non-negative, on the graph
        and the graph is connected (removed peers excluded)."""
        if self.removed:
            live = self.alive
            Topology(self.name, self.adjacency[np.ix_(live, live)],
                     self.W[np.ix_(live, live)], self.weights).check(atol)
            return
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
        degs = self.adjacency.sum(1)[self.alive]
        out: dict[str, object] = {
            "topology": self.name, "peers": len(self.alive),
            "edges": int(self.adjacency.sum() // 2), "min_degree": int(degs.min()),
            "max_degree": int(degs.max()), "spectral_gap": round(self.spectral_gap, 6)}
        if self.removed:
            out["removed"] = sorted(self.removed)
        return out


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


def components(adjacency: np.ndarray) -> list[list[int]]:
    """Connected components (lists of node indices, in order of their smallest node)."""
    n = adjacency.shape[0]
    label = -np.ones(n, dtype=int)
    out: list[list[int]] = []
    for s in range(n):
        if label[s] >= 0:
            continue
        label[s] = len(out)
        frontier, part = [s], [s]
        while frontier:
            nxt = np.flatnonzero(adjacency[frontier].any(0) & (label < 0))
            label[nxt] = len(out)
            part += nxt.tolist()
            frontier = nxt.tolist()
        out.append(sorted(part))
    return out


def fold(W: np.ndarray, i: int, dead: set[int] | frozenset[int]) -> tuple[float, dict[int, float]]:
    """Row ``i`` of W with the weights of ``dead`` neighbours moved onto the diagonal.

    Returns ``(w_self, {live neighbour: weight})``. Every survivor can do this alone: the
    survivors' folded matrix stays symmetric and doubly stochastic (off-diagonals unchanged)."""
    nbrs = [int(j) for j in np.flatnonzero(W[i]) if j != i]
    w_self = float(W[i, i]) + sum(float(W[i, j]) for j in nbrs if j in dead)
    return w_self, {j: float(W[i, j]) for j in nbrs if j not in dead}


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
    topo = Topology(name, adj, mixing_weights(adj, weights), weights)
    topo.check()
    return topo


#: steps between two reads of the store's death marks (:meth:`PeerView.poll`)
POLL_EVERY = 8


class PeerView:
    """The peers this one still gossips with, and their weights, as peers die.

    Two stages per lost peer ``d``, so that all survivors always mix with the same symmetric,
    doubly-stochastic matrix without a round of agreement on the critical path:

    1. From the moment a survivor learns of ``d`` (a failed exchange with it, a failed collective,
       or the ``dead/<d>`` mark the launcher writes, polled at the start of every step), it
       *folds* ``d``'s weight onto its own diagonal (:func:`fold`). Only ``d``'s
       neighbours' rows change and the off-diagonal weights stay as they were, so the survivors'
       matrix is symmetric and doubly stochastic whoever knows what: no coordination needed.
    2. At an agreed step every survivor switches to Metropolis(-Hastings) weights recomputed on the
       surviving graph (:meth:`Topology.without`), which mixes faster than the folded matrix. The
       step is agreed in the rendezvous store: each survivor that learns of ``d`` proposes
       ``its step + world`` with a compare-and-set on ``gossip/drop/<d>``; the first proposal wins
       and everyone reads it. Neighbours are never more than one step apart, so two survivors are
       at most (surviving diameter <= world - 2) steps apart, and a survivor sees the mark at its
       next poll, at most :data:`POLL_EVERY` steps later: so the proposal is ``its step + world
       + POLL_EVERY``, and each learns of ``d`` before the agreed step.

    A survivor that learns of ``d`` from a failed exchange also writes ``dead/<d>`` (when the
    launcher has not), so peers far from ``d`` learn it too. Remaining asymmetry: in the round in
    which ``d`` dies, a neighbour that had already received ``d``'s value mixes it in while one
    that had not folds; that moves the survivors' average once, by at most ``d``'s weight times
    the disagreement, and SGD then carries on from there. A split surviving graph raises
    :class:`~tandem.errors.TandemError` at once. Cost: one store request every
    :data:`POLL_EVERY` steps (the count of death marks), and one per live peer when it changed.
    It was one per live peer every step: on 4 gossip peers sharing 2 cores, 9 % of a 14 ms step
    (py-spy, the MNIST CNN with top-k 0.1 %).
    """

    def __init__(self, base: Topology, rank: int, liveness: Any | None,
                 recorder: Any | None = None) -> None:
        self.base, self.topo, self.rank = base, base, rank
        self.liveness, self.recorder = liveness, recorder
        self.dead: set[int] = set()
        self.switch_at: dict[int, int] = {}
        self._deaths_seen: int | None = -1  # the store's count of marks when last read

    @property
    def size(self) -> int:
        """Peers in the graph, the dead included (the swap's phases are offsets modulo this)."""
        return self.base.n

    @property
    def alive(self) -> list[int]:
        return [r for r in range(self.base.n) if r not in self.dead]

    def row(self) -> tuple[list[int], float, dict[int, float]]:
        """(live neighbours, own weight, neighbour weights) for this round."""
        w_self, w_nbr = fold(self.topo.W, self.rank, self.dead)
        return sorted(w_nbr), w_self, w_nbr

    def poll(self, step: int) -> None:
        """Start of a step: every :data:`POLL_EVERY` steps learn deaths marked in the store
        (one request for the count of marks, the marks only when it changed), then apply the
        switches due."""
        if self.liveness is not None and step % POLL_EVERY == 0:
            count = self.liveness.deaths()
            if count is None or count != self._deaths_seen:
                self._deaths_seen = count
                marked = self.liveness.dead_ranks([r for r in self.alive if r != self.rank])
                if marked:
                    self.learn(marked, step, why="marked dead")
        due = {d for d, at in self.switch_at.items() if at <= step} - set(self.topo.removed)
        if due:
            self.topo = self.base.without(set(self.topo.removed) | due)
            if self.recorder is not None:
                self.recorder.info(gossip_reweighted=sorted(self.topo.removed), at_step=step,
                                   **{"topology_now": self.topo.describe()})

    def learn(self, ranks: list[int] | set[int], step: int, why: str = "exchange failed") -> None:
        """Drop ``ranks`` (fold now) and agree on the step at which to re-weight without them."""
        new = {int(r) for r in ranks} - self.dead - {self.rank}
        if not new:
            return
        self.base.without(self.dead | new)  # raises TandemError when the survivors split
        self.dead |= new
        for d in sorted(new):
            self.switch_at[d] = self._agree(d, step + self.base.n + POLL_EVERY)
            if self.recorder is not None:
                self.recorder.info(lost_peer=d, at_step=step, how=why,
                                   reweight_at_step=self.switch_at[d])

    def _agree(self, d: int, proposal: int) -> int:
        live = self.liveness
        if live is None:
            return proposal
        live.mark_dead(d, f"stopped answering rank {self.rank}'s gossip", unless_marked=True)
        with live.store_lock:  # the heartbeat thread shares this store client
            won = live.store.compare_set(f"gossip/drop/{d}", "", str(proposal))
        return int(won.decode() if isinstance(won, bytes) else won)


__all__ = ["GRAPHS", "WEIGHTS", "PeerView", "Topology", "components", "fold", "is_connected",
           "make_topology", "mixing_weights"]
