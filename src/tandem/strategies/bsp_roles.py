"""The two loops of ``bsp_shared`` (M2): a machine's agent and a machine-learning worker.

They know nothing about workloads: a worker gets a ``compute(flat_model, version, step)``
callable and an agent gets the model's parameters and an optimizer, so tests can drive them with
gradients whose values are known (``tests/bsp_jobs.py``) and the strategy drives them with the
workload's real model (:mod:`tandem.strategies.bsp_shared`).

Worker (one process, never waits for anybody)::

    loop: if a newer model is published, copy it (seqlock read, never torn)
          compute a gradient on it
          add it at once into the machine's active accumulator (under the segment lock)
          until the agent sets the stop flag

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
worker simply stops adding; the superstep closes with the others' gradients. Every dead worker's
gradients are all in the accumulator by the read-out that follows its detection, so its total is
final there. The per-superstep all-reduce carries each machine's live workers and its dead
workers' gradients, so every agent recomputes the same budget, ``steps x live workers +
gradients the dead ones contributed``, and the same per-machine share of a gradient-count
superstep. A worker that died mid-add makes its buffer *torn* (see
:mod:`tandem.transport.shm`): that read-out is discarded, counted in ``discarded``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tandem.errors import TandemError
from tandem.transport.shm import MachineSegment

if TYPE_CHECKING:
    from tandem.codecs.base import Codec
    from tandem.telemetry.recorder import Recorder
    from tandem.transport.group import Group, Transport

log = logging.getLogger(__name__)

#: compute(flat_model, version, step) -> (loss, flat_gradient, compute_s, straggled)
ComputeFn = Callable[[torch.Tensor, int, int], tuple[float, torch.Tensor, float, bool]]


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors])


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


class WorkerLoop:
    """One machine-learning worker: read the latest model, compute, add; until stopped."""

    def __init__(self, seg: MachineSegment, local_index: int, compute: ComputeFn, *,
                 recorder: Recorder | None = None, transport: Transport | None = None,
                 max_staleness: int | None = None, stall_timeout_s: float = 60.0) -> None:
        self.seg, self.local, self.compute = seg, local_index, compute
        self.rec, self.transport = recorder, transport
        self.max_staleness = max_staleness
        self.stall_timeout_s = stall_timeout_s

    def run(self) -> dict[str, Any]:
        seg = self.seg
        flat = torch.empty(seg.numel)
        version = seg.read_model(flat, self.stall_timeout_s)
        changed_at = time.monotonic()
        handed_in = dropped = abandoned = reads = 0
        step = 0
        while not seg.stopped:
            t0 = time.perf_counter()
            latest = seg.latest()
            if latest != version:
                version = seg.read_model(flat, self.stall_timeout_s)
                changed_at = time.monotonic()
                reads += 1
            elif time.monotonic() - changed_at > self.stall_timeout_s:
                raise TandemError(f"worker {self.local}: no new model for "
                                  f"{self.stall_timeout_s:.0f}s; the agent of this machine is "
                                  "gone or stuck (raise --timeout if supersteps are that long)")
            read_s = time.perf_counter() - t0
            loss, grad, compute_s, straggled = self.compute(flat, version, step)
            t1 = time.perf_counter()
            status, stale = seg.add(grad, version, self.local, loss, self.max_staleness)
            add_s = time.perf_counter() - t1
            if status == "stopped":
                abandoned += 1
                break
            handed_in += 1
            dropped += status == "dropped"
            if self.transport is not None:
                self.transport.end_step()
            if self.rec is not None:
                self.rec.step(step, compute_s=compute_s, comm_s=read_s + add_s, idle_s=0.0,
                              bytes_sent=0, bytes_recv=0, loss=loss, straggled=straggled,
                              staleness=stale, version=version, dropped=status == "dropped")
            step += 1
        return {"role": "worker", "local_index": self.local, "gradients": handed_in,
                "dropped": dropped, "abandoned": abandoned, "model_reads": reads}


@dataclass
class AgentConfig:
    """How an agent runs its supersteps (the strategy's options, resolved)."""

    budget: int                          # stop once this many gradients were applied, all machines
    period_s: float = 0.05               # superstep length (time mode)
    grads_per_superstep: int | None = None  # count mode: gradients per superstep, all machines
    share: float = 1.0                   # this machine's fraction of the workers (count mode)
    normalize: str = "mean"              # "mean": sum(G)/sum(c); "sum": sum(G)
    eval_every_grads: int = 0            # evaluate each time this many more gradients applied
    stall_timeout_s: float = 60.0
    poll_s: float = 0.0005
    worker_ids: list[int] = field(default_factory=list)  # global worker index of each local one
    steps_per_worker: int | None = None  # set: recompute the budget when workers die
    worker_ranks: list[int] = field(default_factory=list)  # transport rank of each local worker
    liveness_every_s: float = 0.1        # how often to ask the store who died (a round trip each)


class Agent:
    """One machine's BSP agent; ``group`` holds every machine's agent (agent 0 = controller)."""

    def __init__(self, seg: MachineSegment, params: list[torch.Tensor],
                 optimizer: torch.optim.Optimizer, cfg: AgentConfig, *, transport: Transport,
                 group: Group, codec: Codec | None = None, recorder: Recorder | None = None,
                 evaluate: Callable[[], tuple[float | None, float]] | None = None,
                 is_controller: bool = False) -> None:
        self.seg, self.params, self.optimizer, self.cfg = seg, params, optimizer, cfg
        self.transport, self.group, self.codec = transport, group, codec
        self.rec, self.evaluate, self.is_controller = recorder, evaluate, is_controller
        self.machines = group.size
        self.history: list[dict[str, Any]] = []  # per superstep, for tests and results
        self.dead: set[int] = set()            # local indices of workers known dead
        self.alive_total: float | None = None  # live workers on all machines (last all-reduce)
        self._polled = float("-inf")

    # ---- dead workers -------------------------------------------------------------------------
    def _poll_dead(self) -> None:
        """Ask the store (at most every ``liveness_every_s``) which local workers died."""
        cfg = self.cfg
        if not cfg.worker_ranks or time.monotonic() - self._polled < cfg.liveness_every_s:
            return
        self._polled = time.monotonic()
        liveness = self.transport.liveness
        for r in liveness.dead_ranks(cfg.worker_ranks):
            i = cfg.worker_ranks.index(r)
            if i in self.dead:
                continue
            self.dead.add(i)
            who = cfg.worker_ids[i] if cfg.worker_ids else i
            why = liveness.describe([r])
            log.warning("bsp agent: worker %s (rank %d) died (%s); the supersteps go on without "
                        "it", who, r, why)
            if self.rec is not None:
                self.rec.info(lost_worker=who, lost_rank=r, lost_reason=why[:300])

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
        mean = self.codec.exchange(unflatten(local, self.params), self.transport, self.group)
        return flatten(mean), stats

    def _apply(self, direction: torch.Tensor) -> None:
        for p, g in zip(self.params, unflatten(direction, self.params), strict=True):
            p.grad = g.to(p.dtype).clone()
        self.optimizer.step()

    # ---- the loop -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, seg = self.cfg, self.seg
        version = 0
        seg.publish(flatten(self.params), version)
        applied = 0
        per_worker = [0] * seg.local_workers
        discarded = [0] * seg.local_workers  # read out of torn buffers (never applied)
        budget = cfg.budget
        budget_alive = round(seg.local_workers / cfg.share) if cfg.share else 0  # all machines
        dropped_total = 0
        next_eval = cfg.eval_every_grads or None
        last_progress = time.monotonic()
        start = time.perf_counter()
        while True:
            self._wait(start, seg)
            self._poll_dead()  # before the swap: a worker seen dead has all its adds in it
            t_swap = time.perf_counter()
            out = seg.swap(version + 1)
            self._torn(out)
            for i, n in enumerate(out["per_worker"]):
                per_worker[i] += n
            for i, n in enumerate(out["discarded_per_worker"]):
                discarded[i] += n
            lost = sum(per_worker[i] for i in self.dead)  # applied: their budget share
            t_comm = time.perf_counter()
            direction, stats = self._combine(out, lost)
            t_apply = time.perf_counter()
            total, stale_sum, dropped, loss_sum, alive, lost_all = (float(x) for x in stats)
            self.alive_total = alive
            if alive == 0:
                raise TandemError("agent: every worker on every machine died; nothing left to "
                                  "compute the remaining gradients")
            if cfg.steps_per_worker is not None and (alive < budget_alive or lost_all):
                budget = int(cfg.steps_per_worker * alive + lost_all)  # same on every agent
            self._apply(direction)
            version += 1
            seg.publish(flatten(self.params), version)
            t_end = time.perf_counter()
            applied += int(total)
            dropped_total += out["dropped"]
            if total > 0:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > cfg.stall_timeout_s:
                raise TandemError(f"agent: no gradient from any worker for "
                                  f"{cfg.stall_timeout_s:.0f}s; are the workers alive?")
            stop = applied >= budget
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
                    next_eval += cfg.eval_every_grads
            start = time.perf_counter()
            if stop:
                break
        left = seg.swap(version + 1, stop=True)
        self._torn(left)
        for i, n in enumerate(left["per_worker"]):
            per_worker[i] += n
        for i, n in enumerate(left["discarded_per_worker"]):
            discarded[i] += n
        dropped_total += left["dropped"]

        def by_id(xs: list[int]) -> dict[int, int]:
            return {cfg.worker_ids[i] if cfg.worker_ids else i: n for i, n in enumerate(xs)}

        return {"role": "agent", "supersteps": version, "applied": applied,
                "leftover": left["count"], "dropped": dropped_total, "budget": budget,
                "per_worker": by_id(per_worker), "discarded": sum(discarded),
                "discarded_per_worker": by_id(discarded),
                "lost_workers": sorted(cfg.worker_ids[i] if cfg.worker_ids else i
                                       for i in self.dead)}

    def _torn(self, out: dict[str, Any]) -> None:
        if out["torn"]:
            n = sum(out["discarded_per_worker"])
            log.warning("bsp agent: worker(s) %s died while adding; discarded the superstep's "
                        "%d gradient(s) rather than apply a partial sum", out["torn"], n)
            if self.rec is not None:
                self.rec.info(torn_add=out["torn"], discarded=n)

    def _eval(self, superstep: int, applied: int) -> None:
        if self.evaluate is None:
            return
        rec = self.rec
        if rec is None:
            self.evaluate()
            return
        with rec.evaluating():
            acc, loss = self.evaluate()
        if self.is_controller:
            rec.eval(superstep, accuracy=acc, loss=loss, gradients=applied)
