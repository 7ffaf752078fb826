"""``tandem plan`` validated: its predictions against measured runs at 2, 4 and 8 workers.

Every row is one real run of the local launcher (``tandem.train``) on the mnist5k CNN with
emulated links (``--net``, default 100mbit:1ms, every process its own full-duplex link), and
the planner's prediction for the same strategy, codec and N on the same link (backend
``tandem``: the algorithms the emulator charges). Columns: measured and predicted step time
(median over worker ranks of the time between step records, the first ``skip`` steps and the last
left out; the mean over ``--repeats`` runs, each predicted from its own calibration), their error
``|pred - meas| / meas`` (target <= 20% per row; ``errs``: each run's), measured and predicted
bytes per worker per step (exact match required where they are a pure function of the codec:
everything but the bytes per step of the candidate parameter server and of bsp_shared, which
depend on timing; those rows compare the bytes of one push / one superstep exactly and report the
per-step figure's error).

How compute is calibrated (the 2-core machine runs up to 10 processes per run, so a worker's
compute grows with N, and differs from the planner's unloaded one-thread measurement): from the
run's own step records, each worker's own work per step is ``wall gap - comm_s - idle_s``
(forward, backward, optimizer step, bookkeeping; an injected straggler's sleep left out), and
the planner's compute model is the empirical distribution of those samples
(:meth:`tandem.plan.delays.ComputeTime.from_samples`); the injected straggler model is passed
as configured, and CPU work the planner timed on an idle thread (codecs, adds) is scaled by
the same slow-down (``cpu_scale`` = the run's mean compute / the planner's fastest one-thread
step; the codecs are timed by their fastest call too).
The software's cost per loopback hop (``overhead_ms``; every emulated collective also pays the
``2(N-1)`` hops of its join clock, :mod:`tandem.plan.network`) and per gossip round of
point-to-point messages (``p2p_overhead_ms``) are calibrated once per N from an ``allreduce`` and
a ``gossip`` run (dense) on a link too fast to matter (:func:`calibrate_overhead`). So what is
validated is everything *but* compute: the codec's messages, the collective costs, who waits
for whom (the expected maximum over N or over a neighbourhood), the parameter server's link,
the pipeline's overlap, bsp_shared's throughput. The planner's own unloaded compute
measurement is reported beside it (``plan_compute_ms``), to show how much the sharing costs.

The GOCO simulator (``tandem.sim``) is validated at 4 and 8 peers against real gossip runs
(regression, full-batch, straggler draws shared): its final optimisation error against the run's.

    .venv/bin/python -m bench.plan [--net 100mbit:1ms] [--workers 2,4,8] [--only allreduce]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import Bench

#: (row label, planner method, strategy options, codec, extra config)
CASES: list[tuple[str, str, dict[str, Any], str, dict[str, Any]]] = [
    ("allreduce/dense", "allreduce", {}, "dense", {}),
    ("allreduce/fp16", "allreduce", {}, "fp16", {}),
    ("allreduce/topk", "allreduce", {}, "topk", {}),
    ("allreduce/qsgd", "allreduce", {}, "qsgd", {}),
    ("allreduce/powersgd", "allreduce", {}, "powersgd", {}),
    ("allreduce/lgc", "allreduce", {}, "lgc", {}),
    ("allreduce/dense+stragglers", "allreduce", {}, "dense", {"stragglers": "0.2:3"}),
    ("pipeline(K=2)/dense", "pipeline", {"models": [{}, {}]}, "dense", {}),
    ("param_server:sync/dense", "param_server:sync", {"mode": "sync"}, "dense", {}),
    ("param_server:candidate/dense", "param_server:candidate", {"mode": "candidate"},
     "dense", {}),
    ("param_server:candidate/topk", "param_server:candidate", {"mode": "candidate"},
     "topk", {}),
    ("bsp_shared/dense", "bsp_shared", {}, "dense", {}),
    ("bsp_shared/dense+stragglers", "bsp_shared", {}, "dense", {"stragglers": "0.2:3"}),
    ("gossip:goco/dense+stragglers", "gossip:goco", {"mode": "goco"}, "dense",
     {"stragglers": "0.2:3"}),
    ("gossip:wait/dense+stragglers", "gossip:wait", {"mode": "wait"}, "dense",
     {"stragglers": "0.2:3"}),
    ("gossip:goco/topk", "gossip:goco", {"mode": "goco"}, "topk", {}),
    ("coded_ps/dense", "coded_ps", {"s": 1}, "dense", {"redundancy": 2}),
    ("local", "local", {}, "dense", {}),
]
#: rows whose bytes per step depend on timing (pushes per step, gradients per superstep)
TIMED_BYTES = ("param_server:candidate", "bsp_shared")


def _steps(run: Path) -> dict[int, list[dict[str, Any]]]:
    by: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for line in (run / "events.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "step":
            by[(rec["rank"], rec.get("role", "worker"))].append(rec)  # type: ignore[index]
    return by  # type: ignore[return-value]


def stage3(steps: int) -> int:
    """LGC's first compressed step in a run of ``steps`` (default stage fractions 10% + 20%),
    after the one that checks the autoencoders are in sync."""
    return round(0.1 * steps) + round(0.2 * steps) + 1


def window_mean(stages: list[dict[str, Any]], steps: int, skip: int) -> float:
    """A staged prediction (LGC: ``Prediction.extra["stages"]``) over the steps whose time
    :func:`measure` averages, the gaps that end at steps ``skip + 1 .. steps - 2``: each stage's
    step time weighed by its steps there (its share of ``steps``, rounded as the codec rounds
    it). At 60 steps and skip 5, LGC's warm-up (steps 0-5) has none of the 53, its autoencoder
    training (6-17) 12, where a whole run gives them 10 % and 20 %."""
    bounds, start = [], 0
    for st in stages[:-1]:
        n = round(st["share"] * steps)
        bounds.append((start, start + n))
        start += n
    bounds.append((start, steps))
    window = range(skip + 1, steps - 1)
    counts = [sum(1 for s in window if lo <= s < hi) for lo, hi in bounds]
    if not sum(counts):  # too short a run: measure() then takes every record, the whole run
        counts = [hi - lo for lo, hi in bounds]
    return sum(c * st["step_s"] for c, st in zip(counts, stages, strict=True)) / sum(counts)


def measure(run: Path, skip: int, lgc_from: int | bool = False, slept: float = 0.0
            ) -> dict[str, Any]:
    """Step time, own-work samples and bytes from a run's event log (``lgc_from``: bytes of
    the steps from there on only, a whole number of leader rotations; ``slept``: an injected
    straggler sleeps this multiple of its compute, which its sample leaves out).

    Own work per worker step is ``wall gap - comm_s - idle_s``. What makes workers wait for
    each other is how they differ at the same step, not the load they share, so each sample is
    the run's mean plus the worker's deviation from that step's mean over the workers, scaled
    by ``sqrt(k / (k - 1))`` for k workers (a deviation from a sample mean understates the
    spread: at k = 2 it halves the variance) (``own``); ``ratio`` is forward+backward
    (``compute_s``) over own work, what an injected straggler's delay multiplies."""
    by = _steps(run)
    workers = {k[0]: v for k, v in by.items() if k[1] == "worker"}
    others = {k: v for k, v in by.items() if k[1] != "worker"}
    sent, per_rank, comm = [], [], []
    at: dict[int, list[float]] = collections.defaultdict(list)
    fwd: list[float] = []
    for recs in workers.values():
        recs = sorted(recs, key=lambda r: r["wall"])
        use = recs[skip:-1] if len(recs) > skip + 2 else recs
        if len(use) >= 2:
            per_rank.append((use[-1]["wall"] - use[0]["wall"]) / (len(use) - 1))
        for a, b in zip(use, use[1:], strict=False):
            pure = b["compute_s"]
            if b.get("straggled") or b.get("injected"):
                if not slept:
                    continue
                pure = b["compute_s"] / (1.0 + slept)  # the sleep is factor x the compute
            gap = b["wall"] - a["wall"] - (b["compute_s"] - pure)
            at[b["step"]].append(max(1e-6, gap - (b.get("comm_s") or 0) - (b.get("idle_s") or 0)))
            fwd.append(pure)
        sent += [r["bytes_sent"] for r in use]
        comm += [(r.get("comm_s") or 0) + (r.get("idle_s") or 0) for r in use]
    everyone = [v for v in at.values() if len(v) >= 2] or list(at.values())
    mean = statistics.mean(x for v in at.values() for x in v)
    # deviations from a k-sample mean are sqrt((k-1)/k) of the workers' own spread: undo it
    own = [max(1e-6, mean + (x - statistics.mean(v)) * (len(v) / (len(v) - 1)) ** 0.5)
           if len(v) >= 2 else x for v in everyone for x in v]
    nonzero = [b for b in sent if b]
    if lgc_from:
        n = len(workers)
        last = max(r["step"] for recs in workers.values() for r in recs)
        stop = lgc_from + (last + 1 - lgc_from) // n * n
        sent = [r["bytes_sent"] for recs in workers.values() for r in recs
                if lgc_from <= r["step"] < stop]
    return {"step_s": statistics.median(per_rank), "own": own,
            "ratio": statistics.mean(fwd) / mean if fwd else 1.0,
            "bytes_per_step": statistics.mean(sent) if sent else 0.0,
            "bytes_mode": statistics.mode(nonzero) if nonzero else 0,
            "others": others, "workers": len(workers), "comm": comm}


def fit_compute(own: list[float], stragglers: str | None, partitions: int = 1,
                ratio: float = 1.0) -> Any:
    """The planner's compute model from a run's own-work samples: their empirical distribution
    (per partition), with the configured straggler model on top (its delay multiplies the
    forward+backward, ``ratio`` of the own work)."""
    from tandem.config import StragglerConfig
    from tandem.plan.delays import ComputeTime

    strag = StragglerConfig.parse(stragglers) if stragglers else None
    if strag is not None and strag.kind == "factor":
        strag = strag.model_copy(update={"factor": strag.factor * ratio})
    return ComputeTime.from_samples([x / partitions for x in own], strag)


def _fast_run(n: int, args: argparse.Namespace, out: Path, strategy: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    import tandem

    cfg = {"workload": {"name": args.workload}, "codec": "dense", "workers": n,
           "strategy": strategy, "steps": args.steps, "net": args.calib_net, "seed": 0,
           "eval_every": 10 * args.steps, "progress": False, "timeout_s": 120,
           "out": str(out / f"calib_{strategy['name']}_{n}")}
    tandem.train(cfg)
    return Path(cfg["out"])


def calibrate_overhead(n: int, args: argparse.Namespace, out: Path, profile: Any
                       ) -> tuple[float, float]:
    """The software's costs at ``n`` ranks on this machine, from runs on a link too fast to
    matter (``--calib-net``): per loopback hop (``overhead_s``: an ``allreduce`` + ``dense``
    run; per step, the smallest ``comm_s`` over the ranks, the last to arrive waits for no one,
    is the all-reduce's own time; its median, less the modelled transfer, over the larger of
    the ring's ``2(N-1)`` hops and the ``2(N-1)`` of the emulator's join clock beside it,
    :func:`tandem.plan.network.join_hops`) and per gossip round of point-to-point messages
    (``p2p_overhead_s``: a ``gossip`` run's step time less the planner's prediction without
    it)."""
    from tandem.plan.model import predict_one
    from tandem.plan.network import Network, Tier, join_hops
    from tandem.transport import costs

    run = _fast_run(n, args, out, {"name": "allreduce"})
    by_step: dict[int, list[float]] = collections.defaultdict(list)
    for (_, role), recs in _steps(run).items():
        for r in recs:
            if role == "worker" and args.skip <= r["step"] < args.steps - 1:
                by_step[r["step"]].append(r["comm_s"] + (r.get("idle_s") or 0.0))
    own = statistics.median(min(v) for v in by_step.values() if len(v) == n)
    fast = Network(Tier.parse(args.calib_net), backend="tandem")
    hops = max(costs.all_reduce(profile.dense_nbytes, n).hops, join_hops(n))
    hop = max(0.0, own - fast.all_reduce(profile.dense_nbytes, n).seconds) / hops
    m = measure(_fast_run(n, args, out, {"name": "gossip", "options": {"mode": "goco"}}),
                args.skip)
    compute = fit_compute(m["own"], None)
    net = Network(Tier.parse(args.calib_net), backend="tandem", overhead_s=hop,
                  p2p_overhead_s=0.0)
    pred = predict_one(profile, net, compute, "gossip:goco", "dense", n,
                       cpu_scale=compute.mean() / profile.compute_min_s)
    return hop, max(0.0, m["step_s"] - pred.step_s)


def combine(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the repeats of a case: mean measured and mean predicted step time, their
    error, each repeat's error, and the bytes checks of every repeat."""
    if len(rows) == 1:
        return rows[0]
    out = dict(rows[0])
    for key in ("meas_ms", "pred_ms", "compute_ms", "cpu_scale", "meas_bytes", "pred_bytes",
                "bytes_err"):
        if key in out:
            out[key] = statistics.mean(r[key] for r in rows)
    out["err"] = abs(out["pred_ms"] - out["meas_ms"]) / out["meas_ms"]
    out["errs"] = [round(r["err"], 4) for r in rows]
    out["exact_bytes_ok"] = int(all(r["exact_bytes_ok"] for r in rows))
    return out


def run_case(case: tuple, n: int, args: argparse.Namespace, out: Path, profile: Any,
             overhead: tuple[float, float]) -> dict[str, Any]:
    import tandem
    from tandem.plan.model import PlanOptions, predict_one
    from tandem.plan.network import Network, Tier

    label, method, sopts, codec, extra = case
    strategy = method.split(":")[0]
    if strategy == "bsp_shared":
        sopts = {**sopts, "machines": max(1, n // 2)}
    workload = {"name": args.workload, **({"redundancy": extra["redundancy"]}
                                          if "redundancy" in extra else {})}
    cfg = {"workload": workload, "strategy": {"name": strategy, "options": sopts},
           "codec": codec, "workers": n, "steps": args.steps, "net": args.net, "seed": 0,
           "eval_every": 10 * args.steps, "progress": False, "timeout_s": 120,
           "out": str(out / f"{label.replace('/', '_').replace(':', '_')}_{n}")}
    if "stragglers" in extra:
        cfg["stragglers"] = extra["stragglers"]
    tandem.train(cfg)
    # a coded worker computes d = 2 partitions per step; a pipeline record is a round of 2 models
    d = 2 if strategy in ("coded_ps", "pipeline") else 1
    slept = 0.0
    if "stragglers" in extra:  # goco's straggler stops at deadline_factor (1.5) x its compute
        f = float(extra["stragglers"].split(":")[1])
        slept = min(f, 0.5) if method == "gossip:goco" else f
    m = measure(Path(cfg["out"]), args.skip, lgc_from=codec == "lgc" and stage3(args.steps),
                slept=slept)
    compute = fit_compute(m["own"], extra.get("stragglers"), d, m["ratio"])
    link = Tier.parse(args.net)
    if strategy == "bsp_shared":  # agents: one per 2 workers; adds in shared memory
        net = Network(Tier.parse("100gbit:1us"), link, 2, backend="tandem",
                      overhead_s=overhead[0], p2p_overhead_s=overhead[1])
    else:
        net = Network(link, backend="tandem", overhead_s=overhead[0],
                      p2p_overhead_s=overhead[1])
    opts = PlanOptions(models=2, coded_s=1)
    # CPU work in this run is this much slower than the codecs' timings (both unloaded)
    cpu_scale = compute.mean() / profile.compute_min_s
    pred = predict_one(profile, net, compute, method, codec, n, opts, cpu_scale)
    row: dict[str, Any] = {"config": label, "N": n}
    meas_step = m["step_s"]
    pred_step = pred.step_s
    if strategy == "pipeline":  # a record is one round of K models
        pred_step = pred.extra["round_s"]
    elif "stages" in pred.extra:  # LGC: its stages as the measured window holds them
        pred_step = window_mean(pred.extra["stages"], args.steps, args.skip)
    row.update(meas_ms=1e3 * meas_step, pred_ms=1e3 * pred_step,
               err=abs(pred_step - meas_step) / meas_step)
    pred_bytes = pred.bytes_per_step * (2 if strategy == "pipeline" else 1)
    if method in TIMED_BYTES:
        if strategy == "param_server":
            exact_meas, exact_pred = m["bytes_mode"], pred.extra["push_bytes"]
            per = m["bytes_per_step"]
        else:
            agents = [r for v in m["others"].values() for r in v]
            exact_meas = statistics.mode([r["bytes_sent"] for r in agents])
            sent = sum(r["bytes_sent"] for r in agents)
            grads = sum(r.get("gradients", 0) for r in agents) / max(1, len(m["others"]))
            per = sent / max(1.0, grads)
            machines = pred.extra["machines"]
            exact_pred = (pred.bytes_per_step * pred.extra["grads_per_update"] / machines
                          if machines > 1 else 0)
        row.update(meas_bytes=per, pred_bytes=pred_bytes,
                   bytes_err=abs(pred_bytes - per) / per if per else 0.0,
                   exact_bytes_ok=int(round(exact_pred) == exact_meas),
                   exact_what="push" if strategy == "param_server" else "superstep")
    else:
        row.update(meas_bytes=m["bytes_per_step"], pred_bytes=pred_bytes)
        row["exact_bytes_ok"] = int(abs(row["pred_bytes"] - row["meas_bytes"]) < 0.5)
    row.update(compute_ms=1e3 * compute.mean(), plan_compute_ms=1e3 * profile.compute_s,
               overhead_ms=1e3 * overhead[0], p2p_overhead_ms=1e3 * overhead[1],
               cpu_scale=cpu_scale)
    return row


def goco_sim_rows(bench: Bench, out: Path) -> None:
    """The simulator against real gossip runs: same seeds, same straggler draws."""
    import numpy as np

    import tandem
    from tandem.sim import SimConfig, simulate

    steps, seed = 40, 4
    for n in (4, 8):
        cfg = {"strategy": {"name": "gossip", "options": {"full_batch": True,
                                                          "topology": "ring"}},
               "workload": {"name": "regression", "redundancy": 2, "options": {"n": 1024}},
               "workers": n, "steps": steps, "lr": 0.1, "seed": seed, "stragglers": "0.3:2",
               "eval_every": 20, "progress": False, "out": str(out / f"goco_sim_{n}")}
        res = tandem.train(cfg, timeout_s=240)["results"]
        traj = np.array([r["trajectory"] for r in res]).T
        sim = simulate(SimConfig(devices=n, d=2, p=0.3, steps=steps, lr=0.1, seed=seed,
                                 workload_options={"n": 1024}))
        flags = np.array([[bool(r.get("straggled")) for r in sorted(
            (json.loads(x) for x in (out / f"goco_sim_{n}" / f"events.rank{k}.jsonl")
             .read_text().splitlines()), key=lambda r: r.get("wall", 0.0))
            if r.get("kind") == "step"] for k in range(n)]).T
        real, pred = float(traj[-1].mean()), float(sim.per_device[-1].mean())
        worst = float(np.max(np.abs(traj - sim.per_device) / np.maximum(np.abs(traj), 1e-9)))
        bench.row(config=f"sim goco vs gossip (opt error at step {steps})", N=n,
                  err=abs(pred - real) / real, meas_opt_error=real, pred_opt_error=pred,
                  worst_step_err=worst, same_stragglers=int((flags == sim.straggled).all()))
        bench.target(f"goco simulator final error vs {n}-peer run (rel.)",
                     abs(pred - real) / real, "<= 0.2")
        bench.target(f"goco simulator straggler draws equal the {n}-peer run's",
                     int((flags == sim.straggled).all()), ">= 1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="mnist5k")
    ap.add_argument("--net", default="100mbit:1ms")
    ap.add_argument("--calib-net", default="10gbit:1us")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--workers", default="2,4,8")
    ap.add_argument("--only", default="", help="run the cases whose label contains one of "
                    "these (comma-separated)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per row (and per calibration); "
                    "a row compares the mean measured step with the mean prediction")
    ap.add_argument("--no-sim", action="store_true")
    args = ap.parse_args()

    from tandem.plan.measure import profile as make_profile

    prof = make_profile(args.workload, codecs=sorted({c[3] for c in CASES}))
    bench = Bench("plan", ["config", "N", "meas_ms", "pred_ms", "err", "meas_bytes",
                           "pred_bytes", "exact_bytes_ok", "compute_ms", "plan_compute_ms",
                           "meas_opt_error", "pred_opt_error"])
    errs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        cases = [c for c in CASES
                 if not args.only or any(o in c[0] for o in args.only.split(","))]
        for n in [int(x) for x in args.workers.split(",")] if cases else []:
            cal = [calibrate_overhead(n, args, Path(tmp) / f"r{r}", prof)
                   for r in range(args.repeats)]
            overhead = (statistics.mean(c[0] for c in cal), statistics.mean(c[1] for c in cal))
            print(f"[plan] N={n}: {1e3 * overhead[0]:.2f} ms per collective hop, "
                  f"{1e3 * overhead[1]:.2f} ms per gossip round (calibration)")
            for case in cases:
                row = combine([run_case(case, n, args, Path(tmp) / f"r{r}", prof, overhead)
                               for r in range(args.repeats)])
                bench.row(**row)
                errs.append(row["err"])
                bench.target(f"{row['config']} N={n} step-time error", row["err"], "<= 0.2")
                bench.target(f"{row['config']} N={n} bytes exact", row["exact_bytes_ok"],
                             ">= 1")
        if not args.no_sim:
            goco_sim_rows(bench, Path(tmp))
    if errs:
        bench.note(f"step-time error over {len(errs)} rows: median {statistics.median(errs):.3f}"
                   f", max {max(errs):.3f}")
    bench.note(f"link {args.net} per process (backend tandem); compute calibrated from each "
               f"run's own records (module docstring); {args.repeats} runs per row and per "
               "calibration")
    bench.finish()


if __name__ == "__main__":
    main()
