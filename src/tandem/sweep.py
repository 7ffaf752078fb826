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

import copy
import itertools
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tandem.errors import ConfigError

if TYPE_CHECKING:
    from tandem.config import RunConfig

#: the settings a variant may change; the rest (workers, net, stragglers, ...) is the job's
OVERRIDABLE = ("lr", "momentum", "weight_decay", "batch_size", "seed", "steps", "epochs",
               "eval_every", "target_accuracy", "nan_policy", "codec", "workload", "name")


# ---- variants -------------------------------------------------------------------------------
def expand_grid(grid: dict[str, list[Any]], *, paired: bool = False) -> list[dict[str, Any]]:
    """Variants (flat dicts of dotted keys) from value lists: their product, or with ``paired``
    the i-th value of every list together (all lists must then have one length or length 1)."""
    keys = [k for k, v in grid.items() if v]
    if not keys:
        return [{}]
    lists = [list(grid[k]) for k in keys]
    if paired:
        n = max(len(v) for v in lists)
        if any(len(v) not in (1, n) for v in lists):
            raise ConfigError(f"--paired needs lists of equal length; got "
                              f"{ {k: len(v) for k, v in zip(keys, lists, strict=True)} }")
        rows = [[v[i] if len(v) > 1 else v[0] for v in lists] for i in range(n)]
    else:
        rows = [list(r) for r in itertools.product(*lists)]
    return [dict(zip(keys, r, strict=True)) for r in rows]


def flatten_overrides(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"workload": {"options": {"hidden": 64}}}`` -> ``{"workload.options.hidden": 64}``;
    a bare ``codec``/``workload`` name becomes ``codec.name``/``workload.name``; ``name`` (the
    label) is left out."""
    out: dict[str, Any] = {}
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        if key == "name":
            continue
        if isinstance(v, dict) and v:
            out.update(flatten_overrides(v, key + "."))
        elif key in ("codec", "workload"):
            out[f"{key}.name"] = v
        else:
            out[key] = v
    return out


def label_of(overrides: dict[str, Any], index: int) -> str:
    """A variant's label: its ``name``, else its overrides (``lr=0.1,hidden=64``)."""
    if "name" in overrides:
        text = str(overrides["name"])
    else:
        flat = flatten_overrides(overrides)
        short = [k.removesuffix(".name").split(".")[-1] for k in flat]
        text = ",".join(f"{k}={v}" for k, v in zip(short, flat.values(), strict=True))
        text = text or f"model{index}"
    return "".join(c if c.isalnum() or c in "=.,-_+" else "_" for c in text)[:80]


def variant_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """(label, solo-equivalent config) of each model of a ``pipeline`` config: the base config
    with the model's overrides, strategy ``allreduce``, run directory ``<run>/variants/<label>``.
    Changing the codec or the workload drops the base's options for it. Raises ConfigError."""
    from tandem.config import load_config

    models = list(cfg.strategy.options.get("models") or [])
    if not models:
        raise ConfigError("strategy pipeline needs models: --strategy-opt "
                          "'models=[{lr: 0.01}, {lr: 0.1}]' (or use `tandem sweep`)")
    base = cfg.model_dump(mode="json")
    base["strategy"] = {"name": "allreduce", "options": {}}
    out: list[tuple[str, RunConfig]] = []
    seen: set[str] = set()
    for i, m in enumerate(models):
        if not isinstance(m, dict):
            raise ConfigError(f"pipeline model {i}: expected a mapping of overrides, got {m!r}")
        label = label_of(m, i)
        if label in seen:
            label = f"{label}-{i}"
        seen.add(label)
        over = flatten_overrides(m)
        data = copy.deepcopy(base)
        for part in ("codec", "workload"):
            name = over.get(f"{part}.name")
            if name is not None and name != base[part]["name"]:
                data[part] = {k: v for k, v in base[part].items() if k != "options"}
        over.update({"name": label, "out": str(cfg.run_dir() / "variants" / label)})
        try:
            out.append((label, load_config(data, **over)))
        except ConfigError as err:
            raise ConfigError(f"pipeline model {i} ({label}): {err}") from None
    return out


def sweep_config(base: RunConfig | dict[str, Any], variants: list[dict[str, Any]], *,
                 bucket_mb: float = 0.0, options: dict[str, Any] | None = None) -> RunConfig:
    """The one ``pipeline`` job that trains ``variants`` (override dicts) of ``base``;
    ``options``: more strategy options (e.g. ``{"overlap": False}``)."""
    from tandem.config import RunConfig, load_config

    data = base.model_dump(mode="json") if isinstance(base, RunConfig) else dict(base)
    data["strategy"] = {"name": "pipeline",
                        "options": {"models": [dict(v) for v in variants],
                                    "bucket_mb": bucket_mb, **(options or {})}}
    cfg = load_config(data)
    if cfg.name is None and cfg.out is None:
        cfg = cfg.model_copy(update={"name": f"sweep-{cfg.workload.name}-k{len(variants)}"})
    variant_configs(cfg)  # every variant valid before anything starts
    return cfg


def finalize_variants(variants: list[tuple[str, RunConfig]], job_dir: Path) -> None:
    """Merge, summarise and plot each variant's record of a finished pipeline job (rank 0 does
    it at the end of the job). The summary shows strategy ``pipeline``; ``config.yaml`` there
    stays the solo-equivalent config."""
    from tandem.telemetry.summary import finalize_run

    for label, vcfg in variants:
        shown = vcfg.model_dump(mode="json")
        shown["strategy"] = {"name": "pipeline", "options": {"variant": label,
                                                             "models": len(variants)}}
        finalize_run(vcfg.run_dir(), shown, target_accuracy=vcfg.target_accuracy,
                     extra={"variant": label, "job": str(job_dir),
                            "solo_config": str(vcfg.run_dir() / "config.yaml")})


# ---- running and reporting ------------------------------------------------------------------
def run_sweep(base: RunConfig | dict[str, Any], variants: list[dict[str, Any]], *,
              bucket_mb: float = 0.0, timeout_s: float | None = None,
              return_results: bool = False, options: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Train ``variants`` of ``base`` as one pipelined job; returns ``{"table", "rows",
    "run_dir", "summary"}`` (``summary`` is the job's, with ``results`` if asked)."""
    from tandem.api import train

    cfg = sweep_config(base, variants, bucket_mb=bucket_mb, options=options)
    shutil.rmtree(cfg.run_dir() / "variants", ignore_errors=True)  # no stale variants
    summary = train(cfg, return_results=return_results, timeout_s=timeout_s)
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
