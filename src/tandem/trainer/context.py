"""What one process's loop is handed: the run's config, its transport, the workload, the
recorder, the injected compute faults, the run directory, and how to build the run's codec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.config import RunConfig
    from tandem.telemetry.recorder import Recorder
    from tandem.trainer.stragglers import ComputeFaults
    from tandem.transport.transport import Transport
    from tandem.workloads.base import Workload


@dataclass
class WorkerContext:
    """Everything one process's loop needs.

    ``codec_factory(seed)`` builds the run's codec (the strategy layer supplies it: the trainer
    knows nothing about codecs); :meth:`make_codec` offsets the run's seed, so codecs built with
    the same offset on every rank agree on their shared randomness.
    """

    cfg: RunConfig
    transport: Transport
    workload: Workload
    recorder: Recorder
    faults: ComputeFaults
    run_dir: Path
    codec_factory: Callable[[int], Any] | None = None

    @property
    def rank(self) -> int:
        return self.transport.rank

    @property
    def world(self) -> int:
        return self.transport.world

    def make_codec(self, seed_offset: int = 0) -> Any:
        if self.codec_factory is None:
            raise RuntimeError("this WorkerContext was built without a codec factory")
        return self.codec_factory(self.cfg.seed + seed_offset)
