"""One self-contained HTML page comparing runs, to attach to an issue or a paper review.

``tandem report runs/a runs/b --html report.html`` calls :func:`write_html`::

    report = build_report([Path("runs/a"), Path("runs/b")], target_accuracy=0.9)
    write_html(report, Path("report.html"), version="0.1.0")

The page needs nothing else to show: CSS is inline, each figure is an SVG embedded as a
``data:`` URI (vector, so it prints sharply; its text is drawn as paths, so no font is needed),
and there is no script and no link to anything outside the file. It holds a title, the comparison
table (the same cells as the text table), test accuracy and test loss against wall time and
against bytes sent (log scale), each run's key config, a table per sweep with the best variant
marked, and the Tandem version and date that made it.
"""

from __future__ import annotations

import base64
import html
import math
from datetime import UTC, datetime
from pathlib import Path

from tandem.telemetry.report import (
    COLUMNS,
    METRIC_LABELS,
    NOT_REACHED,
    TEXT_COLUMNS,
    Report,
    Sweep,
    _fmt,
    cells,
    human_bytes,
    metrics_of,
    render_figure,
    target_text,
    to_target_cells,
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1a1a1a;
 max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;
 border-bottom:1px solid #ccc}
.meta{color:#555;margin-top:0}
table{border-collapse:collapse;font-size:.9em;margin:.6em 0}
th,td{border:1px solid #bbb;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#eee}td.num{text-align:right;font-variant-numeric:tabular-nums}
.miss{color:#a40000;font-weight:600}
tr.best td{background:#e6f4e6;font-weight:600}
.mark{white-space:nowrap}
figure{margin:1.2em 0;break-inside:avoid}figure img{width:100%;height:auto}
figcaption{color:#333;font-size:.92em}
ul.defs{font-size:.88em;color:#333;padding-left:1.2em}
footer{margin-top:2em;color:#666;font-size:.85em}
@media print{body{margin:0;max-width:none}h2{break-after:avoid}table{break-inside:avoid}}
"""

DEFINITIONS = (
    ("bytes/worker/step", "train bytes sent, per worker and per step (decimal units)."),
    ("wall s", "wall-clock seconds of training, evaluation excluded."),
    ("target", "the test metric the time- and bytes-to-target columns count to."),
    ("time-to-target s", "wall seconds until the first evaluation at or past the target."),
    ("bytes-to-target", "train bytes sent by all ranks until that evaluation."),
    ("comm / idle fraction", "share of step time spent communicating / waiting."),
)

CONFIG_COLUMNS = (("run", None), ("workload", "workload"), ("strategy", "strategy"),
                  ("codec", "codec"), ("workers", "workers"), ("lr", "lr"),
                  ("net (emulated link)", "net"), ("steps", "steps"),
                  ("batch size", "batch_size"), ("seed", "seed"))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _td(text: str, numeric: bool) -> str:
    inner = f'<span class="miss">{_e(text)}</span>' if text == NOT_REACHED else _e(text)
    return f'<td class="num">{inner}</td>' if numeric else f"<td>{inner}</td>"


def _table(header: list[str], body: list[list[str]], numeric: list[bool],
           row_classes: list[str] | None = None, table_id: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    rows = []
    for i, line in enumerate(body):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        tds = "".join(_td(c, n) for c, n in zip(line, numeric, strict=True))
        rows.append(f"<tr{cls}>{tds}</tr>")
    ident = f' id="{_e(table_id)}"' if table_id else ""
    return (f"<table{ident}><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _target_note(report: Report) -> str:
    targets = {target_text(r.get("target")) for r in report.rows}
    if targets == {"-"}:
        return ("No target was set, so there is no time- or bytes-to-target: pass "
                "<code>--target-accuracy</code> (or <code>--target-loss</code>).")
    if len(targets) == 1:
        return f"Target: <b>{_e(targets.pop())}</b> on the test set."
    return "The runs have different targets; see the target column."


def _figures(report: Report) -> str:
    out = []
    for n, metric in enumerate(metrics_of(report), start=1):
        svg = render_figure(report, [metric], "svg")
        uri = "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii")
        what = METRIC_LABELS[metric]
        out.append(
            f'<figure><img src="{uri}" alt="{_e(what)} against wall time and against bytes '
            f'sent, one line per run"><figcaption>Figure {n}. {_e(what).capitalize()} against '
            "wall time, evaluation excluded (left), and against train data sent by all ranks, "
            "in MB on a log scale (right). Each run has its own colour, line style and marker; "
            "a dotted grey line marks a target.</figcaption></figure>")
    return "\n".join(out)


def _sweep(sw: Sweep) -> str:
    by = {"final_test_accuracy": "highest final test accuracy",
          "final_test_loss": "lowest final test loss"}.get(sw.by or "", "")
    header = ["", "variant", "codec", "lr", "final acc", "final loss", "time-to-target s",
              "bytes-to-target", "bytes/worker/step", "wall s"]
    body, classes = [], []
    for i, r in enumerate(sw.rows):
        time_cell, bytes_cell = to_target_cells(r)
        lr = r["config"].get("lr")
        body.append(["★ best" if i == sw.best else "", str(r.get("variant")),
                     str(r["config"].get("codec") or r["codec"] or "-"),
                     "-" if lr is None else f"{lr:g}",
                     _fmt(r["final_test_accuracy"], ".4f"), _fmt(r["final_test_loss"], ".4g"),
                     time_cell, bytes_cell, human_bytes(r["bytes_sent_per_worker_per_step"]),
                     _fmt(r["wall_time_s"], ".2f")])
        classes.append("best" if i == sw.best else "")
    numeric = [False, False, False] + [True] * 7
    if sw.best is None:
        note = "No variant has a final test metric, so none is marked best."
    else:
        note = (f"Best variant (★): <b>{_e(sw.rows[sw.best].get('variant'))}</b>, by {by} "
                f"of {len(sw.rows)} variants.")
    if sw.missing:
        note += f" Not finished (no summary.json): {_e(', '.join(sw.missing))}."
    return (f"<h2>Sweep {_e(sw.label)}</h2>\n<p>{note} Directory: <code>{_e(sw.run_dir)}"
            f"</code>.</p>\n" + _table(header, body, numeric, classes, f"sweep-{sw.label}"))


def _configs(report: Report) -> str:
    body = []
    for r in report.rows:
        cfg = r["config"]
        line = [str(r["run"])]
        for _, key in CONFIG_COLUMNS[1:]:
            value = cfg.get(key)
            line.append("-" if value is None else
                        f"{value:g}" if isinstance(value, float) and math.isfinite(value)
                        else str(value))
        body.append(line + [r["run_dir"]])
    header = [h for h, _ in CONFIG_COLUMNS] + ["directory"]
    numeric = [h in ("workers", "lr", "steps", "batch size", "seed") for h in header]
    return _table(header, body, numeric, table_id="configs")


def render_html(report: Report, *, title: str | None = None, version: str | None = None,
                generated: datetime | None = None) -> str:
    """The page as a string. ``title`` defaults to the runs' names; ``version`` to the
    installed Tandem's; ``generated`` to now (UTC)."""
    if title is None:
        names = report.inputs if len(report.inputs) <= 4 else (
            report.inputs[:3] + [f"{len(report.inputs) - 3} more"])
        title = "Tandem report: " + ", ".join(names)
    version = version or _installed_version()
    when = (generated or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M %Z").strip()
    numeric = [c not in TEXT_COLUMNS for c in COLUMNS]
    runs = _table(list(COLUMNS), [cells(r) for r in report.rows], numeric, table_id="runs")
    defs = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in DEFINITIONS)
    sweeps = "\n".join(_sweep(sw) for sw in report.sweeps)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="generator" content="Tandem {_e(version)}">
<title>{_e(title)}</title><style>{CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="meta">Generated {_e(when)} by Tandem {_e(version)};
{len(report.rows)} run{'s' if len(report.rows) != 1 else ''}.</p>
<h2>Results</h2>
<p>{_target_note(report)}</p>
{runs}
<ul class="defs">{defs}</ul>
<h2>Curves</h2>
{_figures(report)}
{sweeps}
<h2>Configurations</h2>
{_configs(report)}
<footer>Made with <code>tandem report --html</code> (Tandem {_e(version)}, {_e(when)}).
Every number comes from the runs' summary.json and event logs.</footer>
</body></html>
"""


def write_html(report: Report, path: Path, *, title: str | None = None,
               version: str | None = None, generated: datetime | None = None) -> Path:
    """Write :func:`render_html`'s page to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(report, title=title, version=version, generated=generated)
    path.write_text(page, encoding="utf-8")
    return path


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tandem")
    except PackageNotFoundError:
        return "unknown"
