"""Worker start-up: how long the local launcher takes to start N workers and collect their results,
with workers forked from a server that imported torch once (``forkserver``, the default) against
fresh interpreters (``spawn``).

Why it matters: a short run, a sweep of many runs, and the test suite all pay start-up once per
launch; with ``spawn`` each worker imports torch again, N imports at once on a machine with fewer
cores than workers. Each method is measured in its own fresh Python process, side by side in this
one run: a short ``tandem.train`` run (digits, allreduce, ``--steps`` steps; under ``forkserver``
it includes starting the server, as one ``tandem train`` command does), ``--launches`` bare
launches, and the same run again.

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
import time
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


def _train_s(workers: int, steps: int) -> float:
    import tandem

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tandem.train({"workload": {"name": "digits"}, "strategy": "allreduce",
                      "workers": workers, "steps": steps, "progress": False, "out": tmp})
        return time.perf_counter() - t0


def _child(workers: int, launches: int, steps: int) -> None:
    from tandem.launch import spawn

    first_run = _train_s(workers, steps)  # what one `tandem train` pays in a fresh process
    times = []
    for _ in range(launches):
        t0 = time.perf_counter()
        ranks = spawn(report_rank, workers, timeout_s=300)
        times.append(time.perf_counter() - t0)
        assert ranks == list(range(workers)), ranks
    print(json.dumps({"first_run_s": first_run, "launch_s": times,
                      "later_run_s": _train_s(workers, steps)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="steps of each tandem.train run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.workers, args.launches, args.steps)
        return
    b = Bench("launch", ["method", "workers", "first_run_s", "launch_s", "later_run_s"])
    got = {}
    for method in ("spawn", "forkserver"):
        got[method] = m = _measure(method, args.workers, args.launches, args.steps)
        b.row(method=method, workers=args.workers, first_run_s=m["first_run_s"],
              launch_s=statistics.median(m["launch_s"]), later_run_s=m["later_run_s"])
    sp, fs = got["spawn"], got["forkserver"]
    b.target("forkserver / spawn, first run in a fresh process (one `tandem train`)",
             fs["first_run_s"] / sp["first_run_s"], "<= 1.0")
    b.target("forkserver / spawn, a launch after the first",
             statistics.median(fs["launch_s"]) / statistics.median(sp["launch_s"]), "<= 0.2")
    b.target("forkserver / spawn, a run after the first",
             fs["later_run_s"] / sp["later_run_s"], "<= 0.5")
    b.note(f"each method in its own fresh interpreter, in this order: a {args.steps}-step digits "
           f"allreduce run (first_run_s), {args.launches} launches of {args.workers} workers that "
           "only return their rank (launch_s: median), the same run again (later_run_s)")
    b.finish()


if __name__ == "__main__":
    main()
