"""``bsp_shared`` (M2): BSP supersteps whose compute runs asynchronously in shared memory.

Roles (every one a process): on each machine, several machine-learning *workers* and one *agent*
sharing a memory segment (:mod:`tandem.strategies.bsp_shared.segment`); agent 0 also acts as the
BSP controller.
Workers never wait: they read the latest published model, compute a gradient and add it into the
machine's accumulator at once. Every superstep (a wall-clock period, or a gradient count) the
agents swap-and-zero their accumulators, combine the machines' sums and counts through the
transport with any codec, apply ``theta -= lr * sum(G) / max(1, sum(c))`` and publish the next
model version. Only agents talk across machines, so inter-machine bytes per superstep do not
depend on how many workers a machine has; fast workers simply contribute more gradients per
superstep, so throughput approaches the sum of the workers' speeds instead of N x the slowest.
The loops themselves live in :mod:`tandem.strategies.bsp_shared.agent`.

Process layout:

* local launcher (``tandem train``): ``processes = workers + machines``; ranks ``0..W-1`` are the
  workers (rank = worker index, so data shards and ``--slow-worker RANK:F`` mean what they mean
  elsewhere), ranks ``W..W+K-1`` the agents of "machines" ``0..K-1``. The workers are split over
  machines in contiguous blocks (``split`` sets the sizes explicitly).
* torchrun (one node = one machine): on every node local rank 0 is the agent and local ranks
  ``1..L-1`` the workers, worker index ``node * (L-1) + local_rank - 1``. ``workers`` in the config
  must equal ``nodes * (nproc_per_node - 1)``.

Options (``--strategy-opt key=value``):

* ``machines`` (1): how many emulated machines the local launcher makes (ignored under torchrun).
* ``split`` (none): explicit workers per machine, e.g. ``[1,3]``; must sum to ``workers``.
* ``period_s`` (0.05): superstep length in seconds. Shorter = fresher models (less staleness) and
  more inter-machine messages; longer = fewer bytes, more gradients averaged per update (a larger
  effective batch: raise ``lr`` with ``normalize=mean``).
* ``grads_per_superstep`` (none): end a superstep after this many gradients (all machines; each
  agent waits for its machine's proportional share) instead of by time. Set it to ``workers`` to
  get the same number of gradients per update as synchronous all-reduce.
* ``normalize`` (``mean``): ``mean`` divides the summed gradients by their count (the update has
  the scale of one gradient whatever the speeds); ``sum`` applies the raw sum.
* ``max_staleness`` (none): drop gradients computed on a model more than this many versions
  older than the one they would update (they are counted as ``dropped``). 0 = only fresh ones.

Budget: the run stops once ``steps x workers`` gradients were applied (the same number of
gradients synchronous all-reduce consumes in ``steps`` steps); the last superstep may overshoot
by what arrived in it, and gradients added after the final read-out are reported as ``leftover``.

Dead workers (``tolerates_lost_workers``): a worker that dies (``kill -9``, ``inject_crash``) is
let go by the launcher; its agent learns of it from the store, the superstep closes with the
survivors' gradients and the budget becomes ``steps x survivors + what the dead ones
contributed``. The summary lists the dead ranks in ``lost_ranks``; an agent's death still fails
the run (its workers stop at once: they watch its dead mark in the store, and an agent that
raises sets the segment's stop flag; the other agents' exchange names it).

Checkpoints (``supports_checkpoints``): ``--checkpoint-every N`` counts *supersteps*. At every
N-th superstep boundary the agents pause their workers through shared memory (each worker
writes its file: data position, RNG, counters), read out, apply, then write theirs (model,
optimizer, codec memory of the inter-machine exchange, superstep, applied gradients, budget,
per-worker counts, dead workers) and the controller moves ``LATEST`` (handshake, and what a dead
or stuck worker does to it: :mod:`tandem.strategies.bsp_shared.agent`). ``--resume`` restores model,
optimizer, codec, superstep and counters exactly and each worker's minibatch sequence; which
gradients land in which superstep afterwards depends on timing, as in any run. Workers dead at
the checkpoint stay out (*retired*). Test hook: ``TANDEM_BSP_DIE_MID_ADD=<worker>:<step>``
kills that worker in the middle of an add (a torn add; ``tests/test_bsp_reliability.py``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tandem.checkpoint import Checkpointer, config_fingerprint, rng_state, set_rng_state
from tandem.config import RunConfig
from tandem.errors import CheckpointError, ConfigError
from tandem.flat import flatten, unflatten
from tandem.strategies.base import Strategy, register
from tandem.strategies.bsp_shared.agent import Agent, WorkerLoop
from tandem.strategies.bsp_shared.layout import (
    Layout,
    layout_for,
    local_layout,
    machine_split,
    torchrun_layout,
)
from tandem.strategies.bsp_shared.options import AgentConfig, BspSharedOptions
from tandem.strategies.bsp_shared.segment import MachineSegment
from tandem.trainer import (
    LocalTrainer,
    build_model,
    evaluate,
    screen_gradients,
    training_spec,
)
from tandem.trainer.final_model import save_final_model
from tandem.trainer.stragglers import ComputeFaults

__all__ = ["BspSharedOptions", "BspSharedStrategy", "Layout", "exchanges", "local_layout",
           "machine_split", "torchrun_layout"]


def exchanges(budget: int, grads_per_superstep: int) -> int:
    """Supersteps (one codec exchange each) of a run of ``budget`` gradients in all, when every
    superstep ends after ``grads_per_superstep`` of them (the last may be short)."""
    return -(-budget // grads_per_superstep)


@register
class BspSharedStrategy(Strategy):
    name = "bsp_shared"
    Options = BspSharedOptions
    #: a dead ML worker stops adding; the agents finish the superstep and the run without it
    tolerates_lost_workers = True
    #: every ``checkpoint_every`` *supersteps* (see bsp_roles for the handshake)
    supports_checkpoints = True
    #: one codec exchange per superstep, and supersteps end by time unless grads_per_superstep
    exchanges_by_time = True

    @classmethod
    def check(cls, cfg: RunConfig, options: Any) -> None:
        """Refuse a codec that counts its exchanges (LGC's stages) when their number depends on
        timing: its stages would be shares of the workers' steps, counted in supersteps, so a
        run of fewer supersteps than steps would never leave them."""
        from tandem.codecs.base import CODECS, make_codec

        if not CODECS[cfg.codec.name].counts_exchanges or \
                options.grads_per_superstep is not None:
            return
        codec = make_codec(cfg.codec.name, cfg.codec.options)
        try:  # the codec's own rule: are its stages known without the run's length?
            codec.stage_lengths()
        except ConfigError:
            raise ConfigError(
                f"codec: {codec.name!r} under bsp_shared: its stages are shares of its "
                "exchanges, one per superstep, and supersteps end by time (period_s), so "
                "their number is not known before the run; set strategy option "
                "grads_per_superstep (then the run has workers x steps / grads_per_superstep "
                "supersteps), or give the codec warmup_steps and ae_steps (in supersteps)"
            ) from None

    @classmethod
    def check_world(cls, cfg: RunConfig, world: int) -> None:
        """Under torchrun the layout comes from the nodes (one agent per node); the layout
        itself refuses a mismatch (:func:`.layout.layout_for`)."""

    @classmethod
    def processes(cls, cfg: RunConfig) -> int:
        opts = BspSharedOptions.model_validate(cfg.strategy.options)
        return cfg.workers + len(machine_split(cfg.workers, opts))

    def setup(self) -> None:
        """Before the clock starts: roles, the agents' group, the shared segment of each machine,
        and on ``--resume`` each process's checkpoint file.

        The agent creates the segment and publishes its path in the store; once every process
        has attached (the barrier), the agent unlinks the name, so nothing can leak afterwards.
        A resumed agent marks the workers that were dead at the checkpoint *retired* in the
        segment before publishing it; those workers then load nothing and end at once.
        """
        ctx = self.ctx
        opts: BspSharedOptions = self.opts  # type: ignore[assignment]
        self.layout = layout_for(ctx.cfg, opts, ctx.world)
        self.group = ctx.transport.new_group(self.layout.agent_ranks)  # every rank calls it
        self.kind, self.machine, self.local = self.layout.role(ctx.rank)
        key = f"bsp_shared/segment/{self.machine}"
        self.model = build_model(ctx.workload, ctx.cfg.seed, ctx.transport.device)
        numel = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_local = len(self.layout.worker_ranks[self.machine])
        # files numbered from the controller, so that the Checkpointer's "rank 0 writes LATEST"
        # is the controller (under the local launcher rank 0 is a worker that may die)
        self.ckpt = Checkpointer(ctx.run_dir, (ctx.rank - self.layout.agent_ranks[0]) % ctx.world,
                                 config_fingerprint(ctx.cfg.model_dump(mode="json")),
                                 every=ctx.cfg.checkpoint_every)
        self.state: dict[str, Any] | None = None
        self.retired = False
        if self.kind == "agent":  # before the clock starts, so that the start record says so
            ctx.recorder.role = "controller"  # agents' supersteps are not worker steps
        if ctx.cfg.resume and self.kind == "agent":
            self.state = self._load()
        self.seg: MachineSegment | None = None
        try:
            if self.kind == "agent":
                self.seg = MachineSegment.create(numel, n_local)
                for i in (self.state or {}).get("agent", {}).get("dead", []):
                    self.seg.retire(int(i))
                ctx.transport.store.set(key, str(self.seg.path))
            else:
                path = ctx.transport.store.get(key).decode()
                self.seg = MachineSegment.attach(path, numel, n_local)
                self.retired = self.seg.is_retired(self.local)
                if ctx.cfg.resume and not self.retired:
                    self.state = self._load()
            ctx.transport.barrier().wait()
        finally:
            if self.seg is not None and self.kind == "agent":
                self.seg.unlink()  # attached or failed: the name is no longer needed

    def _load(self) -> dict[str, Any]:
        state = self.ckpt.load()
        index = self.layout.worker_index.get(self.ctx.rank, self.machine)
        if state.get("role") != self.kind or state.get("index") != index:
            raise CheckpointError(f"checkpoint file {self.ckpt.rank} holds {state.get('role')} "
                                  f"{state.get('index')}, not {self.kind} {index}: was the "
                                  "layout (workers, machines, split) changed?")
        # the killed run's records after the checkpoint are rolled back (in this role's units)
        self.ctx.recorder.resume_from(int(state["agent"]["superstep"] if self.kind == "agent"
                                          else state["loop"]["step"]))
        return state

    def _save(self, cid: int, state: dict[str, Any], barrier: Any) -> None:
        index = self.layout.worker_index.get(self.ctx.rank, self.machine)
        self.ckpt.save(cid, {**state, "role": self.kind, "index": index, "rng": rng_state()},
                       barrier)

    def run(self) -> dict[str, Any]:
        seg = self.seg
        assert seg is not None, "setup() must run first"
        try:
            if self.kind == "agent":
                return self._agent(seg, self.model, self.group, self.layout, self.machine)
            return self._worker(seg, self.layout, self.machine, self.local)
        finally:
            seg.close()

    # ---- roles ----------------------------------------------------------------------------
    def _agent(self, seg: MachineSegment, model: torch.nn.Module, group: Any, layout: Layout,
               machine: int) -> dict[str, Any]:
        ctx = self.ctx
        opts: BspSharedOptions = self.opts  # type: ignore[assignment]
        rec = ctx.recorder
        params = [p for p in model.parameters() if p.requires_grad]
        total = self.total_steps(ctx.cfg, len(ctx.workload.train))
        ids = [layout.worker_index[r] for r in layout.worker_ranks[machine]]
        cfg = AgentConfig(
            budget=total * ctx.cfg.workers, period_s=opts.period_s,
            grads_per_superstep=opts.grads_per_superstep, share=len(ids) / ctx.cfg.workers,
            normalize=opts.normalize, eval_every_grads=self.eval_every(total) * ctx.cfg.workers,
            stall_timeout_s=ctx.cfg.timeout_s, worker_ids=ids, steps_per_worker=total,
            worker_ranks=list(layout.worker_ranks[machine]),
            checkpoint_every=ctx.cfg.checkpoint_every)
        codec = ctx.make_codec()
        codec.set_total_steps(exchanges(total * ctx.cfg.workers, opts.grads_per_superstep)
                              if opts.grads_per_superstep else total)

        def barrier() -> None:  # the agents' barrier (workers are held in shared memory)
            if layout.machines > 1:
                ctx.transport.all_reduce(torch.zeros(1), group=group, category="control").wait()

        spec = training_spec(ctx.cfg, ctx.workload)  # the agents own the optimizer
        optimizer = spec.make_optimizer(model)
        agent = Agent(seg, params, optimizer, cfg, transport=ctx.transport,
                      group=group, codec=codec, recorder=rec, is_controller=machine == 0,
                      evaluate=lambda: evaluate(model, ctx.workload, ctx.transport, group),
                      save=lambda cid, state: self._save(cid, {"agent": state}, barrier),
                      scheduler=spec.make_scheduler(optimizer, total), clip=spec.clip)
        if self.state is not None:
            agent.load_state_dict(self.state["agent"])
            set_rng_state(self.state["rng"])
        try:
            out = agent.run()
        except BaseException:
            seg.abort()  # our workers would otherwise wait timeout_s for a model that never comes
            raise
        stale = [h["staleness_mean"] for h in agent.history if h["gradients"]]
        rec.info(bsp_machines=layout.machines, bsp_supersteps=out["supersteps"],
                 bsp_mean_staleness=sum(stale) / len(stale) if stale else 0.0)
        if machine == 0:  # the controller's model is the run's (agents never run a forward:
            save_final_model(ctx.run_dir, model, ctx.cfg,  # buffers stay the initial ones)
                             supersteps=out["supersteps"])
        return dict(out, machine=machine, steps=out["supersteps"],
                    params=[p.detach().clone() for p in params])

    def _worker(self, seg: MachineSegment, layout: Layout, machine: int,
                local: int) -> dict[str, Any]:
        ctx = self.ctx
        index = layout.worker_index[ctx.rank]
        if self.retired:  # dead at the checkpoint we resume from: it stays out (budget as then)
            ctx.recorder.info(retired_worker=index)
            return {"role": "worker", "worker": index, "machine": machine, "retired": True,
                    "gradients": 0, "dropped": 0, "steps": 0, "skipped_steps": 0}
        ctx.faults = ComputeFaults.from_config(ctx.cfg, index)  # slow-worker by worker index
        trainer = LocalTrainer(ctx, worker=index, model=self.model)
        params = trainer.params
        state = self.state
        skipped = 0 if state is None else int(state["skipped"])
        if state is not None:
            trainer.loader.load_state_dict(state["loader"])
            set_rng_state(state["rng"])

        shapes = [tuple(p.shape) for p in params]

        def compute(flat: torch.Tensor, version: int, step: int) -> tuple[float, torch.Tensor,
                                                                          float, bool]:
            nonlocal skipped
            if compute.version != version:  # type: ignore[attr-defined]
                with torch.no_grad():
                    for p, chunk in zip(params, unflatten(flat, shapes), strict=True):
                        p.copy_(chunk)
                compute.version = version  # type: ignore[attr-defined]
            loss, grads, compute_s, straggled = trainer.compute(step)
            grads, was_skipped = screen_gradients(grads, ctx.cfg.nan_policy, ctx.rank, step)
            skipped += was_skipped
            return loss, flatten(grads), compute_s, straggled

        def save(cid: int, counters: dict[str, int], barrier: Any) -> None:
            self._save(cid, {"loop": counters, "loader": trainer.loader.state_dict(),
                             "skipped": skipped}, barrier)

        compute.version = -1  # type: ignore[attr-defined]
        loop = WorkerLoop(seg, local, compute, recorder=ctx.recorder, transport=ctx.transport,
                          max_staleness=self.opts.max_staleness,  # type: ignore[attr-defined]
                          stall_timeout_s=ctx.cfg.timeout_s, agent_rank=layout.agent_ranks[machine],
                          save=save, resume=None if state is None else state["loop"],
                          die_mid_add=_die_mid_add(index, ctx.cfg.resume))
        out = loop.run()
        return dict(out, worker=index, machine=machine, steps=out["gradients"],
                    skipped_steps=skipped)


def _die_mid_add(worker: int, resume: bool) -> int | None:
    """Test hook ``TANDEM_BSP_DIE_MID_ADD=<worker>:<step>``: that worker SIGKILLs itself in the
    middle of adding its gradient of that step (a torn add; see ``MachineSegment.add``)."""
    spec = os.environ.get("TANDEM_BSP_DIE_MID_ADD")
    if not spec or resume:
        return None
    who, step = (int(x) for x in spec.split(":"))
    return step if who == worker else None
