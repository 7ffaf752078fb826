"""The server side of ``param_server``: hold a parameter shard, apply pushes, answer pulls.

Each server process holds the pieces :func:`~.sharding.plan_shards` gives it and owns the run's
optimizer over them (:class:`~tandem.trainer.spec.TrainSpec`: a built-in one runs on the pieces; a
workload's factory, which may build parameter groups, needs the whole model and so one server),
with its schedule (stepped once per applied update) and the global-norm clip (one server only).
Under ``local_step=optimizer`` the workers run the optimizer and the pushes are parameter
changes: a server has no optimizer and subtracts the round's mean change.
One receiver thread per worker waits for that worker's pushes (a receive may wait as long as the
worker lives) and queues them; the main thread decodes each push with the run's codec and applies
it:

* ``sync`` / ``candidate``: rounds. A round ends when every live, unfinished worker has pushed;
  the server applies ``sum / N`` (N = live workers) as one optimizer step and answers each pusher.
* ``async``: each push is applied (scaled by 1/N) on arrival and answered at once.
* ``ssp``: like async, but the answer to a worker's k-th push waits until every live,
  unfinished worker has pushed at least ``k - s`` times (the clock gap never exceeds s).

A worker's final push (flag) is answered only when every worker has finished, with the final
model, so all workers end on the same parameters.

A worker that dies (its receive fails, the launcher marks it dead, its heartbeat goes stale) or
sends nothing for ``timeout_s`` while the server needs its push is *lost*: the server logs its
rank and the reason, records ``lost_worker`` in the event log and goes on with the others while
at least ``min_workers`` live; below that it raises :class:`WorkerFailed` naming the rank.

Checkpoints: a worker's checkpoint mark (``FLAG_CKPT``) arrives after all its pushes; once every
live worker's mark is in, every push before the checkpoint has been applied and answered, so the
server saves (:meth:`PSServer._checkpoint`) and joins the store barrier of the set.

Telemetry: one step record per applied update (``role = server``) with its bytes, ``staleness``
(global updates applied between the version a push's oldest gradient was computed on and its
application), ``local_steps`` (per push) and, for ssp, ``clock_gap`` at each answer.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from tandem.checkpoint import StrategyCheckpoints
from tandem.codecs.base import Message
from tandem.errors import ConfigError, PeerTimeout, TandemError, WorkerFailed
from tandem.strategies.param_server.options import local_step_of
from tandem.strategies.param_server.pull import PullSender
from tandem.strategies.param_server.server_ckpt import ServerCheckpoints
from tandem.strategies.param_server.sharding import plan_shards, split
from tandem.strategies.param_server.wire import FLAG_CKPT, FLAG_FINAL, FLAG_META, meta_from_bytes
from tandem.telemetry.log import get_logger
from tandem.trainer import build_model, step_optimizer, training_spec
from tandem.transport.packing import specs_from_header
from tandem.transport.store_barrier import store_gather, wait_on

if TYPE_CHECKING:
    from tandem.strategies.base import Strategy
    from tandem.transport.liveness import Pending

log = get_logger(__name__)


class PSServer(ServerCheckpoints):
    """One server process of a ``param_server`` run."""

    def __init__(self, strategy: Strategy) -> None:
        self.ctx = ctx = strategy.ctx
        self.opts = opts = strategy.opts
        cfg = ctx.cfg
        ctx.recorder.role = "server"
        place = strategy.placement  # type: ignore[attr-defined]
        self.index = place.server_index(ctx.rank)
        self.ranks = list(place.worker_ranks)  # the workers' ranks, in worker-index order
        n_servers = len(place.server_ranks)
        self.workers = cfg.workers
        self.min_workers = opts.min_workers or cfg.workers
        model = build_model(ctx.workload, cfg.seed)
        init = [p.detach() for p in model.parameters() if p.requires_grad]
        self.plan = plan_shards([tuple(p.shape) for p in init], n_servers)
        mine = split(init, self.plan)[self.index]
        self.spec = spec = training_spec(cfg, ctx.workload)
        #: local_step=optimizer: pushes are parameter changes, averaged without an optimizer
        self.deltas = local_step_of(opts, spec) == "optimizer"
        self.opt: torch.optim.Optimizer | None = None
        if self.deltas or spec.elementwise:  # this server's pieces (a built-in optimizer's)
            self.params = [torch.nn.Parameter(t.clone().float()) for t in mine]
            if not self.deltas:
                self.opt = spec.make_optimizer(self.params)
        else:  # the workload's factory needs the whole model: one server holds it whole
            if n_servers != 1:
                raise ConfigError("param_server: the workload's optimizer factory needs the "
                                  "whole model; use servers=1 (or a built-in optimizer)")
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.opt = spec.make_optimizer(model)
        if spec.clip is not None and n_servers != 1 and not self.deltas:
            raise ConfigError("param_server: clip_grad_norm clips the global norm of the "
                              "aggregated gradient, which one server sees whole; use servers=1")
        self.total = strategy.total_steps(cfg, len(ctx.workload.train))
        self.sched = spec.make_scheduler(self.opt, self.total) if self.opt is not None else None
        self.codecs = {}
        for i, w in enumerate(self.ranks):
            codec = ctx.make_codec(seed_offset=self.index)
            codec.rank = i
            self.codecs[w] = codec
        self.meta: dict[int, dict[str, Any]] = {}
        self.pull = PullSender(opts, self.params, self.ranks, cfg.seed + self.index)
        self.pull_residual_max = 0.0
        self.residuals: dict[int, float] = {}  # worker -> |theta - its view| at its last pull
        self.queue: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.active = set(self.ranks)
        self.finished: set[int] = set()
        self.lost: dict[int, str] = {}
        self.clock = dict.fromkeys(self.ranks, 0)
        self.version = 0
        self.sends: list[tuple[int, Pending]] = []
        self.staleness: list[int] = []
        self.local_steps: list[int] = []
        self.max_gap = 0
        self.deferred_count = 0
        self.updates_recorded = 0
        self.marked: dict[int, int] = {}  # worker -> the step its checkpoint mark names
        self._tag = ""
        self.lgc = strategy.lgc_server(self)  # type: ignore[attr-defined]
        ranks = range(place.world)
        self.ckpt = StrategyCheckpoints(ctx, barrier=lambda: store_gather(
            ctx.transport, f"{self._tag}/saved", 1, ranks, cfg.timeout_s))
        self.saves = 0
        state = self.ckpt.resume()
        if state is not None:
            self._load(state)
            ctx.recorder.resume_from(self.updates_recorded)  # server steps count its updates

    # ---- receiving ----------------------------------------------------------------------------
    def _recv_message(self, w: int) -> list[torch.Tensor]:
        t, limit = self.ctx.transport, None
        n = torch.empty(1, dtype=torch.int64)
        wait_on(t.recv(n, w), t, w, limit, self.stop)
        header = torch.empty(int(n.item()), dtype=torch.int64)
        wait_on(t.recv(header, w), t, w, limit, self.stop)
        return wait_on(t.recv_packed(specs_from_header(header), w), t, w, limit, self.stop)

    def _receive(self, w: int) -> None:
        """Receiver thread: queue every push of worker ``w`` until its final one."""
        try:
            while not self.stop.is_set():
                msg = self._recv_message(w)
                if int(msg[0][3]) & FLAG_CKPT:
                    self.queue.put(("ckpt", w, int(msg[0][2])))
                    continue
                self.queue.put(("push", w, msg))
                if int(msg[0][3]) & FLAG_FINAL:
                    return
        except (WorkerFailed, PeerTimeout) as err:
            if not self.stop.is_set():
                self.queue.put(("lost", w, str(err)))
        except Exception as err:  # noqa: BLE001 - reported to the main thread
            if not self.stop.is_set():
                self.queue.put(("lost", w, f"{type(err).__name__}: {err}"))

    def _decode(self, w: int, msg: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
        header = [int(v) for v in msg[0].tolist()]
        rest = msg[1:]
        if self.lgc is not None:  # decoded with the whole round (decode_round)
            return header, list(rest)
        if header[3] & FLAG_META:
            self.meta[w] = meta_from_bytes(rest[0].numpy().tobytes())
            rest = rest[1:]
        codec = self.codecs[w]
        codec.step = header[4]
        grads = codec.decode(Message(list(rest), dict(self.meta[w])))
        return header, [g.float().reshape(p.shape) for g, p in zip(grads, self.params, strict=True)]

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _live(self) -> int:
        return len(self.active | self.finished)

    def _lose(self, w: int, why: str) -> None:
        if w in self.lost:
            return
        self.active.discard(w)
        self.finished.discard(w)
        self.lost[w] = why
        left = self._live()
        log.warning("parameter server %d: lost worker rank %d (%s); %d of %d workers left",
                    self.index, w, why, left, self.workers)
        self.ctx.recorder.info(lost_worker=w, lost_reason=why[:300], server=self.index)
        if left < self.min_workers:
            raise WorkerFailed(
                f"parameter server {self.index} (rank {self.ctx.rank}): worker rank {w} was lost "
                f"({why}); {left} of {self.workers} workers left, fewer than min_workers="
                f"{self.min_workers}. Set --strategy-opt min_workers=N to go on with fewer.",
                ranks=[w])
        from tandem.transport.store_barrier import abandon  # a stuck one: the launcher ends it
        abandon(self.ctx.transport, w, f"parameter server {self.index} went on without it: {why}")
        if self.marked:  # the others may all be waiting at a checkpoint for this one
            self._checkpoint()

    def _next(self, timeout: float = 0.2) -> tuple[str, int, Any] | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _apply(self, grads: list[torch.Tensor], scale: float) -> None:
        if self.opt is None:  # local_step=optimizer: the mean parameter change, as it is
            with torch.no_grad():
                for p, g in zip(self.params, grads, strict=True):
                    p.sub_(g, alpha=scale)
            self.version += 1
            return
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g * scale if scale != 1.0 else g
        step_optimizer(self.opt, self.params, self.spec.clip, self.sched)
        self.version += 1

    def _reply(self, w: int, final: bool = False) -> None:
        extras = self.lgc.extras(w, final) if self.lgc is not None else None
        tensors, message = self.pull.message(w, self.version, self.params, final, extras)
        t = self.ctx.transport
        send = t.send_message if message else t.send_packed
        self.sends.append((w, send(tensors, w)))
        self.sends = [(r, p) for r, p in self.sends if not p.done()]
        if self.pull.coded and not final:
            self.residuals[w] = self.pull.residual_norm(w, self.params)
            self.pull_residual_max = max(self.pull_residual_max, self.residuals[w])

    def _record(self, **fields: Any) -> None:
        b = self.ctx.transport.end_step()
        step, self.updates_recorded = self.updates_recorded, self.updates_recorded + 1
        if self.residuals:  # coded pulls: the largest residual a worker holds (bounded)
            fields["pull_residual"] = max(self.residuals.values())
        self.ctx.recorder.step(step, compute_s=0.0, comm_s=0.0, idle_s=0.0, bytes_sent=b.sent,
                               bytes_recv=b.recv, loss=None, version=self.version, **fields)

    def _check_silent(self, expected: dict[int, float]) -> None:
        now = time.monotonic()
        for w, since in list(expected.items()):
            if w in self.active and now - since > self.ctx.cfg.timeout_s:
                expected.pop(w)
                self._lose(w, f"no push within {self.ctx.cfg.timeout_s:.0f}s")

    # ---- modes ----------------------------------------------------------------------------------
    def _take(self, expected: dict[int, float]) -> tuple[int, Any] | None:
        """The next push as (worker, payload), or None; a lost worker or a checkpoint mark that
        arrives instead is handled here, the same way in every mode."""
        item = self._next()
        if item is None:
            return None
        kind, w, payload = item
        if kind == "lost":
            self._lose(w, payload)
        elif kind == "ckpt":
            self._mark(w, payload, expected)
        elif w not in self.lost:
            return w, payload
        return None

    def _rounds(self) -> None:
        """sync and candidate: one averaged update per round of pushes from every live worker."""
        while self.active:
            got: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
            start = time.monotonic()
            expected = dict.fromkeys(self.active, start)
            while not self.active <= got.keys():
                push = self._take(expected)
                if push is not None:
                    got[push[0]] = self._decode(*push)
                    expected.pop(push[0], None)
                self._check_silent(expected)
            if self.lgc is not None:
                got = self.lgc.decode_round(got)
            order = sorted(w for w in got if w not in self.lost)
            if not order:
                continue
            total = got[order[0]][1]
            for w in order[1:]:
                total = [a + b for a, b in zip(total, got[w][1], strict=True)]
            n = self._live()
            self._apply([t / n for t in total], 1.0)
            stale = [self.version - 1 - got[w][0][1] for w in order]
            steps = [got[w][0][2] for w in order]
            self.staleness += stale
            self.local_steps += steps
            for w in order:
                if got[w][0][3] & FLAG_FINAL:
                    self.active.discard(w)
                    self.finished.add(w)
                else:
                    self._reply(w)
            self._record(staleness=stale, local_steps=steps, contributors=order,
                         **(self.lgc.fields() if self.lgc is not None else {}))

    def _per_push(self, bound: int | None) -> None:
        """async (``bound=None``) and ssp: apply each push on arrival; ssp holds answers back."""
        deferred: list[tuple[int, int]] = []
        expected = dict.fromkeys(self.active, time.monotonic())
        while self.active:
            push = self._take(expected)
            fresh = None
            if push is not None:
                w = push[0]
                header, grads = self._decode(*push)
                self.clock[w] += 1
                self._apply(grads, 1.0 / self._live())
                stale = self.version - 1 - header[1]
                self.staleness.append(stale)
                self.local_steps.append(header[2])
                expected.pop(w, None)
                if header[3] & FLAG_FINAL:
                    self.active.discard(w)
                    self.finished.add(w)
                else:
                    fresh = (w, self.clock[w])
                    deferred.append(fresh)
                self._record(staleness=stale, worker=w, clock=self.clock[w])
            floor = min((self.clock[j] for j in self.active), default=None)
            keep = []
            for w, k in deferred:
                if w in self.lost:
                    continue
                gap = 0 if floor is None else k - floor
                if bound is None or gap <= bound:
                    self.max_gap = max(self.max_gap, gap)
                    self._reply(w)
                    expected[w] = time.monotonic()
                else:
                    keep.append((w, k))
            self.deferred_count += int(fresh in keep)
            deferred = keep
            self._check_silent(expected)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        threads = [threading.Thread(target=self._receive, args=(w,), daemon=True,
                                    name=f"ps-recv-{w}") for w in self.ranks]
        for th in threads:
            th.start()
        try:
            mode = self.opts.mode
            if mode in ("sync", "candidate"):
                self._rounds()
            else:
                self._per_push(self.opts.staleness if mode == "ssp" else None)
            for w in sorted(self.finished):
                self._reply(w, final=True)
            t = self.ctx.transport
            for w, p in self.sends:
                if w in self.lost:
                    continue
                try:
                    wait_on(p, t, w, self.ctx.cfg.timeout_s)
                except TandemError as err:
                    self._lose(w, f"final model not delivered: {err}")
        finally:
            self.stop.set()
        if self.lgc is not None:
            self.ctx.recorder.info(**{f"lgc_{k}": v for k, v in self.lgc.describe().items()})
        stale = self.staleness or [0]
        return {"role": "server", "server": self.index, "updates": self.version,
                "params_held": sum(p.numel() for p in self.params),
                "staleness_max": max(stale), "staleness_mean": sum(stale) / len(stale),
                "local_steps_mean": sum(self.local_steps) / max(1, len(self.local_steps)),
                "max_clock_gap": self.max_gap, "deferred_replies": self.deferred_count,
                "pull_residual_max": self.pull_residual_max,
                "lost_workers": {str(w): why for w, why in self.lost.items()},
                "checkpoints": self.saves}
