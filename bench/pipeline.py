"""Multi-model pipeline (M4): K models trained one after another versus pipelined in one job.

Setup: K = 4 variants (a learning-rate sweep) of the mnist5k small CNN, 4 workers, batch 256 per
worker. The regime is swept, not picked: for each communication/compute ratio in 0.25, 0.5, 1,
2, 4 the emulated link is set so that one model's all-reduce takes that multiple of its compute
(a short calibration job measures the compute first).

Rows per ratio, measured side by side in this one run:

* ``one job, no overlap``: one ``pipeline`` job with ``overlap=false`` (each exchange waited
  for at once): the sequential schedule in the same processes;
* ``pipelined``: the same job with the overlap;
* at ratio 1 also ``sequential``: the K solo ``allreduce`` runs one after another, the ground
  truth that the no-overlap job is the sequential schedule.

Columns: throughput (steps per second summed over the models), seconds per round (one step of
every model), the ideal speed-up ``sum(C+A) / max(sum C, sum A)`` for equal models, the share of
communication hidden behind compute, and the speed-up. Targets: at least 80 % of the ideal, and
never slower than no overlap (where the ideal is small).

This machine has 2 cores for 4 worker processes, so compute is contended: every worker computes
at the same moments in both modes (the collectives keep them in step), so C is comparable
between rows; the link is emulated (its waits use no CPU), which is what lets the pipeline fill
the idle CPU with the next model's compute. Wall times exclude start-up, evaluation and the first
steps of every run (one-off costs); the pipelined job runs between the solo runs, so that
varying load from other programs on the machine affects both rows alike.

    python -m bench.pipeline [--steps 40] [--net 30mbit:0.5ms]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import Bench

K, WORKERS = 4, 4
LRS = [0.01, 0.03, 0.1, 0.3]


def base_config(steps: int, net: str | None, out: Path, batch: int = 256) -> dict[str, Any]:
    return {"workload": {"name": "mnist5k"}, "workers": WORKERS, "steps": steps,
            "batch_size": batch, "momentum": 0.9, "seed": 1, "net": net, "progress": False,
            "eval_every": steps, "out": str(out), "timeout_s": 120.0}


WARMUP = 5  # steps left out of every measurement: they pay one-off costs (lazy init, caches)


def steady(run_dir: Path) -> dict[str, float]:
    """Steady-state figures of a finished run from its events: seconds per step of wall time
    (rank 0, steps after WARMUP) and rank means of compute and comm seconds per step."""
    import json

    steps = [r for r in map(json.loads, (run_dir / "events.jsonl").open())
             if r.get("kind") == "step"]
    late = [r for r in steps if r["step"] >= WARMUP]
    walls = {r["step"]: r["wall"] for r in steps if r["rank"] == 0}
    last = max(walls)
    return {"s_per_step": (walls[last] - walls[WARMUP - 1]) / (last - WARMUP + 1),
            "compute_s": sum(r["compute_s"] for r in late) / len(late),
            "comm_s": sum(r["comm_s"] for r in late) / len(late),
            "comm_active_s": sum(r.get("comm_active_s", r["comm_s"]) for r in late) / len(late)}


def calibrate(tmp: Path, steps: int) -> tuple[str, float]:
    """Measure compute per step without a link (median over ranks and steps, the first steps
    left out: they pay one-off costs); pick the bandwidth that makes the all-reduce take as long."""
    import json
    import statistics

    import tandem
    from tandem.transport import costs
    from tandem.workloads import build_workload
    from tandem.workloads.models import count_parameters

    cfg = base_config(steps, None, tmp / "calibrate")
    tandem.train(cfg)
    records = [json.loads(line) for line in (tmp / "calibrate" / "events.jsonl").open()]
    compute = statistics.median(r["compute_s"] for r in records
                                if r.get("kind") == "step" and r["step"] >= 4)
    params = count_parameters(build_workload(tandem.load_config(cfg).workload, 1).model_fn())
    traffic = costs.all_reduce(params * 4, WORKERS)
    latency = 0.0005
    seconds = max(compute - traffic.hops * latency, 0.005)
    mbit = traffic.sent * 8 / seconds / 1e6
    return f"{mbit:.2f}mbit:{latency * 1e3:g}ms", compute


RATIOS = (0.25, 0.5, 1.0, 2.0, 4.0)  # communication / compute per model, swept


def link_for_ratio(compute_s: float, ratio: float, latency: float = 0.0005) -> str:
    """The emulated link on which one model's all-reduce takes ``ratio`` x its compute."""
    import tandem
    from tandem.transport import costs
    from tandem.workloads import build_workload
    from tandem.workloads.models import count_parameters

    cfg = tandem.load_config(base_config(1, None, Path("unused")))
    params = count_parameters(build_workload(cfg.workload, 1).model_fn())
    traffic = costs.all_reduce(params * 4, WORKERS)
    seconds = max(ratio * compute_s - traffic.hops * latency, 0.002)
    return f"{traffic.sent * 8 / seconds / 1e6:.3f}mbit:{latency * 1e3:g}ms"


def job_row(bench: Bench, label: str, job: Path, ratio: float, bound: float,
            seq_rate: float | None) -> float:
    """One pipeline job's row: throughput, hidden share; returns its steps/s."""
    run = steady(job)
    models = [steady(job / "variants" / f"lr={x}") for x in LRS]
    active = sum(m["comm_active_s"] for m in models)
    exposed = sum(m["comm_s"] for m in models)
    rate = K / run["s_per_step"]
    bench.row(ratio=ratio, mode=label, models=K, **{
        "steps/s": rate, "s/round": run["s_per_step"], "ideal speedup": bound,
        "sumC s": sum(m["compute_s"] for m in models),
        "hidden share": max(0.0, 1.0 - exposed / active) if active > 0 else None,
        "speedup": rate / seq_rate if seq_rate else None})
    return rate


def main() -> None:
    import tandem
    from tandem.sweep import run_sweep

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS),
                    help="communication/compute ratios to sweep")
    args = ap.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    bench = Bench("pipeline", ["ratio", "mode", "models", "steps/s", "s/round", "ideal speedup",
                               "sumC s", "hidden share", "speedup"])
    with tempfile.TemporaryDirectory(prefix="tandem-bench-pipeline-") as tmpdir:
        tmp = Path(tmpdir)
        _, compute = calibrate(tmp, 20)
        bench.note(f"calibration: compute {compute * 1e3:.1f} ms/step per model (median, "
                   "4 workers on 2 cores); each ratio's link makes one model's all-reduce take "
                   "ratio x that")
        for ratio in ratios:
            net = link_for_ratio(compute, ratio)
            bound = (1 + ratio) / max(1.0, ratio)  # sum(C+A) / max(sum C, sum A), equal models
            jobs = {}
            for label, overlap in (("one job, no overlap", False), ("pipelined", True)):
                jobs[label] = tmp / f"r{ratio:g}-{'on' if overlap else 'off'}"
                run_sweep(base_config(args.steps, net, jobs[label]), [{"lr": x} for x in LRS],
                          timeout_s=1200, options={"overlap": overlap})
            seq_rate = None
            if ratio == 1.0:  # the ground truth that the no-overlap job is the sequential
                solos = []    # schedule: K solo runs one after another, once
                for i, lr in enumerate(LRS):
                    tandem.train(dict(base_config(args.steps, net, tmp / f"solo{i}"), lr=lr))
                    solos.append(steady(tmp / f"solo{i}"))
                seq_round = sum(s["s_per_step"] for s in solos)
                bench.row(ratio=ratio, mode="sequential (K solo runs)", models=K, **{
                    "steps/s": K / seq_round, "s/round": seq_round, "ideal speedup": bound,
                    "sumC s": sum(s["compute_s"] for s in solos), "hidden share": 0.0,
                    "speedup": 1.0})
                seq_rate = K / seq_round
            off = job_row(bench, "one job, no overlap", jobs["one job, no overlap"], ratio,
                          bound, seq_rate)
            on = job_row(bench, "pipelined", jobs["pipelined"], ratio, bound, seq_rate or off)
            bench.target(f"ratio {ratio:g}: pipelined / no-overlap throughput (ideal "
                         f"{bound:.2f})", on / off, f">= {max(1.0, 0.8 * bound):.2f}")
        bench.note("where it wins: communication and compute of similar size (ideal 2x at "
                   "ratio 1); where it cannot: A << C (nothing to hide) or A >> C (the link is "
                   "the bottleneck whatever the order): the ideal falls to 1.25x at 0.25 and 4, "
                   "and the target there is only not to lose (>= 1.0)")
        bench.note("the link is emulated: its waits use no CPU, so the overlap here does not pay "
                   "for the CPU that real gloo transfers use; bench/cluster.py measures real "
                   "links between network namespaces. 2 cores, 4 worker processes: compute is "
                   "contended in every row alike")
    bench.finish()


if __name__ == "__main__":
    main()
