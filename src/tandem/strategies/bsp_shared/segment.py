"""Shared-memory buffers between the processes of one machine (used by ``bsp_shared``, M2).

One :class:`MachineSegment` per machine holds, in a single memory-mapped file:

* a **versioned, double-buffered model slot**: the agent (the only writer) writes version ``v``
  into slot ``v % 2`` while readers may still copy version ``v - 1`` from the other slot. Each slot
  has a sequence word that is ``2v + 1`` while version ``v`` is being written and ``2v`` once it is
  complete (a seqlock). A reader copies the slot between two reads of that word and retries when
  they differ or are odd, so it never returns a torn model, and it learns the version it got from
  the word itself (not from a separate "latest" field that could move meanwhile).
* **double-buffered gradient accumulators with counts**: workers add into the *active* buffer
  under an inter-process lock (``fcntl.flock`` on the segment file: it works between processes
  that share no parent, e.g. under torchrun). The agent flips the active index under the same
  lock (O(1) work while holding it) and then reads the retired buffer at leisure: nobody writes it
  until the next flip. Measured on the development machine: two processes adding into one shared
  tensor *without* a lock lose updates; with a lock the adds are exact.

Per accumulator buffer the segment also counts gradients (in total and per local worker), the
staleness of the gradients (model versions between the one a gradient was computed on and the
one it will be applied to), gradients dropped as too stale, and the sum of the workers' losses.

A worker killed while adding (``kill -9``, OOM) cannot deadlock the agent: ``flock`` locks belong to
the open file description, and the kernel releases them when the dying process's descriptors
close. What it can leave is a *partial add* (some elements of its gradient summed, its count not
bumped). Each worker therefore sets an in-progress word (the buffer index + 1) before touching the
accumulator and clears it after its counts; the agent reads those words under the lock at every
swap. A word still set there can only belong to a dead worker (a live one would hold the lock),
so the retired buffer is *torn*: :meth:`swap` zeroes it and reports its gradients as
``discarded`` (with the torn workers) instead of applying a sum nobody can correct.

Checkpoints use three more words, all polled, never waited on in the kernel: a request word
(the checkpoint id while the agent wants its workers to save), one ack word per worker (the id
it saved last) and one *retired* word per worker (set by a resumed agent for a worker that was
already dead at the checkpoint). Evaluations use one more, the hold word (its id while the
agent evaluates). The protocols themselves live in :mod:`tandem.strategies.bsp_shared.agent`.

Lifetime: the agent creates the file (under ``/dev/shm`` where it exists), the workers open it,
and once everyone has attached the agent unlinks the name, so nothing is left behind even if a
process is killed later: the kernel frees the memory with the last mapping. :meth:`unlink` is
idempotent; call it in a ``finally``.

Memory ordering: the seqlock relies on stores becoming visible in program order (x86-TSO). On
weakly ordered CPUs (ARM) a torn read is unlikely but not excluded; the stress test in
``tests/test_bsp_shared.py`` is the check to run there.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from tandem.errors import TandemError
from tandem.transport.file_lock import flocked

# int64 header fields
_LATEST, _SEQ0, _SEQ1, _STOP, _ACTIVE = 0, 1, 2, 3, 4
_BASE, _COUNT, _STALE_SUM, _STALE_MAX, _DROPPED = 5, 7, 9, 11, 13  # two entries each (buffer 0/1)
_CKPT = 15  # checkpoint request: its id (> 0) while the agent asks the workers to save, else 0
_HOLD = 16  # evaluation hold: its id (> 0) while the agent evaluates and the workers wait, else 0
_FIXED = 17
_PER_WORKER_WORDS = 5  # per local worker: 2 counts (buffer 0/1), in-add, checkpoint ack, retired


def shm_dir() -> Path:
    """Where segment files live: ``/dev/shm`` (RAM) on Linux, the temp directory elsewhere."""
    d = Path("/dev/shm")
    return d if d.is_dir() and os.access(d, os.W_OK) else Path(tempfile.gettempdir())


class MachineSegment:
    """The shared state of one machine: model slots, accumulators, counters, a lock.

    ``numel`` is the model size D (float32 elements); ``local_workers`` the number of workers that
    add into it (each has a local index ``0 .. local_workers-1`` for the per-worker counts).
    Memory: 4 x D floats (two model slots, two accumulators) whatever the number of workers.
    """

    def __init__(self, path: Path, numel: int, local_workers: int, *, create: bool) -> None:
        self.path = Path(path)
        self.numel, self.local_workers = int(numel), int(local_workers)
        self.header_len = _FIXED + _PER_WORKER_WORDS * self.local_workers
        header_bytes = self.header_len * 8
        loss_bytes = 2 * 8
        data_bytes = 4 * self.numel * 4
        total = header_bytes + loss_bytes + data_bytes
        if create:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, total)
        else:
            fd = os.open(self.path, os.O_RDWR)
            if os.fstat(fd).st_size != total:
                os.close(fd)
                raise TandemError(f"shared segment {self.path} has the wrong size: the agent and "
                                  "this worker disagree on the model or the number of workers")
        self._fd = fd
        raw = torch.from_file(str(self.path), shared=True, size=total, dtype=torch.uint8)
        self.header = raw[:header_bytes].view(torch.int64)
        self.loss_sum = raw[header_bytes:header_bytes + loss_bytes].view(torch.float64)
        data = raw[header_bytes + loss_bytes:].view(torch.float32)
        self.slots = (data[: self.numel], data[self.numel: 2 * self.numel])
        self.acc = (data[2 * self.numel: 3 * self.numel], data[3 * self.numel:])
        w = self.local_workers
        self.per_worker = self.header[_FIXED: _FIXED + 2 * w].view(2, w)
        self.in_add = self.header[_FIXED + 2 * w: _FIXED + 3 * w]  # buffer + 1 while adding
        self.acks = self.header[_FIXED + 3 * w: _FIXED + 4 * w]    # last checkpoint id saved
        self.retired = self.header[_FIXED + 4 * w: _FIXED + 5 * w]  # 1: dead before a resume
        if create:
            self.header.zero_()
            self.loss_sum.zero_()
            data.zero_()
            self.header[_LATEST] = -1
            self.header[_SEQ0] = -2  # "version -1, complete": nothing published yet
            self.header[_SEQ1] = -2

    # ---- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, numel: int, local_workers: int, tag: str = "bsp") -> MachineSegment:
        """A new segment under a unique name (no clash between concurrent runs)."""
        path = shm_dir() / f"tandem-{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        return cls(path, numel, local_workers, create=True)

    @classmethod
    def attach(cls, path: str | Path, numel: int, local_workers: int) -> MachineSegment:
        return cls(Path(path), numel, local_workers, create=False)

    def unlink(self) -> None:
        """Remove the name (existing mappings stay valid). Safe to call more than once."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass

    # ---- lock -------------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """The inter-process lock guarding the accumulators (one flock on the segment file)."""
        with flocked(self._fd):
            yield

    # ---- model slot (single writer: the agent) ---------------------------------------------
    def publish(self, flat: torch.Tensor, version: int) -> None:
        """Write model ``version`` into slot ``version % 2`` and make it the latest."""
        slot = version % 2
        self.header[_SEQ0 + slot] = 2 * version + 1  # odd: being written
        self.slots[slot].copy_(flat.reshape(-1))
        self.header[_SEQ0 + slot] = 2 * version      # even: complete
        self.header[_LATEST] = version

    def latest(self) -> int:
        return int(self.header[_LATEST])

    def read_model(self, out: torch.Tensor, timeout_s: float = 60.0) -> int:
        """Copy the latest complete model into ``out``; return its version (seqlock read)."""
        deadline = time.monotonic() + timeout_s
        while True:
            latest = int(self.header[_LATEST])
            if latest >= 0:
                slot = latest % 2
                s1 = int(self.header[_SEQ0 + slot])
                # s1 == 2 * latest: the slot holds exactly the version announced (not a newer one
                # written after a preemption, which would make versions go backwards later)
                if s1 == 2 * latest:
                    out.copy_(self.slots[slot])
                    if int(self.header[_SEQ0 + slot]) == s1:
                        return s1 // 2
            if time.monotonic() > deadline:
                raise TandemError(f"no complete model in {self.path} after {timeout_s:.0f}s: "
                                  "the agent stopped publishing (is it alive?)")
            time.sleep(0)

    # ---- accumulators -----------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return bool(self.header[_STOP])

    def add(self, grad: torch.Tensor, version: int, worker: int, loss: float = 0.0,
            max_staleness: int | None = None, *, die_midway: bool = False) -> tuple[str, int]:
        """Add one gradient computed on model ``version``. Returns ``(status, staleness)`` with
        status ``"added"``, ``"dropped"`` (staler than ``max_staleness``: counted, not summed) or
        ``"stopped"`` (the run is over; the gradient is not counted).

        ``die_midway`` is a test hook: the process SIGKILLs itself after adding half of the
        gradient, holding the lock with its in-progress word set (a torn add, see the module doc).
        """
        with self.locked():
            h = self.header
            if h[_STOP]:
                return "stopped", 0
            a = int(h[_ACTIVE])
            stale = int(h[_BASE + a]) - version
            if max_staleness is not None and stale > max_staleness:
                h[_DROPPED + a] += 1
                return "dropped", stale
            self.in_add[worker] = a + 1  # a death from here to the reset leaves a torn buffer
            if die_midway:
                half = grad.numel() // 2
                self.acc[a][:half].add_(grad.reshape(-1)[:half])
                os.kill(os.getpid(), signal.SIGKILL)
            self.acc[a].add_(grad.reshape(-1))
            h[_COUNT + a] += 1
            self.per_worker[a, worker] += 1
            h[_STALE_SUM + a] += max(stale, 0)
            if stale > int(h[_STALE_MAX + a]):
                h[_STALE_MAX + a] = stale
            self.loss_sum[a] += loss
            self.in_add[worker] = 0
            return "added", stale

    def swap(self, next_base: int, *, stop: bool = False) -> dict:
        """Retire the active accumulator (new gradients go to the other, whose gradients will be
        applied to model ``next_base``); return the retired buffer's sum and counters, then zero
        it. With ``stop`` the run is over: no further gradient is accepted.

        ``torn`` lists local workers that died in the middle of an add into the retired buffer
        (see the module doc); the buffer is then zeroed, ``count`` and ``per_worker`` are 0 and
        ``discarded_per_worker`` holds the complete gradients it had (never applied, but counted,
        not lost silently)."""
        with self.locked():
            a = int(self.header[_ACTIVE])
            # Under the lock nobody alive is adding: a set word is a dead worker's partial add,
            # necessarily into the active buffer (no swap could happen while it held the lock).
            torn = [w for w in range(self.local_workers) if int(self.in_add[w])]
            self.in_add.zero_()
            if stop:
                self.header[_STOP] = 1
            else:
                b = 1 - a
                self.header[_BASE + b] = next_base
                self.header[_ACTIVE] = b
        # nobody writes buffer ``a`` until the next swap: read it without the lock
        h = self.header
        out = {"sum": self.acc[a].clone(), "count": int(h[_COUNT + a]),
               "per_worker": self.per_worker[a].tolist(), "stale_sum": int(h[_STALE_SUM + a]),
               "stale_max": int(h[_STALE_MAX + a]), "dropped": int(h[_DROPPED + a]),
               "loss_sum": float(self.loss_sum[a]), "torn": torn,
               "discarded_per_worker": [0] * self.local_workers}
        if torn:
            out.update(sum=torch.zeros_like(out["sum"]), count=0, stale_sum=0, stale_max=0,
                       loss_sum=0.0, discarded_per_worker=out["per_worker"],
                       per_worker=[0] * self.local_workers)
        self.acc[a].zero_()
        for f in (_COUNT, _STALE_SUM, _STALE_MAX, _DROPPED):
            h[f + a] = 0
        self.per_worker[a].zero_()
        self.loss_sum[a] = 0.0
        return out

    def abort(self) -> None:
        """The agent failed: its workers stop adding and end their loops at once."""
        self.header[_STOP] = 1

    def set_base(self, version: int) -> None:
        """Gradients added from now on update model ``version`` (a resumed run starts there)."""
        with self.locked():
            self.header[_BASE + int(self.header[_ACTIVE])] = version

    # ---- checkpoint handshake (see bsp_roles: the agent asks, each worker saves and acks) ----
    def request_checkpoint(self, cid: int) -> None:
        """Ask the workers to save checkpoint ``cid`` (> 0) and wait until :meth:`release`."""
        self.header[_CKPT] = cid

    def checkpoint_request(self) -> int:
        return int(self.header[_CKPT])

    def ack_checkpoint(self, worker: int, cid: int) -> None:
        self.acks[worker] = cid

    def acked(self, worker: int, cid: int) -> bool:
        return int(self.acks[worker]) == cid

    def release(self) -> None:
        self.header[_CKPT] = 0

    # ---- evaluation hold (the agent asks; each worker stops before its next gradient) -------
    def hold(self, hid: int) -> None:
        """Ask the workers to start no gradient (hold ``hid`` > 0) until :meth:`unhold`: the
        agents evaluate the model meanwhile. A gradient already being computed is finished and
        added (at most one per worker); nobody waits for it, so a straggler delays nothing."""
        self.header[_HOLD] = hid

    def unhold(self) -> None:
        self.header[_HOLD] = 0

    def hold_request(self) -> int:
        return int(self.header[_HOLD])

    def retire(self, worker: int) -> None:
        """Mark a worker that was dead at the checkpoint a run resumes from: it stays out."""
        self.retired[worker] = 1

    def is_retired(self, worker: int) -> bool:
        return bool(int(self.retired[worker]))

    def pending_count(self) -> int:
        """Gradients in the active accumulator so far (a racy read; for polling only)."""
        return int(self.header[_COUNT + int(self.header[_ACTIVE])])
