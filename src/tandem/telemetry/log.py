"""Human-readable logging for Tandem, one format in every process.

Use ``log = get_logger(__name__)`` at the top of a module and ``log.info(...)`` inside it. Every
line carries the time, the level, the logger name and, inside a worker, its rank (read from the
``RANK`` environment variable when the line is written, so a logger made before the launcher set
``RANK`` still tags its lines)::

    2024-05-01 12:00:00,123 INFO    tandem.strategies.allreduce [rank 1]: step 10 ...

All Tandem loggers live under the ``tandem`` logger, which owns the single handler (to stderr).
That handler writes through :func:`tqdm.tqdm.write`, so log lines do not break rank 0's progress
bar. The level defaults to ``INFO``; set ``TANDEM_LOG_LEVEL=DEBUG`` (or call
``get_logger("tandem").setLevel(...)``) to change it. The ``tandem`` logger does not propagate to
the root logger, so an application that calls ``logging.basicConfig`` does not see each line
twice.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "tandem"
FORMAT = "%(asctime)s %(levelname)-7s %(name)s%(rank_tag)s: %(message)s"


class _RankFilter(logging.Filter):
    """Sets ``rank_tag`` (`` [rank R]`` or empty) on each record from ``RANK`` at emit time."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = os.environ.get("RANK")
        record.rank_tag = f" [rank {rank}]" if rank not in (None, "") else ""
        return True


class _TqdmHandler(logging.Handler):
    """Writes to the *current* ``sys.stderr`` via ``tqdm.write`` so progress bars stay intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never crash the caller
            self.handleError(record)


def _configure_root() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not getattr(root, "_tandem_configured", False):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        level = os.environ.get("TANDEM_LOG_LEVEL", "INFO").upper()
        root.setLevel(level if level in logging.getLevelNamesMapping() else logging.INFO)
        root.propagate = False
        root._tandem_configured = True  # type: ignore[attr-defined]
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` under Tandem's handler; names outside ``tandem.`` are nested under it.

    ``get_logger(__name__)`` inside the package gives ``tandem.<module>``; ``get_logger("bench")``
    gives ``tandem.bench``. Calling it many times is cheap and never adds a second handler.
    """
    _configure_root()
    if name != ROOT and not name.startswith(ROOT + "."):
        name = f"{ROOT}.{name}"
    return logging.getLogger(name)
