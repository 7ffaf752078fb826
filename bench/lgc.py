"""Does LGC buy accuracy per byte? LGC-PS (on the server), LGC-RAR, top-k and random-k at
exactly LGC-PS's bytes, PowerSGD at the nearest budget it has, and dense: 3 seeds each.

Every row trains the same job (4 workers, batch 32, lr 0.05, codec momentum 0.9 and none in
the optimizer, iid shards) on the workload whose workers' gradients are the most alike of the
image workloads ``bench/correlation.py`` measured (Fashion-MNIST's CNN, 46,730 parameters,
10,000 test images; mnist5k's 1,000 when Fashion-MNIST is not installed: ``make bench-data``).
The link is not emulated: this benchmark counts bytes, and every byte goes through the meter.

Rows, per seed, in this order (the references are sized from that seed's LGC-PS run):

* ``lgc-ps server``: ``--strategy param_server --codec lgc --codec-opt variant=ps``, sync;
* ``topk = lgc-ps bytes``: top-k on the same server with LGC's position encoding
  (``positions=packed``), LGC's warm-up ramp (``warmup_start`` 0.05 over LGC's warm-up steps),
  and the density after the ramp solved so that its whole-run push bytes, framing included,
  equal LGC-PS's (the largest that does not exceed them; the ``bytes ÷ lgc-ps`` column is the
  metered ratio);
* ``randomk = lgc-ps bytes``: random-k on the server (its positions never travel: every byte is
  a value), its count solved the same way, with LGC's residual cap (``ef_clip`` 2: without it
  random-k at these densities diverged to a non-finite gradient);
* ``dense``: on the same server (the byte unit: a dense push);
* ``lgc-rar allreduce``: LGC-RAR at ``bench/codecs.py``'s density under all-reduce;
* ``powersgd r1 allreduce``: PowerSGD at rank 1, the smallest budget it has (far above LGC's).

Columns: test accuracy (mean and sample standard deviation over the seeds, and each seed's),
bytes a worker sends per step over the whole run (pushes for the server rows, the collectives'
bytes for the all-reduce rows), that as a fraction of a dense push and of LGC-PS's, and LGC's
codec cost: milliseconds per step amortised over the run (the server's autoencoder training
and decoding plus every worker's encode and correction, or RAR's training plus encode/decode),
and per stage.

    .venv/bin/python -m bench.lgc                  # make bench: 400 steps, 3 seeds (~25 min)
    .venv/bin/python -m bench.lgc --long           # the docs: 2,000 steps (lgc_long.json)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.harness import Bench

BUDGET_ROWS = ("topk = lgc-ps bytes", "randomk = lgc-ps bytes")
ROWS = ["lgc-ps server", *BUDGET_ROWS, "dense", "lgc-rar allreduce", "powersgd r1 allreduce"]
LGC_PS = {"variant": "ps", "dense_first_last": False, "ratio": 2.1e-3, "momentum": 0.9}
LGC_RAR = {"variant": "rar", "dense_first_last": False, "ratio": 1.5e-3, "momentum": 0.9}
WARMUP_START = 0.05  # LGC's default ramp start; the top-k reference ramps alike (ramp_start)
PUSH_HEADER_B = 40  # the parameter server's push header: 5 int64
COLUMNS = ["row", "strategy", "acc_mean", "acc_sd", "accs", "acc_se", "sent_B/step",
           "vs_dense_push", "vs_lgc_ps", "codec_ms/step", "stage_ms", "stage_B/step", "detail"]


def framing(tensors: list[tuple[int, ...]]) -> int:
    """Bytes a ``send_message`` adds to its tensors' own: the length word and the header
    (count, then dtype, ndim and the dims of each tensor; one dim each here), 8 bytes each."""
    return 8 + 8 * (1 + sum(2 + len(s) for s in tensors))


def ramp_start() -> float:
    """Where LGC-PS's warm-up ramp starts (its ``warmup_start``): the top-k reference's too."""
    return float(LGC_PS.get("warmup_start", WARMUP_START))


def topk_push_bytes(sizes: list[int], ratio: float, warmup: int, steps: int,
                    gather_world: int | None = None, start: float = WARMUP_START) -> int:
    """Whole-run bytes one worker sends with packed top-k (``steps`` steps): the codec's own
    ``ratio_at`` and ``keep_count`` and LGC's position width. On the server (default) each
    push adds the framing of ``[push header, values, positions]`` (the metadata sent once is
    left out: a few hundred bytes; the metered ratio shows it); under all-reduce
    (``gather_world`` = N) each step is an all-gather of the code, ``(N - 1)`` codes sent."""
    from tandem.codecs import make_codec
    from tandem.codecs.positions import positions_nbytes
    from tandem.codecs.topk import keep_count

    codec = make_codec("topk", {"ratio": ratio, "warmup_steps": warmup,
                                "warmup_start": start, "positions": "packed"})
    dim, total = sum(sizes), 0
    for t in range(steps):
        k = sum(keep_count(n, codec.ratio_at(t)) for n in sizes)
        code = 4 * k + positions_nbytes(k, dim)
        total += ((gather_world - 1) * code if gather_world
                  else PUSH_HEADER_B + framing([(5,), (k,), (1,)]) + code)
    return total


def solve_topk_ratio(sizes: list[int], budget: float, warmup: int, steps: int,
                     gather_world: int | None = None, start: float = WARMUP_START) -> float:
    """The largest density after the ramp (from ``start``) whose whole-run bytes stay within
    ``budget`` (the smallest density when even that spends more)."""
    def cost(r: float) -> int:
        return topk_push_bytes(sizes, r, warmup, steps, gather_world, start)

    lo, hi = 1.0 / sum(sizes), 1.0
    if cost(lo) > budget:
        return lo
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid)
    return lo


def solve_randomk_ratio(dim: int, budget: float, steps: int) -> float:
    """Random-k's density whose whole-run push bytes (``[push header, values]``) stay within
    ``budget``: ``k`` values of 4 bytes per push, ``k / D`` exactly (so ``keep_count`` is k)."""
    per_push = budget / steps - PUSH_HEADER_B - framing([(5,), (1,)])
    return max(1, int(per_push // 4)) / dim


def config(row: str, args: argparse.Namespace, seed: int, workload: dict[str, Any],
           budget: dict[str, float]) -> dict[str, Any]:
    strategy, opts, codec = "param_server", {"mode": "sync"}, {"name": "dense",
                                                                "options": {"momentum": 0.9}}
    if row == "lgc-ps server":
        codec = {"name": "lgc", "options": LGC_PS}
    elif row.startswith("topk"):
        codec = {"name": "topk", "options": {
            "ratio": budget["topk"], "warmup_steps": budget["warmup"],
            "warmup_start": ramp_start(), "positions": "packed", "momentum": 0.9}}
    elif row.startswith("randomk"):
        codec = {"name": "randomk", "options": {"ratio": budget["randomk"], "momentum": 0.9,
                                                "ef_clip": 2.0}}
    elif row == "lgc-rar allreduce":
        strategy, opts, codec = "allreduce", {}, {"name": "lgc", "options": LGC_RAR}
    elif row.startswith("powersgd"):
        strategy, opts = "allreduce", {}
        codec = {"name": "powersgd", "options": {"rank": 1, "momentum": 0.9}}
    return {"workload": workload, "workers": 4, "steps": args.steps, "batch_size": 32,
            "lr": 0.05, "momentum": 0.0, "seed": seed, "eval_every": args.eval_every,
            "progress": False, "timeout_s": 300, "codec": codec,
            "strategy": {"name": strategy, "options": opts}}


def measure(row: str, cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """One run: accuracy, bytes a worker sent per step, LGC's stage bytes and codec time."""
    import tandem
    from tandem.errors import TandemError

    try:
        s = tandem.train({**cfg, "out": str(out)})
    except TandemError as err:  # a diverged reference is a result, not a crash of the bench
        print(f"[lgc] {row}: failed: {err}", flush=True)
        return {"acc": None, "sent": None, "failed": str(err).splitlines()[0][:200],
                "stage_B": None, "stage_ms": None, "codec_ms": None}
    steps, info = cfg["steps"], s.get("info", {})
    workers = [r for r in s["results"] if r.get("role", "worker") == "worker"]
    ps = cfg["strategy"]["name"] == "param_server"
    sent = (sum(w["push_bytes"] for w in workers) / len(workers) / steps if ps
            else s["bytes_sent_per_worker_per_step"])
    got = {"acc": s["final_test_accuracy"], "sent": sent,
           "stage_B": None, "stage_ms": None, "codec_ms": None}
    if cfg["codec"]["name"] != "lgc":
        return got
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    steps_ev = [e for e in events if e.get("kind") == "step"
                and e.get("role", "worker") == "worker"]
    if ps:
        stage_of = [e.get("lgc_stage") for e in steps_ev]
        per_worker = [v for k, v in info.items() if k.endswith("_lgc_codec_ms_total_per_stage")]
        worker_ms = [sum(v[j] for v in per_worker) / max(1, len(per_worker)) for j in range(3)]
        train = (info.get("lgc_ae_train_ms_per_step") or 0) * (info.get("lgc_ae_train_rounds")
                                                                 or 0)
        decode = (info.get("lgc_decode_ms_per_round") or 0) * (info.get("lgc_decode_rounds") or 0)
        totals = [worker_ms[0], worker_ms[1] + train, worker_ms[2] + decode]
    else:
        codec = info.get("codec") or {}
        w, a = codec.get("stage_lengths") or (0, 0)
        stage_of = [1 if int(e["step"]) < w else 2 if int(e["step"]) < w + a else 3
                    for e in steps_ev]
        n3 = max(0, steps - w - a)
        totals = [None, (codec.get("ae_train_ms_per_step") or 0) * a,  # warm-up: not timed
                  (codec.get("codec_ms_per_step") or 0) * n3]
    by_stage = [[e["bytes_sent"] for e, st in zip(steps_ev, stage_of, strict=True) if st == j]
                for j in (1, 2, 3)]
    ranks = max(1, len({e.get("rank") for e in steps_ev}))
    counts = [len(b) / ranks for b in by_stage]  # steps (rounds) in each stage
    got["stage_B"] = [round(sum(b) / len(b), 1) if b else None for b in by_stage]
    got["stage_ms"] = [round(t / c, 3) if c and t is not None else None
                       for t, c in zip(totals, counts, strict=True)]
    got["codec_ms"] = sum(t for t in totals if t is not None) / steps
    got["k"] = info.get("lgc_k") or (info.get("codec") or {}).get("k")
    return got


def lgc_warmup_steps(steps: int) -> int:
    """LGC-PS's warm-up length in a run of ``steps`` (the codec's own stage schedule)."""
    from tandem.codecs import make_codec

    codec = make_codec("lgc", LGC_PS)
    codec.set_total_steps(steps)
    return codec.stage_lengths()[0]


def pick_workload(name: str) -> tuple[dict[str, Any], list[int], int]:
    """The workload spec (mnist5k when ``name``'s data is not installed), its model's
    parameter sizes and its test-set size."""
    from tandem.config import WorkloadConfig
    from tandem.errors import DataError
    from tandem.workloads import build_workload

    try:
        spec, wl = {"name": name}, build_workload(WorkloadConfig(name=name), 0)
    except DataError as err:
        print(f"[lgc] {name} unavailable ({err}); falling back to mnist5k", flush=True)
        spec = {"name": "mnist5k"}
        wl = build_workload(WorkloadConfig(**spec), 0)
    sizes = [p.numel() for p in wl.model_fn().parameters() if p.requires_grad]
    return spec, sizes, len(wl.test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--long", action="store_true", help="2,000 steps, written to lgc_long.json")
    ap.add_argument("--steps", type=int, default=None, help="default 400 (2,000 with --long)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workload", default="fashion")
    ap.add_argument("--only", default="", help="comma-separated rows (lgc-ps server always runs)")
    ap.add_argument("--lgc-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="override an option of the LGC-PS row (tuning trials; the references "
                    "are sized to its bytes as always)")
    ap.add_argument("--results", default="", help="directory for the JSON (default "
                    "bench/results; give another one for trials)")
    args = ap.parse_args()
    if args.results:
        import bench.harness

        bench.harness.RESULTS = Path(args.results)
    for item in args.lgc_opt:
        key, _, value = item.partition("=")
        LGC_PS[key] = yaml.safe_load(value)
    args.steps = args.steps or (2000 if args.long else 400)
    args.eval_every = max(1, args.steps // 4)
    rows = [r for r in ROWS if not args.only or r == ROWS[0] or r in args.only.split(",")]
    workload, sizes, n_test = pick_workload(args.workload)
    dim = sum(sizes)
    warmup = lgc_warmup_steps(args.steps)  # the top-k reference ramps over LGC's warm-up
    bench = Bench("lgc_long" if args.long else "lgc", COLUMNS)
    got: dict[str, list[dict[str, Any]]] = {r: [] for r in rows}
    with tempfile.TemporaryDirectory(prefix="bench-lgc-") as tmp:
        for seed in range(args.seeds):
            budget: dict[str, float] = {"warmup": warmup}
            for row in rows:
                if row in BUDGET_ROWS and "topk" not in budget:  # LGC-PS failed: no budget
                    got[row].append({"acc": None, "sent": None, "failed": "LGC-PS failed",
                                     "stage_B": None, "stage_ms": None, "codec_ms": None})
                    continue
                cfg = config(row, args, seed, workload, budget)
                m = measure(row, cfg, Path(tmp) / f"{seed}-{rows.index(row)}")
                m["ratio"] = cfg["codec"]["options"].get("ratio") if row in BUDGET_ROWS else None
                got[row].append(m)
                print(f"[lgc] seed {seed} {row}: acc {m['acc']}, {m['sent']} B/step",
                      flush=True)
                if row == "lgc-ps server" and m["sent"] is not None:
                    total = m["sent"] * args.steps
                    budget["topk"] = solve_topk_ratio(sizes, total, warmup, args.steps,
                                                      start=ramp_start())
                    budget["randomk"] = solve_randomk_ratio(dim, total, args.steps)
    report(bench, got, args, workload, dim, n_test)


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def report(bench: Bench, got: dict[str, list[dict[str, Any]]], args: argparse.Namespace,
           workload: dict[str, Any], dim: int, n_test: int) -> None:
    """One row per configuration over the seeds that finished (a failed seed is listed, not
    averaged), and the targets."""
    dense_push = 4 * dim + PUSH_HEADER_B + framing([(5,), (1,)])
    done = {row: [m for m in runs if m["acc"] is not None] for row, runs in got.items()}
    lgc_sent = mean([m["sent"] for m in done["lgc-ps server"]])
    stats: dict[str, tuple[float, float]] = {}
    for row, runs in got.items():
        ok = done[row]
        accs = [m["acc"] for m in ok]
        acc, sent = mean(accs), mean([m["sent"] for m in ok])
        sd = statistics.stdev(accs) if len(accs) > 1 else None
        if acc is not None and sd is not None:
            stats[row] = (acc, sd)
        lgc = bool(ok) and ok[0]["stage_B"] is not None
        failed = "; ".join(f"seed {i}: {m['failed']}" for i, m in enumerate(runs)
                           if m.get("failed"))
        sized = {"topk = lgc-ps bytes": "topk", "randomk = lgc-ps bytes": "randomk"}.get(row)
        ratios = sorted({f"{m['ratio']:.3g}" for m in runs if m.get("ratio")}) if sized else []
        detail = " ".join(x for x in (f"K={ok[0].get('k')}" if lgc else "",
                                      f"ratio after ramp {'/'.join(ratios)}" if ratios else "",
                                      failed) if x)
        bench.row(row=row, strategy="allreduce" if "allreduce" in row else "param_server",
                  acc_mean=acc, acc_sd=sd,
                  accs=" ".join("failed" if m["acc"] is None else f"{m['acc']:.4f}"
                                for m in runs),
                  acc_se=None if acc is None else math.sqrt(acc * (1 - acc) / n_test), **{
                      "sent_B/step": sent,
                      "vs_dense_push": None if sent is None else sent / dense_push,
                      "vs_lgc_ps": None if sent is None or not lgc_sent else sent / lgc_sent,
                      "codec_ms/step": mean([m["codec_ms"] for m in ok]) if lgc else None,
                      "stage_ms": ok[0]["stage_ms"] if lgc else None,
                      "stage_B/step": ok[0]["stage_B"] if lgc else None,
                      "detail": detail or None})
    lgc_acc, lgc_sd = stats.get("lgc-ps server", (None, None))
    for ref in BUDGET_ROWS:
        sent = mean([m["sent"] for m in done.get(ref, [])])
        if ref in got:
            bench.target(f"{ref}: |its bytes / LGC-PS's - 1|",
                         abs(sent / lgc_sent - 1) if sent and lgc_sent else None, "<= 0.02")
    ref_acc, ref_sd = stats.get("topk = lgc-ps bytes", (None, None))
    if "topk = lgc-ps bytes" in got:
        spread = 100 * max(lgc_sd or 0, ref_sd or 0)
        bench.target("LGC-PS minus top-k at its bytes, points (goal: more than the larger "
                     "seed standard deviation)",
                     100 * (lgc_acc - ref_acc) if lgc_acc is not None and ref_acc is not None
                     else None, f"> {spread:.3f}")
    if "dense" in stats and lgc_acc is not None:
        bench.target("dense minus LGC-PS, points", 100 * (stats["dense"][0] - lgc_acc), "<= 1")
    bench.target("LGC-PS whole-run bytes / dense push bytes",
                 lgc_sent / dense_push if lgc_sent else None, "<= 0.002")
    bench.note(f"{workload['name']}, 4 workers, {args.steps} steps, batch 32, lr 0.05, codec "
               f"momentum 0.9, {args.seeds} seeds (0..{args.seeds - 1}); accuracy on {n_test:,} "
               "test images, acc_se = sqrt(p(1-p)/n) of one run; no link emulation (bytes are "
               "metered, time is not the question)")
    bench.note(f"LGC-PS options: {LGC_PS}; LGC-RAR options: {LGC_RAR}")
    bench.note("dense push = 4 bytes per parameter plus the push header and framing: "
               f"{dense_push:,} bytes; the all-reduce rows' bytes are what each rank sent in "
               "its collectives (a ring all-reduce of dense would be 1.5 dense pushes at N = 4)")
    bench.note("stage_ms / stage_B: LGC's codec ms per step and bytes per worker per step in "
               "warm-up, autoencoder training and the compressed stage (seed 0); codec_ms/step: "
               "the whole run's codec time over its steps, the seeds' mean")
    bench.finish()


if __name__ == "__main__":
    main()
