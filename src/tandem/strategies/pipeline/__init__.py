"""Multi-model training pipeline (M4): K models share the workers; one model's gradient exchange
runs while the next model computes.

What it does: every worker holds K models (a sweep of hyper-parameters, an ensemble, different
architectures). Each round it visits them in a fixed order. For model m it first waits for and
applies model m's synchronised gradient of the previous round, then runs m's forward/backward and
hands the gradient to m's communication thread, which exchanges it (any codec) while the worker
goes on to model m+1. A round takes about ``max(sum C_m, sum A_m)`` instead of
``sum (C_m + A_m)`` (C compute, A communication): up to 2x when they balance.

Exact synchronous semantics: each model's update is applied before its next forward, so no model
ever sees a stale gradient. Each model gets exactly what its solo ``allreduce`` run would get: the
same initial weights, the same shard and minibatch order, its own optimizer, its own codec
instance (same seed, own error-feedback memory) and its own slice of the global RNG. With the
default ``bucket_mb=0`` the parameters are bitwise equal to the solo runs, for every codec.

How the exchanges run: each model has its own process group and its own communication thread,
which runs that model's exchanges in step order, so every rank issues each group's collectives
in the same order; the transport completes each group's collectives on the group's own thread,
so exchanges of different models may overlap each other; ``one_at_a_time`` gives the link to
one exchange at a time instead, in the round's model order
(:class:`~tandem.strategies.pipeline.lanes.LinkTurns`).

Options (``--strategy-opt``):

* ``models``: one dict of overrides per model, e.g. ``[{lr: 0.01}, {lr: 0.1}]`` or
  ``[{workload: {options: {hidden: 64}}}, {codec: fp16}]`` (keys:
  :data:`tandem.variants.OVERRIDABLE`, dotted keys such as ``workload.options.hidden`` too; ``name``
  is the model's label).
* ``bucket_mb`` (default 0): ``> 0`` launches buckets of about this many MB from gradient hooks
  *during* the backward. Same mathematics, but at 3+ workers the all-reduce adds in another
  order (last bits differ from the solo run) and each bucket has its own codec instance.
* ``variant_records`` (default true): one run record per model under ``<run>/variants/``.
* ``overlap`` (default true): false waits for each exchange at once (a control for benchmarks).
* ``one_at_a_time`` (default false): true gives the link to one model's exchange at a time, in
  round order, where by default each starts as soon as its gradient is ready, concurrently with
  the others'. Measured side by side on real links (docs/pipeline.md) the two were within 4 %,
  except the CNN at 10 Mbit/s, where concurrent exchanges were 7 % faster; the emulator predicts
  the one-at-a-time schedule better at 100 Mbit/s.

Tuning (docs/pipeline.md): the gain needs communication to matter and models of similar cost;
with A << C there is nothing to hide, with A >> C the link is the bottleneck whatever the order.
Telemetry per model: compute, active and exposed (waited) communication seconds, and
``hidden_share``, the share of the communication hidden behind compute.

Reliability: ``--checkpoint-every N`` waits for every model's exchange at the end of every N-th
round (that round's communication is not hidden) and saves, per rank, each model's trainer (model,
optimizer, data position), codec state (one per bucket: error-feedback memory, factors), RNG slice,
skipped-step count and telemetry sums; ``--resume`` continues every model bit-exactly from that
round. A resume with other models or another ``bucket_mb`` is refused (CheckpointError).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator

from tandem.checkpoint import StrategyCheckpoints
from tandem.errors import CheckpointError
from tandem.strategies.base import Strategy, StrategyOptions, WorkerContext, codec_factory, register
from tandem.strategies.pipeline.lanes import CommThread, Flight, Lane, LinkTurns, MeteredLink
from tandem.telemetry.recorder import Recorder
from tandem.trainer.stragglers import ComputeFaults
from tandem.variants import OVERRIDABLE, finalize_variants, variant_configs

if TYPE_CHECKING:
    from tandem.config import RunConfig

__all__ = ["CommThread", "Flight", "Lane", "LinkTurns", "MeteredLink", "PipelineOptions",
           "PipelineStrategy"]


class PipelineOptions(StrategyOptions):
    models: list[dict[str, Any]] = Field(
        default=[], description="one dict of config overrides per model (K >= 1)")
    bucket_mb: float = Field(default=0.0, ge=0, description="0: whole gradient after backward; "
                             ">0: launch ~this many MB per bucket during backward")
    variant_records: bool = Field(default=True, description="write one run record per model")
    overlap: bool = Field(default=True, description="false: wait for each exchange at once "
                          "(the sequential schedule in one job, for comparisons)")
    one_at_a_time: bool = Field(default=False, description="one model's exchange on the link "
                                "at a time, in round order; false: every exchange starts as "
                                "soon as its gradient is ready, concurrently with the others'")

    @field_validator("models")
    @classmethod
    def _keys(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, m in enumerate(v):
            if not isinstance(m, dict):
                raise ValueError(f"models[{i}] must be a mapping of overrides, e.g. {{lr: 0.1}}")
            bad = [k for k in m if k.split(".")[0] not in OVERRIDABLE]
            if bad:
                raise ValueError(f"models[{i}]: cannot override {bad}; "
                                 f"allowed: {list(OVERRIDABLE)}")
        return v


@register
class PipelineStrategy(Strategy):
    name = "pipeline"
    Options = PipelineOptions
    supports_checkpoints = True

    @classmethod
    def processes(cls, cfg: RunConfig) -> int:
        variant_configs(cfg)  # fail in the launcher, before any process starts
        return cfg.workers

    @classmethod
    def sub_configs(cls, cfg: RunConfig) -> list[RunConfig]:
        return [v for _, v in variant_configs(cfg)]

    @classmethod
    def total_steps(cls, cfg: RunConfig, train_size: int) -> int:
        """Rounds: the longest model's steps (models with other datasets are estimated)."""
        return max(Strategy.total_steps(v, train_size) for _, v in variant_configs(cfg))

    def setup(self) -> None:
        ctx = self.ctx
        self.variants = variant_configs(ctx.cfg)
        self.lanes: list[Lane] = []
        built: dict[str, Any] = {}
        turns = LinkTurns() if self.opts.one_at_a_time else None
        for i, (label, vcfg) in enumerate(self.variants):
            work = self._workload(vcfg, built)
            run_dir = vcfg.run_dir()
            rec = Recorder(run_dir, ctx.rank, world=ctx.world, progress=False,
                           append=ctx.cfg.resume)
            vctx = WorkerContext(cfg=vcfg, transport=ctx.transport, workload=work, recorder=rec,
                                 faults=ComputeFaults.from_config(vcfg, ctx.rank), run_dir=run_dir,
                                 codec_factory=codec_factory(vcfg))
            group = ctx.transport.new_group(list(range(ctx.world)))
            self.lanes.append(Lane(i, label, vctx, group, self.opts.bucket_mb,
                                   Strategy.total_steps(vcfg, len(work.train)), turns))
            if ctx.rank == 0 and self.opts.variant_records and not ctx.cfg.resume:
                (run_dir / "config.yaml").write_text(vcfg.to_yaml())
        self.ckpt = StrategyCheckpoints(ctx)  # after the models: building one reseeds torch
        self.start_step = 0
        state = self.ckpt.resume()
        if state is not None:
            if len(state["lanes"]) != len(self.lanes):
                raise CheckpointError(f"pipeline checkpoint holds {len(state['lanes'])} models, "
                                      f"this run has {len(self.lanes)}")
            for lane, lane_state in zip(self.lanes, state["lanes"], strict=True):
                lane.load_state_dict(lane_state)
            self.start_step = int(state["step"])
            for rec in [ctx.recorder, *(lane.ctx.recorder for lane in self.lanes)]:
                rec.resume_from(self.start_step)  # the killed run's later steps: rolled back

    def _workload(self, vcfg: RunConfig, built: dict[str, Any]) -> Any:
        base = self.ctx.cfg
        custom = self.ctx.workload.name != base.workload.name
        if vcfg.workload == base.workload and (vcfg.seed == base.seed or custom):
            return self.ctx.workload
        from tandem.workloads import build_workload

        key = f"{vcfg.workload.model_dump_json()}|{vcfg.seed}"
        if key not in built:
            built[key] = build_workload(vcfg.workload, vcfg.seed)
        return built[key]

    def run(self) -> dict[str, Any]:
        ctx, lanes, rec = self.ctx, self.lanes, self.ctx.recorder
        for lane in lanes:
            lane.ctx.recorder.start(rec.t0)
        rounds = max(lane.total for lane in lanes)
        recorders = [rec] + [lane.ctx.recorder for lane in lanes]

        def evaluating() -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            for r in recorders:
                stack.enter_context(r.evaluating())
            return stack

        ok = False
        try:
            for step in range(self.start_step, rounds):
                compute = exposed = 0.0
                for lane in lanes:
                    exposed += lane.settle(evaluating)
                    if step < lane.total:
                        compute += lane.launch(step)
                        if not self.opts.overlap:
                            exposed += lane.settle(evaluating)
                saving = self.ckpt.due(step, rounds)
                # a checkpoint holds every model with its round applied; the last round's
                # exchanges have nothing left to hide behind, and their bytes belong to its record
                if saving or step == rounds - 1:
                    for lane in lanes:
                        exposed += lane.settle(evaluating)
                b = ctx.transport.end_step()
                rec.step(step, compute_s=compute, comm_s=exposed, idle_s=0.0, bytes_sent=b.sent,
                         bytes_recv=b.recv, loss=None, models=sum(step < ln.total for ln in lanes))
                if saving:
                    with evaluating():
                        self.ckpt.save(step + 1, {"lanes": [ln.state_dict() for ln in lanes]})
            for lane in lanes:
                lane.settle(evaluating)
                lane.save_model()  # variants/<label>/model.pt
            ok = True
        finally:  # after an error a thread may sit in a dead exchange: do not wait for it
            for lane in lanes:
                lane.comm.stop(self.ctx.cfg.timeout_s if ok else 1.0)
        stats = [lane.stats() for lane in lanes]
        active = sum(s["comm_s"] for s in stats)
        hidden = sum(s["hidden_s"] for s in stats)
        share = hidden / active if active > 0 else None
        rec.info(pipeline={"models": [s["label"] for s in stats], "bucket_mb": self.opts.bucket_mb,
                           "hidden_share": share, "per_model": stats})
        for lane in lanes:
            lane.ctx.recorder.info(pipeline=lane.stats())
            lane.ctx.recorder.close()
        if self.opts.variant_records:
            ctx.transport.barrier().wait()  # every rank has closed its files
            if ctx.rank == 0:
                finalize_variants(self.variants, ctx.run_dir)
        params: list[torch.Tensor] = []
        for lane in lanes:
            params += [p.detach().clone() for p in lane.trainer.params]
        return {"steps": rounds, "models": stats, "hidden_share": share, "params": params,
                "params_per_model": [len(lane.trainer.params) for lane in lanes]}
