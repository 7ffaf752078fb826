"""Parameter server baselines versus the candidate model (M3) on one slow, high-latency link.

Setup (issue 5): 4 workers and 1 server, every process on an emulated 100 Mbit/s link with 20 ms
one-way latency. Rows, measured side by side in one run with the same seed, data and number of
gradient steps per worker: sync, ssp (s=3), async, candidate (overwrite), candidate
(delay-corrected). Columns: time to the target test accuracy (training wall time of worker 0,
evaluation excluded; worker 0 evaluates the latest global model it holds), final accuracy of the
final global model, mean worker idle fraction (time blocked on the server during training steps;
the one closing transfer of the final model is reported apart as ``final_sync_s``), mean local
steps per push, bytes pushed and pulled.

    .venv/bin/python -m bench.param_server [--steps 600] [--workload digits] [--target 0.96]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.harness import Bench

ROWS = [
    ("sync", {"mode": "sync"}),
    ("ssp(s=3)", {"mode": "ssp", "staleness": 3}),
    ("async", {"mode": "async"}),
    ("candidate(overwrite)", {"mode": "candidate", "merge": "overwrite"}),
    ("candidate(delay-corrected)", {"mode": "candidate", "merge": "delay-corrected"}),
]


def run_row(opts: dict, args: argparse.Namespace, out: Path) -> dict:
    import tandem

    cfg = {"workload": {"name": args.workload}, "codec": "dense", "workers": 4,
           "steps": args.steps, "batch_size": args.batch, "lr": args.lr, "momentum": 0.0,
           "seed": args.seed, "net": args.net, "eval_every": args.eval_every,
           "target_accuracy": args.target, "progress": False, "timeout_s": 120,
           "strategy": {"name": "param_server", "options": dict(opts, cap=args.cap)},
           "out": str(out)}
    s = tandem.train(cfg)
    workers = [r for r in s["results"] if r.get("role") == "worker"]
    server = next(r for r in s["results"] if r.get("role") == "server")
    n = len(workers)
    return {"time_to_target_s": s["time_to_target_s"],
            "final_acc": s["final_test_accuracy"],
            "idle_frac": sum(w["idle_fraction"] for w in workers) / n,
            "final_sync_s": sum(w["final_sync_s"] for w in workers) / n,
            "wall_s": s["wall_time_s"],
            "steps_per_push": sum(w["local_steps_per_round"] for w in workers) / n,
            "staleness": server["staleness_mean"],
            "push_MB": sum(w["push_bytes"] for w in workers) / 1e6,
            "pull_MB": sum(w["pull_bytes"] for w in workers) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="digits")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--cap", type=int, default=64)
    ap.add_argument("--net", default="100mbit:20ms")
    ap.add_argument("--target", type=float, default=0.96)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bench = Bench("param_server", ["row", "time_to_target_s", "speedup", "final_acc", "idle_frac",
                                   "final_sync_s", "wall_s", "steps_per_push", "staleness",
                                   "push_MB", "pull_MB"])
    measured = {}
    with tempfile.TemporaryDirectory(prefix="bench-ps-") as tmp:
        for name, opts in ROWS:
            measured[name] = run_row(opts, args, Path(tmp) / name.replace("(", "-").strip(")"))
    base = measured["sync"]["time_to_target_s"]
    for name, _ in ROWS:
        m = measured[name]
        t = m["time_to_target_s"]
        bench.row(row=name, speedup=base / t if base and t else None, **m)
    cand, sync = measured["candidate(delay-corrected)"], measured["sync"]
    speed = base / cand["time_to_target_s"] if base and cand["time_to_target_s"] else None
    bench.target("candidate(delay-corrected) time-to-target speedup over sync", speed, ">= 3")
    bench.target("candidate(delay-corrected) mean worker idle fraction", cand["idle_frac"],
                 "< 0.05")
    gap = None if cand["final_acc"] is None or sync["final_acc"] is None else \
        100 * (sync["final_acc"] - cand["final_acc"])
    bench.target("final accuracy: sync minus candidate (points)", gap, "<= 0.5")
    bench.note(f"{args.workload}, 4 workers + 1 server, net {args.net}, {args.steps} steps per "
               f"worker, batch {args.batch}, lr {args.lr}, cap {args.cap}, target {args.target}")
    bench.note("idle_frac excludes the one closing wait for the final model (final_sync_s)")
    bench.finish()


if __name__ == "__main__":
    main()
