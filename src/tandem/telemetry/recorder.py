"""The per-process event log that every comparison between methods is read from.

Each worker process owns one :class:`Recorder`. It appends one JSON object per line to
``<run_dir>/events.rank<R>.jsonl`` (line-buffered, so a killed worker loses at most its last line)
and, on rank 0 only, drives a tqdm progress bar and optional TensorBoard scalars.

Typical use inside a strategy's loop::

    rec = Recorder(run_dir, rank, world=world, progress_total=steps)
    rec.start(t0)                     # after rendezvous; pass rank 0's time.time() to align ranks
    for step in range(steps):
        ...
        rec.step(step, compute_s=c, comm_s=m, idle_s=i, bytes_sent=s, bytes_recv=r, loss=loss,
                 staleness=k)          # method-specific fields go in as keywords
        if step % eval_every == 0:
            with rec.evaluating():     # evaluation time is not training time
                acc, test_loss = evaluate(model)
                rec.eval(step, accuracy=acc, loss=test_loss)
    rec.close()

Record kinds: ``start`` (t0, role, world), ``step``, ``eval``, ``info``, ``resume`` (see below)
and ``end`` (this rank's totals). Every record carries ``kind``, ``rank`` and ``wall``. ``wall`` is
seconds of *training* since :meth:`Recorder.start`: time spent inside :meth:`Recorder.evaluating`
is subtracted, so time-to-accuracy compares methods fairly however often they evaluate. When one
rank evaluates while the others wait for it, every rank should wrap that phase (evaluation and the
wait) in ``evaluating()``, so that all ranks' walls stay on one axis.
:func:`tandem.telemetry.summary.finalize_run` merges the per-rank files and summarises them.

Resuming (``append=True``): the interrupted run's records stay. A strategy that restored a
checkpoint taken before step ``S`` (steps ``0..S-1`` done) calls :meth:`Recorder.resume_from` with
``S`` in *its own record-step units* (a bsp worker's local step, a PS server's update count): the
records of steps ``>= S`` that the killed run wrote after the checkpoint (and its trailing ``info``
and ``end`` records) move, per rank, to ``events.rank<R>.rolled_back.jsonl``, the rank file is
rewritten atomically, and a ``resume`` record (step, rolled_back, lost_wall_s) marks the spot.
So every step is in the run record exactly once and nothing is deleted. The time axis goes on from
the *checkpoint's* point in time (the latest wall the kept records hold), so the record reads as
the trajectory that was kept; the training time the failure threw away is ``lost_wall_s``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tandem.errors import ConfigError, DivergenceError
from tandem.telemetry.divergence import DivergenceWatch
from tandem.telemetry.log import get_logger
from tandem.telemetry.records import dumps, last_wall, split_rolled_back, wall_of

_now = time.time  # the clock; a module attribute so tests can substitute a fake one
log = get_logger(__name__)

STEP_TIMES = ("compute_s", "comm_s", "idle_s")


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


class Recorder:
    """One per worker process. Writes ``<run_dir>/events.rank<R>.jsonl``, one record per line.

    ``progress``/``progress_total``: rank 0 shows a tqdm bar (step, loss, accuracy, MB sent by
    rank 0) when both are set. ``tensorboard``: rank 0 also writes loss, test accuracy/loss and
    bytes under ``<run_dir>/tb`` (needs the ``tensorboard`` package: ``pip install
    'tandem[tensorboard]'``). ``role`` (worker, server, peer, controller, ...) is stored in every
    step and eval record, so summaries can tell a server's updates from workers' steps.
    ``divergence``: the watch every step's loss passes (:mod:`~tandem.telemetry.divergence`;
    default: warn once, never stop; ``None``: no watch); with ``stop`` it makes :meth:`step`
    raise :class:`~tandem.errors.DivergenceError`, which the step loop propagates.

    Thread-safe: a strategy may record from a communication thread and the training thread.
    """

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        *,
        world: int,
        tensorboard: bool = False,
        progress_total: int | None = None,
        progress: bool = True,
        append: bool = False,
        role: str = "worker",
        divergence: DivergenceWatch | None | bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.world = int(world)
        self.role = role
        self.path = self.run_dir / f"events.rank{self.rank}.jsonl"
        self.t0: float = _now()
        self._lock = threading.RLock()
        self._eval_excluded = 0.0  # seconds spent inside finished evaluating() blocks
        self._eval_depth = 0
        self._eval_enter = 0.0
        self.steps = 0
        self.bytes_sent_total = 0
        self.bytes_recv_total = 0
        self.compute_s_total = 0.0
        self.comm_s_total = 0.0
        self.idle_s_total = 0.0
        self.last_loss: float | None = None
        self.last_accuracy: float | None = None
        self._closed = False
        self.divergence = DivergenceWatch() if divergence is True else divergence or None
        self._writer: Any = None
        self._bar: Any = None

        if tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError(
                    "tensorboard=True needs the tensorboard package: "
                    "pip install 'tandem[tensorboard]' (or pip install tensorboard), "
                    f"or run without --tensorboard ({exc})"
                ) from None
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # On resume, keep the interrupted run's events and continue its time axis (from the last
        # recorded wall until resume_from() says which steps were lost).
        self._wall_offset = last_wall(self.path) if append else 0.0
        if append and self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as fh:  # a kill tore the last line: don't glue onto it
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
        self._inherited = self.path.stat().st_size if append and self.path.is_file() else 0
        self._file: IO[str] | None = open(self.path, "a" if append else "w", buffering=1,
                                          encoding="utf-8")
        if progress and progress_total and self.rank == 0:
            from tqdm import tqdm

            self._bar = tqdm(total=int(progress_total), desc="train", unit="step",
                             dynamic_ncols=True, leave=True)

    # ---- time ---------------------------------------------------------------------------------
    def start(self, t0: float | None = None) -> None:
        """Mark the start of training (after rendezvous). Pass rank 0's ``time.time()`` as ``t0``
        to put every rank on the same time axis; time spent in evaluation so far is forgotten."""
        with self._lock:
            self.t0 = _now() if t0 is None else float(t0)
            self._eval_excluded = 0.0
            if self._eval_depth:
                self._eval_enter = max(self._eval_enter, self.t0)
            if self._bar is not None:
                self._bar.reset()  # the bar's clock starts with training, not with set-up
            self._write({"kind": "start", "rank": self.rank, "wall": self._wall_offset,
                         "t0": self.t0,
                         "role": self.role, "world": self.world})

    def wall(self) -> float:
        """Seconds of training since ``t0``: elapsed time minus time spent inside ``evaluating()``.

        Inside an ``evaluating()`` block the value is frozen at the block's entry."""
        with self._lock:
            now = self._eval_enter if self._eval_depth else _now()
            return self._wall_offset + max(0.0, now - self.t0 - self._eval_excluded)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Exclude the time spent inside from :meth:`wall` (nesting is allowed)."""
        with self._lock:
            if self._eval_depth == 0:
                self._eval_enter = _now()
            self._eval_depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._eval_depth -= 1
                if self._eval_depth == 0:
                    self._eval_excluded += max(0.0, _now() - self._eval_enter)

    # ---- resume -------------------------------------------------------------------------------
    @property
    def rolled_back_path(self) -> Path:
        """Where :meth:`resume_from` moves this rank's records of lost steps."""
        return self.run_dir / f"events.rank{self.rank}.rolled_back.jsonl"

    def resume_from(self, step: int, **fields: Any) -> int:
        """The run resumed from a checkpoint taken before ``step`` (in this rank's record-step
        units): move the interrupted run's records of steps ``>= step`` to
        :attr:`rolled_back_path` (appended, fsynced), rewrite the rank file without them
        (atomically), continue the time axis from the latest kept wall and write a ``resume``
        record. Returns the number of lines moved. Call it once, best before :meth:`start`; if
        called after, this Recorder's own records so far are shifted onto the new time axis."""
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"Recorder for rank {self.rank} is closed")
            self._file.flush()
            data = self.path.read_bytes()
            inherited, own = data[:self._inherited], data[self._inherited:]
            kept, gone = split_rolled_back(inherited.splitlines(), int(step))
            old = self._wall_offset
            new = max((w for w in map(wall_of, kept) if w is not None), default=0.0)
            lost = max([old, *(w for w in map(wall_of, gone) if w is not None)]) - new
            shifted = [self._shift(line, new - old) for line in own.splitlines() if line.strip()]
            if gone:
                with open(self.rolled_back_path, "ab") as fh:
                    fh.write(b"".join(line + b"\n" for line in gone))
                    fh.flush()
                    os.fsync(fh.fileno())
            record = {"kind": "resume", "rank": self.rank, "wall": new, "step": int(step),
                      "rolled_back": len(gone), "lost_wall_s": max(0.0, lost),
                      "role": self.role, **fields}
            head = b"".join(line + b"\n" for line in kept) + (dumps(record) + "\n").encode()
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as fh:
                fh.write(head + b"".join(line + b"\n" for line in shifted))
                fh.flush()
                os.fsync(fh.fileno())
            self._file.close()
            os.replace(tmp, self.path)
            self._inherited = len(head)
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")
            self._wall_offset = new
            return len(gone)

    @staticmethod
    def _shift(line: bytes, delta: float) -> bytes:
        """One of this Recorder's own lines moved onto the resumed time axis."""
        if not delta:
            return line
        try:
            rec = json.loads(line)
        except ValueError:
            return line
        if isinstance(rec, dict) and rec.get("wall") is not None:
            rec["wall"] = max(0.0, float(rec["wall"]) + delta)
        return dumps(rec).encode()

    # ---- records ------------------------------------------------------------------------------
    def step(
        self,
        step: int,
        *,
        compute_s: float,
        comm_s: float,
        idle_s: float,
        bytes_sent: int,
        bytes_recv: int,
        loss: float | None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Record one training step of this rank and return the record. ``bytes_*`` are this
        step's train bytes; ``extra`` holds method fields (staleness, straggled, ...)."""
        with self._lock:
            loss_f = _float_or_none(loss)
            self.steps += 1
            self.bytes_sent_total += int(bytes_sent)
            self.bytes_recv_total += int(bytes_recv)
            self.compute_s_total += float(compute_s)
            self.comm_s_total += float(comm_s)
            self.idle_s_total += float(idle_s)
            if loss_f is not None:
                self.last_loss = loss_f
            record = {"kind": "step", "rank": self.rank, "step": int(step), "wall": self.wall(),
                      "compute_s": float(compute_s), "comm_s": float(comm_s),
                      "idle_s": float(idle_s), "bytes_sent": int(bytes_sent),
                      "bytes_recv": int(bytes_recv), "loss": loss_f, "role": self.role, **extra}
            self._write(record)
            if self._bar is not None:
                post = {"step": int(step)}
                if self.last_loss is not None:
                    post["loss"] = f"{self.last_loss:.4g}"
                if self.last_accuracy is not None:
                    post["acc"] = f"{self.last_accuracy:.4f}"
                post["MB sent"] = f"{self.bytes_sent_total / 1e6:.2f}"
                self._bar.set_postfix(post, refresh=False)
                self._bar.update(1)
            if self._writer is not None:
                if loss_f is not None and math.isfinite(loss_f):
                    self._writer.add_scalar("train/loss", loss_f, int(step))
                self._writer.add_scalar("train/bytes_sent_rank0", self.bytes_sent_total, int(step))
            if self.divergence is not None and \
                    (why := self.divergence.check(int(step), loss_f)) is not None:
                self._diverged(int(step), loss_f, why)
            return record

    def _diverged(self, step: int, loss: float | None, why: str) -> None:
        """The watch fired (once per run): say so on one line, record it, stop if asked."""
        assert self.divergence is not None
        self._write({"kind": "info", "rank": self.rank, "wall": self.wall(),
                     "divergence": {"step": step, "loss": loss, "message": why}})
        log.warning("rank %d (%s): %s", self.rank, self.role, why)
        if self.divergence.stop:
            raise DivergenceError(f"rank {self.rank}: {why} (stop_on_divergence is set; "
                                  "unset it to train on regardless)")

    def eval(self, step: int, *, accuracy: float | None, loss: float, **extra: Any) -> None:
        """Record a test evaluation at ``step``. ``accuracy`` is None for regression workloads."""
        with self._lock:
            acc = _float_or_none(accuracy)
            test_loss = float(loss)
            if acc is not None:
                self.last_accuracy = acc
            self._write({"kind": "eval", "rank": self.rank, "step": int(step), "wall": self.wall(),
                         "test_accuracy": acc, "test_loss": test_loss,
                         "bytes_sent_cum": self.bytes_sent_total, "role": self.role, **extra})
            if self._writer is not None:
                if acc is not None:
                    self._writer.add_scalar("eval/test_accuracy", acc, int(step))
                if math.isfinite(test_loss):
                    self._writer.add_scalar("eval/test_loss", test_loss, int(step))
            if self._bar is not None and acc is not None:
                self._bar.set_postfix({"acc": f"{acc:.4f}"}, refresh=False)

    def info(self, **fields: Any) -> None:
        """Record facts about the run (codec cost, parameter count, ...); ``summarize`` collects
        them under ``summary["info"]``."""
        with self._lock:
            self._write({"kind": "info", "rank": self.rank, "wall": self.wall(), **fields})

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Write this rank's totals, close the file, the bar and the TensorBoard writer.

        Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._write({"kind": "end", "rank": self.rank, "wall": self.wall(),
                         "role": self.role, "steps": self.steps,
                         "bytes_sent_total": self.bytes_sent_total,
                         "bytes_recv_total": self.bytes_recv_total,
                         "compute_s_total": self.compute_s_total,
                         "comm_s_total": self.comm_s_total, "idle_s_total": self.idle_s_total,
                         "excluded_s": self._eval_excluded})
            self._closed = True
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError(f"Recorder for rank {self.rank} is closed; no more records")
        self._file.write(dumps(record) + "\n")
