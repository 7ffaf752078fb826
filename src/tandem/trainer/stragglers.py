"""Injected stragglers and slow workers, reproducible from the seed.

Two kinds, both applied to *compute* (the time a worker spends producing its gradient):

* ``--stragglers P:FACTOR``: each worker, each step, straggles with probability ``P``; a straggler's
  step is delayed by ``FACTOR`` x its compute time (or, with ``P:exp:MEAN``, by an exponential draw
  with that mean in seconds). Draws depend only on (seed, rank, step), so a run and its re-run,
  or a simulator and a multi-process run, see the same stragglers.
* ``--slow-worker RANK:FACTOR``: that worker's compute always takes ``FACTOR`` x as long
  (a heterogeneous cluster: an older GPU, a shared node).

The delay is a real sleep: the worker is busy, it cannot compute or answer meanwhile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from tandem.config import RunConfig, SlowWorker, StragglerConfig


@dataclass
class ComputeFaults:
    """Decides, per step, how much extra compute time this rank suffers."""

    rank: int
    seed: int
    stragglers: StragglerConfig | None = None
    slow_factor: float = 1.0

    @classmethod
    def from_config(cls, cfg: RunConfig, rank: int) -> ComputeFaults:
        slow = next((s for s in cfg.slow_workers if s.rank == rank), None)
        return cls(rank, cfg.seed, cfg.stragglers, slow.factor if slow else 1.0)

    def straggles(self, step: int) -> bool:
        """Whether this rank is a straggler at ``step`` (a pure function of seed, rank, step)."""
        if self.stragglers is None or self.stragglers.p <= 0:
            return False
        return bool(
            np.random.default_rng([self.seed, self.rank, step, 1]).random() < self.stragglers.p
        )

    def delay(self, step: int, compute_s: float) -> tuple[float, bool]:
        """Extra seconds for this step and whether it straggled."""
        extra = (self.slow_factor - 1.0) * compute_s
        straggled = self.straggles(step)
        if straggled:
            s = self.stragglers
            assert s is not None
            if s.kind == "factor":
                extra += s.factor * compute_s
            else:
                extra += float(
                    np.random.default_rng([self.seed, self.rank, step, 2]).exponential(s.mean_s)
                )
        return extra, straggled

    def apply(self, step: int, compute_s: float) -> tuple[float, bool]:
        """Sleep the step's delay; return (total compute seconds, straggled)."""
        extra, straggled = self.delay(step, compute_s)
        if extra > 0:
            time.sleep(extra)
        return compute_s + extra, straggled


def straggler_mask(seed: int, ranks: int, step: int, cfg: StragglerConfig | None) -> np.ndarray:
    """Vectorised :meth:`ComputeFaults.straggles` for all ranks at one step (for simulators)."""
    faults = [ComputeFaults(r, seed, cfg) for r in range(ranks)]
    return np.array([f.straggles(step) for f in faults], dtype=bool)


__all__ = ["ComputeFaults", "SlowWorker", "straggler_mask"]
