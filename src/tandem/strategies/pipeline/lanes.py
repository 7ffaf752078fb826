"""The pieces of the ``pipeline`` strategy (:mod:`tandem.strategies.pipeline`) that run one
model: its :class:`Lane` (trainer, codecs, group, RNG slice, telemetry, checkpoint state), the
:class:`CommThread` that runs its exchanges in step order, the :class:`LinkTurns` that gives the
link to one model's exchange at a time, the :class:`Flight` of one step's exchange and the
:class:`MeteredLink` that counts one model's bytes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from tandem.errors import CheckpointError, PeerTimeout
from tandem.strategies.base import Computed, Exchanged, StepLoop
from tandem.trainer import LocalTrainer, screen_gradients
from tandem.transport import costs

if TYPE_CHECKING:
    from collections.abc import Callable

    from tandem.trainer.context import WorkerContext
    from tandem.transport.transport import Group, Transport


#: origin of the step records' ``t_compute_start`` / ``t_comm_done`` (one per process)
_CLOCK0 = time.perf_counter()


class LinkTurns:
    """Gives the link to one model's exchange at a time, in the order the exchanges were
    submitted (the pipeline's ``one_at_a_time`` option; off by default).

    Why it exists: each model has its own process group, so two exchanges at once are two TCP
    flows each way on every link, which can serve them worse than one after the other. Measured
    side by side on four hosts joined by real links (``bench/cluster.py``, two models, dense
    codec), one at a time against concurrent: 1,111 against 1,154 ms a round on ``textlm`` at
    100 Mbit/s, 211 against 204 on the CNN, 10,105 against 9,991 on ``textlm`` at 10 Mbit/s and
    2,328 against 2,166 on the CNN, so concurrent stays the default. With turns the emulator's
    round was within 2 % and 20 % of the real one at 100 Mbit/s (12 % and 28 % concurrent).

    No deadlock: every rank submits its models' exchanges in the same order (the round's fixed
    model order), so every rank runs them in that one order; each lane's thread takes its own
    exchanges in step order, so the exchange whose turn it is always heads its lane's queue."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket whose exchange has the link
        self._holder = ""

    def ticket(self) -> int:
        with self._cond:
            self._next += 1
            return self._next - 1

    def wait(self, ticket: int, what: str, limit_s: float) -> None:
        """Block until ``ticket``'s turn; PeerTimeout naming the exchange that holds the link
        if it does not come within ``limit_s`` (the caller passes what it allows one exchange,
        as :meth:`Lane.settle` does)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._serving == ticket, limit_s):
                raise PeerTimeout(f"{what} waited {limit_s:.0f}s for the link, held by "
                                  f"{self._holder or 'an earlier exchange'}; raise timeout_s on "
                                  "slow links")
            self._holder = what

    def done(self, ticket: int) -> None:
        """Hand the link on (also after an error: the next exchange must not wait forever)."""
        with self._cond:
            if self._serving == ticket:
                self._serving += 1
                self._holder = ""
                self._cond.notify_all()


class CommThread:
    """The thread that runs one model's exchanges, in step order (see the module docstring);
    with ``turns``, each waits for its turn on the link (:class:`LinkTurns`)."""

    def __init__(self, timeout_s: float, turns: LinkTurns | None = None) -> None:
        self.timeout_s = timeout_s
        self.turns = turns
        self._queue: queue.Queue[tuple[Lane, Flight, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tandem-pipeline-comm",
                                        daemon=True)
        self._thread.start()

    def submit(self, lane: Lane, flight: Flight) -> None:
        """Queue ``flight`` (from the training thread: the ticket order is the submit order)."""
        self._queue.put((lane, flight, self.turns.ticket() if self.turns is not None else -1))

    def stop(self, wait_s: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout=wait_s)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            lane, flight, ticket = item
            try:
                if self.turns is not None:
                    self.turns.wait(ticket, f"pipeline model {lane.label}'s exchange of step "
                                            f"{flight.step}", lane.exchange_limit_s(flight))
                flight.started_at = time.perf_counter()
                for b in range(flight.nbuckets):
                    if not flight.ready[b].wait(self.timeout_s):
                        raise PeerTimeout(f"pipeline model {lane.label}: bucket {b} of step "
                                          f"{flight.step} never became ready (internal error)")
                    flight.means[b] = lane.exchange_bucket(flight, b)
                flight.bytes = lane.link.take()
            except Exception as err:  # re-raised in the training thread
                flight.error = err
            finally:
                if self.turns is not None:
                    self.turns.done(ticket)
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
                   category: str = "train", caller_waits: bool = False) -> Any:
        self._charge(costs.all_reduce(*self._n(tensor, group)), category)
        return self._t.all_reduce(tensor, op, group=group, category=category,
                                  caller_waits=caller_waits)

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
        self.compute_started_at: float | None = None  # when the step's forward began
        self.launched_at: float | None = None
        self.started_at: float | None = None  # when its exchange began (had the link)
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


class Lane(StepLoop):
    """One model on this worker: its trainer, codec(s), group, RNG slice and telemetry.

    A lane runs the step loop split in two: :meth:`launch` computes and hands the gradient to
    the model's communication thread; :meth:`settle` applies, records and evaluates, with the
    loop's own hooks. The job (:mod:`tandem.strategies.pipeline`) interleaves the lanes."""

    def __init__(self, index: int, label: str, ctx: WorkerContext, group: Group,
                 bucket_mb: float, total: int, turns: LinkTurns | None = None) -> None:
        self.index, self.label, self.group = index, label, group
        trainer = LocalTrainer(ctx)
        super().__init__(ctx, total, trainer=trainer)
        self.trainer: LocalTrainer = trainer
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
        self.rng = torch.get_rng_state()  # the solo run's global RNG state at its first step
        self.link = MeteredLink(ctx.transport)
        self.comm = CommThread(ctx.cfg.timeout_s, turns)
        self.flight: Flight | None = None
        self.pending: tuple[Flight, float, float, bool] | None = None  # flight, loss, C, straggled
        self.sums = {"compute_s": 0.0, "comm_s": 0.0, "exposed_s": 0.0, "hidden_s": 0.0}
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
        flight.compute_started_at = time.perf_counter()
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

    def exchange_limit_s(self, flight: Flight) -> float:
        """The longest one exchange may take: the transport's timeout per bucket, and one more
        for the wait on the gradient."""
        return self.ctx.cfg.timeout_s * (flight.nbuckets + 1)

    def settle(self, evaluating: Callable[[], contextlib.ExitStack]) -> float:
        """Wait for the last exchange, apply it, record the step (and evaluate when due).
        Returns the seconds this thread waited (the communication not hidden)."""
        if self.pending is None:
            return 0.0
        flight, loss, compute_s, straggled = self.pending
        self.pending = None
        t0 = time.perf_counter()
        limit = self.exchange_limit_s(flight)
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
        active = (flight.finished_at or 0.0) - (flight.launched_at or 0.0)
        hidden = max(0.0, active - exposed)
        for k, v in (("compute_s", compute_s), ("comm_s", active), ("exposed_s", exposed),
                     ("hidden_s", hidden)):
            self.sums[k] += v
        self.skipped += flight.skipped
        step = flight.step
        c = Computed(loss, [], compute_s, straggled, skipped=flight.skipped,
                     fields={"skipped": True} if flight.skipped else {})
        # when this step's forward began and its exchange ended, on one clock for all lanes of
        # the process (seconds since it started): with overlap, the next model's forward
        # begins before this model's exchange ends; without, after
        ex = Exchanged(mean, comm_s=exposed, fields={
            "comm_active_s": active, "hidden_s": hidden,
            "t_compute_start": round((flight.compute_started_at or 0.0) - _CLOCK0, 6),
            "t_comm_start": round((flight.started_at or 0.0) - _CLOCK0, 6),
            "t_comm_done": round((flight.finished_at or 0.0) - _CLOCK0, 6)})
        self.apply(step, c, ex)
        self.record(step, c, ex, flight.bytes)
        if self.eval_due(step):
            with evaluating():
                self.evaluate(step)
        return exposed

    def record(self, step: int, c: Computed, ex: Exchanged,
               traffic: tuple[int, int] = (0, 0)) -> None:
        """The step record, with this model's own bytes (the transport's meter mixes models)."""
        record = self.ctx.recorder.step(
            step, compute_s=c.compute_s, comm_s=ex.comm_s or 0.0, idle_s=0.0,
            bytes_sent=traffic[0], bytes_recv=traffic[1], loss=c.loss, straggled=c.straggled,
            **ex.fields, **c.fields)
        self.step_callbacks(step, record)

    def exchange(self, step: int, c: Computed) -> Exchanged:  # pragma: no cover - see launch
        raise RuntimeError("a pipeline lane exchanges on its communication thread (launch)")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs from this model, taken between rounds (nothing in flight):
        trainer (model, optimizer, data position), each bucket's codec state, the model's own
        RNG slice, its skipped-step count and telemetry sums."""
        if self.pending is not None:
            raise RuntimeError(f"pipeline model {self.label}: checkpoint with an exchange in "
                               "flight (settle first)")
        return {"label": self.label, "trainer": self.trainer.state_dict(),
                "codecs": [c.state_dict() for c in self.codecs], "rng": self.rng,
                "skipped": self.skipped, "sums": dict(self.sums)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("label") != self.label or len(state["codecs"]) != len(self.codecs):
            raise CheckpointError(
                f"pipeline checkpoint holds model {state.get('label')!r} with "
                f"{len(state['codecs'])} bucket(s) where this run has {self.label!r} with "
                f"{len(self.codecs)}: resume with the run's own models and bucket_mb")
        self.trainer.load_state_dict(state["trainer"])
        for c, cs in zip(self.codecs, state["codecs"], strict=True):
            c.load_state_dict(cs)
        self.rng = state["rng"]
        self.skipped = int(state["skipped"])
        self.sums.update({k: float(v) for k, v in state["sums"].items()})

    def stats(self) -> dict[str, Any]:
        s = self.sums
        share = s["hidden_s"] / s["comm_s"] if s["comm_s"] > 0 else None
        return {"label": self.label, "steps": self.total, "skipped_steps": self.skipped,
                **{k: round(v, 6) for k, v in s.items()}, "hidden_share": share}
