"""The paper-style study: GOCO's error against iterations over straggling rates p and redundancy d.

``study(devices=1024, ps=(0.1, 0.3, 0.5), ds=(1, 2, 3))`` simulates every (p, d) pair with the
same seed (so every curve starts from the same model and data), returns the curves and the error
floors, and :func:`plot_study` draws one panel per p with one curve per d (log scale).

What to expect (the paper's claims): the floor falls as d grows (more holders per partition, less
variance from the missing gradients) and rises with p. A ring of 1024 devices mixes very slowly
(spectral gap ~ 1e-5); use ``topology="exponential"`` or more gossip rounds for large M.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tandem.errors import ConfigError
from tandem.sim.goco import SimConfig, SimResult, simulate


def study_configs(base: SimConfig, ps: Sequence[float], ds: Sequence[int],
                  name: Callable[[str], str] = str) -> dict[tuple[float, int], SimConfig]:
    """The config of every (p, d) pair on top of ``base``, each checked
    (:meth:`SimConfig.check`, fields named by ``name``) before any simulation starts, so a bad
    last pair fails in milliseconds rather than after the others' minutes."""
    if not ps or not ds:
        raise ConfigError(f"{name('p') if not ps else name('d')}: give at least one value")
    configs = {(p, d): replace(base, p=p, d=d)
               for p in dict.fromkeys(ps) for d in dict.fromkeys(ds)}
    for cfg in configs.values():
        cfg.check(name)
    return configs


def study(base: SimConfig, ps: Sequence[float] = (0.1, 0.3, 0.5),
          ds: Sequence[int] = (1, 2, 3)) -> dict[tuple[float, int], SimResult]:
    """Simulate every (p, d) pair on top of ``base`` (all checked first; repeats run once)."""
    return {k: simulate(cfg) for k, cfg in study_configs(base, ps, ds).items()}


def floor_table(results: dict[tuple[float, int], SimResult], tail: float = 0.2
                ) -> list[dict[str, Any]]:
    """One row per p: the error floor for each d (mean error over the last ``tail`` of steps)."""
    ps = sorted({p for p, _ in results})
    ds = sorted({d for _, d in results})
    rows = []
    for p in ps:
        row: dict[str, Any] = {"p": p}
        for d in ds:
            if (p, d) in results:
                row[f"d={d}"] = results[(p, d)].floor(tail)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0]) if rows else []
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)) for x in cells]
    return "\n".join(lines)


def plot_study(results: dict[tuple[float, int], SimResult], path: str | Path) -> Path:
    """Error (mean ||x_i - x*||^2) against iteration: one panel per p, one curve per d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = sorted({p for p, _ in results})
    ds = sorted({d for _, d in results})
    fig, axes = plt.subplots(1, len(ps), figsize=(4.5 * len(ps), 3.6), squeeze=False,
                             sharey=True)
    for ax, p in zip(axes[0], ps, strict=True):
        for d in ds:
            if (p, d) in results:
                ax.semilogy(results[(p, d)].opt_error, label=f"d={d}")
        ax.set_title(f"p = {p}")
        ax.set_xlabel("iteration")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("mean ||x_i - x*||^2")
    any_cfg = next(iter(results.values())).config
    fig.suptitle(f"GOCO, {any_cfg.devices} devices, {any_cfg.topology}, lr={any_cfg.lr}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_study(results: dict[tuple[float, int], SimResult], path: str | Path,
               every: int = 1) -> Path:
    """Curves (every ``every``-th step), floors and the config as JSON."""
    any_cfg = next(iter(results.values())).config
    data = {"config": {k: v for k, v in asdict(any_cfg).items() if k not in ("p", "d")},
            "floors": floor_table(results),
            "curves": [{"p": p, "d": d, "spectral_gap": r.spectral_gap,
                        "opt_error": r.opt_error[::every].tolist(),
                        "consensus_error": r.consensus_error[::every].tolist(),
                        "straggle_rate": float(r.straggled.mean())}
                       for (p, d), r in sorted(results.items())]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


__all__ = ["floor_table", "format_table", "plot_study", "save_study", "study", "study_configs"]
