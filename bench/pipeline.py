"""Multi-model pipeline (M4): K models trained one after another versus pipelined in one job.

Setup: K = 4 variants (a learning-rate sweep) of the mnist5k small CNN, 4 workers, batch 256 per
worker, on an emulated link chosen so that one model's all-reduce takes about as long as its
compute (a short calibration job measures the compute first; ``--net`` skips it).

Rows, measured side by side in this one run:

* ``sequential``: the K solo ``allreduce`` runs one after another (their training walls added);
* ``one job, no overlap``: one ``pipeline`` job with ``overlap=false`` (each exchange waited
  for at once): the sequential schedule in the same processes, a control row;
* ``pipelined``: one ``pipeline`` job holding the K models.

Columns: throughput (steps per second summed over the models), seconds per round (one step of
every model), the bound ``max(sum C, sum A)`` beside ``sum (C + A)`` (C and A are each model's
compute and all-reduce seconds per step measured in its solo run), the share of communication
hidden behind compute, and the speed-up over sequential (target >= 1.8).

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


def link_seconds(net: str) -> float:
    """The emulated link's modelled time for one model's all-reduce (no waiting included)."""
    import tandem
    from tandem.config import NetConfig
    from tandem.transport import costs
    from tandem.workloads import build_workload
    from tandem.workloads.models import count_parameters

    cfg = tandem.load_config(base_config(1, net, Path("unused")))
    params = count_parameters(build_workload(cfg.workload, 1).model_fn())
    link = NetConfig.parse(net)
    return costs.all_reduce(params * 4, WORKERS).seconds(link.bytes_per_s, link.latency_s)


def main() -> None:
    import tandem
    from tandem.sweep import run_sweep

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--net", default=None, help="emulated link; default: calibrated")
    args = ap.parse_args()
    bench = Bench("pipeline", ["mode", "models", "steps/s", "s/round", "sum(C+A) s",
                               "max(sumC,sumA) s", "sumC this row s", "hidden share",
                               "speedup"])
    with tempfile.TemporaryDirectory(prefix="tandem-bench-pipeline-") as tmpdir:
        tmp = Path(tmpdir)
        net, calib = (args.net, None) if args.net else calibrate(tmp, 20)
        if calib is not None:
            bench.note(f"calibration: compute {calib * 1e3:.1f} ms/step per model -> link {net}")
        # sequential: K solo runs one after another. The two one-job runs go between them, so
        # that drifting load from other programs on a shared machine hits every row alike.
        solos: list[dict[str, float]] = []
        jobs: dict[str, Path] = {}
        result: dict[str, Any] = {}
        for i, lr in enumerate(LRS):
            for mode, overlap in (("pipelined", True), ("one job, no overlap", False)):
                if i == (1 if overlap else 3):
                    jobs[mode] = tmp / mode.replace(" ", "_").replace(",", "")
                    out = run_sweep(base_config(args.steps, net, jobs[mode]),
                                    [{"lr": x} for x in LRS], timeout_s=900,
                                    options={"overlap": overlap})
                    result = out if overlap else result
            tandem.train(dict(base_config(args.steps, net, tmp / f"solo{i}"), lr=lr))
            solos.append(steady(tmp / f"solo{i}"))
        c = [s["compute_s"] for s in solos]
        a = [s["comm_s"] for s in solos]
        serial_bound, overlap_bound = sum(c) + sum(a), max(sum(c), sum(a))
        seq_round = sum(s["s_per_step"] for s in solos)
        seq_rate = K / seq_round
        bench.row(mode="sequential (K solo runs)", models=K, **{
            "steps/s": seq_rate, "s/round": seq_round, "sum(C+A) s": serial_bound,
            "max(sumC,sumA) s": overlap_bound, "sumC this row s": sum(c), "hidden share": 0.0,
            "speedup": 1.0})
        rates = {}
        for mode in ("one job, no overlap", "pipelined"):
            job = steady(jobs[mode])
            models = [steady(jobs[mode] / "variants" / f"lr={x}") for x in LRS]
            active = sum(m["comm_active_s"] for m in models)
            exposed = sum(m["comm_s"] for m in models)
            rates[mode] = K / job["s_per_step"]
            bench.row(mode=mode, models=K, **{
                "steps/s": rates[mode], "s/round": job["s_per_step"],
                "sum(C+A) s": serial_bound, "max(sumC,sumA) s": overlap_bound,
                "sumC this row s": sum(m["compute_s"] for m in models),
                "hidden share": max(0.0, 1.0 - exposed / active) if active > 0 else None,
                "speedup": rates[mode] / seq_rate})
        pipe_rate = rates["pipelined"]
        bench.note(f"per model C = {[round(x * 1e3, 1) for x in c]} ms, "
                   f"A = {[round(x * 1e3, 1) for x in a]} ms per step (solo runs); steady "
                   f"state: the first {WARMUP} steps of every run are left out")
        bench.note(f"ideal speed-up sum(C+A)/max(sumC,sumA) = {serial_bound / overlap_bound:.2f}; "
                   f"the link alone takes {link_seconds(net) * 1e3:.1f} ms per all-reduce, the "
                   "rest of A is waiting for the slowest rank and thread hand-offs")
        bench.note("2 cores, 4 worker processes: compute is contended in both rows alike; "
                   "the emulated link's waits use no CPU. A (solo) includes waiting for the "
                   "slowest rank, which the pipeline also hides")
        bench.target("pipelined / sequential throughput", pipe_rate / seq_rate, ">= 1.8")
        bench.note(f"pipelined / one-job-no-overlap throughput: "
                   f"{pipe_rate / rates['one job, no overlap']:.2f} (same processes, same "
                   "schedule except the overlap: the control for load drift and warm-up)")
        print(result["table"])
    bench.finish()


if __name__ == "__main__":
    main()
