"""One exception hierarchy for Tandem.

Every error a user can meet derives from :class:`TandemError`, and its message says what went
wrong *and* what to do about it. Catch ``TandemError`` to handle all of them.

Every ``TandemError`` carries ``at``, the wall-clock time (``time.time()``) it was created, so
that the launcher can order the failures of a job's ranks (one machine: one clock) and name the
true cause first (:func:`is_secondary`, :func:`first_cause`).
"""

from __future__ import annotations

import time


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose; ``at``: when it was raised."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.at = time.time()


class ConfigError(TandemError, ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


class DataError(TandemError):
    """A dataset is missing or malformed (the message says where Tandem looked)."""


class PeerTimeout(TandemError, TimeoutError):
    """A peer did not answer within the deadline; ``ranks`` lists the ranks suspected."""

    def __init__(self, message: str, ranks: list[int] | None = None) -> None:
        super().__init__(message)
        self.ranks = list(ranks or [])


class WorkerFailed(TandemError):
    """A worker process died or raised; ``ranks`` lists the ranks that failed.

    ``details`` maps each failed rank to its own error text (the launcher fills it in).
    """

    def __init__(self, message: str, ranks: list[int] | None = None,
                 details: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.ranks = list(ranks or [])
        self.details = dict(details or {})


class NonFiniteGradient(TandemError):
    """A gradient held NaN or Inf and the NaN policy is ``stop``."""


class DivergenceError(TandemError):
    """The training loss turned non-finite or grew far past its best, and the run was asked to
    stop on divergence (``stop_on_divergence``)."""


class CheckpointError(TandemError):
    """A checkpoint is corrupt, missing or does not match the run's configuration."""


#: error kinds that are raised *because* another rank failed or went silent
CONSEQUENCES = ("WorkerFailed", "PeerTimeout")
#: what the engine's transport says when the process at the other end of a link has exited
#: (gloo: "Connection closed by peer", "... typically caused by a remote worker crashing")
PEER_EXIT_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                   "remote worker crashing", "econnreset", "epipe")


def is_secondary(report: str) -> bool:
    """True when a rank's error report (``"Kind: text"`` or a traceback) is a consequence of
    another rank's failure: a :class:`WorkerFailed` or :class:`PeerTimeout`, or a transport
    error that follows a peer's exit (connection closed or reset by peer, broken pipe, gloo's
    "remote worker crashing"). Anything else is *primary*: a cause in its own right."""
    if report.startswith(CONSEQUENCES):
        return True
    low = report.lower()
    return any(sign in low for sign in PEER_EXIT_SIGNS)


def first_cause(reports: dict[int, str], times: dict[int, float]) -> int:
    """The rank to name first among failed ranks: the earliest *primary* failure (ties: the
    lowest rank), or the earliest failure of all when every one is secondary. ``times`` holds
    when each failure happened (``time.time()``; a missing time counts as last)."""
    primary = [r for r in reports if not is_secondary(reports[r])]
    pool = primary or list(reports)
    return min(pool, key=lambda r: (times.get(r, float("inf")), r))
