"""One peer of a ``gossip`` run (:mod:`tandem.strategies.gossip`), on the one step loop.

Each step: compute the gradients of the partitions this peer holds (or straggle: miss the
deadline or be an injected straggler), screen them (a non-finite gradient makes the peer a
straggler for the step under ``nan_policy=skip``), take the local step ``y = x - lr_t * w * e``
and mix ``y`` with the live neighbours (exact parameters, or CHOCO-compressed differences).
The peer's state is the flat parameter vector ``x``; its model copy is for evaluation only.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from tandem.coding import make_allocation, sgc_weight
from tandem.errors import CheckpointError, WorkerFailed
from tandem.flat import unflatten
from tandem.strategies.base import Computed, Exchanged, StepLoop, Strategy
from tandem.strategies.gossip.choco import ChocoMixer, default_consensus_step
from tandem.strategies.gossip.evaluate import (
    average_parameters,
    evaluate_alone,
    evaluate_network,
)
from tandem.strategies.gossip.options import GossipOptions
from tandem.strategies.gossip.overlap import BackgroundMix
from tandem.strategies.gossip.swap import swap
from tandem.topology import PeerView, make_topology
from tandem.trainer import build_model, screen_gradients, step_optimizer, training_spec
from tandem.trainer.final_model import save_final_model
from tandem.trainer.partitions import PartitionGradients


class GossipPeer(StepLoop):
    """Peer ``rank`` of the graph: its parameters ``x``, its partitions, its neighbours."""

    def __init__(self, strategy: Strategy) -> None:
        ctx, cfg = strategy.ctx, strategy.ctx.cfg
        o: GossipOptions = strategy.opts
        self.o = o
        rank, world, tr, rec = ctx.rank, ctx.world, ctx.transport, ctx.recorder
        super().__init__(ctx, strategy.total_steps(cfg, len(ctx.workload.train)))
        d = 1 if o.mode == "dsgd" else cfg.workload.redundancy
        alloc = make_allocation(world, d, o.allocation)
        topo = make_topology(o.topology, world, weights=o.weights, seed=cfg.seed, edge_p=o.edge_p)
        self.view = PeerView(topo, rank, tr.liveness, rec)
        self.crash = {int(s) for r, s in cfg.inject_crash if r == rank} if not cfg.resume \
            else set()
        self.nan_steps = {tuple(v) for v in cfg.inject_nan}
        p = o.p if o.p is not None else (cfg.stragglers.p if cfg.stragglers else 0.0)
        self.weight = sgc_weight(d, p) if o.mode == "goco" else 1.0 / d
        self.grads = PartitionGradients(ctx, rank, list(alloc.held[rank]), o.full_batch,
                                        o.compute_floor_s)
        self.model = build_model(ctx.workload, cfg.seed, tr.device)  # evaluation copy
        self.mparams = [q for q in self.model.parameters() if q.requires_grad]
        self.x = parameters_to_vector(self.mparams).detach().clone()
        # the shared initial model, from which average_dtype=float16 averages the changes
        self.origin = self.x.clone() if o.average_dtype == "float16" else None
        # GOCO's closed form x - lr * w * e for plain SGD; any other recipe (AdamW, a schedule,
        # clipping) runs a per-peer optimizer on a model copy that holds x
        self.spec = training_spec(cfg, ctx.workload)
        self.step_model: torch.nn.Module | None = None
        self.opt: Any = None
        self.sched: Any = None
        if not self.spec.plain_sgd:
            self.step_model = build_model(ctx.workload, cfg.seed, tr.device)
            self.step_params = [q for q in self.step_model.parameters() if q.requires_grad]
            # the copy's parameters are views of one flat buffer: loading x and reading the
            # stepped parameters back is one copy each
            self.step_shapes = [tuple(q.shape) for q in self.step_params]
            self.step_flat = parameters_to_vector(self.step_params).detach().clone()
            for q, view in zip(self.step_params, unflatten(self.step_flat, self.step_shapes),
                               strict=True):
                q.data = view
            self.opt = self.spec.make_optimizer(self.step_model)
            self.sched = self.spec.make_scheduler(self.opt, self.total)
        optimum = ctx.workload.optimum
        self.optimum = optimum.to(self.x) \
            if optimum is not None and optimum.numel() == self.x.numel() else None
        threaded = o.deadline_s is not None and o.mode != "wait"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="gossip-grad") if threaded else None
        self.mixer: ChocoMixer | None = None
        if cfg.codec.name != "dense":  # compressed gossip (CHOCO); dense mixes exact parameters
            codec = ctx.make_codec()
            self.mixer = ChocoMixer(codec, self.x, [tuple(q.shape) for q in self.mparams],
                                    o.consensus_step or default_consensus_step(codec), tr,
                                    self.view)
            self.mixer.codec.set_total_steps(-(-self.total // o.mix_every) * o.gossip_rounds)
        rec.info(topology=topo.describe(), mode=o.mode, d=d, weight=self.weight, p_weight=p,
                 allocation=list(alloc.held[rank]),
                 consensus_step=None if self.mixer is None else self.mixer.gamma)
        self.trajectory: list[float] = []
        self.evals: list[dict[str, Any]] = []
        self.n_straggled = 0
        self.stopped_checkpoints = False
        self.peer = {"world": world, "W": torch.as_tensor(topo.W, dtype=torch.float64),
                     "held": [int(k) for k in alloc.held[rank]], "weight": float(self.weight)}
        self.t0 = 0.0
        self.background = BackgroundMix(self._mix) if o.overlap else None
        self.restore()

    # ---- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"x": self.x, "loaders": [ld.state_dict() for ld in self.grads.loaders],
                "straggled": self.n_straggled, "skipped": self.skipped, "evals": self.evals,
                "trajectory": self.trajectory,
                "peer": {**self.peer, "lost": sorted(self.view.dead)},
                "choco": None if self.mixer is None else self.mixer.state_dict(),
                "optimizer": None if self.opt is None else self.opt.state_dict(),
                "scheduler": None if self.sched is None else self.sched.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        check_peer_state(state["peer"], self.peer)
        self.x = state["x"].to(self.x)
        for loader, ls in zip(self.grads.loaders, state["loaders"], strict=True):
            loader.load_state_dict(ls)
        self.n_straggled = int(state["straggled"])
        self.trajectory, self.evals = list(state["trajectory"]), list(state["evals"])
        if self.mixer is not None:
            self.mixer.load_state_dict(state["choco"])
        if self.opt is not None and state.get("optimizer") is not None:
            self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None and state.get("scheduler") is not None:
            self.sched.load_state_dict(state["scheduler"])

    def checkpoint(self, step: int) -> None:
        """Save after ``step`` while every peer is alive. Once a peer is lost no checkpoint is
        written (a set needs every rank, and the lost one cannot save): LATEST keeps naming the
        last full-world state, and a resume restarts every peer from it."""
        if self.view.dead:
            if not self.stopped_checkpoints:
                self.stopped_checkpoints = True
                self.ctx.recorder.info(checkpoints_stopped_at_step=step,
                                       lost_peers=sorted(self.view.dead))
            return
        self._world(step, self.ckpt.save, step + 1, self.state())

    # ---- the loop's hooks -----------------------------------------------------------------------
    def compute(self, step: int) -> Computed:
        self.t0 = time.perf_counter()
        self.view.poll(step)
        if self.background is not None and self.mixes(step):  # W x_t travels while the
            self.background.start(self.x, step)  # gradient at x_t computes
        loss, g, compute_s, straggled, injected = self._gradient(step)
        return Computed(loss, [g], compute_s, straggled, fields={"injected": injected})

    def screen(self, step: int, c: Computed) -> Computed:
        """A NaN/Inf gradient never reaches the neighbours: with the skip policy the peer counts
        as a straggler for this step (e_i = 0), as GOCO allows."""
        if not c.straggled:
            if (self.ctx.rank, step) in self.nan_steps:
                c.grads = [torch.full_like(c.grads[0], float("nan"))]  # injected (tests)
            c.grads, bad = screen_gradients(c.grads, self.ctx.cfg.nan_policy, self.ctx.rank, step)
            c.straggled = c.straggled or bad
            self.skipped += bad
        self.n_straggled += int(c.straggled)
        return c

    def exchange(self, step: int, c: Computed) -> Exchanged:
        cfg, o, x = self.ctx.cfg, self.o, self.x
        waited, mixes = 0.0, self.mixes(step)
        base = x  # GOCO's order: step from x_t, then mix; overlap: step from the mixed W x_t
        if self.background is not None and mixes:
            base, waited = self.background.finish()
        if self.step_model is None:
            lr = cfg.lr / (1.0 + o.lr_decay * step)
            y = base.clone()
            if not c.straggled:
                y -= lr * self.weight * c.grads[0]
            if cfg.weight_decay:
                y -= lr * cfg.weight_decay * x
        else:
            y = self._optimizer_step(c, base)
        idle = 0.0
        if o.mode == "wait" and mixes and not self.view.dead:  # a dead rank cannot join one
            tb = time.perf_counter()
            self._world(step, lambda: self.ctx.transport.barrier().wait())
            idle = time.perf_counter() - tb
        t1 = time.perf_counter()
        self.x = self._mix(y, step) if mixes and self.background is None else y
        comm = waited + time.perf_counter() - t1
        fields: dict[str, Any] = {}
        if self.optimum is not None:
            fields["opt_error"] = float(((self.x.double() - self.optimum.double()) ** 2).sum())
            self.trajectory.append(fields["opt_error"])
        fields["step_s"] = time.perf_counter() - self.t0
        return Exchanged(None, idle_s=idle, comm_s=comm, fields=fields)

    def mixes(self, step: int) -> bool:
        """Whether ``step`` ends with a mixing (``mix_every``: the last of every N steps)."""
        return (step + 1) % self.o.mix_every == 0

    def _mix(self, y: torch.Tensor, step: int) -> torch.Tensor:
        """``gossip_rounds`` rounds with the live neighbours: CHOCO's compressed rounds with a
        codec, exact ones without."""
        rounds = self.o.gossip_rounds
        return self.mixer.mix(y, rounds, step) if self.mixer is not None else \
            self._gossip(y, rounds, step)

    def _optimizer_step(self, c: Computed, base: torch.Tensor) -> torch.Tensor:
        """This peer's optimizer from ``base`` (x_t, or W x_t with overlap) on
        e_i = w * sum of its partition gradients (zero when it straggled: the optimizer still
        steps, so its momentum and weight decay go on)."""
        assert self.step_model is not None
        e = torch.zeros_like(self.x) if c.straggled else self.weight * c.grads[0]  # fresh
        with torch.no_grad():
            self.step_flat.copy_(base)
        for p, g in zip(self.step_params, unflatten(e, self.step_shapes), strict=True):
            p.grad = g  # views of e, which nothing else holds (clipping scales them in place)
        step_optimizer(self.opt, self.step_params, self.spec.clip, self.sched)
        return self.step_flat.clone()

    def evaluate(self, step: int) -> None:
        ev = None
        if not self.view.dead:
            ev = self._world(step, evaluate_network, self.ctx, step, self.x, self.model,
                             self.mparams, self.optimum, self.origin)
        self.evals.append(ev or evaluate_alone(self.ctx, step, self.x, self.model, self.mparams,
                                               self.optimum, len(self.view.alive)))

    def run(self) -> dict[str, Any]:
        try:
            return super().run()
        finally:
            if self.pool is not None:
                self.pool.shutdown(wait=False, cancel_futures=True)
            if self.background is not None:
                self.background.close()

    def save_model(self) -> None:
        """The network average of the peers' parameters (one all-reduce; of the changes since
        the initial model in float16 with ``average_dtype=float16``) as ``model.pt``,
        written by the lowest live rank; each peer's own too with ``save_peers``. After a peer
        was lost no world collective is possible: the lowest survivor writes its own model and
        the file says so (``average_of`` names the peers averaged)."""
        ctx, view, model = self.ctx, self.view, self.grads.model
        if self.o.save_peers:
            with torch.no_grad():
                vector_to_parameters(self.x, self.grads.params)
            save_final_model(ctx.run_dir, model, ctx.cfg, name=f"model.peer{ctx.rank}.pt",
                             step=self.total, peer=ctx.rank)
        avg = average_parameters(ctx.transport, self.x, self.origin) if not view.dead else None
        if ctx.rank != min(view.alive):
            return
        with torch.no_grad():
            vector_to_parameters(avg if avg is not None else self.x, self.grads.params)
        save_final_model(ctx.run_dir, model, ctx.cfg, step=self.total,
                         average_of=sorted(view.alive) if avg is not None else [ctx.rank],
                         average_dtype=self.o.average_dtype if avg is not None else None)

    def finish(self) -> dict[str, Any]:
        with torch.no_grad():
            vector_to_parameters(self.x, self.mparams)
        view = self.view
        return {"steps": self.total, "straggled_steps": self.n_straggled,
                "skipped_steps": self.skipped, "straggle_rate": self.n_straggled / self.total,
                "trajectory": self.trajectory,
                "evals": self.evals if self.ctx.rank == min(view.alive) else [],
                "lost_peers": sorted(view.dead),
                "params": [q.detach().clone() for q in self.mparams]}

    # ---- one step's pieces ---------------------------------------------------------------------
    def _gradient(self, step: int) -> tuple[float | None, torch.Tensor, float, bool, bool]:
        """(loss, sum of partition grads, compute s, straggled, injected straggler)."""
        x, grads, pool, o = self.x, self.grads, self.pool, self.o
        faults = self.ctx.faults
        if step in self.crash:
            os.kill(os.getpid(), signal.SIGKILL)  # injected crash (tests): as a real kill -9
        if pool is None:
            loss, gs, spent = grads.compute(x)
            extra, injected = faults.delay(step, spent)
            if injected and o.mode != "wait":
                # late: it misses the implicit deadline (deadline_factor x its normal compute),
                # so it is busy until then and its work is lost; the next step starts there
                wait = min(extra, max(0.0, (o.deadline_factor - 1.0) * spent))
                if wait > 0:
                    time.sleep(wait)
                return loss, gs[0], spent + wait, True, True
            if extra > 0:
                time.sleep(extra)
            return loss, summed(gs), spent + extra, False, injected
        cancel = threading.Event()
        snapshot = x.clone()

        def job() -> tuple[float, torch.Tensor, float]:
            loss, gs, spent = grads.compute(snapshot)
            extra, _ = faults.delay(step, spent)
            if extra > 0:
                cancel.wait(extra)
            return loss, summed(gs), spent + extra

        assert o.deadline_s is not None
        t0 = time.perf_counter()
        fut = pool.submit(job)
        injected = faults.straggles(step)
        try:
            loss, g, spent = fut.result(timeout=o.deadline_s)
            return loss, g, spent, False, injected
        except FutureTimeout:
            cancel.set()
            return None, x, time.perf_counter() - t0, True, injected

    def _world(self, step: int, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` (world collectives); if it fails because ranks are marked dead, drop
        them and return None (the caller falls back), otherwise re-raise."""
        try:
            return fn(*args)
        except WorkerFailed as err:
            marked = self.ctx.transport.liveness.dead_ranks(err.ranks or None)
            if not marked:
                raise
            self.view.learn(marked, step, why="collective failed")
            return None

    def _gossip(self, y: torch.Tensor, rounds: int, step: int) -> torch.Tensor:
        """``rounds`` rounds of x_i <- W_ii y_i + sum_j W_ij y_j with the live neighbours; a
        neighbour whose exchange fails because it died is dropped (its weight folded)."""
        tr, view = self.ctx.transport, self.view
        for _ in range(rounds):
            nbrs, w_self, w_nbr = view.row()
            bufs = {j: torch.empty_like(y) for j in nbrs}
            sent = y.clone()  # one copy for every neighbour: nothing writes it until all left
            _, lost = swap(tr.rank, view.size, nbrs,
                           lambda j, b=bufs: tr.recv(b[j], j, caller_waits=True),
                           lambda j, v=sent: tr.send(v, j, caller_waits=True))
            if lost:
                view.learn(lost, step)
                _, w_self, w_nbr = view.row()
            out = y * w_self
            for j, w in w_nbr.items():
                out += w * bufs[j]
            y = out
        return y


def summed(grads: list[torch.Tensor]) -> torch.Tensor:
    """The sum of a peer's partition gradients; the one gradient itself when it holds one
    (d = 1: no copy a step)."""
    return grads[0] if len(grads) == 1 else torch.stack(grads).sum(0)


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
