"""bsp_shared (M2) against synchronous all-reduce with 4 workers, one of them 3x slower.

Compute is emulated: the digits MLP's forward pass in training mode sleeps a fixed
``--compute-ms`` (default 20 ms, an accelerator's step time) on top of its real ~0.3 ms, so that
4 worker processes plus agents on this 2-core machine measure the *method* (who waits for whom)
rather than the CPU contention between processes. ``--slow-worker 3:3`` makes worker 3's whole
step (sleep + real compute) 3x as long.

Rows, measured side by side in one run, each averaged over ``--seeds`` seeds:

* ``solo fast`` / ``solo slow``: one worker alone (strategy ``local``), fast and 3x slow; the sum
  of the workers' solo speeds, 3 x fast + slow, is the ideal throughput;
* ``allreduce``: plain synchronous BSP, everyone waits for the slowest each step;
* ``bsp_shared count=4``: supersteps of 4 gradients (the same gradients per update as
  all-reduce, so accuracy at a fixed gradient budget compares like with like);
* ``bsp_shared period=50ms``: supersteps by wall clock (more gradients per update, fewer updates).

Columns: gradients per second (applied gradients / training wall time, evaluation excluded),
time to ``--target`` test accuracy, test accuracy once the budget of ``steps x 4`` gradients is
spent. Targets: bsp_shared (count=4) throughput >= 0.9 x the sum of solo speeds; its accuracy at
the gradient budget within 1 point of all-reduce's.

    .venv/bin/python -m bench.bsp_shared [--seeds 3] [--steps 150] [--compute-ms 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

import tandem
from bench.harness import Bench
from tandem.config import WorkloadConfig
from tandem.workloads import build_workload
from tandem.workloads.base import Workload


class EmulatedCompute(torch.nn.Module):
    """Wraps a model; a training-mode forward also sleeps ``seconds`` (emulated accelerator)."""

    def __init__(self, inner_fn: Any, seconds: float) -> None:
        super().__init__()
        self.inner = inner_fn()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.seconds > 0:
            time.sleep(self.seconds)
        return self.inner(x)


def emulated_digits(seed: int, compute_s: float) -> Workload:
    work = build_workload(WorkloadConfig(name="digits"), seed)
    work.model_fn = partial(EmulatedCompute, work.model_fn, compute_s)
    return work


def run(cfg: dict[str, Any], work: Workload) -> dict[str, Any]:
    summary = tandem.train(cfg, workload=work)
    results = summary.get("results", [])
    agents = [r for r in results if r.get("role") == "agent"]
    wall = summary["wall_time_s"]
    if cfg["strategy"]["name"] == "local":
        grads = summary["steps"]
    elif agents:
        grads = agents[0]["applied"]
    else:
        grads = summary["steps"] * cfg["workers"]
    info = summary.get("info", {})
    return {"gps": grads / wall if wall else None, "tta": summary["time_to_target_s"],
            "acc": summary["final_test_accuracy"], "grads": grads, "wall": wall,
            "supersteps": agents[0]["supersteps"] if agents else None,
            "staleness": info.get("bsp_mean_staleness")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150, help="steps per worker (budget = 4 x steps)")
    ap.add_argument("--compute-ms", type=float, default=20.0)
    ap.add_argument("--target", type=float, default=0.93)
    args = ap.parse_args()
    workers, slow = 4, 3.0
    tmp = Path(tempfile.mkdtemp(prefix="bench-bsp-"))
    base = {"workload": {"name": "digits"}, "workers": workers, "steps": args.steps,
            "batch_size": 32, "lr": 0.1, "progress": False, "eval_every": 10,
            "target_accuracy": args.target, "timeout_s": 120}
    solo_steps = max(30, args.steps // 2)
    configs = {
        "solo fast": {"strategy": "local", "steps": solo_steps},
        "solo slow (3x)": {"strategy": "local", "steps": solo_steps, "slow_workers": ["0:3"]},
        "allreduce": {"strategy": "allreduce", "slow_workers": [f"3:{slow:g}"]},
        "bsp_shared count=4": {"strategy": {"name": "bsp_shared",
                                            "options": {"grads_per_superstep": workers}},
                               "slow_workers": [f"3:{slow:g}"]},
        "bsp_shared period=50ms": {"strategy": {"name": "bsp_shared",
                                                "options": {"period_s": 0.05}},
                                   "slow_workers": [f"3:{slow:g}"]},
    }
    measured: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    for seed in range(args.seeds):
        # by module name, not __main__, so the spawned workers unpickle the model class
        from bench import bsp_shared as me

        work = me.emulated_digits(seed, args.compute_ms / 1000)
        for name, extra in configs.items():  # interleaved: every row sees the same machine load
            cfg = dict(base, **extra, seed=seed, out=str(tmp / f"{name.split()[0]}-{seed}"))
            if isinstance(cfg["strategy"], str):
                cfg["strategy"] = {"name": cfg["strategy"]}
            measured[name].append(run(cfg, work))
            print(f"{name} seed {seed}: {measured[name][-1]}", flush=True)

    def mean(name: str, key: str) -> float | None:
        vals = [m[key] for m in measured[name] if m[key] is not None]
        return statistics.fmean(vals) if len(vals) == len(measured[name]) and vals else None

    ideal = 3 * mean("solo fast", "gps") + mean("solo slow (3x)", "gps")
    b = Bench("bsp_shared", ["config", "gradients/s", "x ideal", "time_to_target_s",
                             "acc_at_budget", "gradients", "supersteps", "staleness"])
    for name in configs:
        gps = mean(name, "gps")
        b.row(config=name, **{"gradients/s": gps,
                              "x ideal": None if name.startswith("solo") else gps / ideal,
                              "time_to_target_s": mean(name, "tta"),
                              "acc_at_budget": mean(name, "acc"), "gradients": mean(name, "grads"),
                              "supersteps": mean(name, "supersteps"),
                              "staleness": mean(name, "staleness")})
    b.target("bsp_shared throughput / sum of solo speeds",
             mean("bsp_shared count=4", "gps") / ideal, ">= 0.9")
    b.target("|accuracy at budget: bsp_shared - allreduce|",
             abs(mean("bsp_shared count=4", "acc") - mean("allreduce", "acc")), "<= 0.01")
    b.note(f"ideal = 3 x solo fast + solo slow = {ideal:.1f} gradients/s; emulated compute "
           f"{args.compute_ms:g} ms per step; {args.seeds} seed(s); budget {args.steps * workers} "
           f"gradients; time to {args.target} accuracy (None: not reached in every seed)")
    b.finish()


if __name__ == "__main__":
    main()
