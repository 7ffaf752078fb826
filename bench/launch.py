"""Worker start-up: how long the local launcher takes to start N workers and collect their results,
with workers forked from a server that imported torch once (``forkserver``, the default) against
fresh interpreters (``spawn``).

Why it matters: a short run, a sweep of many runs, and the test suite all pay start-up once per
launch; with ``spawn`` each worker imports torch again, N imports at once on a machine with fewer
cores than workers. Each method is measured in its own fresh Python process (so the first
``forkserver`` launch includes starting the server), ``--launches`` times in a row, side by side in
this one run; a last pair of rows times a whole short ``tandem.train`` run (digits, allreduce,
``--steps`` steps) under each method.

    python -m bench.launch [--workers 4] [--launches 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import Bench

ROOT = Path(__file__).resolve().parent.parent


def report_rank() -> int:
    """The job each worker runs: nothing but proving it started (its rank)."""
    return int(os.environ["RANK"])


def _measure(method: str, workers: int, launches: int, steps: int) -> dict[str, object]:
    """Run this module's ``--child`` mode in a fresh interpreter with ``method``; its JSON line."""
    env = dict(os.environ, TANDEM_START_METHOD=method)
    out = subprocess.run(
        [sys.executable, "-m", "bench.launch", "--child", "--workers", str(workers),
         "--launches", str(launches), "--steps", str(steps)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"bench.launch --child with {method} failed ({out.returncode}):\n"
                         + out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(workers: int, launches: int, steps: int) -> None:
    import time

    import tandem
    from tandem.launch import spawn

    times = []
    for _ in range(launches):
        t0 = time.perf_counter()
        ranks = spawn(report_rank, workers, timeout_s=300)
        times.append(time.perf_counter() - t0)
        assert ranks == list(range(workers)), ranks
    train_s = None
    if steps:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            tandem.train({"workload": {"name": "digits"}, "strategy": "allreduce",
                          "workers": workers, "steps": steps, "progress": False, "out": tmp})
            train_s = time.perf_counter() - t0
    print(json.dumps({"launch_s": times, "train_s": train_s}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps of the tandem.train row (0: none)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.workers, args.launches, args.steps)
        return
    b = Bench("launch", ["method", "workers", "first_launch_s", "later_launch_s",
                         "train_run_s"])
    got = {}
    for method in ("spawn", "forkserver"):
        got[method] = m = _measure(method, args.workers, args.launches, args.steps)
        later = statistics.median(m["launch_s"][1:]) if len(m["launch_s"]) > 1 else None
        m["later"] = later
        b.row(method=method, workers=args.workers, first_launch_s=m["launch_s"][0],
              later_launch_s=later, train_run_s=m["train_s"])
    spawn_s = statistics.median(got["spawn"]["launch_s"])
    if got["forkserver"]["later"] is not None:
        b.target("forkserver later launch / spawn launch", got["forkserver"]["later"] / spawn_s,
                 "<= 0.2")
    b.target("forkserver first launch / spawn launch", got["forkserver"]["launch_s"][0] / spawn_s,
             "<= 1.0")
    if args.steps:
        b.note(f"whole {args.steps}-step run (after the launches, same interpreter), forkserver / "
               f"spawn: {got['forkserver']['train_s'] / got['spawn']['train_s']:.3f} (no target: "
               "the run's own work, building the workload and training, is the same under both)")
    b.note("each method in its own fresh interpreter; launch = start N workers, each returns its "
           "rank, all reaped; later_launch_s = median of launches 2..N in that interpreter")
    b.finish()


if __name__ == "__main__":
    main()
