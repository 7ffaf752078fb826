"""Telemetry: what every run records, and how runs are summarised and compared.

* :class:`Recorder` (one per worker process) writes ``events.rank<R>.jsonl``, drives rank 0's
  progress bar and optional TensorBoard scalars.
* :func:`finalize_run` merges the logs into ``events.jsonl`` and writes ``summary.json`` and
  ``curves.png``; :func:`merge_events`, :func:`summarize` and :func:`plot_curves` are its parts.
* :func:`compare` puts several runs in one table and one plot.
* :func:`get_logger` gives a logger with Tandem's format (rank included).

Plotting imports matplotlib only when called, so worker processes stay light.
"""

from tandem.telemetry.log import get_logger
from tandem.telemetry.recorder import Recorder
from tandem.telemetry.report import compare
from tandem.telemetry.summary import finalize_run, merge_events, plot_curves, summarize

__all__ = [
    "Recorder",
    "compare",
    "finalize_run",
    "get_logger",
    "merge_events",
    "plot_curves",
    "summarize",
]
