"""Topologies: every graph is connected and its mixing matrix symmetric and doubly stochastic."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.errors import ConfigError
from tandem.topology import (
    GRAPHS,
    POLL_EVERY,
    WEIGHTS,
    PeerView,
    Topology,
    is_connected,
    make_topology,
)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(GRAPHS), n=st.integers(1, 40), weights=st.sampled_from(WEIGHTS),
       seed=st.integers(0, 1000))
def test_mixing_matrix_is_symmetric_doubly_stochastic_on_the_graph(name, n, weights, seed):
    t = make_topology(name, n, weights=weights, seed=seed)
    W, A = t.W, t.adjacency
    np.testing.assert_allclose(W, W.T, atol=1e-12)
    np.testing.assert_allclose(W.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.sum(1), 1.0, atol=1e-12)
    assert (W >= 0).all()
    assert not A.diagonal().any() and (A == A.T).all()
    assert (W[~A & ~np.eye(n, dtype=bool)] == 0).all()  # weights only on edges
    assert is_connected(A)
    for i in range(n):
        assert all(i in t.neighbors(j) for j in t.neighbors(i))
    # the average is a fixed point and one round never increases disagreement
    x = np.random.default_rng(seed).standard_normal((n, 3))
    y = W @ x
    np.testing.assert_allclose(y.mean(0), x.mean(0), atol=1e-12)
    assert ((y - y.mean(0)) ** 2).sum() <= ((x - x.mean(0)) ** 2).sum() + 1e-12
    assert 0.0 <= t.spectral_gap <= 1.0 + 1e-12


def test_degrees_and_gaps_of_the_named_graphs():
    assert {make_topology("ring", 8).degree(i) for i in range(8)} == {2}
    assert make_topology("ring", 8).neighbors(0) == [1, 7]
    assert {make_topology("torus", 16).degree(i) for i in range(16)} == {4}
    assert make_topology("exponential", 16).neighbors(0) == [1, 2, 4, 8, 12, 14, 15]
    assert make_topology("complete", 6).spectral_gap == pytest.approx(1.0)
    gaps = [make_topology(g, 16).spectral_gap for g in ("ring", "torus", "exponential")]
    assert gaps[0] < gaps[1] <= gaps[2]
    # ring of n: Metropolis weights 1/3, gap = 2/3 (1 - cos(2 pi / n))
    gap = 2 / 3 * (1 - np.cos(2 * np.pi / 12))
    assert make_topology("ring", 12).spectral_gap == pytest.approx(gap)


def test_erdos_renyi_is_seeded_and_connected():
    a = make_topology("erdos_renyi", 30, seed=5, edge_p=0.1)
    b = make_topology("erdos_renyi", 30, seed=5, edge_p=0.1)
    c = make_topology("erdos_renyi", 30, seed=6, edge_p=0.1)
    assert (a.adjacency == b.adjacency).all() and not (a.adjacency == c.adjacency).all()
    assert is_connected(a.adjacency)
    with pytest.raises(ConfigError, match="edge_p"):
        make_topology("erdos_renyi", 30, edge_p=0.001)


def test_check_rejects_bad_matrices():
    good = make_topology("ring", 5)
    bad = good.W.copy()
    bad[0, 1] += 0.1
    bad[0, 0] -= 0.1  # rows still sum to one, but no longer symmetric
    with pytest.raises(ConfigError, match="symmetric"):
        Topology("x", good.adjacency, bad).check()
    off = good.W.copy()
    off[0, 2] = off[2, 0] = 0.1
    off[0, 0] -= 0.1
    off[2, 2] -= 0.1
    with pytest.raises(ConfigError, match="not an edge"):
        Topology("x", good.adjacency, off).check()
    split = np.zeros((4, 4), dtype=bool)
    split[0, 1] = split[1, 0] = split[2, 3] = split[3, 2] = True
    with pytest.raises(ConfigError, match="connected"):
        Topology("x", split, np.eye(4)).check()
    with pytest.raises(ConfigError, match="unknown topology"):
        make_topology("star", 4)


def _simulate_phased_swap(adjacency: np.ndarray) -> tuple[bool, list[list[tuple]]]:
    """Every peer runs its phases in order; a phase ends when its send's receiver has posted
    the matching receive and its receive's sender the matching send (gloo: a transfer needs
    both ends posted). Returns whether everyone finished, and each peer's phases."""
    from tandem.strategies.gossip.swap import phases

    n = adjacency.shape[0]
    plan = [phases(r, n, np.flatnonzero(adjacency[r]).tolist()) for r in range(n)]
    at = [0] * n
    done_send = [set() for _ in range(n)]
    done_recv = [set() for _ in range(n)]

    def posted(r: int) -> tuple:
        return plan[r][at[r]] if at[r] < len(plan[r]) else (None, None)

    moved = True
    while moved:
        moved = False
        for r in range(n):
            if at[r] >= len(plan[r]):
                continue
            to, frm = posted(r)
            if to is not None and posted(to)[1] == r:
                done_send[r].add(to)
                done_recv[to].add(r)
            if frm is not None and posted(frm)[0] == r:
                done_recv[r].add(frm)
                done_send[frm].add(r)
            if (to is None or to in done_send[r]) and (frm is None or frm in done_recv[r]):
                at[r] += 1
                moved = True
    return all(at[r] == len(plan[r]) for r in range(n)), plan


@pytest.mark.parametrize("name", sorted(GRAPHS))
@pytest.mark.parametrize("n", [2, 3, 4, 6, 9])
def test_gossip_swap_phases_pair_every_edge_once_without_deadlock(name, n):
    """Breaks if the phased swap (strategies/gossip/swap.py) misses a neighbour, sends or
    receives twice in one phase, lets the two ends of an edge meet in different phases, or can
    leave peers waiting on each other forever (simulated on the graph)."""
    adj = make_topology(name, n, seed=1).adjacency
    finished, plan = _simulate_phased_swap(adj)
    assert finished
    for r in range(n):
        nbrs = set(np.flatnonzero(adj[r]).tolist())
        sends = [to for to, _ in plan[r] if to is not None]
        recvs = [frm for _, frm in plan[r] if frm is not None]
        assert sorted(sends) == sorted(nbrs) == sorted(recvs)  # each once
    if name == "ring" and n > 2:
        assert all(len(p) == 2 for p in plan)  # one direction at a time: two phases
    # with a neighbour gone (its peers' views drop it), the survivors still finish
    if n > 2:
        cut = adj.copy()
        cut[0, :] = cut[:, 0] = False
        assert _simulate_phased_swap(cut)[0]


class _MarksInStore:
    """A stand-in for :class:`tandem.transport.liveness.Liveness`: death marks and the count of
    them, with every store request counted."""

    def __init__(self) -> None:
        self.marked: set[int] = set()
        self.requests = 0
        self.proposals: dict[int, int] = {}

    def deaths(self) -> int:
        self.requests += 1
        return len(self.marked)

    def dead_ranks(self, peers: list[int]) -> list[int]:
        self.requests += len(peers)
        return [r for r in peers if r in self.marked]

    def mark_dead(self, rank: int, why: str, *, unless_marked: bool = False) -> None:
        self.marked.add(rank)

    @property
    def store_lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def store(self) -> object:
        """``compare_set`` only: the first proposal for a rank wins."""
        marks = self

        class _Store:
            def compare_set(self, key: str, expected: str, value: str) -> bytes:
                d = int(key.rsplit("/", 1)[1])
                return str(marks.proposals.setdefault(d, int(value))).encode()
        return _Store()


def test_a_peer_view_reads_the_store_every_few_steps_and_learns_every_mark_before_the_switch():
    """Breaks if the view goes back to one store request per live peer every step (9 % of a
    gossip step on 4 peers sharing 2 cores), misses a death mark, or agrees on a switch step
    that a survivor polling every POLL_EVERY steps could reach before it learned of the death."""
    store = _MarksInStore()
    n = 6
    views = [PeerView(make_topology("ring", n), r, store) for r in range(n)]
    for step in range(3 * POLL_EVERY):
        for v in views:
            v.poll(step)
    # one request for the count every POLL_EVERY steps, plus the marks once on the first poll
    assert store.requests == n * (3 + (n - 1))
    store.requests = 0
    # rank 5 dies; rank 0, its neighbour, learns at once from a failed exchange at step 30
    store.marked.add(5)
    views[0].learn([5], 30)
    switch = views[0].switch_at[5]
    assert switch == 30 + n + POLL_EVERY
    survivors = views[:5]
    learned = {}
    for step in range(30 - (n - 2), switch + 1):  # from the furthest a survivor may lag
        for r, v in enumerate(survivors):
            v.poll(step)
            if 5 in v.dead and r not in learned:
                learned[r] = step
    assert sorted(learned) == [0, 1, 2, 3, 4]
    assert max(learned.values()) < switch  # each knew before the agreed step ...
    assert all(v.switch_at[5] == switch for v in survivors)  # ... and the same one
    assert all(5 in v.topo.removed for v in survivors)  # and everyone switched at it
