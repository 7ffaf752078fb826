"""Compare finished runs side by side: one text table and one overlay plot.

``tandem report runs/a runs/b`` calls :func:`compare`::

    table, rows = compare([Path("runs/a"), Path("runs/b")], out_png=Path("compare.png"))
    print(table)

Each run directory must hold the ``summary.json`` written by
:func:`tandem.telemetry.summary.finalize_run`; the curves are read from its event logs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tandem.errors import TandemError
from tandem.telemetry.curves import ByteIndex, eval_curve, load_events

COLUMNS = ("run", "strategy", "codec", "workers", "steps", "final acc", "bytes/worker/step",
           "wall s", "time-to-target s", "comm fraction", "idle fraction")


def load_summary(run_dir: Path) -> dict:
    """The ``summary.json`` of a run, or a :class:`TandemError` saying how to produce it."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise TandemError(f"{run_dir} has no summary.json: is it a finished Tandem run? "
                          "(finish it with `tandem train`, or call "
                          "tandem.telemetry.finalize_run on its directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TandemError(
            f"{path} is not valid JSON ({exc}); re-run finalize_run on {run_dir}"
        ) from None
    if not isinstance(data, dict):
        raise TandemError(f"{path} does not hold a summary object; re-run finalize_run")
    return data


def human_bytes(n: float | None) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as network rates are quoted)."""
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def _row(label: str, run_dir: Path, s: dict) -> dict:
    return {
        "run": label, "run_dir": str(run_dir),
        "strategy": s.get("strategy"), "codec": s.get("codec"),
        "workers": s.get("workers"), "steps": s.get("steps"),
        "final_test_accuracy": s.get("final_test_accuracy"),
        "final_test_loss": s.get("final_test_loss"),
        "bytes_sent_per_worker_per_step": s.get("bytes_sent_per_worker_per_step"),
        "wall_time_s": s.get("wall_time_s"),
        "time_to_target_s": s.get("time_to_target_s"),
        "comm_fraction": s.get("comm_fraction"),
        "idle_fraction": s.get("idle_fraction"),
    }


def _cells(row: dict) -> list[str]:
    if row["final_test_accuracy"] is not None:
        final = _fmt(row["final_test_accuracy"], ".4f")
    elif row["final_test_loss"] is not None:
        final = "loss " + _fmt(row["final_test_loss"], ".4g")
    else:
        final = "-"
    return [str(row["run"]), str(row["strategy"] or "-"), str(row["codec"] or "-"),
            _fmt(row["workers"], "d"), _fmt(row["steps"], "d"), final,
            human_bytes(row["bytes_sent_per_worker_per_step"]), _fmt(row["wall_time_s"], ".2f"),
            _fmt(row["time_to_target_s"], ".2f"), _fmt(row["comm_fraction"], ".3f"),
            _fmt(row["idle_fraction"], ".3f")]


def format_table(rows: list[dict]) -> str:
    """Plain-text table with one line per run, columns as in :data:`COLUMNS`."""
    body = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    lines = []
    for n, line in enumerate(body):
        # text columns left-aligned, numbers right-aligned
        cells = [c.ljust(w) if i < 3 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [Path(d).name or str(d) for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for n, d in zip(names, run_dirs, strict=True)]


def _plot(run_dirs: list[Path], labels: list[str], out_png: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = []
    for d in run_dirs:
        records = load_events(d)
        curves.append(eval_curve(records, ByteIndex(records)))
    use_acc = all(any(p["accuracy"] is not None for p in c) for c in curves if c)
    metric = "accuracy" if use_acc else "loss"

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_b = fig.subplots(1, 2)
    for label, points in zip(labels, curves, strict=True):
        points = [p for p in points if p[metric] is not None]
        ys = [p[metric] for p in points]
        ax_t.plot([p["wall"] for p in points], ys, marker="o", markersize=3, label=label)
        ax_b.plot([p["bytes"] / 1e6 for p in points], ys, marker="o", markersize=3, label=label)
    ax_t.set_xlabel("wall time (s)")
    ax_b.set_xlabel("train MB sent (all ranks)")
    # log axis: byte budgets of methods differ by orders of magnitude; symlog keeps zero on it
    positive = [p["bytes"] / 1e6 for c in curves for p in c if p["bytes"] > 0]
    if positive:
        ax_b.set_xscale("symlog", linthresh=min(positive))
    for ax, what in ((ax_t, "wall time"), (ax_b, "bytes sent")):
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"test {metric} vs {what}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    return out_png


def compare(run_dirs: list[Path], out_png: Path | None = None) -> tuple[str, list[dict]]:
    """Table and rows comparing ``run_dirs``; with ``out_png``, also the overlay plot there.

    Rows hold raw numbers (``bytes_sent_per_worker_per_step`` in bytes, fractions in 0..1, None
    where a run has no value); the table formats them for reading. Raises :class:`TandemError`
    when a directory has no ``summary.json``.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise TandemError("compare needs at least one run directory")
    summaries = [load_summary(d) for d in run_dirs]
    labels = _labels(run_dirs)
    rows = [_row(lab, d, s) for lab, d, s in zip(labels, run_dirs, summaries, strict=True)]
    if out_png is not None:
        _plot(run_dirs, labels, out_png)
    return format_table(rows), rows
