"""A machine-learning worker of ``bsp_shared`` (M2), and the flat-model helpers both roles use.

The worker never waits for anybody::

    loop: if the agent asks for a checkpoint: save our rank file, ack, wait for the release
          if the agent holds us for an evaluation: wait for the unhold
          if a newer model is published, copy it (seqlock read, never torn)
          compute a gradient on it
          add it at once into the machine's active accumulator (under the segment lock)
          until the agent sets the stop flag (or the agent is marked dead: then fail at once)

It knows nothing about workloads: it gets a ``compute(flat_model, version, step)`` callable, so
tests drive it with gradients whose values are known (``tests/bsp_jobs.py``). The checkpoint
handshake is explained in :mod:`tandem.strategies.bsp_shared.agent`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from tandem.errors import TandemError, WorkerFailed
from tandem.flat import flatten
from tandem.strategies.bsp_shared.segment import MachineSegment

if TYPE_CHECKING:
    from tandem.telemetry.recorder import Recorder
    from tandem.transport.transport import Transport

#: compute(flat_model, version, step) -> (loss, flat_gradient, compute_s, straggled)
ComputeFn = Callable[[torch.Tensor, int, int], tuple[float, torch.Tensor, float, bool]]


#: save(checkpoint_id, loop_counters, barrier): write this worker's rank file, then barrier()
SaveWorkerFn = Callable[[int, dict[str, int], Callable[[], None]], None]


def model_digest(params: list[torch.Tensor]) -> str:
    """SHA-256 of the parameters as float32 bytes: how a resumed run proves where it started."""
    return hashlib.sha256(flatten(params).contiguous().numpy().tobytes()).hexdigest()


class WorkerLoop:
    """One machine-learning worker: read the latest model, compute, add; until stopped.

    ``agent_rank``: the transport rank of this machine's agent; its death (marked in the store by
    the launcher) ends the loop within ``liveness_every_s`` instead of after ``stall_timeout_s``.
    ``save``/``resume``: checkpoints (module doc); ``die_mid_add``: test hook, this loop's step at
    which the process kills itself in the middle of its add (``MachineSegment.add``)."""

    def __init__(self, seg: MachineSegment, local_index: int, compute: ComputeFn, *,
                 recorder: Recorder | None = None, transport: Transport | None = None,
                 max_staleness: int | None = None, stall_timeout_s: float = 60.0,
                 agent_rank: int | None = None, save: SaveWorkerFn | None = None,
                 resume: dict[str, int] | None = None, die_mid_add: int | None = None,
                 liveness_every_s: float = 0.5) -> None:
        self.seg, self.local, self.compute = seg, local_index, compute
        self.rec, self.transport = recorder, transport
        self.max_staleness = max_staleness
        self.stall_timeout_s = stall_timeout_s
        self.agent_rank, self.save, self.die_mid_add = agent_rank, save, die_mid_add
        self.liveness_every_s = liveness_every_s
        #: what a checkpoint keeps of the loop (the strategy adds data position and RNG)
        self.counters = {"step": 0, "gradients": 0, "dropped": 0, "model_reads": 0}
        self.counters.update({k: int(v) for k, v in (resume or {}).items()})
        self._acked = self._held = 0
        self._polled = float("-inf")

    def _check_agent(self) -> None:
        if self.agent_rank is None or self.transport is None or \
                time.monotonic() - self._polled < self.liveness_every_s:
            return
        self._polled = time.monotonic()
        liveness = self.transport.liveness
        if liveness.dead_ranks([self.agent_rank]):
            raise WorkerFailed(f"worker {self.local}: the agent of this machine (rank "
                               f"{self.agent_rank}) died ({liveness.describe([self.agent_rank])})",
                               ranks=[self.agent_rank])

    def _checkpoint(self, cid: int) -> None:
        """Save our rank file, ack, wait for the agent's release: every gradient we handed in
        before is in the agent's read-out and none after it, so the files form a consistent cut.
        Only shared-memory words are waited on (no collective), always with a deadline."""
        seg = self.seg

        def barrier() -> None:
            seg.ack_checkpoint(self.local, cid)
            self._wait_while(lambda: seg.checkpoint_request() == cid, f"checkpoint {cid}")

        with self.rec.evaluating() if self.rec is not None else nullcontext():
            if self.save is None:
                barrier()
            else:
                self.save(cid, dict(self.counters), barrier)
        self._acked = cid

    def _hold(self, hid: int) -> None:
        """The agent evaluates: compute nothing until it lifts hold ``hid``."""
        with self.rec.evaluating() if self.rec is not None else nullcontext():
            self._wait_while(lambda: self.seg.hold_request() == hid, f"evaluation hold {hid}")
        self._held = hid

    def _wait_while(self, asked: Callable[[], bool], what: str) -> None:
        """Poll a shared-memory word (never a collective) until the agent moves on, the run
        stops or ``stall_timeout_s`` passes (an error that says the agent may be stuck)."""
        deadline = time.monotonic() + self.stall_timeout_s
        while asked() and not self.seg.stopped:
            self._check_agent()
            if time.monotonic() > deadline:
                raise TandemError(f"worker {self.local}: {what} not released in "
                                  f"{self.stall_timeout_s:.0f}s; is the agent stuck?")
            time.sleep(0.001)

    def run(self) -> dict[str, Any]:
        seg, c = self.seg, self.counters
        flat = torch.empty(seg.numel)
        version = seg.read_model(flat, self.stall_timeout_s)
        changed_at = time.monotonic()
        abandoned = 0
        while not seg.stopped:
            cid = seg.checkpoint_request()
            if cid and cid != self._acked:
                self._checkpoint(cid)
                changed_at = time.monotonic()
                continue
            hid = seg.hold_request()
            if hid and hid != self._held:
                self._hold(hid)
                changed_at = time.monotonic()
                continue
            self._check_agent()
            t0 = time.perf_counter()
            latest = seg.latest()
            if latest != version:
                version = seg.read_model(flat, self.stall_timeout_s)
                changed_at = time.monotonic()
                c["model_reads"] += 1
            elif time.monotonic() - changed_at > self.stall_timeout_s:
                raise TandemError(f"worker {self.local}: no new model for "
                                  f"{self.stall_timeout_s:.0f}s; the agent of this machine is "
                                  "gone or stuck (raise --timeout if supersteps are that long)")
            read_s = time.perf_counter() - t0
            step = c["step"]
            loss, grad, compute_s, straggled = self.compute(flat, version, step)
            t1 = time.perf_counter()
            status, stale = seg.add(grad, version, self.local, loss, self.max_staleness,
                                    die_midway=step == self.die_mid_add)
            add_s = time.perf_counter() - t1
            if status == "stopped":
                abandoned += 1
                break
            c["gradients"] += 1
            c["dropped"] += status == "dropped"
            if self.transport is not None:
                self.transport.end_step()
            if self.rec is not None:
                self.rec.step(step, compute_s=compute_s, comm_s=read_s + add_s, idle_s=0.0,
                              bytes_sent=0, bytes_recv=0, loss=loss, straggled=straggled,
                              staleness=stale, version=version, dropped=status == "dropped")
            c["step"] = step + 1
        return {"role": "worker", "local_index": self.local, "gradients": c["gradients"],
                "dropped": c["dropped"], "abandoned": abandoned, "model_reads": c["model_reads"]}
