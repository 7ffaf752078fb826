"""The two loops of ``bsp_shared`` (M2): a machine's agent (here) and a machine-learning worker
(:mod:`tandem.strategies.bsp_shared.worker`, re-exported here).

They know nothing about workloads: a worker gets a ``compute(flat_model, version, step)``
callable and an agent gets the model's parameters and an optimizer, so tests can drive them with
gradients whose values are known (``tests/bsp_jobs.py``) and the strategy drives them with the
workload's real model (:mod:`tandem.strategies.bsp_shared`).

Agent (one per machine; agent 0 also plays the BSP controller)::

    superstep s: wait for the period (or for this machine's share of the gradient count)
                 swap-and-zero the accumulator          -> G_m, c_m, per-worker counts
                 all-reduce (c, staleness, loss) over the agents -> C = sum of c_m
                 codec.exchange(G_m * K / C) over the agents -> sum(G) / C (K = machines)
                 theta_{s+1} = theta_s - lr * that (the optimizer step), publish version s+1
                 stop once C summed over supersteps reaches the gradient budget

The stop decision and the evaluation points are functions of all-reduced numbers, so every agent
reaches them at the same superstep without a separate controller message: the controller's
"read out now" is the superstep boundary itself, and agent 0 records the global evaluations.

Dead workers: before each read-out (at most every ``liveness_every_s``, and while waiting for a
gradient count) an agent asks the store which of its workers the launcher marked dead. A dead
worker stops adding and the superstep closes without it; its gradients are all in the
accumulator by the read-out after its detection. The per-superstep all-reduce carries each
machine's live workers and its dead workers' gradients, so every agent recomputes the same budget
(``steps x live workers + the dead ones' gradients``) and per-machine share of a gradient-count
superstep. A worker that died mid-add makes its buffer *torn* (:mod:`.segment`): that read-out is
discarded, counted in ``discarded``. At the end, a live worker with no gradient in the last
superstep may be stuck: it is marked abandoned (:func:`~tandem.transport.store_barrier.abandon`).

Checkpoints (every ``checkpoint_every`` supersteps; checkpoint ``N`` = the state after ``N``
supersteps). Workers never join a collective, so the "barrier of all ranks" is two-level and
cannot deadlock against the shared-memory protocol: (1) before superstep ``N-1``'s swap each
agent sets the request word to ``N``; each worker, its in-flight gradient added, writes its rank
file (data position, RNG, counters), acks and polls for the release; (2) the agent waits for its
*live* workers' acks (one marked dead meanwhile is excluded and retired on resume; one neither
acked nor dead after ``stall_timeout_s`` makes the machine "not ready"); (3) the swap then holds
every gradient handed in before the cut and none after it, and the superstep runs as usual;
(4) the agents all-reduce "not ready": if every machine is ready each writes its file (model,
optimizer, codec memory, counters, dead workers), the all-reduce is the barrier and the
controller moves ``LATEST``, else the checkpoint is skipped (``checkpoint_skipped``); (5) the
agent clears the request word and the workers go on with the new model.

Evaluations hold the workers through a hold word: each worker starts no gradient until the
agent has evaluated (one in progress is finished, not waited for), so evaluation time, which is
left out of the wall time, holds no training either.

Checkpoint files are numbered from the controller: ``rank0.pt`` is agent 0 (it writes
``LATEST``), ``rank<m>.pt`` agent ``m``, ``rank<K+w>.pt`` worker ``w`` under the local launcher
(``K`` machines); under torchrun the file number is the process rank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from tandem.errors import CheckpointError, TandemError
from tandem.flat import flatten, unflatten
from tandem.strategies.bsp_shared.options import AgentConfig
from tandem.strategies.bsp_shared.segment import MachineSegment
from tandem.strategies.bsp_shared.worker import (  # noqa: F401 - re-exported: one import for both roles
    ComputeFn,
    WorkerLoop,
    model_digest,
)
from tandem.trainer.precision import step_optimizer
from tandem.transport.store_barrier import abandon, abandon_idle

#: save(checkpoint_id, agent_state): write this agent's rank file (its barrier: the agents')
SaveAgentFn = Callable[[int, dict[str, Any]], None]

if TYPE_CHECKING:
    from tandem.codecs.base import Codec
    from tandem.telemetry.recorder import Recorder
    from tandem.transport.transport import Group, Transport

log = logging.getLogger(__name__)


class Agent:
    """One machine's BSP agent; ``group`` holds every machine's agent (agent 0 = controller)."""

    def __init__(self, seg: MachineSegment, params: list[torch.Tensor],
                 optimizer: torch.optim.Optimizer, cfg: AgentConfig, *, transport: Transport,
                 group: Group, codec: Codec | None = None, recorder: Recorder | None = None,
                 evaluate: Callable[[], Any] | None = None,
                 is_controller: bool = False, save: SaveAgentFn | None = None,
                 scheduler: Any = None, clip: float | None = None) -> None:
        self.seg, self.params, self.optimizer, self.cfg = seg, params, optimizer, cfg
        self.shapes = [tuple(p.shape) for p in params]
        #: the LR schedule, stepped once per superstep's update; the global-norm clip of the
        #: aggregated gradient (the same on every agent, so every model stays the same)
        self.scheduler, self.clip = scheduler, clip
        self.transport, self.group, self.codec = transport, group, codec
        self.rec, self.evaluate, self.is_controller = recorder, evaluate, is_controller
        self.save = save
        self.machines = group.size
        self.history: list[dict[str, Any]] = []  # per superstep, for tests and results
        self.dead: set[int] = set()            # local indices of workers known dead
        self.alive_total: float | None = None  # live workers on all machines (last all-reduce)
        self._polled = float("-inf")
        # progress: what a checkpoint keeps (state_dict) besides the model and the optimizer
        n = seg.local_workers
        self.version = self.applied = self.dropped_total = 0
        self.budget = cfg.budget
        self.per_worker, self.discarded = [0] * n, [0] * n  # read out; read out of torn buffers
        self.torn_adds: list[int] = []
        self.checkpoints: list[int] = []
        self.checkpoints_skipped: list[int] = []
        self.resumed_from: dict[str, Any] | None = None

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, codec memory and the superstep counters, at a superstep boundary."""
        return {"superstep": self.version, "applied": self.applied, "budget": self.budget,
                "dropped": self.dropped_total, "per_worker": list(self.per_worker),
                "discarded": list(self.discarded), "dead": sorted(self.dead),
                "alive_total": self.alive_total, "torn_adds": list(self.torn_adds),
                "params": [p.detach().clone() for p in self.params],
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "codec": self.codec.state_dict() if self.codec is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["per_worker"]) != self.seg.local_workers or \
                len(state["params"]) != len(self.params):
            raise CheckpointError("agent checkpoint does not match this machine (workers or "
                                  "model changed)")
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.codec is not None and state["codec"] is not None:
            self.codec.load_state_dict(state["codec"])
        self.version, self.applied = int(state["superstep"]), int(state["applied"])
        self.budget, self.dropped_total = int(state["budget"]), int(state["dropped"])
        self.per_worker = [int(x) for x in state["per_worker"]]
        self.discarded = [int(x) for x in state["discarded"]]
        self.dead = {int(i) for i in state["dead"]}
        self.alive_total = state["alive_total"]
        self.torn_adds = [int(x) for x in state["torn_adds"]]
        self.resumed_from = {"superstep": self.version, "applied": self.applied,
                             "model_sha256": model_digest(self.params)}

    def _pause(self, cid: int) -> bool:
        """Ask this machine's workers to save checkpoint ``cid`` and wait until every live one
        has (acked: its file is written, it waits for :meth:`_checkpoint`'s release). A worker
        found dead meanwhile is excluded, not waited for. False after ``stall_timeout_s``."""
        seg, cfg = self.seg, self.cfg
        seg.request_checkpoint(cid)
        deadline = time.monotonic() + cfg.stall_timeout_s
        while True:
            self._poll_dead()
            waiting = [i for i in range(seg.local_workers)
                       if i not in self.dead and not seg.acked(i, cid)]
            if not waiting:
                return True
            if time.monotonic() > deadline:
                log.warning("bsp agent: local worker(s) %s did not save checkpoint %d in %.0fs",
                            waiting, cid, cfg.stall_timeout_s)
                return False
            time.sleep(cfg.poll_s)

    def _checkpoint(self, cid: int, ready: bool) -> None:
        """All agents agree (a tiny all-reduce) whether every machine's workers saved; then each
        agent writes its file, the agents' barrier runs inside ``save`` and the controller moves
        LATEST; else the checkpoint is skipped (recorded). Either way the workers go on."""
        flag = torch.tensor([0.0 if ready else 1.0], dtype=torch.float64)
        if self.machines > 1:
            self.transport.all_reduce(flag, group=self.group, category="control").wait()
        if float(flag[0]) == 0 and self.save is not None:
            self.save(cid, self.state_dict())
            self.checkpoints.append(cid)
        else:
            self.checkpoints_skipped.append(cid)
            log.warning("bsp agent: checkpoint %d skipped: %d machine(s) had a worker that "
                        "neither saved nor was known dead", cid, int(flag[0]))
            if self.rec is not None:
                self.rec.info(checkpoint_skipped=cid, machines_not_ready=int(flag[0]))
        self.seg.release()

    # ---- dead workers -------------------------------------------------------------------------
    def _poll_dead(self) -> None:
        """Ask the store (at most every ``liveness_every_s``) which local workers died."""
        cfg = self.cfg
        if not cfg.worker_ranks or time.monotonic() - self._polled < cfg.liveness_every_s:
            return
        self._polled = time.monotonic()
        liveness = self.transport.liveness
        for r in liveness.dead_ranks(cfg.worker_ranks):
            if (i := cfg.worker_ranks.index(r)) in self.dead:
                continue
            self.dead.add(i)
            who, why = cfg.worker_ids[i] if cfg.worker_ids else i, liveness.describe([r])
            log.warning("bsp agent: worker %s (rank %d) died (%s); the supersteps go on without "
                        "it", who, r, why)
            if self.rec is not None:
                self.rec.info(lost_worker=who, lost_rank=r, lost_reason=why[:300])
            abandon(self.transport, r, f"bsp agent: counted dead ({why})")

    def _target(self) -> int:
        """This machine's share of a gradient-count superstep, among the live workers."""
        cfg = self.cfg
        alive = self.seg.local_workers - len(self.dead) if cfg.worker_ranks else None
        if alive is None or self.alive_total is None:
            share = cfg.share
        else:
            share = alive / self.alive_total if self.alive_total else 0.0
        if alive == 0:
            return 0
        return max(1, round(cfg.grads_per_superstep * share))  # type: ignore[operator]

    # ---- phases -----------------------------------------------------------------------------
    def _wait(self, start: float, seg: MachineSegment) -> None:
        cfg = self.cfg
        if cfg.grads_per_superstep is None:
            left = start + cfg.period_s - time.perf_counter()
            if left > 0:
                time.sleep(left)
            return
        target = self._target()
        deadline = time.monotonic() + cfg.stall_timeout_s
        while seg.pending_count() < target:
            self._poll_dead()
            target = self._target()  # a worker that died meanwhile lowers it (0: none left here)
            if time.monotonic() > deadline:
                raise TandemError(f"agent: fewer than {target} gradients in "
                                  f"{cfg.stall_timeout_s:.0f}s; are the workers alive?")
            time.sleep(cfg.poll_s)

    def _combine(self, out: dict[str, Any], lost: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(update direction, global stats [count, stale_sum, dropped, loss_sum, live workers,
        gradients of dead workers]); ``lost`` is this machine's dead workers' gradients."""
        alive = self.seg.local_workers - len(self.dead)
        stats = torch.tensor([out["count"], out["stale_sum"], out["dropped"], out["loss_sum"],
                              alive, lost], dtype=torch.float64)
        if self.machines > 1:
            self.transport.all_reduce(stats, group=self.group).wait()
        total = float(stats[0])
        scale = 1.0 / max(1.0, total) if self.cfg.normalize == "mean" else 1.0
        local = out["sum"] * (scale * self.machines)
        if self.machines == 1:
            return local, stats
        if self.codec is None:
            self.transport.all_reduce(local, group=self.group).wait()
            return local / self.machines, stats
        mean = self.codec.exchange(unflatten(local, self.shapes), self.transport, self.group)
        return flatten(mean), stats

    def _apply(self, direction: torch.Tensor) -> None:
        for p, g in zip(self.params, unflatten(direction, self.shapes), strict=True):
            p.grad = g.to(p.dtype).clone()
        step_optimizer(self.optimizer, self.params, self.clip, self.scheduler)

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, seg = self.cfg, self.seg
        if self.version:  # resumed: gradients added from now on update the restored model
            seg.set_base(self.version)
            if self.rec is not None:
                self.rec.info(resumed_from=self.resumed_from)
        seg.publish(flatten(self.params), self.version)
        every = cfg.eval_every_grads
        next_eval = (self.applied // every + 1) * every if every else None
        last_progress = time.monotonic()
        start = time.perf_counter()
        while True:
            self._wait(start, seg)
            cid = self.version + 1  # checkpoint ``cid`` = the state after ``cid`` supersteps
            due = bool(cfg.checkpoint_every) and cid % cfg.checkpoint_every == 0 and \
                self.save is not None
            ready = self._pause(cid) if due else False  # workers paused: nothing after the swap
            self._poll_dead()  # before the swap: a worker seen dead has all its adds in it
            t_swap = time.perf_counter()
            out = seg.swap(self.version + 1)
            self._read_out(out)
            lost = sum(self.per_worker[i] for i in self.dead)  # applied: their budget share
            t_comm = time.perf_counter()
            direction, stats = self._combine(out, lost)
            t_apply = time.perf_counter()
            total, stale_sum, dropped, loss_sum, alive, lost_all = (float(x) for x in stats)
            self.alive_total = alive
            if alive == 0:
                raise TandemError("agent: every worker on every machine died; nothing left to "
                                  "compute the remaining gradients")
            if cfg.steps_per_worker is not None:  # steps x live workers + what the dead did
                self.budget = int(cfg.steps_per_worker * alive + lost_all)  # same on every agent
            self._apply(direction)
            self.version += 1
            version = self.version
            seg.publish(flatten(self.params), version)
            t_end = time.perf_counter()
            self.applied += int(total)
            applied = self.applied
            if total > 0:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > cfg.stall_timeout_s:
                raise TandemError(f"agent: no gradient from any worker for "
                                  f"{cfg.stall_timeout_s:.0f}s; are the workers alive?")
            stop = applied >= self.budget
            b = self.transport.end_step()
            rec = {"superstep": version - 1, "gradients": int(total),
                   "local_gradients": out["count"],
                   "per_worker": {cfg.worker_ids[i] if cfg.worker_ids else i: n
                                  for i, n in enumerate(out["per_worker"])},
                   "staleness_mean": stale_sum / total if total else 0.0,
                   "staleness_max": out["stale_max"], "dropped": int(dropped),
                   "duration_s": t_end - start, "version": version, "applied_total": applied}
            self.history.append(rec)
            if self.rec is not None:
                self.rec.step(version - 1, compute_s=t_end - t_apply, comm_s=t_apply - t_comm,
                              idle_s=t_swap - start + (t_comm - t_swap), bytes_sent=b.sent,
                              bytes_recv=b.recv, loss=loss_sum / total if total else None,
                              **{k: v for k, v in rec.items() if k != "superstep"})
            if next_eval is not None and (applied >= next_eval or stop):
                self._eval(version - 1, applied)
                while next_eval <= applied:
                    next_eval += every
            if due and not stop:  # never after the last superstep (nothing left to resume)
                with self.rec.evaluating() if self.rec is not None else nullcontext():
                    self._checkpoint(cid, ready)
            start = time.perf_counter()
            if stop:
                break
        left = seg.swap(self.version + 1, stop=True)
        self._read_out(left)
        abandon_idle(self.transport, {r: out["per_worker"][i] + left["per_worker"][i] for i, r in
                                      enumerate(cfg.worker_ranks) if i not in self.dead},
                     "bsp agent: no gradient in the last superstep", cfg.stall_timeout_s)
        return {"role": "agent", "supersteps": self.version, "applied": self.applied,
                "leftover": left["count"], "dropped": self.dropped_total, "budget": self.budget,
                "per_worker": self._by_id(self.per_worker), "discarded": sum(self.discarded),
                "discarded_per_worker": self._by_id(self.discarded),
                "lost_workers": sorted(self._by_id(self.per_worker, self.dead)),
                "torn_adds": self.torn_adds, "checkpoints": self.checkpoints,
                "checkpoints_skipped": self.checkpoints_skipped,
                "resumed_from": self.resumed_from}

    def _by_id(self, xs: list[int], only: set[int] | None = None) -> dict[int, int]:
        ids = self.cfg.worker_ids
        return {ids[i] if ids else i: n for i, n in enumerate(xs) if only is None or i in only}

    def _read_out(self, out: dict[str, Any]) -> None:
        """Add a swap's per-worker counts to the run's; a torn buffer is reported, not applied."""
        for i, n in enumerate(out["per_worker"]):
            self.per_worker[i] += n
        for i, n in enumerate(out["discarded_per_worker"]):
            self.discarded[i] += n
        self.dropped_total += out["dropped"]
        if out["torn"]:
            ids = self.cfg.worker_ids
            torn = [ids[i] if ids else i for i in out["torn"]]
            self.torn_adds.extend(torn)
            n = sum(out["discarded_per_worker"])
            log.warning("bsp agent: worker(s) %s died while adding; discarded the superstep's "
                        "%d gradient(s) rather than apply a partial sum", torn, n)
            if self.rec is not None:
                self.rec.info(torn_add=torn, discarded=n)

    def _eval(self, superstep: int, applied: int) -> None:
        """Evaluate with this machine's workers held (:meth:`MachineSegment.hold`): evaluation
        time is left out of the run's wall time, as in every strategy, so the workers must start
        no gradient in it either (they would get free compute, and pile stale gradients into the
        next superstep). Their gradients in progress are finished, not waited for."""
        if self.evaluate is None:
            return
        rec, seg = self.rec, self.seg
        with rec.evaluating() if rec is not None else nullcontext():
            seg.hold(superstep + 1)
            try:
                ev = self.evaluate()
            finally:
                seg.unhold()
        if rec is not None and self.is_controller:
            rec.eval(superstep, **ev.record(), gradients=applied)
