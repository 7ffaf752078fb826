"""``cap=auto``: the candidate worker's cap on local steps between merges, tuned as it runs.

A candidate worker waits for the global model only once it has taken ``cap`` steps since its
last merge. Too small a cap and it idles on every round trip; a far larger one only matters when
the network stalls, and then lets the worker run that far ahead of the global model. The right
value is about the round trip (push -> pull arrival, which grows with the model's bytes over the
link's bandwidth, the latency and the other workers' pushes) divided by the compute time of one
step. :class:`AutoCap` measures both (exponential moving averages of the push-to-arrival time
taken from the pull handle's completion time, of its spread, and of the step's compute time)
and keeps

    cap = clamp(ceil((round_trip + 2 * spread) / compute) + 1, 2, max_staleness)

so that the expected local steps per round sit just above ``round_trip / compute``, with room
for a round trip two spreads slower than usual (a server that shares its CPU, a queue on its
link) before a worker waits. Before the
first round trip is measured the cap is ``max_staleness`` (the user's bound: nothing known yet
is no reason to wait). ``max_staleness`` (default 64) bounds how stale a worker's model may get.
"""

from __future__ import annotations

import math

#: how many spreads (mean absolute deviations) of the round trip the cap leaves room for
SPREADS = 2.0
#: weight of the newest measurement in the moving averages
ALPHA = 0.3


class AutoCap:
    """Measure round trips and compute times; :attr:`value` is the cap to use now."""

    def __init__(self, max_staleness: int) -> None:
        self.max = max(1, int(max_staleness))
        self.rtt: float | None = None
        self.spread = 0.0
        self.compute: float | None = None

    @staticmethod
    def _ema(old: float | None, new: float) -> float:
        return new if old is None else (1 - ALPHA) * old + ALPHA * new

    def observe_compute(self, seconds: float) -> None:
        if seconds > 0:
            self.compute = self._ema(self.compute, seconds)

    def observe_round_trip(self, seconds: float) -> None:
        if seconds >= 0:
            if self.rtt is not None:
                self.spread = self._ema(self.spread, abs(seconds - self.rtt))
            self.rtt = self._ema(self.rtt, seconds)

    @property
    def value(self) -> int:
        if self.rtt is None or not self.compute:
            return self.max
        want = math.ceil((self.rtt + SPREADS * self.spread) / self.compute) + 1
        return max(min(2, self.max), min(self.max, want))

    def state_dict(self) -> dict[str, float | None]:
        return {"rtt": self.rtt, "spread": self.spread, "compute": self.compute}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        self.rtt, self.compute = state.get("rtt"), state.get("compute")
        self.spread = float(state.get("spread") or 0.0)
