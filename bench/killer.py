"""Killing one process of a running job from outside, at a step, and noticing who saw it die.

Used by :mod:`bench.kill_resume`: :class:`Killer` is ``spawn``'s ``on_start`` hook (installed by
:func:`killing`), which follows worker 0's event log with :class:`Tail` and SIGKILLs the victim
once a step (and a checkpoint) is recorded, or waits for an injected death; then it watches every
rank's log for the first record of the loss (:func:`mentions_loss`).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def dead(pid: int) -> bool:
    """Gone or a zombie (the fork server has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


class Tail:
    """New JSON records of a growing event log."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.rest = path, 0, b""

    def records(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except OSError:
            return []
        self.pos += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def mentions_loss(rec: dict[str, Any], victim: int) -> bool:
    """A record saying ``victim`` is lost (param_server, coded_ps, bsp_shared: ``lost_worker``/
    ``lost_rank``; gossip: the re-weighting or the stop of checkpoints)."""
    if rec.get("kind") != "info":
        return False
    return victim in (rec.get("lost_rank"), rec.get("lost_worker")) or \
        victim in (rec.get("gossip_reweighted") or []) or victim in (rec.get("lost_peers") or [])


class Killer:
    """``spawn``'s on_start hook: SIGKILL the victim once worker 0's log records ``step`` (and
    a checkpoint exists), or wait for its injected death; then watch every rank's log for the
    first record of the loss. Times are ``time.monotonic()``."""

    def __init__(self, run_dir: Path, victim: int, step: int, external: bool,
                 need_ckpt: bool) -> None:
        self.run_dir, self.victim, self.step = run_dir, victim, step
        self.external, self.need_ckpt = external, need_ckpt
        self.t_dead: float | None = None
        self.t_noticed: float | None = None
        self.seen = -1  # the highest step the victim's log records
        self.stop = threading.Event()

    def __call__(self, procs: list[Any], _store: Any) -> None:
        threading.Thread(target=self.watch, args=(procs[self.victim].pid, len(procs)),
                         daemon=True).start()

    def reached(self, clock: Tail) -> bool:
        steps = [r["step"] for r in clock.records() if r.get("kind") == "step"]
        self.seen = max([self.seen, *steps])
        return self.seen >= self.step and (
            not self.need_ckpt or (self.run_dir / "checkpoints" / "LATEST").is_file())

    def watch(self, pid: int, world: int) -> None:
        clock = Tail(self.run_dir / f"events.rank{0 if self.external else self.victim}.jsonl")
        while self.t_dead is None and not self.stop.wait(0.01):
            if self.external and self.reached(clock):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return  # it finished before the step: the trial reports "did not die"
                self.t_dead = time.monotonic()
            elif not self.external and dead(pid):
                self.t_dead = time.monotonic()
        logs = [Tail(self.run_dir / f"events.rank{r}.jsonl") for r in range(world)]
        for log in logs:  # skip what was written before the death
            log.records()
        while self.t_noticed is None and not self.stop.wait(0.02):
            if any(mentions_loss(rec, self.victim) for log in logs for rec in log.records()):
                self.t_noticed = time.monotonic()


@contextmanager
def killing(hook: Killer) -> Iterator[None]:
    """``tandem.train`` starts its processes through ``tandem.job.spawn``: give it the hook."""
    import tandem.job as job

    inner = job.spawn
    job.spawn = functools.partial(inner, on_start=hook)
    try:
        yield
    finally:
        job.spawn = inner
