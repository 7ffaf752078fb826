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
so exchanges of different models may overlap each other (on an emulated or real link they queue
back to back, which keeps the link busy).

Options (``--strategy-opt``):

* ``models``: one dict of overrides per model, e.g. ``[{lr: 0.01}, {lr: 0.1}]`` or
  ``[{workload: {options: {hidden: 64}}}, {codec: fp16}]`` (keys: :data:`tandem.sweep.OVERRIDABLE`,
  dotted keys such as ``workload.options.hidden`` too; ``name`` is the model's label).
* ``bucket_mb`` (default 0): ``> 0`` launches buckets of about this many MB from gradient hooks
  *during* the backward. Same mathematics, but at 3+ workers the all-reduce adds in another
  order (last bits differ from the solo run) and each bucket has its own codec instance.
* ``variant_records`` (default true): one run record per model under ``<run>/variants/``.
* ``overlap`` (default true): false waits for each exchange at once (a control for benchmarks).

Tuning (docs/pipeline.md): the gain needs communication to matter and models of similar cost;
with A << C there is nothing to hide, with A >> C the link is the bottleneck whatever the order.
Telemetry per model: compute, active and exposed (waited) communication seconds, and
``hidden_share``, the share of the communication hidden behind compute.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, field_validator

from tandem.errors import PeerTimeout
from tandem.strategies.base import Strategy, StrategyOptions, WorkerContext
from tandem.strategies.registry import register
from tandem.strategies.training import LocalTrainer, evaluate, is_eval_step, screen_gradients
from tandem.sweep import OVERRIDABLE, finalize_variants, variant_configs
from tandem.telemetry.recorder import Recorder
from tandem.transport import costs
from tandem.transport.faults import ComputeFaults

if TYPE_CHECKING:
    from collections.abc import Callable

    from tandem.config import RunConfig
    from tandem.transport.group import Group, Transport


class PipelineOptions(StrategyOptions):
    models: list[dict[str, Any]] = Field(
        default=[], description="one dict of config overrides per model (K >= 1)")
    bucket_mb: float = Field(default=0.0, ge=0, description="0: whole gradient after backward; "
                             ">0: launch ~this many MB per bucket during backward")
    variant_records: bool = Field(default=True, description="write one run record per model")
    overlap: bool = Field(default=True, description="false: wait for each exchange at once "
                          "(the sequential schedule in one job, for comparisons)")

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

    @classmethod
    def processes(cls, cfg: RunConfig) -> int:
        variant_configs(cfg)  # fail in the launcher, before any process starts
        return cfg.workers

    @classmethod
    def total_steps(cls, cfg: RunConfig, train_size: int) -> int:
        """Rounds: the longest model's steps (models with other datasets are estimated)."""
        return max(Strategy.total_steps(v, train_size) for _, v in variant_configs(cfg))

    def setup(self) -> None:
        ctx = self.ctx
        self.variants = variant_configs(ctx.cfg)
        self.lanes: list[Lane] = []
        built: dict[str, Any] = {}
        for i, (label, vcfg) in enumerate(self.variants):
            work = self._workload(vcfg, built)
            run_dir = vcfg.run_dir()
            rec = Recorder(run_dir, ctx.rank, world=ctx.world, progress=False)
            vctx = WorkerContext(cfg=vcfg, transport=ctx.transport, workload=work, recorder=rec,
                                 faults=ComputeFaults.from_config(vcfg, ctx.rank), run_dir=run_dir)
            group = ctx.transport.new_group(list(range(ctx.world)))
            self.lanes.append(Lane(i, label, vctx, group, self.opts.bucket_mb,
                                   Strategy.total_steps(vcfg, len(work.train))))
            if ctx.rank == 0 and self.opts.variant_records:
                (run_dir / "config.yaml").write_text(vcfg.to_yaml())

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
            for step in range(rounds):
                compute = exposed = 0.0
                for lane in lanes:
                    exposed += lane.settle(evaluating)
                    if step < lane.total:
                        compute += lane.launch(step)
                        if not self.opts.overlap:
                            exposed += lane.settle(evaluating)
                b = ctx.transport.end_step()
                rec.step(step, compute_s=compute, comm_s=exposed, idle_s=0.0, bytes_sent=b.sent,
                         bytes_recv=b.recv, loss=None, models=sum(step < ln.total for ln in lanes))
            for lane in lanes:
                lane.settle(evaluating)
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

class CommThread:
    """The thread that runs one model's exchanges, in step order (see the module docstring)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._queue: queue.Queue[tuple[Lane, Flight] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tandem-pipeline-comm",
                                        daemon=True)
        self._thread.start()

    def submit(self, lane: Lane, flight: Flight) -> None:
        self._queue.put((lane, flight))

    def stop(self, wait_s: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout=wait_s)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            lane, flight = item
            try:
                for b in range(flight.nbuckets):
                    if not flight.ready[b].wait(self.timeout_s):
                        raise PeerTimeout(f"pipeline model {lane.label}: bucket {b} of step "
                                          f"{flight.step} never became ready (internal error)")
                    flight.means[b] = lane.exchange_bucket(flight, b)
                flight.bytes = lane.link.take()
            except Exception as err:  # re-raised in the training thread
                flight.error = err
            finally:
                flight.finished_at = time.perf_counter()
                flight.done.set()


class MeteredLink:
    """The transport as one model's codec sees it, plus that model's own byte count (the
    transport's meter mixes the models; the cost formulas are the transport's own)."""

    def __init__(self, transport: Transport) -> None:
        self._t, self._lock, self._bytes = transport, threading.Lock(), [0, 0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)

    def _charge(self, traffic: costs.Traffic, category: str) -> None:
        if category == "train":
            with self._lock:
                self._bytes[0] += traffic.sent
                self._bytes[1] += traffic.recv

    def _n(self, t: torch.Tensor, group: Group | None) -> tuple[int, int]:
        return t.numel() * t.element_size(), (group or self._t.world_group).size

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, group: Group | None = None,
                   category: str = "train") -> Any:
        self._charge(costs.all_reduce(*self._n(tensor, group)), category)
        return self._t.all_reduce(tensor, op, group=group, category=category)

    def all_gather(self, tensor: torch.Tensor, *, group: Group | None = None,
                   category: str = "train") -> Any:
        self._charge(costs.all_gather(*self._n(tensor, group)), category)
        return self._t.all_gather(tensor, group=group, category=category)

    def broadcast(self, tensor: torch.Tensor, src: int, *, group: Group | None = None,
                  category: str = "train") -> Any:
        self._charge(costs.broadcast(*self._n(tensor, group), self._t.rank == src), category)
        return self._t.broadcast(tensor, src, group=group, category=category)

    def take(self) -> tuple[int, int]:
        """Bytes (sent, received) since the last call."""
        with self._lock:
            out, self._bytes = (self._bytes[0], self._bytes[1]), [0, 0]
            return out


class Flight:
    """One step's exchange of one model: its buckets' gradients in, their means out."""

    def __init__(self, step: int, sizes: list[int]) -> None:
        self.step = step
        self.nbuckets = len(sizes)
        self.grads: list[list[torch.Tensor | None]] = [[None] * n for n in sizes]
        self._missing = list(sizes)
        self._lock = threading.Lock()
        self.ready = [threading.Event() for _ in sizes]
        self.means: list[list[torch.Tensor] | None] = [None] * len(sizes)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.launched_at: float | None = None
        self.finished_at: float | None = None
        self.bytes = (0, 0)
        self.skipped = False

    def put(self, b: int, j: int, grad: torch.Tensor) -> None:
        with self._lock:
            if self.grads[b][j] is not None:
                return
            self.grads[b][j] = grad
            self._missing[b] -= 1
            if self._missing[b] == 0:
                if self.launched_at is None:
                    self.launched_at = time.perf_counter()
                self.ready[b].set()


class Lane:
    """One model on this worker: its trainer, codec(s), group, RNG slice and telemetry."""

    def __init__(self, index: int, label: str, ctx: WorkerContext, group: Group,
                 bucket_mb: float, total: int) -> None:
        self.index, self.label, self.ctx, self.group, self.total = index, label, ctx, group, total
        self.trainer = LocalTrainer(ctx)
        params = self.trainer.params
        if bucket_mb > 0:  # reverse order: the last layers' gradients are ready first
            self.buckets: list[list[int]] = [[]]
            size = 0
            for i in reversed(range(len(params))):
                if size >= bucket_mb * 1e6:
                    self.buckets.append([])
                    size = 0
                self.buckets[-1].insert(0, i)
                size += params[i].numel() * 4
        else:
            self.buckets = [list(range(len(params)))]
        self.codecs = [ctx.make_codec(seed_offset=b) for b in range(len(self.buckets))]
        for c in self.codecs:
            c.set_total_steps(total)
        self.every = ctx.cfg.eval_every or max(1, total // 20)
        self.rng = torch.get_rng_state()  # the solo run's global RNG state at its first step
        self.link = MeteredLink(ctx.transport)
        self.comm = CommThread(ctx.cfg.timeout_s)
        self.flight: Flight | None = None
        self.pending: tuple[Flight, float, float, bool] | None = None  # flight, loss, C, straggled
        self.sums = {"compute_s": 0.0, "comm_s": 0.0, "exposed_s": 0.0, "hidden_s": 0.0}
        self.skipped = 0
        self.where = {i: (b, j) for b, idx in enumerate(self.buckets) for j, i in enumerate(idx)}
        if bucket_mb > 0:
            for i, p in enumerate(params):
                p.register_post_accumulate_grad_hook(self._hook(i))

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        b, j = self.where[i]

        def on_grad(p: torch.Tensor) -> None:
            if self.flight is not None and p.grad is not None:
                self.flight.put(b, j, p.grad.detach().clone())
        return on_grad

    def launch(self, step: int) -> float:
        """Forward/backward of ``step``; its exchange goes to this model's communication thread.
        Returns the compute seconds."""
        flight = Flight(step, [len(b) for b in self.buckets])
        hooked = len(self.buckets) > 1
        torch.set_rng_state(self.rng)
        if hooked:
            self.flight = flight
            self.comm.submit(self, flight)
        try:
            loss, grads, compute_s, straggled = self.trainer.compute(step)
        finally:
            self.flight = None
            self.rng = torch.get_rng_state()
        for i, g in enumerate(grads):  # whole mode: everything; hooked: params without a grad
            flight.put(*self.where[i], g)
        if not hooked:
            self.comm.submit(self, flight)
        self.pending = (flight, loss, compute_s, straggled)
        return compute_s

    def exchange_bucket(self, flight: Flight, b: int) -> list[torch.Tensor]:
        """(communication thread) the group mean of bucket ``b``, as the solo run computes it."""
        grads = [g for g in flight.grads[b] if g is not None]
        grads, skipped = screen_gradients(grads, self.ctx.cfg.nan_policy, self.ctx.rank,
                                          flight.step, f" in model {self.label}")
        flight.skipped = flight.skipped or skipped
        return self.codecs[b].exchange(grads, self.link, self.group)

    def settle(self, evaluating: Callable[[], contextlib.ExitStack]) -> float:
        """Wait for the last exchange, apply it, record the step (and evaluate when due).
        Returns the seconds this thread waited (the communication not hidden)."""
        if self.pending is None:
            return 0.0
        flight, loss, compute_s, straggled = self.pending
        self.pending = None
        t0 = time.perf_counter()
        limit = self.ctx.cfg.timeout_s * (flight.nbuckets + 1)
        if not flight.done.wait(limit):
            raise PeerTimeout(f"pipeline model {self.label}: the exchange of step {flight.step} "
                              f"did not finish within {limit:.0f}s; raise timeout_s on slow links")
        exposed = time.perf_counter() - t0
        if flight.error is not None:
            raise flight.error
        mean: list[torch.Tensor] = [torch.empty(0)] * len(self.trainer.params)
        for b, idx in enumerate(self.buckets):
            for i, g in zip(idx, flight.means[b] or [], strict=True):
                mean[i] = g
        self.trainer.apply(mean)
        active = (flight.finished_at or 0.0) - (flight.launched_at or 0.0)
        hidden = max(0.0, active - exposed)
        for k, v in (("compute_s", compute_s), ("comm_s", active), ("exposed_s", exposed),
                     ("hidden_s", hidden)):
            self.sums[k] += v
        extra: dict[str, Any] = {"skipped": True} if flight.skipped else {}
        self.skipped += flight.skipped
        rec, step = self.ctx.recorder, flight.step
        rec.step(step, compute_s=compute_s, comm_s=exposed, idle_s=0.0, bytes_sent=flight.bytes[0],
                 bytes_recv=flight.bytes[1], loss=loss, straggled=straggled,
                 comm_active_s=active, hidden_s=hidden, **extra)
        if is_eval_step(step, self.every, self.total):
            with evaluating():
                acc, tloss = evaluate(self.trainer.model, self.ctx.workload, self.ctx.transport)
            rec.eval(step, accuracy=acc, loss=tloss)
        return exposed

    def stats(self) -> dict[str, Any]:
        s = self.sums
        share = s["hidden_s"] / s["comm_s"] if s["comm_s"] > 0 else None
        return {"label": self.label, "steps": self.total, "skipped_steps": self.skipped,
                **{k: round(v, 6) for k, v in s.items()}, "hidden_share": share}
