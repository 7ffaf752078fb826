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
   ``x_i <- sum_j W_ij y_j`` with its neighbours (point-to-point sends through the transport).

Modes (``mode=``): ``goco`` uses the unbiased weight ``w = 1/(d(1-p))``; ``redundant`` keeps the
redundancy but uses ``w = 1/d`` (biased low by the straggling rate); ``dsgd`` is plain decentralized
SGD (d forced to 1, stragglers skipped); ``wait`` waits for every gradient (no straggler is
skipped; a barrier makes everyone wait for the slowest, i.e. wait-for-all decentralized SGD).

Stragglers: injected ones come from ``--stragglers P:FACTOR`` (the draws are a pure function of
seed, rank and step, so :mod:`tandem.sim` sees the same ones). Without ``deadline_s`` an injected
straggler gives up as soon as its normal compute is done (its gradient would miss any deadline set
just above the normal compute time); ``wait`` sleeps the delay. With ``deadline_s`` lateness is
real: the gradient is computed in a helper thread and a peer whose gradient is not ready
``deadline_s`` after the step began counts as straggled (its late work is cancelled).

Options and tuning:

* ``p``: the straggling probability in GOCO's weight; default the injected ``--stragglers`` p, else
  0. With real deadlines set it to the measured rate (the run reports ``straggle_rate``).
* ``topology``/``weights``/``edge_p``/``gossip_rounds``: see :mod:`tandem.topology`; a small
  spectral gap wants more rounds.
* ``deadline_s``: just above the normal step compute time; lower skips more peers, higher waits.
* ``compute_floor_s``: pad each gradient computation to at least this many seconds (sleep). It
  emulates a heavier model so that timing comparisons mean something when many processes share a
  few cores; 0 (default) disables it.
* ``lr_decay``: ``lr_t = lr / (1 + lr_decay * t)``; constant lr (0) shows GOCO's error floor.

Codecs: with ``dense`` (default) peers mix exact parameters, as GOCO's analysis assumes; any
other self-contained codec (fp16, bf16, QSGD, signSGD, top-k, random-k) runs CHOCO-gossip, which
sends compressed differences against public copies (:mod:`.gossip_choco`; its step size is the
``consensus_step`` option, default per codec).

Telemetry: each step record has ``straggled`` and, on regression, ``opt_error = ||x_i - x*||^2``;
each eval record has ``consensus_error`` (mean ||x_i - mean x||^2), ``opt_error`` (mean over peers)
and ``avg_opt_error`` (||mean x - x*||^2); test loss/accuracy are of the averaged model, and on
classification ``peer_accuracy_min``/``peer_accuracy_mean`` are of the peers' own models.
Optimizer: plain SGD as in the paper (momentum is refused; weight decay is applied locally).

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

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal

import torch
from pydantic import Field
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from tandem.checkpoint import StrategyCheckpoints, check_resume
from tandem.coding import make_allocation, sgc_weight
from tandem.errors import CheckpointError, ConfigError, WorkerFailed
from tandem.strategies.base import Strategy, StrategyOptions, register
from tandem.strategies.gossip.choco import ChocoMixer, default_consensus_step
from tandem.strategies.gossip.evaluate import evaluate_alone, evaluate_network
from tandem.topology import PeerView, make_topology
from tandem.trainer import (
    build_model,
    is_eval_step,
    screen_gradients,
)
from tandem.trainer.partitions import PartitionGradients, data_partitions, loader_seed

__all__ = ["GossipOptions", "GossipStrategy", "PartitionGradients", "check_peer_state",
           "data_partitions", "loader_seed"]


class GossipOptions(StrategyOptions):
    mode: Literal["goco", "dsgd", "redundant", "wait"] = "goco"
    topology: Literal["ring", "torus", "exponential", "erdos_renyi", "complete"] = "ring"
    weights: Literal["metropolis", "max_degree"] = "metropolis"
    edge_p: float | None = Field(default=None, gt=0, le=1)
    gossip_rounds: int = Field(default=1, ge=1)
    allocation: Literal["cyclic", "fractional"] = "cyclic"
    p: float | None = Field(default=None, ge=0, lt=1)
    deadline_s: float | None = Field(default=None, gt=0)
    compute_floor_s: float = Field(default=0.0, ge=0)
    full_batch: bool = False
    lr_decay: float = Field(default=0.0, ge=0)
    consensus_step: float | None = Field(default=None, gt=0, le=1)


@register
class GossipStrategy(Strategy):
    name = "gossip"
    Options = GossipOptions
    tolerates_lost_workers = True
    supports_checkpoints = True
    peer_codes = True

    @classmethod
    def processes(cls, cfg: Any) -> int:
        check_resume(cfg)  # another topology or worker count is refused here, before any start
        if cfg.codec.options.get("momentum"):
            raise ConfigError("gossip uses plain SGD as in GOCO: drop the codec's momentum option")
        return cfg.workers

    def run(self) -> dict[str, Any]:
        ctx, o, cfg = self.ctx, self.opts, self.ctx.cfg
        assert isinstance(o, GossipOptions)
        if cfg.momentum > 0:
            raise ConfigError("gossip uses plain SGD as in GOCO; set momentum to 0")
        rank, world, tr, rec = ctx.rank, ctx.world, ctx.transport, ctx.recorder
        d = 1 if o.mode == "dsgd" else cfg.workload.redundancy
        alloc = make_allocation(world, d, o.allocation)
        topo = make_topology(o.topology, world, weights=o.weights, seed=cfg.seed, edge_p=o.edge_p)
        view = PeerView(topo, rank, tr.liveness, rec)
        self._crash = {int(s) for r, s in cfg.inject_crash if r == rank} if not cfg.resume \
            else set()
        p = o.p if o.p is not None else (cfg.stragglers.p if cfg.stragglers else 0.0)
        weight = sgc_weight(d, p) if o.mode == "goco" else 1.0 / d
        grads = PartitionGradients(ctx, rank, list(alloc.held[rank]), o.full_batch,
                                   o.compute_floor_s)
        model = build_model(ctx.workload, cfg.seed, tr.device)  # evaluation copy
        mparams = [q for q in model.parameters() if q.requires_grad]
        x = parameters_to_vector(mparams).detach().clone()
        opt = ctx.workload.optimum
        opt = opt.to(x) if opt is not None and opt.numel() == x.numel() else None
        total = self.total_steps(cfg, len(ctx.workload.train))
        every = self.eval_every(total)
        threaded = o.deadline_s is not None and o.mode != "wait"
        pool = ThreadPoolExecutor(1, thread_name_prefix="gossip-grad") if threaded else None
        mixer = None
        if cfg.codec.name != "dense":  # compressed gossip (CHOCO); dense mixes exact parameters
            codec = ctx.make_codec()
            mixer = ChocoMixer(codec, x, [tuple(q.shape) for q in mparams],
                               o.consensus_step or default_consensus_step(codec), tr, view)
            mixer.codec.set_total_steps(total * o.gossip_rounds)
        rec.info(topology=topo.describe(), mode=o.mode, d=d, weight=weight, p_weight=p,
                 allocation=list(alloc.held[rank]),
                 consensus_step=None if mixer is None else mixer.gamma)
        trajectory: list[float] = []
        evals: list[dict[str, Any]] = []
        n_straggled = n_skipped = start = 0
        nan_steps = {tuple(v) for v in cfg.inject_nan}
        self.ckpt, self._ckpt_stopped = StrategyCheckpoints(ctx), False
        peer = {"world": world, "W": torch.as_tensor(topo.W, dtype=torch.float64),
                "held": [int(k) for k in alloc.held[rank]], "weight": float(weight)}
        state = self.ckpt.resume()
        if state is not None:
            check_peer_state(state["peer"], peer)
            x = state["x"].to(x)
            for loader, ls in zip(grads.loaders, state["loaders"], strict=True):
                loader.load_state_dict(ls)
            start, n_straggled, n_skipped = (int(state[k]) for k in ("step", "straggled",
                                                                        "skipped"))
            trajectory, evals = list(state["trajectory"]), list(state["evals"])
            if mixer is not None:
                mixer.load_state_dict(state["choco"])
            rec.resume_from(start)  # the killed run's later steps: rolled back
        try:
            for step in range(start, total):
                t0 = time.perf_counter()
                view.poll(step)
                loss, g, compute_s, straggled, injected, idle_s = self._gradient(
                    step, x, grads, pool, o)
                if not straggled:
                    if (rank, step) in nan_steps:
                        g = torch.full_like(g, float("nan"))  # injected (tests)
                    # A NaN/Inf gradient never reaches the neighbours: with the skip policy the
                    # peer counts as a straggler for this step (e_i = 0), as GOCO allows.
                    (g,), bad = screen_gradients([g], cfg.nan_policy, rank, step)
                    straggled, n_skipped = straggled or bad, n_skipped + bad
                n_straggled += int(straggled)
                lr = cfg.lr / (1.0 + o.lr_decay * step)
                y = x.clone()
                if not straggled:
                    y -= lr * weight * g
                if cfg.weight_decay:
                    y -= lr * cfg.weight_decay * x
                if o.mode == "wait" and not view.dead:  # a dead rank cannot join a barrier
                    tb = time.perf_counter()
                    self._world(view, step, lambda: tr.barrier().wait())
                    idle_s += time.perf_counter() - tb
                t1 = time.perf_counter()
                x = mixer.mix(y, o.gossip_rounds, step) if mixer is not None else \
                    self._gossip(y, view, o.gossip_rounds, step)
                comm_s = time.perf_counter() - t1
                b = tr.end_step()
                extra: dict[str, Any] = {"straggled": straggled, "injected": injected}
                if opt is not None:
                    extra["opt_error"] = float(((x.double() - opt.double()) ** 2).sum())
                    trajectory.append(extra["opt_error"])
                extra["step_s"] = time.perf_counter() - t0
                rec.step(step, compute_s=compute_s, comm_s=comm_s, idle_s=idle_s,
                         bytes_sent=b.sent, bytes_recv=b.recv, loss=loss, **extra)
                if is_eval_step(step, every, total):
                    with rec.evaluating():
                        ev = None
                        if not view.dead:
                            ev = self._world(view, step, evaluate_network, ctx, step, x, model,
                                             mparams, opt)
                        evals.append(ev or evaluate_alone(ctx, step, x, model, mparams, opt,
                                                          len(view.alive)))
                if self.ckpt.due(step, total):
                    with rec.evaluating():
                        self._checkpoint(view, step, {
                            "x": x, "loaders": [ld.state_dict() for ld in grads.loaders],
                            "straggled": n_straggled, "skipped": n_skipped, "evals": evals,
                            "trajectory": trajectory, "peer": {**peer, "lost": sorted(view.dead)},
                            "choco": None if mixer is None else mixer.state_dict()})
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        with torch.no_grad():
            vector_to_parameters(x, mparams)
        return {"steps": total, "straggled_steps": n_straggled, "skipped_steps": n_skipped,
                "straggle_rate": n_straggled / total,
                "trajectory": trajectory, "evals": evals if rank == min(view.alive) else [],
                "lost_peers": sorted(view.dead),
                "params": [q.detach().clone() for q in mparams]}

    # ---- one step's pieces ---------------------------------------------------------------------
    def _checkpoint(self, view: PeerView, step: int, state: dict[str, Any]) -> None:
        """Save after ``step`` while every peer is alive. Once a peer is lost no checkpoint is
        written (a set needs every rank, and the lost one cannot save): LATEST keeps naming the
        last full-world state, and a resume restarts every peer from it."""
        if view.dead:
            if not self._ckpt_stopped:
                self._ckpt_stopped = True
                self.ctx.recorder.info(checkpoints_stopped_at_step=step,
                                       lost_peers=sorted(view.dead))
            return
        self._world(view, step, self.ckpt.save, step + 1, state)

    def _gradient(self, step: int, x: torch.Tensor, grads: PartitionGradients,
                  pool: ThreadPoolExecutor | None, o: GossipOptions
                  ) -> tuple[float | None, torch.Tensor, float, bool, bool, float]:
        """(loss, sum of partition grads, compute s, straggled, injected straggler, idle s)."""
        faults = self.ctx.faults
        if step in self._crash:
            os.kill(os.getpid(), signal.SIGKILL)  # injected crash (tests): as a real kill -9
        if pool is None:
            loss, gs, spent = grads.compute(x)
            extra, injected = faults.delay(step, spent)
            if injected and o.mode != "wait":
                return loss, gs[0], spent, True, True, 0.0  # late: abandoned at the deadline
            if extra > 0:
                time.sleep(extra)
            return loss, torch.stack(gs).sum(0), spent + extra, False, injected, 0.0
        cancel = threading.Event()
        snapshot = x.clone()

        def job() -> tuple[float, torch.Tensor, float]:
            loss, gs, spent = grads.compute(snapshot)
            extra, _ = faults.delay(step, spent)
            if extra > 0:
                cancel.wait(extra)
            return loss, torch.stack(gs).sum(0), spent + extra

        assert o.deadline_s is not None
        t0 = time.perf_counter()
        fut = pool.submit(job)
        injected = faults.straggles(step)
        try:
            loss, g, spent = fut.result(timeout=o.deadline_s)
            return loss, g, spent, False, injected, 0.0
        except FutureTimeout:
            cancel.set()
            return None, x, time.perf_counter() - t0, True, injected, 0.0

    def _world(self, view: PeerView, step: int, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` (world collectives); if it fails because ranks are marked dead, drop
        them and return None (the caller falls back), otherwise re-raise."""
        try:
            return fn(*args)
        except WorkerFailed as err:
            marked = self.ctx.transport.liveness.dead_ranks(err.ranks or None)
            if not marked:
                raise
            view.learn(marked, step, why="collective failed")
            return None

    def _gossip(self, y: torch.Tensor, view: PeerView, rounds: int, step: int) -> torch.Tensor:
        """``rounds`` rounds of x_i <- W_ii y_i + sum_j W_ij y_j with the live neighbours; a
        neighbour whose exchange fails because it died is dropped (its weight folded)."""
        tr = self.ctx.transport
        for _ in range(rounds):
            nbrs, w_self, w_nbr = view.row()
            sends = [(j, tr.send(y.clone(), j)) for j in nbrs]
            bufs = {j: torch.empty_like(y) for j in nbrs}
            recvs = [(j, tr.recv(bufs[j], j)) for j in nbrs]
            lost: set[int] = set()
            for j, h in recvs + sends:
                if j in lost:
                    continue
                try:
                    h.wait()
                except WorkerFailed as err:
                    if j not in err.ranks:
                        raise
                    lost.add(j)
            if lost:
                view.learn(lost, step)
                _, w_self, w_nbr = view.row()
            out = y * w_self
            for j, w in w_nbr.items():
                out += w * bufs[j]
            y = out
        return y


def check_peer_state(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse a gossip checkpoint that does not fit this peer: written after peers were lost,
    or for another world size, mixing matrix, coding allocation or GOCO weight. (The config
    fingerprint already refuses changed options; this also catches a change in how the topology
    or the allocation is built, e.g. after an upgrade.)"""
    if saved.get("lost"):
        raise CheckpointError(f"gossip checkpoint was written after peers {saved['lost']} were "
                              "lost; it cannot restore the re-weighted topology")
    if saved["world"] != now["world"]:
        raise CheckpointError(f"gossip checkpoint has {saved['world']} peers, this run "
                              f"{now['world']}: resume with the same number of workers")
    if saved["W"].shape != now["W"].shape or not torch.equal(saved["W"], now["W"]):
        raise CheckpointError("gossip checkpoint was written with another topology (mixing "
                              "matrix); resume with the run's own topology options")
    if saved["held"] != now["held"] or saved["weight"] != now["weight"]:
        raise CheckpointError(f"gossip checkpoint holds partitions {saved['held']} (weight "
                              f"{saved['weight']}), this run {now['held']} ({now['weight']}): "
                              "resume with the run's own redundancy, allocation and mode")
