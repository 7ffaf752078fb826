"""One exception hierarchy for Tandem.

Every error a user can meet derives from :class:`TandemError`, and its message says what went
wrong *and* what to do about it. Catch ``TandemError`` to handle all of them.
"""

from __future__ import annotations


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""


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


class CheckpointError(TandemError):
    """A checkpoint is corrupt, missing or does not match the run's configuration."""
