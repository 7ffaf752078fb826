"""``gossip``: decentralized SGD on a graph, with GOCO's stochastic gradient coding (method M5).

After Chengxi Li and Mikael Skoglund, "Gradient Coding in Decentralized Learning for Evading
Stragglers" (arXiv 2402.04193, 2024). There is no server: peer i holds parameters x_i and talks only
to its graph neighbours (:mod:`tandem.topology`). The data is cut into M partitions (one per peer)
and each partition is stored on d peers (:mod:`tandem.coding`, cyclic or fractional allocation).
Every step, peer i

1. computes the gradient of each partition it holds at x_i (a minibatch of ``batch_size`` from each,
   or the whole partition with ``full_batch=true``);
2. if it finished in time, ``e_i = w * sum_k g_k``; if it straggled, ``e_i = 0``;
3. takes a local step ``y_i = x_i - lr_t * e_i`` and runs ``gossip_rounds`` rounds of
   ``x_i <- sum_j W_ij y_j`` with its neighbours (point-to-point sends through the transport,
   one direction of the graph at a time: :mod:`tandem.strategies.gossip.swap`).

Overlap (``overlap=true``; off by default): the peer mixes ``x_t`` with its neighbours in a
helper thread while its gradient at ``x_t`` computes, then steps from the mixed parameters:
``x_{t+1} = W x_t - lr_t * e_i`` (D-PSGD's order; GOCO's is ``W (x_t - lr_t * e_i)``). A step
then costs about the longer of compute and exchange instead of their sum. Use it when the
exchange is a large share of the step (a slow link, a small compressed message whose latency
dominates); its sequence differs from GOCO's (:mod:`.overlap`). Not with ``mode=wait``.

Modes (``mode=``): ``goco`` uses the unbiased weight ``w = 1/(d(1-p))``; ``redundant`` keeps the
redundancy but uses ``w = 1/d`` (biased low by the straggling rate); ``dsgd`` is plain decentralized
SGD (d forced to 1, stragglers skipped); ``wait`` waits for every gradient (no straggler is
skipped; a barrier makes everyone wait for the slowest, i.e. wait-for-all decentralized SGD).

Stragglers: injected ones come from ``--stragglers P:FACTOR`` (the draws are a pure function of
seed, rank and step, so :mod:`tandem.sim` sees the same ones). A straggler is charged where its
time falls, in every mode: ``wait`` sleeps the whole delay (everyone waits for it); the other
modes end its step at a deadline it misses and throw its work away (``straggled`` steps, the time
counted as compute). Without ``deadline_s`` that deadline is implicit: ``deadline_factor`` (1.5)
times its normal compute. With ``deadline_s`` lateness is real: the gradient is computed in a
helper thread and a peer whose gradient is not ready ``deadline_s`` after the step began counts
as straggled (its late work is cancelled; a computation still running delays the next step).

Options and tuning:

* ``p``: the straggling probability in GOCO's weight; default the injected ``--stragglers`` p, else
  0. With real deadlines set it to the measured rate (the run reports ``straggle_rate``).
* ``topology``/``weights``/``edge_p``/``gossip_rounds``: see :mod:`tandem.topology`; a small
  spectral gap wants more rounds.
* ``mix_every``: mix on every N-th step only (steps N-1, 2N-1, ...); the steps between are local
  steps that send nothing (local updates in decentralized SGD: Anastasia Koloskova et al., "A
  Unified Theory of Decentralized SGD with Changing Topology and Local Updates", ICML 2020,
  arXiv 2003.10422). 1/N of the gossip bytes; the peers drift apart between mixings, which the
  consensus error of each evaluation shows. Raise it when the exchange is most of a step.
  ``mode=wait`` holds the peers at its barrier before each mixing only.
* ``deadline_s``: just above the normal step compute time; lower skips more peers, higher waits.
* ``compute_floor_s``: pad each gradient computation to at least this many seconds (sleep). It
  emulates a heavier model so that timing comparisons mean something when many processes share a
  few cores; 0 (default) disables it.
* ``lr_decay``: ``lr_t = lr / (1 + lr_decay * t)``; constant lr (0) shows GOCO's error floor.
* ``average_dtype``: how the network average (the saved ``model.pt``, each evaluation) is
  assembled. ``float32`` (default) all-reduces the parameters, exactly. ``float16`` all-reduces
  each peer's change since the shared initial model in half precision: half the bytes of that
  all-reduce (on a 10 Mbit/s link a 200k-parameter model's average takes about a second in
  float32), with an error of at most about ``world * 2**-10`` of the largest change. Pick it
  when the link is slow and the model is evaluated or saved often.

Codecs: with ``dense`` (default) peers mix exact parameters, as GOCO's analysis assumes; any
other self-contained codec (fp16, bf16, QSGD, signSGD, top-k, random-k) runs CHOCO-gossip, which
sends compressed differences against public copies (:mod:`.gossip_choco`; its step size is the
``consensus_step`` option, default per codec).

Telemetry: each step record has ``straggled`` and, on regression, ``opt_error = ||x_i - x*||^2``;
each eval record has ``consensus_error`` (mean ||x_i - mean x||^2), ``opt_error`` (mean over peers)
and ``avg_opt_error`` (||mean x - x*||^2); test loss/accuracy are of the averaged model, and on
classification ``peer_accuracy_min``/``peer_accuracy_mean`` are of the peers' own models.
Optimizer: by default GOCO's plain SGD step ``y = x - lr_t * w * e - lr_t * wd * x`` (the paper's).
Any other recipe (momentum, AdamW, a schedule, clipping: ``--optimizer``, ``--schedule``,
``--clip-grad-norm`` or the workload's own) gives *each peer its own optimizer*, stepped on
``e_i = w * sum_k g_k`` (zero when the peer straggled: the optimizer still steps, so momentum and
weight decay go on) before the mixing; its state is the peer's and is checkpointed with it.
``lr_decay`` belongs to the plain step and is refused beside a schedule or another optimizer.

Lost peers (``tolerates_lost_workers``): a peer that dies is dropped and the survivors go on; see
:class:`PeerView` for how every survivor ends up on the same re-weighted mixing matrix. Once a
peer is lost the world all-reduce of the evaluation and ``wait``'s barrier are impossible (the dead
rank cannot join): each survivor then evaluates its own model alone (eval records with
``local: true``; ``opt_error`` is its own distance, no ``consensus_error``) and ``wait`` mode paces
the survivors through the neighbour exchanges only.

Checkpoints (``--checkpoint-every N``): every peer saves its parameters x_i, its partitions' data
positions, its counters and records, the world size, mixing matrix, allocation and GOCO weight;
``--resume`` continues bit-exactly (without ``deadline_s``: real deadlines are timing-dependent, so
such a run resumes from its saved state but is not reproducible anyway). Checkpoints are written
only while every peer is alive: after a loss, ``LATEST`` keeps naming the last full-world set and a
resume restarts *every* peer from it, on the original topology (consistent, since no peer had been
lost then). Resuming with another topology, worker count, redundancy or mode is refused with
:class:`~tandem.errors.CheckpointError`.
"""

from __future__ import annotations

from typing import Any

from tandem.errors import ConfigError
from tandem.strategies.base import Strategy, register
from tandem.strategies.gossip.options import GossipOptions
from tandem.strategies.gossip.peer import GossipPeer, check_peer_state

__all__ = ["GossipOptions", "GossipStrategy", "check_peer_state"]


@register
class GossipStrategy(Strategy):
    name = "gossip"
    Options = GossipOptions
    tolerates_lost_workers = True
    supports_checkpoints = True
    peer_codes = True

    @classmethod
    def check(cls, cfg: Any, options: Any) -> None:
        if options.lr_decay and (cfg.schedule is not None or cfg.momentum > 0 or
                                 (cfg.optimizer is not None and cfg.optimizer.name != "sgd")):
            raise ConfigError("strategy.options.lr_decay: GOCO's lr_t = lr / (1 + decay t) is "
                              "for its plain SGD step; with a schedule or another optimizer "
                              "use --schedule instead")
        if options.overlap and options.mode == "wait":
            raise ConfigError("strategy.options.overlap: mode=wait holds every peer at a "
                              "barrier before the exchange, so there is nothing to overlap; "
                              "use overlap with goco, redundant or dsgd")
        if cfg.codec.options.get("momentum"):
            raise ConfigError("codec.options.momentum: gossip uses plain SGD as in GOCO; drop "
                              "the codec's momentum option")

    def run(self) -> dict[str, Any]:
        return GossipPeer(self).run()
