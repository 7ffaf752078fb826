"""Compare finished runs side by side: one text table, one overlay plot, the data for a page.

``tandem report runs/a runs/b`` calls :func:`build_report`, then :func:`format_table` and
:func:`save_png` (:func:`compare` does all three; :mod:`tandem.telemetry.html` makes the page)::

    rep = build_report([Path("runs/a"), Path("runs/sweep")], target_accuracy=0.9)
    print(format_table(rep.rows)); save_png(rep, Path("compare.png"))

Each run directory needs the ``summary.json`` of :func:`tandem.telemetry.summary.finalize_run`;
curves come from its event logs. A sweep directory (``sweep.json`` or ``variants/``) stands for
its variants, one row ``<sweep>/<variant>`` each; :attr:`Report.sweeps` names the best (highest
final test accuracy, else lowest final test loss). Targets given here apply to every run, else
each run's own; time- and bytes-to-target are the first evaluation reaching it (as in the
summary), and a run that never met its target reads "not reached".
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.errors import TandemError
from tandem.telemetry.curves import ByteIndex, eval_curve, first_reaching, load_events, time_at

COLUMNS = ("run", "strategy", "codec", "workers", "steps", "final acc", "final loss",
           "bytes/worker/step", "wall s", "target", "time-to-target s", "bytes-to-target",
           "comm fraction", "idle fraction")
TEXT_COLUMNS = frozenset({"run", "strategy", "codec", "target"})
NOT_REACHED = "not reached"
METRIC_LABELS = {"accuracy": "test accuracy (fraction correct)", "loss": "test loss"}


@dataclass
class Sweep:
    """One sweep directory: its variants' rows (also in :attr:`Report.rows`), the best one."""

    label: str
    run_dir: Path
    rows: list[dict]
    best: int | None  # index into rows; None when no variant has a final metric
    by: str | None  # "final_test_accuracy" or "final_test_loss"
    missing: list[str] = field(default_factory=list)  # variants without a summary.json


@dataclass
class Report:
    """Everything a table, a plot or a page shows: one row and one eval curve per run."""

    inputs: list[str]  # labels of the directories as given (a sweep counts once)
    rows: list[dict]
    curves: list[list[dict]]  # eval points of each row, as :func:`eval_curve` gives them
    sweeps: list[Sweep]


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


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


# ---- rows ---------------------------------------------------------------------------------------
def with_options(entry: Any) -> str | None:
    """``{"name": "topk", "options": {"ratio": 0.05}}`` -> ``"topk(ratio=0.05)"``."""
    if not isinstance(entry, dict):
        return entry if isinstance(entry, str) else None
    opts = entry.get("options") or {}
    inner = ", ".join(f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}"
                      for k, v in opts.items())
    return f"{entry.get('name')}({inner})" if inner else entry.get("name")


def key_config(s: dict) -> dict:
    """The settings a reader needs to tell runs apart, from the summary's copy of the config."""
    cfg = s.get("config") if isinstance(s.get("config"), dict) else {}
    return {"workload": s.get("workload"), "workers": s.get("workers", cfg.get("workers")),
            "strategy": with_options(cfg.get("strategy")) or s.get("strategy"),
            "codec": with_options(cfg.get("codec")) or s.get("codec"),
            **{k: cfg.get(k) for k in ("lr", "net", "steps", "batch_size", "seed")}}


def _target(s: dict, points: list[dict], target_accuracy: float | None,
            target_loss: float | None) -> dict[str, Any]:
    """Which target applies to a run and when (if ever) it was reached."""
    has_acc = any(p["accuracy"] is not None for p in points) or (
        not points and s.get("final_test_accuracy") is not None)
    acc = target_accuracy if target_accuracy is not None else s.get("target_accuracy")
    loss = target_loss if target_loss is not None else s.get("target_loss")
    keys = ("time_to_target_s", "steps_to_target", "bytes_to_target")
    if has_acc and acc:
        target = {"metric": "accuracy", "value": float(acc)}
        hit = first_reaching(points, accuracy=float(acc))
    elif not has_acc and loss is not None:
        target = {"metric": "loss", "value": float(loss)}
        hit = first_reaching(points, loss=float(loss))
    else:
        return {"target": None, "target_reached": None, **dict.fromkeys(keys)}
    if not points:  # no event logs left: trust the summary when it used the same target
        same = (s.get("target_accuracy") if has_acc else s.get("target_loss")) == target["value"]
        reached = same and s.get("time_to_target_s") is not None
        return {"target": target, "target_reached": reached if same else None,
                **{k: s.get(k) if reached else None for k in keys}}
    return {"target": target, "target_reached": hit is not None,
            "time_to_target_s": time_at(hit) if hit else None,
            "steps_to_target": hit["step"] if hit else None,
            "bytes_to_target": hit["bytes"] if hit else None}


def _row(label: str, run_dir: Path, s: dict, points: list[dict], target_accuracy: float | None,
         target_loss: float | None) -> dict:
    return {
        "run": label, "run_dir": str(run_dir),
        "strategy": s.get("strategy"), "codec": s.get("codec"),
        "workers": s.get("workers"), "steps": s.get("steps"),
        "final_test_accuracy": s.get("final_test_accuracy"),
        "final_test_loss": s.get("final_test_loss"),
        "bytes_sent_per_worker_per_step": s.get("bytes_sent_per_worker_per_step"),
        "bytes_sent_total": s.get("bytes_sent_total"),
        "wall_time_s": s.get("wall_time_s"),
        **_target(s, points, target_accuracy, target_loss),
        "comm_fraction": s.get("comm_fraction"),
        "idle_fraction": s.get("idle_fraction"),
        "config": key_config(s),
    }


def target_text(target: dict | None) -> str:
    """``{"metric": "accuracy", "value": 0.9}`` -> ``"acc>=0.9"``; ``"-"`` for no target."""
    if not target:
        return "-"
    sign = ">=" if target["metric"] == "accuracy" else "<="
    return f"{'acc' if target['metric'] == 'accuracy' else 'loss'}{sign}{target['value']:g}"


def to_target_cells(row: dict) -> tuple[str, str]:
    """The time-to-target and bytes-to-target cells: numbers, "not reached", or "-"."""
    if row.get("target_reached") is False:
        return NOT_REACHED, NOT_REACHED
    return _fmt(row.get("time_to_target_s"), ".2f"), human_bytes(row.get("bytes_to_target"))


def cells(row: dict) -> list[str]:
    """One row formatted for reading, in the order of :data:`COLUMNS`."""
    time_cell, bytes_cell = to_target_cells(row)
    return [str(row["run"]), str(row["strategy"] or "-"), str(row["codec"] or "-"),
            _fmt(row["workers"], "d"), _fmt(row["steps"], "d"),
            _fmt(row["final_test_accuracy"], ".4f"), _fmt(row["final_test_loss"], ".4g"),
            human_bytes(row["bytes_sent_per_worker_per_step"]), _fmt(row["wall_time_s"], ".2f"),
            target_text(row.get("target")), time_cell, bytes_cell,
            _fmt(row["comm_fraction"], ".3f"), _fmt(row["idle_fraction"], ".3f")]


def format_table(rows: list[dict]) -> str:
    """Plain-text table with one line per run, columns as in :data:`COLUMNS`."""
    body = [list(COLUMNS)] + [cells(r) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    lines = []
    for n, line in enumerate(body):
        # text columns left-aligned, numbers right-aligned
        out = [c.ljust(w) if COLUMNS[i] in TEXT_COLUMNS else c.rjust(w)
               for i, (c, w) in enumerate(zip(line, widths, strict=True))]
        lines.append("  ".join(out).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- sweeps -------------------------------------------------------------------------------------
def is_sweep(run_dir: Path) -> bool:
    """A ``tandem sweep`` job directory: it has ``sweep.json`` or a ``variants/`` folder."""
    return (Path(run_dir) / "sweep.json").is_file() or (Path(run_dir) / "variants").is_dir()


def sweep_variants(run_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """``([(label, dir)], missing)``: finished variants in ``sweep.json`` order (by name when
    there is none), and the labels of variants without a ``summary.json``."""
    base = Path(run_dir) / "variants"
    names = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    try:
        listed = json.loads((Path(run_dir) / "sweep.json").read_text(encoding="utf-8"))
        order = [str(r.get("variant") or r.get("run")) for r in listed if isinstance(r, dict)]
    except (OSError, json.JSONDecodeError, TypeError):
        order = []
    labels = [n for n in order if n in names] + [n for n in names if n not in order]
    labels += [n for n in order if n not in names]
    found = [(n, base / n) for n in labels if (base / n / "summary.json").is_file()]
    return found, [n for n in labels if not (base / n / "summary.json").is_file()]


def best_variant(rows: list[dict]) -> tuple[int | None, str | None]:
    """``(index, key)`` of the best row: highest final test accuracy, else lowest final test loss
    (the first one on a tie); ``(None, None)`` when no row has either."""
    for key, sign in (("final_test_accuracy", 1.0), ("final_test_loss", -1.0)):
        scored = [(sign * r[key], -i) for i, r in enumerate(rows) if _finite(r.get(key))]
        if scored:
            return -max(scored)[1], key
    return None, None


def format_sweeps(sweeps: list[Sweep]) -> str:
    """One line per sweep naming its best variant, e.g. for the end of the text report."""
    lines = []
    for sw in sweeps:
        note = f"; not finished: {', '.join(sw.missing)}" if sw.missing else ""
        if sw.best is None:
            lines.append(f"sweep {sw.label}: no variant has a final test metric{note}")
            continue
        best = sw.rows[sw.best]
        what = "final acc" if sw.by == "final_test_accuracy" else "final loss"
        lines.append(f"sweep {sw.label}: best variant {best.get('variant')} ({what} "
                     f"{best[sw.by]:.4g} of {len(sw.rows)} variants){note}")
    return "\n".join(lines)


# ---- building -----------------------------------------------------------------------------------
def _labels(run_dirs: list[Path]) -> list[str]:
    names = [Path(d).name or str(d) for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for n, d in zip(names, run_dirs, strict=True)]


def build_report(run_dirs: list[Path], *, target_accuracy: float | None = None,
                 target_loss: float | None = None) -> Report:
    """Read every run (a sweep directory: its variants) into a :class:`Report`.

    Raises :class:`TandemError` when a directory has no ``summary.json`` or a sweep has no
    finished variant.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise TandemError("compare needs at least one run directory")
    labels = _labels(run_dirs)
    rows: list[dict] = []
    curves: list[list[dict]] = []
    sweeps: list[Sweep] = []

    def add(label: str, d: Path) -> dict:
        s = load_summary(d)
        records = load_events(d)
        points = eval_curve(records, ByteIndex(records))
        rows.append(_row(label, d, s, points, target_accuracy, target_loss))
        curves.append(points)
        return rows[-1]

    for label, d in zip(labels, run_dirs, strict=True):
        if not is_sweep(d):
            add(label, d)
            continue
        found, missing = sweep_variants(d)
        if not found:
            raise TandemError(f"sweep {d} has no finished variant (no variants/*/summary.json); "
                              f"finish it with `tandem sweep --report {d}`")
        mine = []
        for name, vdir in found:
            mine.append(add(f"{label}/{name}", vdir))
            mine[-1]["variant"] = name
        best, by = best_variant(mine)
        sweeps.append(Sweep(label, d, mine, best, by, missing))
    return Report(labels, rows, curves, sweeps)


# ---- figures ------------------------------------------------------------------------------------
_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_RC = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
       "xtick.labelsize": 10, "ytick.labelsize": 10, "lines.linewidth": 1.6,
       "svg.fonttype": "path", "svg.hashsalt": "tandem-report"}


def metrics_of(report: Report) -> list[str]:
    """The test metrics worth a figure: accuracy (when any run has it) and loss."""
    has_acc = any(p["accuracy"] is not None for c in report.curves for p in c)
    return ["accuracy", "loss"] if has_acc else ["loss"]


def _panel(ax: Any, report: Report, metric: str, x: str) -> None:
    shown = 0
    for i, (row, points) in enumerate(zip(report.rows, report.curves, strict=True)):
        pts = [p for p in points if p[metric] is not None and (x == "wall" or p["bytes"] > 0)]
        xs = [p["wall"] if x == "wall" else p["bytes"] / 1e6 for p in pts]
        ax.plot(xs, [p[metric] for p in pts], label=row["run"], color=f"C{i % 10}",
                linestyle=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)],
                markersize=4, markevery=max(1, len(pts) // 15))
        shown += bool(pts)
    for value in sorted({r["target"]["value"] for r in report.rows
                         if r.get("target") and r["target"]["metric"] == metric}):
        ax.axhline(value, color="0.4", linewidth=1.0, linestyle=(0, (1, 3)), zorder=0,
                   label=f"target: {target_text({'metric': metric, 'value': value})}")
    if x == "bytes":
        ax.set_xlabel("train data sent by all ranks (MB, log scale)")
        if shown:
            ax.set_xscale("log")  # byte budgets of methods differ by orders of magnitude
    else:
        ax.set_xlabel("wall time, evaluation excluded (s)")
    if not shown:
        ax.text(0.5, 0.5, "no bytes sent" if x == "bytes" else "no data", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_title(f"test {metric} vs {'wall time' if x == 'wall' else 'data sent'}")
    ax.grid(True, which="major", alpha=0.3)


def render_figure(report: Report, metrics: list[str], fmt: str = "png", dpi: int = 120) -> bytes:
    """One figure, a row per metric (against wall time, against bytes sent), as ``fmt`` bytes.

    Sized and styled for print: 11 pt text at 10 inches wide, a distinct line style and marker per
    run as well as a colour, one shared legend under the panels.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        legend_rows = math.ceil((len(report.rows) + 1) / 3)
        fig = Figure(figsize=(10, 3.9 * len(metrics) + 0.3 * legend_rows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(metrics), 2, squeeze=False)
        for (ax_t, ax_b), metric in zip(axes, metrics, strict=True):
            _panel(ax_t, report, metric, "wall")
            _panel(ax_b, report, metric, "bytes")
        handles, labels = axes[0][0].get_legend_handles_labels()
        handles, labels = handles[:len(report.rows)], labels[:len(report.rows)]
        for ax in axes[:, 0]:  # then each target line once
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                if label.startswith("target: ") and label not in labels:
                    handles.append(handle)
                    labels.append(label)
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)),
                   frameon=False)
        buf = io.BytesIO()
        # an SVG without date, metadata block or DTD reference: reproducible, nothing to fetch
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=dict.fromkeys(
            ("Date", "Creator", "Format", "Type")) if fmt == "svg" else None)
    return re.sub(rb"<!DOCTYPE[^>]*>\s*", b"", buf.getvalue()) if fmt == "svg" else buf.getvalue()


def save_png(report: Report, out_png: Path) -> Path:
    """Write the overlay plot (test accuracy and test loss; loss only without accuracy)."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_png.write_bytes(render_figure(report, metrics_of(report), "png"))
    return out_png


def compare(run_dirs: list[Path], out_png: Path | None = None, *,
            target_accuracy: float | None = None,
            target_loss: float | None = None) -> tuple[str, list[dict]]:
    """Table and rows comparing ``run_dirs``; with ``out_png``, also the overlay plot there.

    Rows hold raw numbers (``bytes_sent_per_worker_per_step`` in bytes, fractions in 0..1, None
    where a run has no value; ``target_reached`` False when a target was set and never met); the
    table formats them for reading. A sweep directory gives one row per variant. Raises
    :class:`TandemError` when a directory has no ``summary.json``.
    """
    report = build_report(run_dirs, target_accuracy=target_accuracy, target_loss=target_loss)
    if out_png is not None:
        save_png(report, out_png)
    return format_table(report.rows), report.rows
