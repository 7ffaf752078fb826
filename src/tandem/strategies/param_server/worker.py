"""The worker side of ``param_server``: compute, push, and (in candidate mode) never wait.

One loop serves every mode; the baselines are the candidate loop with ``cap = 1``:

1. compute a gradient g on the current model; add it to the unpushed sum U (k += 1) and take
   the local step theta <- theta - lr*g (the candidate model); under ``local_step=optimizer``
   the local step is the run's optimizer step and U sums the parameter changes instead;
2. if no push is in flight: push U (through the codec, one message per server), post the pull's
   receive at once, remember theta_cand = theta;
3. if the pull is in flight: merge when it has arrived (``Pending.done()``, never blocking);
   wait for it (idle time) only once ``cap`` gradients have been computed since the last merge.

The last step flushes: it waits for any pull in flight, pushes the rest of U with the final
flag and waits for the final global model, so every worker ends holding the same parameters.
That closing wait is counted as communication (``final_sync_s``), not idle: it is the transfer
of the finished model, paid once per run.

Telemetry per step: compute / comm / idle seconds, bytes pushed (sent) and pulled (received),
``round`` (pushes so far), ``since_merge`` and, on push steps, ``pushed_steps`` (local steps in
the push). Worker 0 evaluates the latest *global* model it has received (not its local model).

Checkpoints: :meth:`PSWorker._checkpoint` runs the worker's half of the checkpoint barrier
described in :mod:`.param_server` (agree on the push count, flush, mark the servers, save).
"""

from __future__ import annotations

import time
import warnings
from typing import TYPE_CHECKING, Any

import torch

from tandem.errors import PeerTimeout, WorkerFailed
from tandem.strategies.base import Computed, Exchanged, StepLoop
from tandem.strategies.param_server.cap import AutoCap
from tandem.strategies.param_server.options import local_step_of
from tandem.strategies.param_server.pull import PullReceiver
from tandem.strategies.param_server.sharding import join, plan_shards, split
from tandem.strategies.param_server.wire import FLAG_CKPT, FLAG_FINAL, FLAG_META, meta_to_bytes
from tandem.trainer import LocalTrainer, build_model, evaluate
from tandem.trainer.final_model import save_final_model
from tandem.trainer.stragglers import ComputeFaults
from tandem.transport.store_barrier import CheckpointAbandoned, store_gather, wait_on
from tandem.transport.transport import Group

if TYPE_CHECKING:
    from tandem.strategies.base import Strategy
    from tandem.transport.liveness import Pending


class PSWorker(StepLoop):
    """One worker process of a ``param_server`` run."""

    def __init__(self, strategy: Strategy) -> None:
        ctx, opts, cfg = strategy.ctx, strategy.opts, strategy.ctx.cfg
        self.opts = opts
        self._tag = ""
        place = strategy.placement  # type: ignore[attr-defined]
        self.index = index = place.worker_index(ctx.rank)
        self.worker_ranks = place.worker_ranks
        ranks = range(place.world)
        if index != ctx.rank:  # faults (slow worker, crash, NaN) name the worker index
            ctx.faults = ComputeFaults.from_config(cfg, index)
        trainer = LocalTrainer(ctx, worker=index)
        super().__init__(ctx, strategy.total_steps(cfg, len(ctx.workload.train)),
                         trainer=trainer, barrier=lambda: store_gather(
                             ctx.transport, f"{self._tag}/saved", 1, ranks, cfg.timeout_s))
        self.trainer: LocalTrainer = trainer
        self.params = trainer.params
        self.servers = list(place.server_ranks)
        self.plan = plan_shards([tuple(p.shape) for p in self.params], len(self.servers))
        self.codecs = []
        for s in range(len(self.servers)):
            codec = ctx.make_codec(seed_offset=s)
            codec.rank = index
            codec.set_total_steps(self.total)
            self.codecs.append(codec)
        #: local_step=optimizer: each local step is the run's optimizer step, U the change
        self.deltas = local_step_of(opts, trainer.spec) == "optimizer"
        self.auto = AutoCap(opts.max_staleness) if opts.cap == "auto" else None
        self.cap = 1 if opts.mode != "candidate" else \
            (self.auto.value if self.auto is not None else opts.cap)
        self.caps: list[int] = []
        self.pushed_at = 0.0
        self.eval_model = build_model(ctx.workload, cfg.seed) if index == 0 else None
        self.solo = Group(None, [ctx.rank])
        self.base = [p.detach().clone() for p in self.params]  # latest global model received
        self.lgc = strategy.lgc_worker(self)  # type: ignore[attr-defined]
        self.pulls = PullReceiver(opts, self.plan, self.servers, self.base, cfg.seed,
                                  message=self.lgc is not None)
        self.version = 0
        self.unpushed: list[torch.Tensor] | None = None   # U
        self.moved: list[torch.Tensor] | None = None      # sum of lr_t * g over U
        self.squares: list[torch.Tensor] | None = None    # sum of g*g over U (compensated)
        self.k = 0
        self.oldest = 0
        self.cand: list[torch.Tensor] | None = None       # theta_cand at the last push
        self.inflight: list[Pending] | None = None
        self.sends: list[tuple[int, Pending]] = []
        self.last_meta: list[bytes | None] = [None] * len(self.servers)
        self.pushes = 0
        self.pushed_steps: list[int] = []
        self.since_merge = 0
        self.idle_total = self.busy_total = self.final_sync = 0.0
        self.sent = self.recv = 0
        self.restore()  # after every model is built (building one reseeds torch)

    # ---- checkpoints ----------------------------------------------------------------------------
    _SAVED = ("base", "version", "unpushed", "moved", "squares", "k", "oldest", "cand",
              "pushes", "pushed_steps", "since_merge", "skipped")

    def load_state(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state["trainer"])
        for codec, cs in zip(self.codecs, state["codecs"], strict=True):
            codec.load_state_dict(cs)
            codec.set_total_steps(self.total)
        for key in self._SAVED:  # last_meta stays None: the meta is sent again
            setattr(self, key, state["worker"].get(key))
        self.pulls.reset(self.base)  # a coded pull's view is the last global model received
        if self.auto is not None and "auto_cap" in state["worker"]:
            self.auto.load_state_dict(state["worker"]["auto_cap"])
        if self.lgc is not None:
            self.lgc.load_state_dict(state["lgc"])

    def checkpoint_due(self, step: int) -> bool:
        """Not after the last step: the servers have already taken the final pushes and
        answered with the final model (``model.pt``); a resume continues from the last
        periodic checkpoint."""
        return super().checkpoint_due(step) and step + 1 < self.total

    def checkpoint(self, step: int) -> None:
        self._checkpoint(step)

    @torch.no_grad()
    def _checkpoint(self, step: int) -> None:
        """The worker's half of the checkpoint barrier after ``step`` (see :mod:`.param_server`)."""
        ctx, cfg, t = self.ctx, self.ctx.cfg, self.ctx.transport
        self._tag = tag = f"{step + 1}"
        counts = store_gather(t, f"{tag}/pushes", self.pushes, self.worker_ranks,
                              cfg.timeout_s, complete=False)
        target = max(counts.values())
        while self.pushes < target:  # behind by at most one round: push what we have
            if self.inflight is not None:
                self._merge()
            if self.unpushed is None:
                self.unpushed = [torch.zeros_like(p) for p in self.params]
                self.oldest = self.version
            self._push(final=False)
        if self.inflight is not None:
            self._merge()
        mark = torch.tensor([self.pushes, self.oldest, step + 1, FLAG_CKPT, 0], dtype=torch.int64)
        for s, rank in enumerate(self.servers):
            try:
                wait_on(t.send_message([mark], rank), t, rank, cfg.timeout_s)
            except (WorkerFailed, PeerTimeout) as err:
                raise self._server_error(err, s) from err
        self._reap_sends()
        state = {"trainer": self.trainer.state_dict(),
                 "codecs": [c.state_dict() for c in self.codecs],
                 "worker": {**{key: getattr(self, key) for key in self._SAVED},
                            **({"auto_cap": self.auto.state_dict()} if self.auto else {})},
                 **({"lgc": self.lgc.state_dict()} if self.lgc is not None else {})}
        try:
            self.ckpt.save(step + 1, state)
        except CheckpointAbandoned as err:
            ctx.recorder.info(checkpoint_abandoned=step + 1, reason=str(err)[:300])
            self.ckpt.ckpt.every = 0  # a lost rank can never complete a set again

    # ---- pushes and pulls ---------------------------------------------------------------------
    def _server_error(self, err: BaseException, s: int) -> WorkerFailed:
        rank = self.servers[s]
        return WorkerFailed(f"worker {self.ctx.rank}: parameter server {s} (rank {rank}) "
                            f"failed or stopped answering: {err}", ranks=[rank])

    def _push(self, final: bool) -> int:
        t = self.ctx.transport
        assert self.unpushed is not None
        parts = split(self.unpushed, self.plan)
        self._reap_sends()
        self.inflight = []
        self.pushed_at = time.monotonic()
        for s, rank in enumerate(self.servers):
            self.inflight.append(self.pulls.post(t, s))
            if self.lgc is not None:  # LGC-PS: one server (checked), its own push code
                self.sends.append((s, t.send_message(self.lgc.push(self, final), rank)))
                continue
            codec = self.codecs[s]
            msg = codec.encode(parts[s])
            codec.step += 1
            flags = FLAG_FINAL if final else 0
            extra: list[torch.Tensor] = []
            meta = meta_to_bytes(msg.meta)
            if meta != self.last_meta[s]:
                flags |= FLAG_META
                extra.append(torch.frombuffer(bytearray(meta), dtype=torch.uint8))
                self.last_meta[s] = meta
            header = torch.tensor([self.pushes, self.oldest, self.k, flags, codec.step - 1],
                                  dtype=torch.int64)
            self.sends.append((s, t.send_message([header, *extra, *msg.tensors], rank)))
        self.pushes += 1
        self.pushed_steps.append(self.k)
        k = self.k
        if self.opts.merge == "compensated":
            self.cand = [p.detach().clone() for p in self.params]
        self.unpushed, self.moved, self.squares, self.k = None, None, None, 0
        return k

    def _reap_sends(self) -> None:
        """Surface failed sends (a dead server) and forget finished ones."""
        keep = []
        for s, p in self.sends:
            if p.done():
                try:
                    p.wait(0)
                except (WorkerFailed, PeerTimeout) as err:
                    raise self._server_error(err, s) from err
            else:
                keep.append((s, p))
        self.sends = keep

    def _pulled(self) -> bool:
        return self.inflight is not None and all(p.done() for p in self.inflight)

    @torch.no_grad()
    def _merge(self, final: bool = False) -> None:
        """Wait for (or take) the pulled global model and merge it per the ``merge`` option.

        How long: a round's answer may come ``timeout_s`` late, since a server first waits that
        long for a silent worker's push before it counts the worker lost, so up to twice
        ``timeout_s``. The final model comes once every worker has finished, which with a slow
        worker may be long after this one: it is waited for as long as the server lives (its own
        waits are bounded, so it answers or fails)."""
        assert self.inflight is not None
        parts, versions = [], []
        limit = None if final else 2 * self.ctx.cfg.timeout_s
        for s, p in enumerate(self.inflight):
            try:
                got = wait_on(p, self.ctx.transport, self.servers[s], limit)
            except (WorkerFailed, PeerTimeout) as err:
                raise self._server_error(err, s) from err
            version, pieces, extras = self.pulls.take(s, got)
            versions.append(version)
            parts.append(pieces)
            if self.lgc is not None:
                self.lgc.pulled(extras)
        if self.auto is not None and not final:
            arrived = max(p.completed_at or time.monotonic() for p in self.inflight)
            self.auto.observe_round_trip(arrived - self.pushed_at)
        theta_g = join(parts, self.plan)
        self.version = min(versions)
        self.base = theta_g
        u, moved = self.unpushed, self.moved
        if self.opts.merge == "overwrite" or u is None or moved is None:
            new = theta_g
        else:
            if self.opts.merge == "compensated" and self.cand is not None:
                assert self.squares is not None
                lam, lr = self.opts.compensation, self.trainer.lr
                fix = [lam * q * (g - c)
                       for q, g, c in zip(self.squares, theta_g, self.cand, strict=True)]
                self.unpushed = [a + f for a, f in zip(u, fix, strict=True)]
                moved = self.moved = [m + lr * f for m, f in zip(moved, fix, strict=True)]
            new = [g - m for g, m in zip(theta_g, moved, strict=True)]
        for p, v in zip(self.params, new, strict=True):
            p.copy_(v.view_as(p))
        self.inflight = None
        self.since_merge = 0

    @torch.no_grad()
    def _accumulate(self, grads: list[torch.Tensor]) -> None:
        """Take the local step on ``grads`` and add it to the unpushed sum U (and ``moved``,
        the parameters' change since the push, which a delay-corrected merge keeps)."""
        if self.k == 0:
            self.oldest = self.version
        if self.deltas:  # the run's optimizer (state, clip, schedule); U is the change it made
            before = [p.detach().clone() for p in self.params]
            self.trainer.apply(grads)
            step = [b.sub_(p.detach()) for b, p in zip(before, self.params, strict=True)]
            self._add(step, step)
            return
        if self.opts.merge == "compensated":
            sq = [g * g for g in grads]
            self.squares = sq if self.squares is None else [
                a + b for a, b in zip(self.squares, sq, strict=True)]
        step = [self.trainer.lr * g for g in grads]
        self._add(grads, step)
        for p, s in zip(self.params, step, strict=True):
            p.sub_(s.view_as(p))
        self._advance_schedule()

    def _add(self, pushed: list[torch.Tensor], moved: list[torch.Tensor]) -> None:
        """U += pushed (what the next push carries; copied, since ``pushed`` may be the
        gradients' own tensors); moved += moved (the local change: fresh tensors, kept as they
        are when ``moved`` starts)."""
        if self.unpushed is None:
            self.unpushed = [g.clone() for g in pushed]
        else:
            for a, g in zip(self.unpushed, pushed, strict=True):
                a.add_(g)
        self.moved = moved if self.moved is None else [
            a.add_(m) for a, m in zip(self.moved, moved, strict=True)]
        self.k += 1
        self.since_merge += 1

    def _advance_schedule(self) -> None:
        """The candidate's local steps are SGD steps at the schedule's rate of that step
        (whatever optimizer the server runs): advance the worker's copy of the schedule."""
        sched = self.trainer.scheduler
        if sched is not None:
            with warnings.catch_warnings():  # stepped without optimizer.step(): on purpose
                warnings.simplefilter("ignore", UserWarning)
                sched.step()

    # ---- the loop's hooks ---------------------------------------------------------------------
    def exchange(self, step: int, c: Computed) -> Exchanged:
        """Take the local step and push when nothing is in flight; merge an arrived pull, and
        wait for it (idle) only once ``cap`` steps ran since the last merge. The last step
        flushes: push the rest with the final flag and wait for the final global model."""
        fields: dict[str, Any] = {}
        idle = 0.0
        if self.auto is not None and self.opts.mode == "candidate":
            self.auto.observe_compute(c.compute_s)
            self.cap = self.auto.value  # and what it was computed from: cap_rtt, _spread, _compute
            fields.update({f"cap_{k}": v for k, v in self.auto.state_dict().items()})
        self.caps.append(self.cap)
        self._accumulate(c.grads)
        last = step == self.total - 1
        if self.inflight is None and not last:
            fields["pushed_steps"] = self._push(final=False)
        if self.inflight is not None and not last:
            if self._pulled():
                self._merge()
            elif self.since_merge >= self.cap:
                t_w = time.perf_counter()
                self._merge()
                idle = time.perf_counter() - t_w
        if last:
            t_f = time.perf_counter()
            if self.inflight is not None:
                self._merge()
            fields["pushed_steps"] = self._push(final=True)
            self._merge(final=True)
            self._reap_sends()
            self.final_sync = time.perf_counter() - t_f
        fields.update(round=self.pushes, since_merge=self.since_merge, cap=self.cap)
        if self.lgc is not None and "pushed_steps" in fields:
            fields.update(self.lgc.fields())
        return Exchanged(None, idle_s=idle, fields=fields)

    def record(self, step: int, c: Computed, ex: Exchanged) -> None:
        b = self.ctx.transport.end_step()
        self.sent, self.recv = self.sent + b.sent, self.recv + b.recv
        self.idle_total += ex.idle_s
        self.busy_total += c.compute_s + (ex.comm_s or 0.0) + ex.idle_s
        record = self.ctx.recorder.step(
            step, compute_s=c.compute_s, comm_s=ex.comm_s or 0.0, idle_s=ex.idle_s,
            bytes_sent=b.sent, bytes_recv=b.recv, loss=c.loss, straggled=c.straggled,
            **c.fields, **ex.fields)
        self.step_callbacks(step, record)

    def eval_due(self, step: int) -> bool:
        return self.eval_model is not None and super().eval_due(step)

    def evaluate(self, step: int) -> None:
        """Worker 0 evaluates the latest *global* model it has received."""
        assert self.eval_model is not None
        with torch.no_grad():
            for p, v in zip(self.eval_model.parameters(), self.base, strict=True):
                p.copy_(v.view_as(p))
        ev = evaluate(self.eval_model, self.ctx.workload, self.ctx.transport, self.solo)
        self.report_eval(step, {**ev.record(), "version": self.version})

    def save_model(self) -> None:
        """Worker index 0 writes ``model.pt`` (under torchrun rank 0 may serve)."""
        if self.index == 0:
            save_final_model(self.ctx.run_dir, self.trainer.model, self.ctx.cfg, step=self.total)

    def finish(self) -> dict[str, Any]:
        ctx = self.ctx
        self.pulls.stop.set()
        if self.lgc is not None:
            ctx.recorder.info(**{f"worker{ctx.rank}_lgc_{k}": v
                                 for k, v in self.lgc.describe().items()})
        steps_per_round = sum(self.pushed_steps) / max(1, len(self.pushed_steps))
        summary = {"role": "worker", "steps": self.total, "pushes": self.pushes,
                   "local_steps_per_round": steps_per_round,
                   "max_local_steps": max(self.pushed_steps, default=0),
                   "pushed_steps_total": sum(self.pushed_steps),
                   "idle_s": self.idle_total, "final_sync_s": self.final_sync,
                   "idle_fraction": self.idle_total / self.busy_total
                   if self.busy_total > 0 else 0.0,
                   "push_bytes": self.sent, "pull_bytes": self.recv,
                   "cap_mean": sum(self.caps) / max(1, len(self.caps)),
                   "cap_max": max(self.caps, default=self.cap), "worker": self.index,
                   "skipped_steps": self.skipped, "resumed_from": self.start_step}
        ctx.recorder.info(**{f"worker{ctx.rank}_{k}": v for k, v in summary.items()
                             if k != "role"})
        summary["params"] = [p.detach().clone() for p in self.params]
        return summary
