"""``coded_ps``: a parameter server with classic gradient coding (Tandon et al., ICML 2017).

The n workers (ranks 0..n-1) hold data partitions with redundancy d = s + 1 (cyclic or fractional
repetition, :mod:`tandem.coding`); one extra process (rank n) is the server. Every step the server
sends the current parameters to the idle workers; worker i computes the gradient of each partition
it holds and returns ``c_i = sum_k B[i, k] g_k``; the server waits for the *first* n - s coded
gradients computed at the current parameters, decodes ``sum_k g_k`` exactly with the decoding
vector of that survivor set, and takes an SGD step with the mean gradient ``sum_k g_k / n``.
The late workers' answers are dropped when they arrive and those workers get the newest parameters,
so a straggler never falls further behind than one step.

Unlike GOCO the result is exact (no variance from stragglers) but at most s stragglers per step are
tolerated, each worker computes d partition gradients, and the server is a single hot spot.

Options: ``s`` (stragglers tolerated; default ``redundancy - 1``, and ``redundancy`` must then be
``s + 1`` or 1), ``scheme`` (``cyclic`` | ``fractional``, the latter needs (s+1) | n),
``full_batch`` (whole-partition gradients), ``compute_floor_s`` (pad each gradient computation,
for meaningful timing with many processes per core), ``code_seed``.
Tune: s = the number of stragglers you expect per step; each extra unit costs one more partition
gradient per worker per step.

Reliability. Non-finite gradients are screened on the worker before they are sent
(:func:`~tandem.trainer.trainer.screen_gradients`): ``--nan-policy stop`` ends the run naming
the rank and step; ``skip`` sends a "skipped" answer instead of the coded gradient and counts it
(``skipped_steps``). The server treats a skipped answer like a straggler: it decodes from the
others when n - s usable answers remain, else it leaves the parameters unchanged for that step
(``dropped_steps``). A worker that dies (its receive fails, or the launcher marks it dead) is a
*permanent straggler* (``tolerates_lost_workers``): the server drops it, records ``lost_worker``
and goes on while at most s workers are lost, since any n - s answers decode exactly; beyond that
it raises :class:`~tandem.errors.WorkerFailed` naming the lost ranks. The server's death ends the
run. Checkpoints are not written (``--checkpoint-every`` is refused): late workers' computations
are always in flight, and the server holds no state beyond the parameters.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from tandem.coding import gradient_code
from tandem.errors import ConfigError, PeerTimeout, TandemError, WorkerFailed
from tandem.flat import unflatten
from tandem.strategies.base import Strategy, StrategyOptions, register
from tandem.telemetry.log import get_logger
from tandem.trainer import (
    build_model,
    is_eval_step,
    screen_gradients,
    step_optimizer,
    training_spec,
)
from tandem.trainer.evaluate import evaluate_alone
from tandem.trainer.final_model import save_final_model
from tandem.trainer.partitions import PartitionGradients
from tandem.transport.store_barrier import wait_on

log = get_logger(__name__)
STOP = -1.0
DEAD_POLL_S = 0.25


def skipped_tag(step: int) -> float:
    """The tag of a worker's "gradient skipped" answer for ``step`` (normal answers: ``step``)."""
    return float(-2 - step)


class CodedPSOptions(StrategyOptions):
    s: int | None = Field(default=None, ge=0, description="stragglers tolerated per step "
                          "(default: workload redundancy - 1)")
    scheme: Literal["cyclic", "fractional"] = Field("cyclic", description="repetition "
                                                    "scheme; fractional needs (s+1) | workers")
    full_batch: bool = Field(False, description="whole-partition gradients instead of "
                             "minibatches")
    compute_floor_s: float = Field(default=0.0, ge=0, description="pad each partition "
                                   "gradient to at least this long (emulates a heavier model)")
    code_seed: int = Field(0, description="seed of the random encoding matrix")


@register
class CodedPSStrategy(Strategy):
    name = "coded_ps"
    Options = CodedPSOptions
    #: a dead worker is a permanent straggler while at most s are lost (see module doc)
    tolerates_lost_workers = True
    needs_identical_start = False  # the workers train what the server sends
    exact_exchange = ("the server decodes an exact linear combination of the coded gradients; "
                      "a lossy codec would break exact recovery")

    @classmethod
    def processes(cls, cfg: Any) -> int:
        return cfg.workers + 1

    def _code(self) -> Any:
        cfg, o = self.ctx.cfg, self.opts
        assert isinstance(o, CodedPSOptions)
        s = o.s if o.s is not None else cfg.workload.redundancy - 1
        if s >= cfg.workers:
            raise ConfigError(f"coded_ps: s={s} must be below workers ({cfg.workers})")
        return gradient_code(cfg.workers, s, o.scheme, seed=o.code_seed)

    def run(self) -> dict[str, Any]:
        self.code = self._code()
        if self.ctx.rank == self.ctx.cfg.workers:
            self.ctx.recorder.role = "server"
            return self._server()
        return self._worker()

    # ---- worker --------------------------------------------------------------------------------
    def _worker(self) -> dict[str, Any]:
        ctx, o = self.ctx, self.opts
        assert isinstance(o, CodedPSOptions)
        tr, rec, server, i = ctx.transport, ctx.recorder, ctx.cfg.workers, ctx.rank
        held = list(self.code.alloc.held[i])
        grads = PartitionGradients(ctx, i, held, o.full_batch, o.compute_floor_s)
        n_params = sum(p.numel() for p in grads.params)
        buf = torch.empty(n_params + 1)
        done = skipped = 0
        nan_at = {tuple(x) for x in ctx.cfg.inject_nan}
        crash_at = {tuple(x) for x in ctx.cfg.inject_crash}
        while True:
            t0 = time.perf_counter()
            wait_on(tr.recv(buf, server), tr, server, None)  # while the server lives
            idle_s = time.perf_counter() - t0
            step = int(buf[0])
            if buf[0] == STOP:
                break
            loss, gs, spent = grads.compute(buf[1:].clone())
            if (i, step) in crash_at:
                os.kill(os.getpid(), signal.SIGKILL)  # injected crash (tests)
            if (i, step) in nan_at:
                gs[0].fill_(float("nan"))
            compute_s, straggled = ctx.faults.apply(done, spent)
            gs, was_skipped = screen_gradients(gs, ctx.cfg.nan_policy, i, step)
            skipped += was_skipped
            tag = skipped_tag(step) if was_skipped else float(step)
            coded = torch.zeros(n_params) if was_skipped else self.code.encode(i, gs)
            t1 = time.perf_counter()
            wait_on(tr.send(torch.cat([torch.tensor([tag]), coded]), server), tr, server, None)
            b = tr.end_step()
            rec.step(done, compute_s=compute_s, comm_s=time.perf_counter() - t1, idle_s=idle_s,
                     bytes_sent=b.sent, bytes_recv=b.recv, loss=loss, straggled=straggled,
                     server_step=step, **({"skipped": True} if was_skipped else {}))
            done += 1
        return {"steps": done, "skipped_steps": skipped}

    # ---- server --------------------------------------------------------------------------------
    def _server(self) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.ctx.cfg
        tr, rec, n = ctx.transport, ctx.recorder, cfg.workers
        model = build_model(ctx.workload, cfg.seed, tr.device)
        params = [p for p in model.parameters() if p.requires_grad]
        x = parameters_to_vector(params).detach().clone()
        opt = ctx.workload.optimum
        opt = opt.double() if opt is not None and opt.numel() == x.numel() else None
        total = self.total_steps(cfg, len(ctx.workload.train))
        every = self.eval_every(total)
        # the server owns the optimizer: the closed form x - lr * g for plain SGD, the run's
        # optimizer (schedule, clipping) on the model otherwise
        spec = training_spec(cfg, ctx.workload)
        optimizer = sched = None
        if not spec.plain_sgd:
            optimizer = spec.make_optimizer(model)
            sched = spec.make_scheduler(optimizer, total)
        inbox: dict[int, tuple[torch.Tensor, Any]] = {}
        self.lost: dict[int, str] = {}
        self.live = set(range(n))

        def dispatch(j: int, step: float) -> Any:
            try:
                if step != STOP:  # the answer's receive before the send: see Transport.send
                    b = torch.empty(x.numel() + 1)
                    inbox[j] = (b, tr.recv(b, j))
                return tr.send(torch.cat([torch.tensor([step]), x]), j)
            except TandemError as err:
                self._lose(j, f"send failed: {err}", inbox)
                return None

        for j in range(n):
            dispatch(j, 0.0)
        used = [0] * n
        dropped = 0
        trajectory: list[float] = []
        for step in range(total):
            t0 = time.perf_counter()
            got, declined = self._collect(step, inbox, dispatch, t0)
            wait_s = time.perf_counter() - t0
            extra: dict[str, Any] = {"survivors": sorted(got)}
            if len(got) >= n - self.code.s:
                full = self.code.decode(got)
                if optimizer is None:
                    x -= cfg.lr * full / n
                else:
                    x = self._optimizer_step(x, full / n, params, optimizer, sched, spec.clip)
            else:  # skipped answers left too few to decode: no update this step
                dropped += 1
                extra["dropped"] = True
            for j in sorted(got) + sorted(declined):
                used[j] += j in got
                if step + 1 < total and j in self.live:
                    dispatch(j, float(step + 1))
            b = tr.end_step()
            if opt is not None:
                extra["opt_error"] = float(((x.double() - opt) ** 2).sum())
                trajectory.append(extra["opt_error"])
            rec.step(step, compute_s=0.0, comm_s=0.0, idle_s=wait_s, bytes_sent=b.sent,
                     bytes_recv=b.recv, loss=None, **extra)
            if is_eval_step(step, every, total):
                with rec.evaluating():
                    with torch.no_grad():
                        vector_to_parameters(x, params)
                    ev = evaluate_alone(model, ctx.workload, tr.device)
                    rec.eval(step, **ev.record(),
                             **({"opt_error": trajectory[-1]} if trajectory else {}))
        stops = []
        for j in range(n):  # let every live worker finish its last job, then stop it
            if j in inbox:
                try:
                    inbox.pop(j)[1].wait()
                except TandemError as err:
                    self._lose(j, str(err), inbox, final=True)
            if j in self.live:
                stops.append((j, dispatch(j, STOP)))
        for j, pend in stops:  # no closing barrier (lost workers): make sure STOP arrived
            try:
                if pend is not None:
                    pend.wait()
            except TandemError as err:
                self._lose(j, f"stop not delivered: {err}", inbox, final=True)
        with torch.no_grad():
            vector_to_parameters(x, params)
        save_final_model(ctx.run_dir, model, cfg, step=total)  # the server's model
        return {"steps": total, "used_per_worker": used, "trajectory": trajectory,
                "dropped_steps": dropped, "skipped_steps": 0,
                "lost_workers": {str(j): why for j, why in self.lost.items()},
                "params": [p.detach().clone() for p in params]}

    @staticmethod
    def _optimizer_step(x: torch.Tensor, grad: torch.Tensor, params: list[torch.Tensor],
                        optimizer: Any, sched: Any, clip: float | None) -> torch.Tensor:
        with torch.no_grad():
            vector_to_parameters(x, params)
        for p, g in zip(params, unflatten(grad, [tuple(q.shape) for q in params]), strict=True):
            p.grad = g.clone()
        step_optimizer(optimizer, params, clip, sched)
        return parameters_to_vector(params).detach().clone()

    def _lose(self, j: int, why: str, inbox: dict[int, Any], final: bool = False) -> None:
        """Worker ``j`` is gone: a permanent straggler while the code can decode without it."""
        if j in self.lost:
            return
        inbox.pop(j, None)
        self.live.discard(j)
        self.lost[j] = why
        n, s = self.ctx.cfg.workers, self.code.s
        log.warning("coded_ps server: lost worker rank %d (%s); %d of %d workers left", j, why,
                    len(self.live), n)
        self.ctx.recorder.info(lost_worker=j, lost_reason=why[:300])
        if len(self.live) < n - s and not final:
            lost = sorted(self.lost)
            raise WorkerFailed(
                f"coded_ps server: worker rank(s) {lost} lost ({why}); the code (s={s}) decodes "
                f"from any {n - s} of the {n} workers and only {len(self.live)} are left. Use "
                "a larger s (and workload redundancy s+1) to survive more lost workers.",
                ranks=lost)

    def _collect(self, step: int, inbox: dict[int, tuple[torch.Tensor, Any]], dispatch: Any,
                 t0: float) -> tuple[dict[int, torch.Tensor], set[int]]:
        """The first n - s coded gradients computed at this step's parameters, and the workers
        that answered this step with a skipped (non-finite) gradient. Returns early with fewer
        than n - s when every live worker has answered and too many skipped."""
        n, s = self.ctx.cfg.workers, self.code.s
        got: dict[int, torch.Tensor] = {}
        declined: set[int] = set()
        deadline = t0 + self.ctx.cfg.timeout_s
        next_poll = time.perf_counter() + DEAD_POLL_S
        while len(got) < n - s and len(got) + len(declined) < len(self.live):
            progressed = False
            for j, (buf, pend) in list(inbox.items()):
                if not pend.done():
                    continue
                del inbox[j]
                progressed = True
                try:
                    pend.wait(0)
                except TandemError as err:
                    self._lose(j, str(err), inbox)
                    continue
                tag = int(buf[0])
                if tag == step:
                    got[j] = buf[1:].clone()
                elif tag == int(skipped_tag(step)):
                    declined.add(j)
                else:  # a late answer to an old step: hand this worker the newest parameters
                    dispatch(j, float(step))
            if not progressed:
                now = time.perf_counter()
                if now > next_poll:  # the launcher marks dead ranks in the store
                    next_poll = now + DEAD_POLL_S
                    waiting = sorted(self.live - got.keys() - declined)
                    for j in self.ctx.transport.liveness.dead_ranks(waiting):
                        self._lose(j, self.ctx.transport.liveness.describe([j]), inbox)
                if now > deadline:
                    missing = sorted(self.live - got.keys() - declined)
                    raise PeerTimeout(f"coded_ps server: step {step} has {len(got)} of the "
                                      f"{n - s} coded gradients it needs after "
                                      f"{self.ctx.cfg.timeout_s:.0f}s; workers {missing} are "
                                      "silent", ranks=missing)
                time.sleep(0.0005)
        return got, declined
