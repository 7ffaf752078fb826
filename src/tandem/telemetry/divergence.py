"""The divergence watch: a run whose training loss blows up says so at once, not at the end.

Every step's loss passes :meth:`tandem.telemetry.recorder.Recorder.step`, which feeds one
:class:`DivergenceWatch` per rank. The loss *diverges* when it turns non-finite (NaN, Inf), or
when its smoothed value (an exponential moving average, weight :data:`SMOOTHING` on the newest
step, so that one unlucky minibatch does not count) grows past ``factor`` (default 10) times its
running minimum *and* above where it started. The second condition keeps a well-trained model
whose loss went from 2.3 to 0.001 from being called divergent for a batch at 0.02; a loss that
climbs back above its first value from a tenth of it has diverged whatever the noise. A loss
that is zero or negative at its best (a custom objective) is only watched for non-finite values.

The watch fires once per run per rank: the Recorder logs one warning line naming the step, the
loss and the likely cause (the learning rate; a compressing codec with momentum), records an
``info`` event ``divergence``, and with ``stop`` (``stop_on_divergence``, ``tandem train
--stop-on-divergence``) raises :class:`~tandem.errors.DivergenceError`, which ends the run.
"""

from __future__ import annotations

import math
from typing import Any

#: weight of the newest step in the smoothed loss (about five steps of memory)
SMOOTHING = 0.3
FACTOR = 10.0


class DivergenceWatch:
    """Feed it every step's loss (:meth:`check`); it answers once, when the loss diverges."""

    def __init__(self, factor: float = FACTOR, *, stop: bool = False,
                 cause: str = "the learning rate is likely too high: lower it") -> None:
        if not factor > 1:
            raise ValueError(f"divergence factor must be > 1, not {factor}")
        self.factor, self.stop, self.cause = float(factor), bool(stop), cause
        self.smoothed: float | None = None
        self.first: float | None = None
        self.best: float | None = None
        self.fired_at: int | None = None  # the step it fired at (it fires once)

    @classmethod
    def for_run(cls, cfg: Any) -> DivergenceWatch:
        """The watch of a run (a :class:`~tandem.config.RunConfig`): ``stop_on_divergence``, and
        the likely cause worded from its learning rate, codec and momentum."""
        codec = getattr(getattr(cfg, "codec", None), "name", "dense")
        lr, momentum = getattr(cfg, "lr", None), float(getattr(cfg, "momentum", 0.0) or 0.0)
        cause = f"the learning rate ({lr:g}) is likely too high: lower --lr" if lr else \
            "the learning rate is likely too high: lower it"
        if codec != "dense" and momentum > 0:
            cause += (f"; the codec {codec} with momentum {momentum:g} also amplifies its "
                      "compression error: try --momentum 0, or compare with --codec dense")
        elif codec != "dense":
            cause += f"; or the codec {codec}: compare with --codec dense"
        return cls(stop=bool(getattr(cfg, "stop_on_divergence", False)), cause=cause)

    def check(self, step: int, loss: float | None) -> str | None:
        """Take one step's loss; the first time it diverges return what to say (the step, the
        loss, how far past its best, the likely cause), else None."""
        if loss is None or self.fired_at is not None:
            return None
        if not math.isfinite(loss):
            return self._fire(step, f"the training loss is {loss} at step {step}")
        s = loss if self.smoothed is None else (1 - SMOOTHING) * self.smoothed + SMOOTHING * loss
        self.smoothed = s
        if self.first is None:
            self.first = s
        self.best = s if self.best is None else min(self.best, s)
        if self.best > 0 and s > self.factor * self.best and s > self.first:
            return self._fire(step, f"the training loss grew to {s:.4g} at step {step} "
                                    f"(smoothed), {s / self.best:.0f}x its best {self.best:.4g}")
        return None

    def _fire(self, step: int, what: str) -> str:
        self.fired_at = step
        return f"{what}: diverging; {self.cause}"
