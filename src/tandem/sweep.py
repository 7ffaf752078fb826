"""Sweeps: train K variants of one configuration as one pipelined job (strategy ``pipeline``).

``tandem sweep --lr 0.01,0.03,0.1,0.3`` expands its comma lists into variants (a grid, or pairs
with ``--paired``), runs them as one job in which each model's gradient exchange hides behind the
other models' compute (see :mod:`tandem.strategies.pipeline`), and leaves:

* ``<run>/``: the job's own record (per-round compute and exposed communication);
* ``<run>/variants/<label>/``: one complete run record per variant (``config.yaml`` there is the
  solo-equivalent config: ``tandem train --config`` on it trains that variant alone and, with the
  same seeds, reaches the same parameters);
* ``<run>/sweep.txt`` / ``sweep.json``: the summary table; ``<run>/sweep.png``: the variants'
  test curves overlaid (:func:`tandem.telemetry.report.compare`).

From Python::

    from tandem.sweep import expand_grid, run_sweep
    result = run_sweep({"workload": {"name": "digits"}, "workers": 4, "steps": 300},
                       expand_grid({"lr": [0.01, 0.1], "workload.options.hidden": [64, 256]}))
    print(result["table"])
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tandem.config import RunConfig
from tandem.job import run_job
from tandem.variants import (
    OVERRIDABLE,
    expand_grid,
    finalize_variants,
    flatten_overrides,
    label_of,
    variant_configs,
)

__all__ = ["OVERRIDABLE", "expand_grid", "finalize_variants", "flatten_overrides", "label_of",
           "run_sweep", "summarize_sweep", "sweep_config", "variant_configs"]

def sweep_config(base: RunConfig | dict[str, Any], variants: list[dict[str, Any]], *,
                 bucket_mb: float = 0.0, options: dict[str, Any] | None = None) -> RunConfig:
    """The one ``pipeline`` job that trains ``variants`` (override dicts) of ``base``;
    ``options``: more strategy options (e.g. ``{"overlap": False}``)."""
    from tandem.resolve import load_config

    data = base.model_dump(mode="json") if isinstance(base, RunConfig) else dict(base)
    data["strategy"] = {"name": "pipeline",
                        "options": {"models": [dict(v) for v in variants],
                                    "bucket_mb": bucket_mb, **(options or {})}}
    cfg = load_config(data)
    if cfg.name is None and cfg.out is None:
        cfg = cfg.model_copy(update={"name": f"sweep-{cfg.workload.name}-k{len(variants)}"})
    variant_configs(cfg)  # every variant valid before anything starts
    return cfg


# ---- running and reporting ------------------------------------------------------------------
def run_sweep(base: RunConfig | dict[str, Any], variants: list[dict[str, Any]], *,
              bucket_mb: float = 0.0, timeout_s: float | None = None,
              return_results: bool = False, options: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Train ``variants`` of ``base`` as one pipelined job; returns ``{"table", "rows",
    "run_dir", "summary"}`` (``summary`` is the job's, with ``results`` if asked)."""
    cfg = sweep_config(base, variants, bucket_mb=bucket_mb, options=options)
    shutil.rmtree(cfg.run_dir() / "variants", ignore_errors=True)  # no stale variants
    summary = run_job(cfg, return_results=return_results, timeout_s=timeout_s)
    table, rows = summarize_sweep(cfg.run_dir())
    return {"table": table, "rows": rows, "run_dir": cfg.run_dir(), "summary": summary}


def _mean_info(summary: dict[str, Any], key: str) -> float | None:
    """Rank mean of ``info.pipeline[key]`` (ranks differ in timings, so per-rank values exist)."""
    by_rank = summary.get("info_by_rank") or {"0": summary.get("info") or {}}
    vals = [float(v["pipeline"][key]) for v in by_rank.values()
            if isinstance(v.get("pipeline"), dict) and v["pipeline"].get(key) is not None]
    return sum(vals) / len(vals) if vals else None


COLUMNS = ("variant", "codec", "steps", "final acc", "final loss", "time-to-target s",
           "bytes/worker/step", "compute s", "comm s", "exposed s", "hidden share")


def summarize_sweep(run_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """Table and rows of a finished pipeline job's variants; writes ``sweep.txt``,
    ``sweep.json`` and the overlay plot ``sweep.png`` into ``run_dir``. Times are per worker
    (rank means): compute, active communication, exposed (waited) communication."""
    from tandem.config import load_config
    from tandem.telemetry.report import _fmt, compare, human_bytes, load_summary

    run_dir = Path(run_dir)
    cfg = load_config(path=run_dir / "config.yaml")
    variants = variant_configs(cfg)
    dirs = [v.run_dir() for _, v in variants]
    _, base_rows = compare(dirs, out_png=run_dir / "sweep.png")
    rows = []
    for (label, vcfg), base_row, d in zip(variants, base_rows, dirs, strict=True):
        s = load_summary(d)
        rows.append({**base_row, "run": label, "variant": label, "codec": vcfg.codec.name,
                     "lr": vcfg.lr, "final_test_loss": s.get("final_test_loss"),
                     "compute_s": _mean_info(s, "compute_s"), "comm_s": _mean_info(s, "comm_s"),
                     "exposed_s": _mean_info(s, "exposed_s"),
                     "hidden_share": _mean_info(s, "hidden_share")})
    cells = [[r["variant"], r["codec"], _fmt(r["steps"], "d"),
              _fmt(r["final_test_accuracy"], ".4f"), _fmt(r["final_test_loss"], ".4g"),
              _fmt(r["time_to_target_s"], ".2f"), human_bytes(r["bytes_sent_per_worker_per_step"]),
              _fmt(r["compute_s"], ".2f"), _fmt(r["comm_s"], ".2f"), _fmt(r["exposed_s"], ".2f"),
              _fmt(r["hidden_share"], ".3f")] for r in rows]
    body = [list(COLUMNS)] + cells
    widths = [max(len(line[i]) for line in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w)
                       in enumerate(zip(line, widths, strict=True))).rstrip() for line in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    table = "\n".join(lines)
    (run_dir / "sweep.txt").write_text(table + "\n")
    (run_dir / "sweep.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return table, rows
