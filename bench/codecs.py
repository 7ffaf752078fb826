"""Every codec side by side on one slow link: accuracy, bytes, time to target, codec cost.

    .venv/bin/python -m bench.codecs [--steps 400] [--workers 4] [--target 0.75] [--only a,b]

One run, rows measured back to back on the same job: 4 workers, Fashion-MNIST with the small CNN
(``mnist5k`` when Fashion-MNIST is not installed), the same steps, seeds, shards and optimizer for
every row, and an emulated ``100mbit:1ms`` link per process. Rows:

* ``ddp`` - torch ``DistributedDataParallel`` with ``tandem.codecs.ddp_hook(dense)`` routed through
  a Tandem Transport, so DDP's gradients pay the same emulated link and byte meter;
* ``tandem/<codec>`` - ``tandem.train`` with the ``allreduce`` strategy and each codec.

Columns come from each run's ``summary.json`` (final test accuracy, bytes per worker per step,
training wall time and time to the target accuracy, evaluation time excluded) and, for LGC, from
its ``events.jsonl``: the mean bytes per worker per step over the steps of stage 3 (the compressed
stage; stage lengths from the codec's ``describe()``).

Codec cost is measured apart, in this process with one thread like a worker: ``loss.backward()``
of the same model on real 32-sample batches against one ``codec.exchange`` on those gradients
through :class:`bench.codec_cost.IdenticalPeers`, a stand-in transport of 4 ranks that all send
what this rank sends and costs no time. That runs the codec's real 4-rank code path (4 messages
decoded for gathered codes, both PowerSGD rounds, LGC's leader work) without the link; medians of
20 reps.

Tuning: ``--steps`` sets the budget (the benchmark must stay under ~12 minutes on the 2-core
machine; each row costs ~10 s of process start plus training and evaluation), ``--eval-every``
the time-to-target resolution, ``--n-test`` the size of the Fashion-MNIST test subset,
``--hidden`` the CNN's first linear layer (default 64: 46,730 parameters; 512 gives 281k at about
the same compute, so communication dominates DDP's step more; ``LGC_RATIO`` is sized for the
default and keeps LGC within 1/1000 at 512 too).

A row whose workers fail (a codec that diverges to NaN) is reported as ``failed`` with the error
in the notes; its other columns come from the steps before the failure. Run records are kept in
``runs/bench-codecs/<row>/`` (``--runs``) for inspection.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

from bench.codec_cost import codec_costs
from bench.codecs_ddp import ddp_job
from bench.harness import Bench

NET = "100mbit:1ms"
#: momentum 0.9 for every row, applied inside the codec (DGC momentum correction, the codecs'
#: ``momentum`` option) with the optimizer's momentum at 0: error-feedback codecs are unstable
#: when the optimizer's heavy momentum integrates their delayed residuals (signSGD collapsed,
#: random-k and LGC-PS diverged). For dense and the DDP row it is the same update exactly.
MOMENTUM = 0.9
#: LGC's density per variant: the largest K whose compressed stage stays within 1/1000 of dense
#: bytes on this CNN (positions are 16-bit here; PS: K = 103, RAR: K = 76; see the notes)
LGC_RATIO = {"ps": 2.1e-3, "rar": 1.5e-3}
#: the top-k row sized to LGC-PS's bytes
TOPK_REF = "topk = lgc ps bytes"
#: (row name, codec name, codec options); LGC with dense_first_last=false (see the notes)
CODEC_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("dense", "dense", {}),
    ("fp16", "fp16", {}),
    ("topk 0.01", "topk", {"ratio": 0.01}),
    ("randomk 0.01", "randomk", {"ratio": 0.01}),
    ("qsgd", "qsgd", {}),
    ("powersgd r2", "powersgd", {"rank": 2}),
    ("powersgd r4", "powersgd", {"rank": 4}),  # just under 1/10 of dense bytes on this CNN
    ("signsgd", "signsgd", {}),
    ("lgc ps", "lgc", {"variant": "ps", "dense_first_last": False, "ratio": LGC_RATIO["ps"]}),
    ("lgc rar", "lgc", {"variant": "rar", "dense_first_last": False,
                        "ratio": LGC_RATIO["rar"]}),
    # the reference LGC must beat: top-k with LGC's packed positions and warm-up ramp, its
    # density after the ramp solved to spend exactly LGC-PS's whole-run bytes (main(); the
    # ratio here only sizes the offline codec-cost measurement)
    (TOPK_REF, "topk", {"ratio": 2.5e-4, "warmup_start": 0.05, "positions": "packed"}),
]
#: rows run only when named in ``--only`` (references for LGC: top-k at LGC's density with the
#: same DGC ramp as LGC's default warm-up, 0.05 -> 1e-3 over the first 10 % of the steps)
EXTRA_ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("topk 0.001", "topk", {"ratio": 1e-3, "warmup_start": 0.05}),
]
COLUMNS = ["config", "final_acc", "gap_pts", "bytes/worker/step", "ratio_to_dense",
           "stage3_bytes", "stage3_ratio", "time_to_target_s", "compute_to_target_s",
           "train_wall_s", "codec_ms", "backward_ms", "overhead", "overhead_resnet18"]


# ---- runs ------------------------------------------------------------------------------------
def stage3_bytes(run_dir: Path, summary: dict[str, Any]) -> float | None:
    """Mean bytes sent per worker per step over LGC's compressed stage (from events.jsonl).

    Stage lengths come from the codec's ``describe()`` in the run record, or, for a run that
    failed before recording it, from the codec built with the run's options and step count."""
    lengths = ((summary.get("info") or {}).get("codec") or {}).get("stage_lengths")
    cfg = summary.get("config") or {}
    if not lengths and cfg.get("steps"):
        from tandem.codecs import make_codec

        codec = make_codec("lgc", (cfg.get("codec") or {}).get("options"))
        codec.set_total_steps(int(cfg["steps"]))
        lengths = codec.stage_lengths()
    path = run_dir / "events.jsonl"
    if not lengths or not path.is_file():
        return None
    start = int(lengths[0]) + int(lengths[1])
    sent = [int(r.get("bytes_sent") or 0) for r in map(json.loads, path.read_text().splitlines())
            if r.get("kind") == "step" and int(r.get("step", -1)) >= start]
    return sum(sent) / len(sent) if sent else None


def compute_to_target(run_dir: Path, steps_to_target: int | None) -> float | None:
    """Compute time alone up to the step that reached the target: the sum over steps of the
    slowest rank's ``compute_s`` (forward, backward, optimizer; no communication). No codec can
    make a row reach the target faster than this, so ``DDP time / this`` bounds any speed-up."""
    path = run_dir / "events.jsonl"
    if steps_to_target is None or not path.is_file():
        return None
    slowest: dict[int, float] = {}
    for r in map(json.loads, path.read_text().splitlines()):
        if r.get("kind") == "step" and int(r.get("step", -1)) <= steps_to_target:
            st = int(r["step"])
            slowest[st] = max(slowest.get(st, 0.0), float(r.get("compute_s") or 0.0))
    return sum(slowest.values()) if slowest else None


def pick_workload(name: str, n_test: int, hidden: int) -> tuple[dict[str, Any], Any]:
    """The workload's spec and the workload. A missing dataset is refused with the workload's
    own error (Fashion-MNIST: ``make bench-data``), never replaced by another workload: the
    targets and the docs' figures are for the workload named."""
    from tandem.config import WorkloadConfig
    from tandem.workloads import build_workload

    spec: dict[str, Any] = {"name": name, "options": {"n_test": n_test, "hidden": hidden}
                            if name == "fashion" else {"hidden": hidden}}
    return spec, build_workload(WorkloadConfig(**spec), 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--target", type=float, default=0.75)
    ap.add_argument("--workload", default="fashion")
    ap.add_argument("--n-test", type=int, default=5000)
    ap.add_argument("--hidden", type=int, default=64, help="the CNN's first linear layer width")
    ap.add_argument("--runs", default="runs/bench-codecs", help="where the run records go")
    ap.add_argument("--scale-workload", default="resnet18", help="also measure codec cost on "
                    "this workload's gradients ('none' to skip)")
    ap.add_argument("--scale-batch", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated row names (debugging; also "
                    "the extra rows: " + ", ".join(r for r, _, _ in EXTRA_ROWS) + ")")
    ap.add_argument("--results", default="", help="directory for codecs.json (default "
                    "bench/results; give another one for partial runs)")
    args = ap.parse_args()
    if args.results:
        import bench.harness

        bench.harness.RESULTS = Path(args.results)

    import tandem
    from tandem.config import load_config
    from tandem.errors import TandemError, WorkerFailed
    from tandem.launch import spawn
    from tandem.telemetry.summary import finalize_run

    t_start = time.time()
    bench = Bench("codecs", COLUMNS)  # created first, so results' duration_s covers the runs
    wl_spec, work = pick_workload(args.workload, args.n_test, args.hidden)
    from tandem.workloads.models import count_parameters

    args.n_params = count_parameters(work.model_fn())
    base = {"workload": wl_spec, "workers": args.workers, "steps": args.steps, "batch_size": 32,
            "lr": 0.05, "momentum": 0.0, "seed": 0, "net": NET, "eval_every": args.eval_every,
            "target_accuracy": args.target, "progress": False, "timeout_s": 120.0}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    rows: list[tuple[str, dict[str, Any], Path]] = []
    root = Path(args.runs)
    shutil.rmtree(root, ignore_errors=True)

    print("[codecs] measuring codec cost (1 process, 1 thread)", flush=True)
    backward_ms, codec_ms = codec_costs(work, 0, 32, args.workers, CODEC_ROWS, MOMENTUM)
    scale: dict[str, float] = {}
    if args.scale_workload != "none":
        from tandem.config import WorkloadConfig
        from tandem.workloads import build_workload

        print(f"[codecs] measuring codec cost on {args.scale_workload} gradients", flush=True)
        big = build_workload(WorkloadConfig(name=args.scale_workload), 0)
        back_big, ms_big = codec_costs(big, 0, args.scale_batch, args.workers, CODEC_ROWS,
                                       MOMENTUM, reps=5)
        scale = {row: ms / back_big for row, ms in ms_big.items()}
        scale["backward_ms"] = back_big

    if not only or "ddp" in only:
        cfg = load_config(dict(base, name="ddp", out=str(root / "ddp")))
        (root / "ddp").mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        spawn(ddp_job, args.workers, cfg.model_dump(mode="json"), str(root / "ddp"), MOMENTUM,
              timeout_s=600, env={"TANDEM_THREADS": "1"})
        s = finalize_run(root / "ddp", cfg.model_dump(mode="json"), target_accuracy=args.target)
        print(f"[codecs] ddp done in {time.time() - t0:.0f} s", flush=True)
        rows.append(("ddp (dense hook)", s, root / "ddp"))
    for row, name, opts in CODEC_ROWS + EXTRA_ROWS:
        if (only and row not in only) or (not only and (row, name, opts) in EXTRA_ROWS):
            continue
        if name == "topk" and "warmup_start" in opts:  # the ramp over 10 % of the run
            opts = {**opts, "warmup_steps": max(1, round(0.1 * args.steps))}
        if row == TOPK_REF:
            lgc_ps = next((s for r, s, _ in rows if r == "tandem lgc ps"), None)
            if not lgc_ps or not lgc_ps.get("bytes_sent_per_worker_per_step"):
                print(f"[codecs] {row}: skipped (no lgc ps run to size it to)", flush=True)
                continue
            from bench.lgc import solve_topk_ratio

            sizes = [p.numel() for p in work.model_fn().parameters() if p.requires_grad]
            budget = lgc_ps["bytes_sent_per_worker_per_step"] * args.steps
            opts = {**opts, "ratio": solve_topk_ratio(sizes, budget, opts["warmup_steps"],
                                                      args.steps, gather_world=args.workers)}
        out = root / row.replace(" ", "_")
        cfg_dict = dict(base, name=row, out=str(out),
                        codec={"name": name, "options": {**opts, "momentum": MOMENTUM}})
        t0 = time.time()
        try:
            s = tandem.train(cfg_dict, timeout_s=600)
        except WorkerFailed as err:  # e.g. a codec that diverges: report it, keep going
            try:
                s = finalize_run(out, load_config(cfg_dict).model_dump(mode="json"),
                                 target_accuracy=args.target)
            except TandemError:  # no events at all
                s = {"codec": name}
            s["failed"] = str(err).split(" (also failed")[0]
        print(f"[codecs] {row} done in {time.time() - t0:.0f} s", flush=True)
        rows.append((f"tandem {row}", s, out))
    report(bench, args, rows, backward_ms, codec_ms, scale, wl_spec["name"], t_start)


def report(b: Bench, args: Any, rows: list[tuple[str, dict[str, Any], Path]], backward_ms: float,
           codec_ms: dict[str, float], scale: dict[str, float], workload: str,
           t_start: float) -> None:
    by = {cfg: s for cfg, s, _ in rows}
    dense = by.get("tandem dense", {})
    dense_bytes = dense.get("bytes_sent_per_worker_per_step")
    dense_acc = dense.get("final_test_accuracy")
    figures: dict[str, dict[str, Any]] = {}
    for cfg, s, run_dir in rows:
        bytes_ = s.get("bytes_sent_per_worker_per_step")
        acc = s.get("final_test_accuracy")
        st3 = stage3_bytes(run_dir, s) if s.get("codec") == "lgc" else None
        key = cfg.removeprefix("tandem ")
        cms = codec_ms.get(key) if cfg.startswith("tandem") else None
        if s.get("failed"):
            b.note(f"{cfg}: FAILED ({s['failed']}); its columns are from the steps before the "
                   "failure and its final accuracy is shown as 'failed'")
            acc = None
        f = {"config": cfg, "final_acc": "failed" if s.get("failed") else acc,
             "gap_pts": None if acc is None or dense_acc is None else 100 * (dense_acc - acc),
             "bytes/worker/step": bytes_,
             "ratio_to_dense": bytes_ / dense_bytes if bytes_ and dense_bytes else None,
             "stage3_bytes": st3,
             "stage3_ratio": st3 / dense_bytes if st3 is not None and dense_bytes else None,
             "time_to_target_s": s.get("time_to_target_s"),
             "compute_to_target_s": compute_to_target(run_dir, s.get("steps_to_target")),
             "train_wall_s": s.get("wall_time_s"),
             "codec_ms": cms, "backward_ms": backward_ms,
             "overhead": cms / backward_ms if cms is not None else None,
             "overhead_resnet18": scale.get(key) if cfg.startswith("tandem") else None}
        figures[cfg] = f
        b.row(**f)
        info = (s.get("info") or {}).get("codec")
        if info and s.get("codec") == "lgc":
            b.note(f"{cfg}: stage lengths {info.get('stage_lengths')}, k={info.get('k')}, "
                   f"latent={info.get('latent_floats')} floats, ae_params={info.get('ae_params')}"
                   f", ae_loss {_r(info.get('ae_loss_first'))} -> {_r(info.get('ae_loss_last'))}"
                   f", in-run encode+decode {_r(info.get('codec_ms_per_step'))} ms/step, AE "
                   f"training {_r(info.get('ae_train_ms_per_step'))} ms/step (stage 2), "
                   f"resyncs {info.get('ae_resyncs')}")
    for v in ("ps", "rar"):
        f = figures.get(f"tandem lgc {v}")
        if f:
            b.target(f"lgc {v}: compressed-stage bytes / dense", f["stage3_ratio"], "<= 0.001")
            b.target(f"lgc {v}: whole-run bytes / dense", f["ratio_to_dense"], "<= 0.01")
    lgc_gaps = [f["gap_pts"] for k, f in figures.items()
                if k.startswith("tandem lgc ") and f["gap_pts"] is not None]
    b.target("lgc (better variant): accuracy gap to dense, points",
             min(lgc_gaps) if lgc_gaps else None, "<= 0.5")
    small = [f["gap_pts"] for k, f in figures.items() if k.startswith("tandem") and
             f["ratio_to_dense"] is not None and f["ratio_to_dense"] <= 0.1 and
             f["gap_pts"] is not None]
    b.target("best codec at >= 10x fewer bytes: accuracy gap to dense, points",
             min(small) if small else None, "<= 0.5")
    ddp_t = figures.get("ddp (dense hook)", {}).get("time_to_target_s")
    times = [(f["time_to_target_s"], k) for k, f in figures.items()
             if k.startswith("tandem") and f["time_to_target_s"] is not None]
    best = min(times) if times else None
    b.target("DDP time to target / best config's" + (f" ({best[1]})" if best else ""),
             ddp_t / best[0] if ddp_t and best else None, ">= 10")
    floors = [f["compute_to_target_s"] for f in figures.values()
              if f["compute_to_target_s"] is not None]
    b.target("ceiling of that ratio here: DDP time to target / fastest compute alone to target",
             ddp_t / min(floors) if ddp_t and floors else None, ">= 10")
    ref = figures.get(f"tandem {TOPK_REF}", {})
    lgc_ps = figures.get("tandem lgc ps", {})
    if isinstance(ref.get("final_acc"), float) and isinstance(lgc_ps.get("final_acc"), float):
        b.target("lgc ps minus top-k at its whole-run bytes, accuracy points",
                 100 * (lgc_ps["final_acc"] - ref["final_acc"]), "> 0")
        b.target(f"{TOPK_REF}: |its whole-run bytes / lgc ps's - 1|",
                 abs(ref["bytes/worker/step"] / lgc_ps["bytes/worker/step"] - 1), "<= 0.02")
    over = [(f["overhead"], k) for k, f in figures.items() if f["overhead"] is not None]
    for v in ("ps", "rar"):
        f = figures.get(f"tandem lgc {v}")
        if f:
            b.target(f"lgc {v}: codec overhead / backward", f["overhead"], "<= 0.1")
    if over:
        worst = max(over)
        b.target(f"worst codec overhead / backward ({worst[1]})", worst[0], "<= 0.1")
    big = [(f["overhead_resnet18"], k) for k, f in figures.items()
           if f["overhead_resnet18"] is not None]
    for v in ("ps", "rar"):
        f = figures.get(f"tandem lgc {v}")
        if f and f["overhead_resnet18"] is not None:
            b.target(f"lgc {v}: codec overhead / backward on ResNet-18", f["overhead_resnet18"],
                     "<= 0.1")
    if big:
        worst = max(big)
        b.target(f"worst codec overhead / backward on ResNet-18 ({worst[1]})", worst[0],
                 "<= 0.1")
    b.note(f"{args.workers} workers, {workload} (small CNN, hidden {args.hidden}, "
           f"{args.n_params:,} params), {args.steps} steps, "
           f"batch 32/worker, SGD lr 0.05, momentum {MOMENTUM} in the codec (momentum "
           f"correction; optimizer momentum 0) for every row incl. DDP's dense hook, seed 0, "
           f"emulated {NET} per process, "
           f"eval every {args.eval_every} steps on {args.n_test} test images, target accuracy "
           f"{args.target}; times exclude evaluation")
    b.note("gap_pts = (Tandem dense accuracy - row accuracy) x 100; ratio_to_dense against Tandem "
           "dense's measured bytes; stage3 = LGC's compressed stage, mean over its steps and ranks "
           "from events.jsonl")
    b.note("lgc runs use dense_first_last=false (with the default true the small CNN's dense first "
           "and last layers alone cost ~1/60 of dense), ratio sized to the 1/1000 budget "
           f"(ps {LGC_RATIO['ps']}, rar {LGC_RATIO['rar']}; positions travel in ceil(log2 D) = "
           f"{math.ceil(math.log2(args.n_params))} bits) and the default top-k warm-up (DGC "
           "ramp 0.05 -> ratio over stage 1), which "
           "keeps the whole run under 1/100; '" + TOPK_REF + "': top-k with the same ramp and "
           "the same packed positions, its density after the ramp solved to spend lgc ps's "
           "metered whole-run bytes (its codec_ms is measured at density 2.5e-4)")
    b.note("compute_to_target_s: sum over the steps up to the one that reached the target of the "
           "slowest rank's compute time (no communication): a floor no codec can beat on this "
           "machine (4 workers share 2 cores)")
    b.note("codec_ms: median of 20 exchange() calls on real gradients (batch 32, 1 thread) through "
           f"a zero-cost {args.workers}-rank stand-in transport whose peers echo this rank "
           "(LGC: fixed leader = this rank, compressed stage); backward_ms: median "
           "loss.backward() of the same model and batches")
    if scale:
        b.note(f"overhead_resnet18: the same codec-cost measurement on {args.scale_workload} "
               f"gradients (11.2M params, batch {args.scale_batch}, 5 reps; LGC's K scales with "
               f"D): backward {scale['backward_ms']:.0f} ms; the per-operation overhead that "
               f"dominates on the {args.n_params:,}-parameter CNN is fixed, the arithmetic "
               "grows with D")
    b.note(f"benchmark wall time {time.time() - t_start:.0f} s")
    b.finish()


def _r(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}"


if __name__ == "__main__":
    main()
