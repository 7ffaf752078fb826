"""The variants of a multi-model (``pipeline``) job: what each may override, how a grid of
values expands into variants, and each variant's solo-equivalent configuration.

Pure configuration work (it builds :class:`~tandem.config.RunConfig` objects), so both the
``pipeline`` strategy and the ``tandem sweep`` face use it without importing each other.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

from tandem.config import RunConfig, load_config
from tandem.errors import ConfigError
from tandem.telemetry.summary import finalize_run

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


def finalize_variants(variants: list[tuple[str, RunConfig]], job_dir: Path) -> None:
    """Merge, summarise and plot each variant's record of a finished pipeline job (rank 0 does
    it at the end of the job). The summary shows strategy ``pipeline``; ``config.yaml`` there
    stays the solo-equivalent config."""
    for label, vcfg in variants:
        shown = vcfg.model_dump(mode="json")
        shown["strategy"] = {"name": "pipeline", "options": {"variant": label,
                                                             "models": len(variants)}}
        finalize_run(vcfg.run_dir(), shown, target_accuracy=vcfg.target_accuracy,
                     extra={"variant": label, "job": str(job_dir),
                            "solo_config": str(vcfg.run_dir() / "config.yaml")})
