"""The plot of how alike the workers' gradients are over training (``correlation.png``).

Written by :func:`~tandem.telemetry.summary.finalize_run` when the run recorded the fields of
``tandem.strategies.correlation`` (``--strategy-opt correlation_every=N`` under ``allreduce``):
per layer, the mean pairwise cosine similarity of the workers' gradients and the overlap of
their top-k supports, against the step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def correlation_records(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "events.rank0.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "step" and "grad_cos" in rec:
            out.append(rec)
    return out


def plot_correlation(run_dir: Path) -> Path | None:
    """``correlation.png`` in ``run_dir`` (None when the run measured no correlation)."""
    recs = correlation_records(run_dir)
    if not recs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] + 1 for r in recs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for ax, key, title in ((axes[0], "grad_cos", "mean pairwise cosine similarity"),
                           (axes[1], "topk_overlap", "mean pairwise top-k support overlap")):
        layers = list(recs[0][key])
        for i, layer in enumerate(layers):
            ax.plot(steps, [r[key].get(layer) for r in recs], label=layer, lw=1.2,
                    ls=("-", "--", ":", "-.")[i % 4])
        ax.plot(steps, [r[f"{key}_model"] for r in recs], label="whole model", lw=2.4,
                color="black")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("across workers")
    axes[1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    out = Path(run_dir) / "correlation.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
