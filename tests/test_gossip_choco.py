"""Compressed gossip (CHOCO) in the ``gossip`` strategy: the round's algebra on threads standing in
for peers, and whole multi-process runs (bytes, consensus, refusals)."""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import pytest
import torch

import tandem
from tandem.codecs import make_codec
from tandem.errors import ConfigError
from tandem.strategies.gossip.choco import ChocoMixer, default_consensus_step
from tandem.topology import PeerView, make_topology
from tandem.transport.packing import unpack
from tandem.transport.process_group import Done
from tandem.workloads import build_workload

SHAPES = [(6, 5), (5,), (3, 5)]  # 50 entries in three layers
DIM = 50


class QueueP2P:
    """Point-to-point send/recv between threads (one queue per ordered pair), the only transport
    methods :class:`ChocoMixer` uses."""

    def __init__(self, pipes: dict[tuple[int, int], queue.Queue], rank: int) -> None:
        self.pipes, self.rank = pipes, rank

    def send(self, buf: torch.Tensor, dst: int, *, caller_waits: bool = False) -> Done:
        self.pipes[(self.rank, dst)].put(buf.clone())
        return Done(None)

    def recv_packed(self, specs: Any, src: int, *, caller_waits: bool = False) -> Posted:
        return Posted(lambda: unpack(self.pipes[(src, self.rank)].get(timeout=30), specs))


class Posted:
    """A receive posted now and completed by ``wait`` (the mixer posts receives before sends)."""

    def __init__(self, take: Any) -> None:
        self.take = take

    def wait(self) -> Any:
        return self.take()


def _rounds(codec: str, opts: dict[str, Any], gamma: float, ys: list[torch.Tensor],
            x0: torch.Tensor, rounds: int) -> tuple[list[torch.Tensor], list[ChocoMixer]]:
    """Every peer of a 4-ring mixes its ``ys[i]`` for ``rounds`` rounds; (results, mixers)."""
    n = len(ys)
    topo = make_topology("ring", n)
    pipes = {(i, j): queue.Queue() for i in range(n) for j in range(n)}
    mixers = [ChocoMixer(make_codec(codec, opts, seed=1), x0, SHAPES, gamma, QueueP2P(pipes, i),
                         PeerView(topo, i, None)) for i in range(n)]
    out: list[torch.Tensor | None] = [None] * n
    errors: list[BaseException] = []

    def peer(i: int) -> None:
        try:
            out[i] = mixers[i].mix(ys[i].clone(), rounds, step=0)
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return [o for o in out if o is not None], mixers


def _ys(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(DIM, generator=gen) for _ in range(n)]


def test_an_exact_codec_with_step_one_is_exact_gossip():
    """Breaks if the round's update is not y_i + sum_j W_ij (x^_j - x^_i): with the identity code
    and gamma = 1 every round must equal x <- W x."""
    ys, x0 = _ys(4), torch.randn(DIM)
    got, _ = _rounds("dense", {}, 1.0, ys, x0, rounds=2)
    W = torch.as_tensor(make_topology("ring", 4).W, dtype=torch.float32)
    want = W @ (W @ torch.stack(ys))
    torch.testing.assert_close(torch.stack(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("codec", "opts"), [("topk", {"ratio": 0.1}), ("randomk", {"ratio": 0.2}),
                                             ("qsgd", {}), ("signsgd", {}), ("fp16", {})])
def test_public_copies_agree_and_the_average_is_kept(codec, opts):
    """The invariants CHOCO rests on: every peer's copy x^_j of a neighbour equals that
    neighbour's copy of itself (only codes travelled, so a decode that depended on the receiver
    would break it); the peers' average is unchanged by mixing (W doubly stochastic); the codec's
    own error feedback stays off (the public copies are the memory)."""
    ys, x0 = _ys(4, seed=3), torch.zeros(DIM)
    got, mixers = _rounds(codec, opts, 0.3, ys, x0, rounds=3)
    for i, m in enumerate(mixers):
        for j, copy in m.public.items():
            torch.testing.assert_close(copy, mixers[j].public[j], rtol=0, atol=0)
        assert m.codec.residuals is None and m.codec.step == 3 and m.codec.rank == i
    torch.testing.assert_close(torch.stack(got).mean(0), torch.stack(ys).mean(0),
                               rtol=1e-5, atol=1e-5)
    # and the mixing did something: the peers moved towards each other
    spread = lambda xs: float(((torch.stack(xs) - torch.stack(xs).mean(0)) ** 2).sum())  # noqa: E731
    assert spread(got) < spread(ys)


def test_default_consensus_step_scales_with_density():
    assert default_consensus_step(make_codec("fp16")) == 1.0
    assert default_consensus_step(make_codec("topk", {"ratio": 0.01})) == pytest.approx(0.04)
    assert default_consensus_step(make_codec("topk", {"ratio": 0.5})) == 0.4
    assert default_consensus_step(make_codec("randomk", {"ratio": 0.01})) == pytest.approx(0.01)


def _cons(run_dir) -> list[float]:
    text = (run_dir / "events.rank0.jsonl").read_text().splitlines()
    return [r["consensus_error"] for r in map(json.loads, text) if r.get("kind") == "eval"]


def test_topk_gossip_run_sends_the_codes_bytes_and_reaches_consensus(tmp_path):
    """A 4-peer ring on digits with top-k 1 %: each peer sends exactly one top-k message to each
    of its 2 neighbours per step (the meter's count), about 1/49 of exact gossip, and the peers
    still train and draw together."""
    base = {"strategy": {"name": "gossip", "options": {"topology": "ring"}},
            "workload": {"name": "digits"}, "workers": 4, "steps": 150, "lr": 0.1,
            "momentum": 0.0, "seed": 0, "eval_every": 50, "progress": False}
    s = tandem.train(dict(base, codec={"name": "topk", "options": {"ratio": 0.01}},
                          out=str(tmp_path / "topk")))
    assert s["info"]["consensus_step"] == pytest.approx(0.04)
    model = build_workload(tandem.load_config(base).workload).model_fn()
    grads = [torch.randn_like(p) for p in model.parameters()]
    nbytes = make_codec("topk", {"ratio": 0.01}).encode(grads).nbytes
    assert s["bytes_sent_per_worker_per_step"] == 2 * nbytes
    dense = 2 * 4 * sum(g.numel() for g in grads)
    assert 40 < dense / s["bytes_sent_per_worker_per_step"] < 60
    cons = _cons(tmp_path / "topk")
    assert len(cons) == 3 and cons[-1] < cons[0]
    assert s["final_test_accuracy"] > 0.9
    # the peers' own models are evaluated too (the average model hides their disagreement)
    ev = s["results"][0]["evals"][-1]
    assert 0.5 < ev["peer_accuracy_min"] <= ev["peer_accuracy_mean"] <= 1.0


def test_topk_gossip_with_overlap_and_momentum_sends_the_same_bytes_and_trains(tmp_path):
    """overlap=true with CHOCO and each peer's own momentum optimizer: the mixing of x_t runs
    beside the gradient, one top-k message per neighbour per step as without overlap (the
    meter's count), and the peers still train."""
    base = {"strategy": {"name": "gossip", "options": {"topology": "ring", "overlap": True}},
            "workload": {"name": "digits"}, "workers": 4, "steps": 150, "lr": 0.05,
            "momentum": 0.9, "seed": 0, "eval_every": 50, "progress": False,
            "codec": {"name": "topk", "options": {"ratio": 0.01}}}
    s = tandem.train(dict(base, out=str(tmp_path / "overlap")))
    model = build_workload(tandem.load_config(base).workload).model_fn()
    grads = [torch.randn_like(p) for p in model.parameters()]
    nbytes = make_codec("topk", {"ratio": 0.01}).encode(grads).nbytes
    assert s["bytes_sent_per_worker_per_step"] == 2 * nbytes
    assert s["final_test_accuracy"] > 0.85
    cons = _cons(tmp_path / "overlap")
    assert len(cons) == 3 and cons[-1] < cons[0]


def test_codecs_that_need_a_collective_or_momentum_are_refused(tmp_path):
    for name in ("powersgd", "lgc"):
        with pytest.raises(ConfigError, match="decode it alone"):
            tandem.load_config({"strategy": "gossip", "codec": name})
    cfg = {"strategy": "gossip", "workload": {"name": "regression"}, "workers": 2, "steps": 2,
           "codec": {"name": "topk", "options": {"momentum": 0.9}}, "momentum": 0.0,
           "progress": False, "out": str(tmp_path / "m")}
    with pytest.raises(ConfigError, match="codec's momentum"):
        tandem.train(cfg)


@pytest.mark.parametrize(("codec", "opts"), [("topk", {"ratio": 0.1}), ("randomk", {"ratio": 0.2}),
                                             ("topk", {"ratio": 0.1, "positions": "packed"}),
                                             ("signsgd", {}), ("qsgd", {})])
def test_add_decoded_is_the_dense_decode_added_bit_for_bit(codec, opts):
    """CHOCO adds every code into a public copy through ``add_decoded``; the sparse codecs add
    their entries only. Breaks if that sum differs in any bit from adding the dense decode
    (a repeated position, a value cast, the wrong positions for random-k's step)."""
    c = make_codec(codec, opts, seed=5)
    c.memory.enabled = False
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    for step in (0, 3):
        c.step = step
        msg = c.encode(grads)
        base = torch.randn(DIM, generator=gen)
        want = base + torch.cat([t.reshape(-1) for t in c.decode(msg)])
        got = base.clone()
        c.add_decoded(msg, got)
        assert torch.equal(got, want)
        assert not torch.equal(got, base)  # the code moved something
