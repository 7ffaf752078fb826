"""Parameter server on slow links: the candidate model (M3) with compressed pushes and pulls,
against synchronous PS with the same codecs, all-reduce with the same codec, and plain
DDP-equivalent all-reduce (dense), on emulated links.

Sections (``--sections``), every row of a section measured in one run with the same seed, data
and steps (``modes``: the baselines and both merges on digits at 20 ms, dense):

* ``links``: 4 workers (+ 1 server) on emulated 10 and 100 Mbit/s links with 1 ms one-way
  latency, on mnist5k's CNN with ``hidden=360`` (201,538 parameters; 3,500 train / 1,500 test
  images, ``test_fraction=0.3``) and on ``textlm`` (the default 867k-parameter byte-level
  transformer, its own AdamW recipe; token accuracy on 256 x 64 test bytes). Rows:

  - ``candidate``: param_server, ``mode=candidate``, ``cap=auto``, pushes top-k 1 % (codec
    momentum 0.9, optimizer momentum 0: DGC's momentum correction), pulls top-k 4 %
    (``pull=topk``, error feedback on the server; 4 workers x the push density);
  - ``sync PS``: the same codecs, ``mode=sync``;
  - (textlm: AdamW moves every coordinate, so its PS rows pull ``bf16`` deltas, error
    feedback on the server, instead of top-k; its ``candidate`` runs AdamW on each worker,
    ``local_step=auto`` = ``optimizer``, and pushes the parameter change, and the row
    ``candidate(sgd steps)`` is the same with ``local_step=sgd``: local SGD steps, AdamW on the
    server);
  - ``allreduce topk``: the same push codec under all-reduce;
  - ``allreduce dense``: what DDP computes (optimizer momentum 0.9 for the CNN);
  - ``candidate, sync's time``: the default candidate given sync PS's time instead of its
    steps. A step budget stops the candidate, whose steps are several times shorter, long
    before sync PS reaches the target, so its time to target would read "never". This row
    runs as many steps as fit in sync PS's time to the target (its whole training time where
    it never got there) at the ``candidate`` row's measured training seconds per step, at
    least the section's steps and at most ``BUDGET_CAP`` times them. The time-to-target
    target reads this row; the final-model target stays on the equal-steps ``candidate`` row.

* ``tuning``: the CNN at 10 Mbit/s, where the candidate loses: the candidate with the options a
  user would try there (``max_staleness`` 8 and 16 for fresher models, ``merge=compensated``,
  4x the push density: top-k 4 % pushes, 16 % pulls, and four servers, each with its own
  link) beside the default candidate and sync PS; and textlm (AdamW) at 10 Mbit/s with four
  servers beside the default and sync PS; and digits at 100 Mbit/s, 20 ms, where the
  candidate's workers idle at ``cap`` (``max_staleness`` 64 binds: a round lasts ~150 of their
  steps), with ``max_staleness`` 256 beside the default and sync PS. No targets: it says
  whether tuning rescues it.

* ``latency``: one-way latency 0.1, 1 and 20 ms at 100 Mbit/s on ``digits`` (MLP, 360 test
  images) and ``textlm``; rows ``candidate`` and ``sync PS`` with the default ``cap`` (auto),
  textlm with the codecs above, digits with dense pushes and pulls and SGD without momentum
  (9.6k parameters: nothing worth compressing). This is issue 19's latency sweep.

Columns: time to the target (training wall time of worker 0, evaluation excluded; worker 0
evaluates the latest global model it holds), ``speedup`` (the same section, workload and link's
sync PS time / this row's), final test accuracy and its standard error ``sqrt(p(1-p)/n)`` (n =
test images; for textlm n = test bytes, which are correlated within a window, so the error is
a lower bound), mean worker idle fraction, local steps per push and mean ``cap`` (candidate),
bytes pushed and pulled per worker per step.

    .venv/bin/python -m bench.param_server [--quick] [--sections links,latency]
        [--workloads cnn,textlm,digits] [--merge]
    .venv/bin/python -m bench.param_server --rescore   # recompute the targets from the rows
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import Bench

TOPK = {"name": "topk", "options": {"ratio": 0.01, "momentum": 0.9}}
TOPK_PLAIN = {"name": "topk", "options": {"ratio": 0.01}}
PULL = {"pull": "topk", "pull_options": {"ratio": 0.04}}  # 4 workers x the push ratio
WORKLOADS: dict[str, dict[str, Any]] = {
    "cnn": {"workload": {"name": "mnist5k", "options": {"hidden": 360, "test_fraction": 0.3}},
            "batch_size": 32, "lr": 0.05, "momentum": 0.9, "target_accuracy": 0.95},
    # in 80 steps most rows' token accuracy stays on the unigram plateau (0.2755: the most
    # frequent byte), so textlm's target is a test loss
    "textlm": {"workload": {"name": "textlm"}},
    "digits": {"workload": {"name": "digits"}, "batch_size": 32, "lr": 0.1, "momentum": 0.0,
               "target_accuracy": 0.95},
}
STEPS = {"cnn": 400, "textlm": 80, "digits": 600}
#: textlm: time to this test loss (nats per byte) instead of an accuracy
TARGET_LOSS = {"textlm": 3.5}
QUICK_STEPS = {"cnn": 120, "textlm": 16, "digits": 200}
#: the ``candidate, sync's time`` row runs at most this many times the section's steps
BUDGET_CAP = 10
BUDGET_ROW = "candidate, sync's time"
EVAL_EVERY = {"cnn": 10, "textlm": 4, "digits": 5}


MODES = [("sync PS", {"mode": "sync"}), ("ssp(s=3)", {"mode": "ssp", "staleness": 3}),
         ("async", {"mode": "async"}), ("candidate(overwrite)", {"mode": "candidate",
                                                               "merge": "overwrite"}),
         ("candidate", {"mode": "candidate", "merge": "delay-corrected"})]


TUNING = [("candidate", {}), ("sync PS", {"mode": "sync"}),
          ("candidate max_staleness=8", {"max_staleness": 8}),
          ("candidate max_staleness=16", {"max_staleness": 16}),
          ("candidate compensated", {"merge": "compensated"}),
          # one server's link carries every push and pull: four servers, four links (8
          # processes on this machine's 2 cores)
          ("candidate servers=4", {"servers": 4})]


def rows(section: str, workload: str) -> list[tuple[str, dict[str, Any]]]:
    if section == "tuning" and workload == "digits":  # its idle: cap bound by max_staleness
        ps = {"strategy": "param_server", "codec": "dense", "momentum": 0.0}
        return [(name, dict(ps, options={"mode": "candidate", **opts})) for name, opts in
                [("candidate", {}), ("sync PS", {"mode": "sync"}),
                 ("candidate max_staleness=256", {"max_staleness": 256})]]
    if section == "tuning" and workload == "textlm":  # AdamW at 10 Mbit/s: its own links
        # for each of four servers (its optimizer factory runs on the workers, so it may)
        ps = {"strategy": "param_server", "codec": TOPK_PLAIN, "momentum": 0.0}
        return [(name, dict(ps, options={"mode": "candidate", "pull": "bf16", **opts}))
                for name, opts in TUNING if name in ("candidate", "sync PS",
                                                     "candidate servers=4")]
    if section == "tuning":  # what a user would try where the candidate loses (the CNN at
        # 10 Mbit/s): fresher models (a lower max_staleness) or LOSP's compensation
        ps = {"strategy": "param_server", "codec": TOPK, "momentum": 0.0}
        out = [(name, dict(ps, options={"mode": "candidate", **PULL, **opts}))
               for name, opts in TUNING]
        # more of the gradient per push: top-k 4 % pushes, pulls 4 workers x that (16 %)
        wider = {"name": "topk", "options": {"ratio": 0.04, "momentum": 0.9}}
        return out + [("candidate push 4 %, pull 16 %", dict(ps, codec=wider, options={
            "mode": "candidate", "pull": "topk", "pull_options": {"ratio": 0.16}}))]
    if section == "modes":  # the baselines, dense, as issue 5 measured them
        return [(name, {"strategy": "param_server", "codec": "dense", "momentum": 0.0,
                        "options": opts}) for name, opts in MODES]
    # textlm's AdamW has its own first moment: its top-k pushes carry no codec momentum; and
    # Adam moves every coordinate each step, so the server's change is dense: top-k pulls lag
    # it (the run's final model, the server's, was far worse than the workers' views: test
    # loss 8.3 against 3.5 in a trial), bf16 pulls carry it at half the bytes
    topk = TOPK_PLAIN if workload == "textlm" else TOPK
    ps = {"strategy": "param_server", "codec": topk, "momentum": 0.0}
    pull = {"pull": "bf16"} if workload == "textlm" else PULL
    if workload == "digits":  # 9.6k parameters: nothing to compress, latency is the question
        ps, pull = {"strategy": "param_server", "codec": "dense", "momentum": 0.0}, {}
    out = [("candidate", dict(ps, options={"mode": "candidate", **pull})),
           ("sync PS", dict(ps, options={"mode": "sync", **pull}))]
    if workload == "textlm":  # what the candidate did before local_step=optimizer (AdamW's
        # local steps were SGD steps, and the server took one AdamW step per round of k pushes)
        out.append(("candidate(sgd steps)",
                    dict(ps, options={"mode": "candidate", "local_step": "sgd", **pull})))
    if section == "links":
        out += [("allreduce topk", {"strategy": "allreduce", "codec": topk, "momentum": 0.0}),
                ("allreduce dense", {"strategy": "allreduce", "codec": "dense"})]
    return out


def test_size(workload: str) -> int:
    """Test samples behind one accuracy figure (bytes for textlm)."""
    from tandem.config import WorkloadConfig
    from tandem.workloads import build_workload

    w = WorkloadConfig.model_validate(WORKLOADS[workload]["workload"])
    work = build_workload(w, 0)
    per = int(work.test[0][1].numel()) if workload == "textlm" else 1
    return len(work.test) * per


def run_row(workload: str, net: str, row: dict[str, Any], steps: int, out: Path) -> dict:
    import tandem

    base = {k: v for k, v in WORKLOADS[workload].items()}
    cfg: dict[str, Any] = {**base, "workers": 4, "steps": steps, "seed": 0, "net": net,
                           "eval_every": EVAL_EVERY[workload], "progress": False,
                           "timeout_s": 300, "out": str(out)}
    if "momentum" in row and "momentum" in cfg:
        cfg["momentum"] = row["momentum"]
    cfg["codec"] = row["codec"]
    cfg["strategy"] = {"name": row["strategy"], "options": row.get("options", {})}
    s = tandem.train(cfg)
    if workload in TARGET_LOSS:
        s["time_to_target_s"], s["steps_to_target"] = _time_to_loss(out, TARGET_LOSS[workload])
    workers = [r for r in s["results"] if r.get("role", "worker") == "worker"]
    n = len(workers)
    ps = row["strategy"] == "param_server"

    def mean(key: str) -> float | None:
        vals = [w[key] for w in workers if w.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    per_step = 1e-6 / steps
    return {"time_to_target_s": s["time_to_target_s"], "steps_to_target": s["steps_to_target"],
            "final_acc": s["final_test_accuracy"], "final_loss": s["final_test_loss"],
            "idle_frac": mean("idle_fraction") if ps else s["idle_fraction"],
            "steps_per_push": mean("local_steps_per_round") if ps else 1.0,
            "cap_mean": mean("cap_mean") if ps else None,
            "push_MB/step": mean("push_bytes") * per_step if ps else
            s["bytes_sent_per_worker_per_step"] / 1e6,
            "pull_MB/step": mean("pull_bytes") * per_step if ps else None,
            "wall_s": s["wall_time_s"], "workers": n,
            "train_s": s["wall_time_s"] - (s.get("excluded_time_s") or 0.0)}


def budget_steps(steps: int, cand: dict[str, Any], sync: dict[str, Any]) -> int:
    """Steps the candidate takes in sync PS's time to the target (sync PS's whole training time
    where it never got there), at the equal-steps candidate's training seconds per step; at
    least ``steps``, at most ``BUDGET_CAP x steps``. Both times exclude evaluation, as the time
    to target does."""
    budget = sync["time_to_target_s"] or sync["train_s"]
    per_step = cand["train_s"] / steps
    want = math.ceil(budget / per_step) if per_step > 0 else steps
    return int(min(BUDGET_CAP * steps, max(steps, want)))


def _time_to_loss(run: Path, target: float) -> tuple[float | None, int | None]:
    """Wall time and step of the first evaluation whose test loss is at most ``target``."""
    import json

    for line in (run / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("kind") == "eval" and e.get("test_loss") is not None and \
                e["test_loss"] <= target:
            return float(e["wall"]), int(e["step"])
    return None, None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--sections", default="links,latency,modes,tuning")
    ap.add_argument("--merge", action="store_true", help="keep the other sections' rows and "
                    "targets of the existing results file (each section is measured in one run)")
    ap.add_argument("--workloads", default="cnn,textlm,digits")
    ap.add_argument("--rescore", action="store_true", help="measure nothing: recompute the "
                    "targets from the results file's rows (after a change to the targets)")
    args = ap.parse_args()
    steps_of = QUICK_STEPS if args.quick else STEPS
    wanted = set(args.workloads.split(","))
    plan: list[tuple[str, str, str]] = []  # (section, workload, net)
    if "links" in args.sections:
        plan += [("links", w, f"{r}:1ms") for w in ("cnn", "textlm") if w in wanted
                 for r in ("10mbit", "100mbit")]
    if "latency" in args.sections:
        plan += [("latency", w, f"100mbit:{lat}") for w in ("digits", "textlm") if w in wanted
                 for lat in ("100us", "1ms", "20ms")]
    if "modes" in args.sections and "digits" in wanted:
        plan += [("modes", "digits", "100mbit:20ms")]
    if "tuning" in args.sections:
        plan += [("tuning", w, "10mbit:1ms") for w in ("cnn", "textlm") if w in wanted]
        plan += [("tuning", "digits", "100mbit:20ms")] if "digits" in wanted else []
    bench = Bench("param_server_quick" if args.quick else "param_server",
                  ["section", "workload", "net", "row", "steps", "time_to_target_s", "speedup",
                   "final_acc", "acc_se", "final_loss", "idle_frac", "steps_per_push",
                   "cap_mean",
                   "push_MB/step", "pull_MB/step", "wall_s"])
    if args.rescore:
        _rescore(bench)
        return
    if args.merge:  # keep the other (section, workload) pairs' rows and targets
        runs = {(p[0], p[1]) for p in plan}
        bench.keep_previous(lambda r: (r.get("section"), r.get("workload")) not in runs,
                            lambda t: tuple(t["name"].split(" ", 2)[:2]) not in runs,
                            ", ".join(f"{s} {w}" for s, w in sorted(runs)))
    sizes = {w: test_size(w) for w in {p[1] for p in plan}}
    measured: dict[tuple[str, str, str], dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ps-") as tmp:
        for i, (section, workload, net) in enumerate(plan):
            got = measured.setdefault((section, workload, net), {})
            for name, row in rows(section, workload):
                out = Path(tmp) / f"{i}-{name.replace(' ', '_')}"
                got[name] = run_row(workload, net, row, steps_of[workload], out)
                print(f"[param_server] {section} {workload} {net} {name}: {got[name]}",
                      flush=True)
            if section == "links":  # the candidate's time to target, in sync PS's time
                n = budget_steps(steps_of[workload], got["candidate"], got["sync PS"])
                out = Path(tmp) / f"{i}-budget"
                got[BUDGET_ROW] = run_row(workload, net, dict(rows(section, workload))[
                    "candidate"], n, out) | {"steps": n}
                print(f"[param_server] {section} {workload} {net} {BUDGET_ROW} ({n} steps): "
                      f"{got[BUDGET_ROW]}", flush=True)
    for (section, workload, net), got in measured.items():
        sync_t = got["sync PS"]["time_to_target_s"]
        for name, m in got.items():
            t, acc = m["time_to_target_s"], m["final_acc"]
            se = math.sqrt(acc * (1 - acc) / sizes[workload]) if acc is not None else None
            bench.row(section=section, workload=workload, net=net, row=name,
                      speedup=sync_t / t if sync_t and t else None, acc_se=se,
                      test_n=sizes[workload],
                      target=WORKLOADS[workload].get("target_accuracy"),
                      target_loss=TARGET_LOSS.get(workload),
                      **{"steps": steps_of[workload], **m})
    _targets(bench, measured)
    bench.note("4 workers (+1 server for param_server rows), seed 0; links: 1 ms one-way "
               "latency; latency: 100 Mbit/s; top-k 1 % pushes with codec momentum 0.9 "
               "(optimizer momentum 0; textlm: its AdamW, no codec momentum), top-k 4 % "
               "pulls (textlm: bf16 pulls); digits: dense, momentum 0; cap=auto "
               "(max_staleness 64)")
    accs = {w: c["target_accuracy"] for w, c in WORKLOADS.items() if "target_accuracy" in c}
    bench.note(f"steps: {steps_of}; targets: test accuracy {accs}, test loss {TARGET_LOSS} "
               "(in 80 steps textlm's token accuracy stays on the unigram plateau 0.2755 "
               "in most rows, so it cannot tell them apart)")
    bench.note(f"links: the row '{BUDGET_ROW}' runs the candidate for the steps that fit in "
               "sync PS's time to target at the candidate row's training seconds per step "
               f"(at most {BUDGET_CAP}x the steps); its steps are in the row")
    bench.note("idle_frac of param_server rows excludes the one closing wait for the final "
               "model (final_sync_s); allreduce rows report the run's idle fraction")
    bench.finish()


def _rescore(bench: Bench) -> None:
    """``--rescore``: the results file's rows, notes and provenance as they are, the targets
    recomputed from its rows (measures nothing)."""
    bench.adopt_results()
    measured: dict[tuple[str, str, str], dict[str, dict]] = {}
    for r in bench.rows:
        measured.setdefault((r["section"], r["workload"], r["net"]), {})[r["row"]] = r
    _targets(bench, measured)
    bench.finish()


def _targets(bench: Bench, measured: dict[tuple[str, str, str], dict[str, dict]]) -> None:
    """Where the candidate must win (idle, time to target) and where it must not lose (its final
    model within a small margin of sync PS's, METHODS M3: 1 accuracy point, about two standard
    errors on these test sets; textlm 0.05 nats of test loss), at the same steps and, where the
    section ran it, in sync PS's time to target (against sync PS's whole run)."""
    for (section, workload, net), got in measured.items():
        if section == "tuning":  # a sweep of the candidate's options where it loses: no goal
            continue
        cand, sync = got["candidate"], got["sync PS"]
        where = f"{section} {workload} {net}"
        bench.target(f"{where}: candidate mean worker idle fraction", cand["idle_frac"],
                     "< 0.05")
        # the final model at the same steps; and (links) after the candidate's run in sync PS's
        # time to target, against sync PS's whole run, which had more time
        for label, row in [("candidate", cand), ("candidate in sync's time", got.get(BUDGET_ROW))]:
            if row is None:
                continue
            if workload in TARGET_LOSS:
                cl, sl = row["final_loss"], sync["final_loss"]
                bench.target(f"{where}: {label} final test loss - sync PS's",
                             cl - sl if cl is not None and sl is not None else None, "<= 0.05")
            else:
                ca, sa = row["final_acc"], sync["final_acc"]
                bench.target(f"{where}: {label} final test accuracy - sync PS's",
                             ca - sa if ca is not None and sa is not None else None, ">= -0.01")
        # time to target in sync PS's time where the section ran it (a step budget stops the
        # candidate's shorter steps before sync PS gets there)
        ct = got.get(BUDGET_ROW, cand)["time_to_target_s"]
        st = sync["time_to_target_s"]
        if section == "latency" and net.endswith("100us"):
            bench.target(f"{where}: candidate time to target / sync PS's",
                         ct / st if ct and st else None, "<= 1.1")
        else:
            bench.target(f"{where}: candidate time to target / sync PS's",
                         ct / st if ct and st else None, "< 1")


if __name__ == "__main__":
    main()
