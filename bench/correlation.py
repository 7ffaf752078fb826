"""How correlated are the workers' gradients, per layer, over training? (issue 20: the question
LGC exists for.)

For each workload and partition, 4 workers train with ``allreduce`` + dense and record every
``EVERY`` steps the mean pairwise cosine similarity of their gradients and the overlap of their
top-1% supports (``--strategy-opt correlation_every``; tandem.strategies.correlation). Rows:
``mnist5k`` and ``fashion`` with iid and by-label partitions (2 labels per worker), ``textlm``
with iid (a by-label split of next bytes means nothing). Columns: the whole model's cosine and
overlap early (mean over the first quarter of the measurements) and late (last quarter), and
the layer with the highest late cosine. The per-layer curves go to docs/img/correlation-*.png.

Correlation does not depend on timing: a busy machine changes nothing here.

    .venv/bin/python -m bench.correlation [--steps 200]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import tandem
from bench.harness import Bench
from tandem.telemetry.correlation import correlation_records

EVERY = 10
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("mnist5k", "iid", {"lr": 0.05, "momentum": 0.9}),
    ("mnist5k", "label", {"lr": 0.05, "momentum": 0.9}),
    ("fashion", "iid", {"lr": 0.05, "momentum": 0.9}),
    ("fashion", "label", {"lr": 0.05, "momentum": 0.9}),
    ("textlm", "iid", {}),
]


def summarize(run: Path) -> dict[str, Any]:
    recs = correlation_records(run)
    q = max(1, len(recs) // 4)
    early, late = recs[:q], recs[-q:]

    def mean(rs: list[dict[str, Any]], key: str) -> float:
        return statistics.fmean(r[key] for r in rs)

    layer_late = {name: statistics.fmean(r["grad_cos"][name] for r in late)
                  for name in late[-1]["grad_cos"]}
    best = max(layer_late, key=layer_late.get)  # type: ignore[arg-type]
    return {"cos early": mean(early, "grad_cos_model"), "cos late": mean(late, "grad_cos_model"),
            "overlap early": mean(early, "topk_overlap_model"),
            "overlap late": mean(late, "topk_overlap_model"),
            "most alike layer (late)": f"{best} {layer_late[best]:.3f}",
            "measurements": len(recs)}


def check_data() -> None:
    """Build every workload of :data:`ROWS` before any trains: a missing dataset (Fashion-MNIST
    comes from ``make bench-data``) is refused at once with the workload's own error, not after
    the rows before it have run and been lost."""
    from tandem.config import WorkloadConfig
    from tandem.workloads import build_workload

    for name in dict.fromkeys(w for w, _, _ in ROWS):
        build_workload(WorkloadConfig(name=name), 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    bench = Bench("correlation", ["workload", "partition", "cos early", "cos late",
                                  "overlap early", "overlap late", "most alike layer (late)",
                                  "measurements"])
    check_data()
    IMG.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-correlation-") as tmp:
        for workload, part, extra in ROWS:
            run = Path(tmp) / f"{workload}-{part}"
            tandem.train({"workload": {"name": workload, "partition": part}, "workers": 4,
                          "steps": args.steps, "seed": 0, "progress": False,
                          "eval_every": args.steps, "out": str(run), **extra,
                          "strategy": {"name": "allreduce",
                                       "options": {"correlation_every": EVERY}}},
                         timeout_s=3600)
            bench.row(workload=workload, partition=part, **summarize(run))
            shutil.copy(run / "correlation.png", IMG / f"correlation-{workload}-{part}.png")
    bench.note(f"4 workers, allreduce + dense, {args.steps} steps, measured every {EVERY} steps; "
               "cosine and top-1% support overlap averaged over worker pairs; early / late: "
               "the first / last quarter of the measurements")
    bench.finish()


if __name__ == "__main__":
    main()
