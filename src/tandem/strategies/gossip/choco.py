"""Compressed gossip for the ``gossip`` strategy: CHOCO-gossip with any self-contained codec.

After Anastasia Koloskova, Sebastian U. Stich and Martin Jaggi, "Decentralized Stochastic
Optimization and Gossip Algorithms with Compressed Communication" (ICML 2019, arXiv 1902.00340).
Exact gossip sends the whole parameter vector to every neighbour each round. Compressing it
directly does not work: the compression error of the *parameters* never averages out and the
peers drift apart. CHOCO compresses *differences* instead. Every peer keeps a public copy
``x^_j`` of itself and of each neighbour, the value the neighbours also hold for it, and each
round

1. sends ``q_i = Q(y_i - x^_i)`` to its neighbours (only the codec's bytes travel);
2. adds ``q_j`` to ``x^_j`` for itself and every neighbour (decoding each neighbour's message
   alone: hence only codecs whose messages are self-contained, see
   :attr:`tandem.codecs.Codec.self_contained`);
3. moves towards the public average: ``y_i <- y_i + gamma * sum_j W_ij (x^_j - x^_i)``.

The public copies are the memory of what was not sent yet (the gap ``y - x^`` is sent later), so
the codec's own error feedback is switched off
(:attr:`tandem.codecs.memory.ErrorFeedback.enabled`). All peers start from the same initial model,
so the public copies start there and cost nothing. With the
identity codec and ``gamma = 1`` one round is exactly ``y_i <- sum_j W_ij y_j``.

Tuning ``consensus_step`` (gamma; default :func:`default_consensus_step`): 1 for near-exact codecs
(fp16, bf16); coarser codecs need a smaller step, roughly in proportion to the fraction of the
difference they keep (CHOCO's theory asks for gamma of the order of the compression quality times
the graph's spectral gap). Too large a step and the consensus error (reported at each evaluation)
grows instead of falling; too small and the peers mix slowly. At extreme densities (top-k at
1e-3) no step keeps the peers together for long: the local steps move them faster than k entries
a round can tell the neighbours.

Lost neighbours are handled as in exact gossip: their public copy is dropped and the row
re-weighted (:class:`tandem.topology.PeerView`).
"""

from __future__ import annotations

from typing import Any

import torch

from tandem.codecs import Codec, Message
from tandem.flat import unflatten
from tandem.strategies.gossip.swap import swap
from tandem.topology import PeerView


def default_consensus_step(codec: Codec) -> float:
    """``consensus_step``'s default for ``codec``, from a grid on the digits MLP (4 peers, ring,
    lr 0.1, 300 steps; ``docs/goco.md`` has the figures): the largest step whose consensus error
    did not grow, with a margin for signSGD (1 also worked there). Sparse codecs scale with
    their density: top-k at 0.01 grew at 0.4 and fell at 0.1 and 0.04; random-k at 0.01
    needed 0.01; QSGD diverged at 1."""
    ratio = float(getattr(codec.opts, "ratio", 1.0))
    return {"fp16": 1.0, "bf16": 1.0, "dense": 1.0, "signsgd": 0.5, "qsgd": 0.4,
            "topk": min(0.4, 4 * ratio), "randomk": min(0.4, ratio)}.get(codec.name, 0.1)


class ChocoMixer:
    """The public copies and one compressed gossip round (see the module docstring)."""

    def __init__(self, codec: Codec, x0: torch.Tensor, shapes: list[tuple[int, ...]],
                 consensus_step: float, transport: Any, view: PeerView) -> None:
        codec.memory.enabled = False  # the public copies play its part
        codec.rank = transport.rank  # private randomness (QSGD's rounding) differs per peer
        self.codec, self.shapes, self.gamma = codec, shapes, float(consensus_step)
        self.transport, self.view, self.me = transport, view, transport.rank
        nbrs, _, _ = view.row()
        self.public = {j: x0.detach().clone() for j in [self.me, *nbrs]}

    def state_dict(self) -> dict[str, Any]:
        return {"public": {j: v.clone() for j, v in self.public.items()},
                "codec": self.codec.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.public = {int(j): v.clone() for j, v in state["public"].items()}
        self.codec.load_state_dict(state["codec"])

    def mix(self, y: torch.Tensor, rounds: int, step: int) -> torch.Tensor:
        """``rounds`` compressed gossip rounds from the locally stepped parameters ``y``."""
        for _ in range(rounds):
            y = self._round(y, step)
        return y

    def _round(self, y: torch.Tensor, step: int) -> torch.Tensor:
        tr, codec, me = self.transport, self.codec, self.me
        nbrs, _, _ = self.view.row()
        msg = codec.encode(unflatten(y - self.public[me], self.shapes))
        packed = msg.pack()  # a fresh buffer, never written again: one for every neighbour
        got, lost = swap(me, self.view.size, nbrs,
                         lambda j: tr.recv_packed(msg.specs(), j, caller_waits=True),
                         lambda j: tr.send(packed, j, caller_waits=True))
        if lost:
            self.view.learn(lost, step)
        # decode at the step the messages were encoded at (random-k's shared positions); a
        # sparse code adds only its entries
        codec.add_decoded(msg, self.public[me])
        for j, tensors in got.items():
            if j not in lost:
                codec.add_decoded(Message(tensors, msg.meta), self.public[j])
        codec.step += 1
        for j in lost:
            self.public.pop(j, None)
        _, _, w_nbr = self.view.row()
        # y += gamma * sum_j W_ij (x^_j - x^_i): the plain form's order and roundings (the
        # golden fingerprints hold), without its zero buffer and one temporary per neighbour
        mine, pull = self.public[me], None
        for j, w in w_nbr.items():
            term = (self.public[j] - mine).mul_(w)
            pull = term if pull is None else pull.add_(term)
        return y if pull is None else y.add_(pull, alpha=self.gamma)
