"""Kill -9 every role of every strategy, then resume: no hang, the dead rank named, exact resumes.

For each (strategy, role) below, each trial starts a fresh run under the local launcher
(``tandem.train``) and SIGKILLs one process of that role at a seeded random step: a worker or peer
by ``inject_crash`` (it kills itself, so the moment is reproducible), a server, agent or
controller, which do not honour ``inject_crash``, by the bench once worker 0's event log records
the step (its steps are the job's clock; a checkpoint must exist too). Then, per strategy's promise:

* ``fail`` (allreduce, pipeline, param_server sync worker with the default ``min_workers``, every
  server, bsp_shared agent and controller): the run must die with the launcher's ``WorkerFailed``
  naming the killed rank first, within ``timeout_s`` + the launcher's 15 s grace after the death;
  then the run resumes from ``checkpoints/LATEST`` and must complete.
* ``lost`` (param_server candidate with ``min_workers`` = workers - 1, bsp_shared worker, gossip
  peer, coded_ps worker with s=1): the run must complete with ``lost_ranks == [victim]``;
  ``detected_s`` is then the time until a rank's event log first records the loss. gossip also
  resumes (every peer restarts from the last full-world checkpoint).
* exact resumes (allreduce, pipeline, param_server sync, gossip: what the tests assert bit-exact)
  compare every rank's final parameters with an uninterrupted run of the same config;
  param_server candidate and bsp_shared resumes are not bit-exact by design ('not promised');
  coded_ps writes no checkpoints, so its trials end at the detection.

A hang is the launcher's own job deadline ending the run. Process start-up is not in
``detected_s`` (measured from the death the bench saw). As root one more trial runs a 2-host job
across network namespaces under ``torchrun --max-restarts 1`` and kills a worker on host 1: the
job must restart and resume to the uninterrupted run's final test loss
(:mod:`bench.kill_resume_netns`); without root its target is NOT RUN.

    python -m bench.kill_resume [--trials 10] [--steps 40] [--only gossip,param_server/sync:server]
    sudo .venv/bin/python -m bench.kill_resume --only torchrun --merge   # that trial alone

``--only`` takes ``strategy[:role]`` items (``param_server`` matches both modes). Duration on the
2-core machine: about 3-10 s per trial (a run and a resume), so the default 10 trials x 12 rows
take roughly 10-15 min (longer on a loaded machine); ``--trials 1`` about 1 min. Trials that
failed or took over 5 s to be named keep each rank's error in the JSON (``details``: its first
line, or a traceback's exception and where it was raised).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import Bench
from bench.killer import Killer, killing

W = 3  # workers (gossip: 4 peers on a ring)
GRACE_S = 15.0  # tandem.job's failure grace beyond timeout_s
LIMIT_S = 300.0  # the launcher's job deadline: reaching it is a hang
BASE = {"workload": {"name": "digits"}, "codec": "dense", "workers": W, "batch_size": 16,
        "lr": 0.1, "momentum": 0.9, "seed": 1, "progress": False, "checkpoint_every": 5,
        "timeout_s": 20}


@dataclass(frozen=True)
class Case:
    strategy: str  # label; "param_server/sync" etc.
    role: str
    cfg: dict[str, Any]
    victims: tuple[int, ...]
    inject: bool  # inject_crash (the role kills itself) or the bench's SIGKILL
    expect: str  # "fail" or "lost"
    resume: bool
    exact: bool
    every_step: bool = False  # coded_ps: a late worker skips steps, so inject from k on


def cases() -> list[Case]:
    def ps(mode: str, **o: Any) -> dict[str, Any]:
        return dict(BASE, momentum=0.0, strategy={"name": "param_server",
                                                  "options": {"mode": mode, **o}})
    models = [{"lr": 0.1}, {"lr": 0.05, "codec": {"name": "topk", "options": {"ratio": 0.1}}}]
    pipe = dict(BASE, strategy={"name": "pipeline", "options": {"models": models}})
    bsp = dict(BASE, momentum=0.0, stragglers="1.0:exp:0.02",  # ~20 ms a gradient: mid-run kills
               strategy={"name": "bsp_shared",
                         "options": {"split": [2, 1], "grads_per_superstep": 3}})
    gossip = dict(BASE, workers=4, lr=0.05, momentum=0.0,
                  workload={"name": "regression", "redundancy": 2, "options": {"n": 512}},
                  strategy={"name": "gossip", "options": {"topology": "ring"}})
    coded = dict(BASE, momentum=0.0, checkpoint_every=0,
                 workload={"name": "digits", "redundancy": 2},
                 strategy={"name": "coded_ps", "options": {"s": 1}})
    workers = tuple(range(W))
    cand = {"cap": 4}
    return [
        Case("allreduce", "worker", dict(BASE, strategy="allreduce"), workers, True, "fail",
             True, True),
        Case("pipeline", "worker", pipe, workers, True, "fail", True, True),
        Case("param_server/sync", "worker", ps("sync"), workers, True, "fail", True, True),
        Case("param_server/sync", "server", ps("sync"), (W,), False, "fail", True, True),
        Case("param_server/candidate", "worker", ps("candidate", min_workers=W - 1, **cand),
             workers, True, "lost", False, False),
        Case("param_server/candidate", "server", ps("candidate", **cand), (W,), False, "fail",
             True, False),
        # local launcher: ranks 0..W-1 workers, then one agent per machine; agent 0 (rank W)
        # is also the controller
        Case("bsp_shared", "worker", bsp, workers, True, "lost", False, False),
        Case("bsp_shared", "agent", bsp, (W + 1,), False, "fail", True, False),
        Case("bsp_shared", "controller", bsp, (W,), False, "fail", True, False),
        Case("gossip", "peer", gossip, tuple(range(4)), True, "lost", True, True),
        Case("coded_ps", "worker", coded, workers, True, "lost", False, False, every_step=True),
        Case("coded_ps", "server", coded, (W,), False, "fail", False, False),
    ]


def select(all_cases: list[Case], only: str | None) -> list[Case]:
    """``--only strategy[:role],...``; a strategy matches its label or the label's prefix
    before ``/`` (``param_server`` = both modes)."""
    if not only:
        return all_cases
    want = [item.strip().partition(":") for item in only.split(",") if item.strip()]
    picked = [c for c in all_cases if any(
        s in (c.strategy, c.strategy.split("/")[0]) and r in ("", c.role) for s, _, r in want)]
    if not picked:
        raise SystemExit(f"--only {only!r} matches none of "
                         f"{sorted({f'{c.strategy}:{c.role}' for c in all_cases})}")
    return picked


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"


def rank_error(detail: str) -> str:
    """What a rank's failure says, in one line: its first line, or for a traceback (a worker's
    exception that is not a TandemError arrives as ``Kind: Traceback ...``) the exception's
    own line and where it was raised."""
    lines = [ln.strip() for ln in detail.splitlines() if ln.strip()]
    if not lines or not lines[0].endswith("Traceback (most recent call last):"):
        return (lines or [""])[0][:240]
    where = next((ln for ln in reversed(lines) if ln.startswith("File ")), "")
    return f"{lines[-1][:200]} ({where[:200]})"


def max_diff(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> float:
    """Largest |a - b| over every rank's parameters (ranks without params are skipped)."""
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        if "params" in a or "params" in b:
            for x, y in zip(a["params"], b["params"], strict=True):
                worst = max(worst, float((x - y).abs().max()))
    return worst


def trial(case: Case, victim: int, k: int, out: Path, steps: int,
          ref: Any) -> dict[str, Any]:
    import tandem
    from tandem.errors import WorkerFailed

    crash = [f"{victim}:{s}" for s in (range(k, steps) if case.every_step else [k])]
    cfg = dict(case.cfg, steps=steps, out=str(out), inject_crash=crash if case.inject else [])
    killer = Killer(out, victim, k, external=not case.inject,
                    need_ckpt=case.cfg["checkpoint_every"] > 0)
    row: dict[str, Any] = {"strategy": case.strategy, "role": case.role, "victim": victim,
                           "kill_step": k, "outcome": None, "detected_s": None,
                           "names_first": None, "resumed_from": None, "max_param_diff": None,
                           "ok": False}
    allowed = case.cfg["timeout_s"] + GRACE_S
    try:
        with killing(killer):
            summary = tandem.train(cfg, timeout_s=LIMIT_S)
        if killer.t_dead is None:
            row["outcome"] = "did not die"  # the kill never happened: nothing was tested
        elif case.expect == "fail":
            row["outcome"] = f"completed (lost_ranks {summary['lost_ranks']})"
        else:
            row["names_first"] = summary["lost_ranks"] == [victim]
            row["outcome"] = "lost" if row["names_first"] else \
                f"lost_ranks {summary['lost_ranks']}"
            if killer.t_noticed is not None:
                row["detected_s"] = round(killer.t_noticed - killer.t_dead, 3)
            row["ok"] = row["names_first"] and (row["detected_s"] or 0.0) <= allowed
    except WorkerFailed as err:
        text = str(err)
        if "exceeded" in text:
            row["outcome"] = "hang"
        elif killer.t_dead is None:
            row["outcome"] = f"failed before the kill: {first_line(err)}"
        else:
            row["detected_s"] = round(time.monotonic() - killer.t_dead, 3)
            row["names_first"] = text.startswith(f"rank {victim} failed") and \
                victim in err.ranks
            if case.expect == "lost":
                row["outcome"] = f"failed: {first_line(err)}"
            else:
                row["outcome"] = "named" if row["names_first"] else f"misnamed: {first_line(err)}"
                row["ok"] = row["names_first"] and row["detected_s"] <= allowed
                if row["names_first"] and row["detected_s"] > allowed:
                    row["outcome"] = "named late"
        if not row["ok"] or (row["detected_s"] or 0.0) > 5.0:  # the JSON keeps why
            row["details"] = {r: rank_error(d) for r, d in err.details.items()}
    except Exception as err:  # noqa: BLE001 - any other end is a failed trial
        row["outcome"] = f"error: {first_line(err)}"
    finally:
        killer.stop.set()
    if not row["ok"]:
        return row
    if not case.resume:
        row["max_param_diff"] = "no checkpoints" if case.cfg["checkpoint_every"] == 0 else \
            "not resumed (completed)"
        return row
    latest = out / "checkpoints" / "LATEST"
    row["resumed_from"] = json.loads(latest.read_text())["step"] if latest.is_file() else None
    try:
        res = tandem.train(dict(cfg, resume=True), return_results=True, timeout_s=LIMIT_S)
    except Exception as err:  # noqa: BLE001 - a resume that fails is a failed trial
        row["outcome"] += f"; resume failed: {first_line(err)}"
        row["ok"] = False
        return row
    row["max_param_diff"] = max_diff(ref()["results"], res["results"]) if case.exact else \
        "not promised"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10, help="kills per (strategy, role)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", default=None, help="strategy[:role],... e.g. gossip,bsp_shared:agent;"
                    " 'torchrun': the multi-node torchrun trial (root: network namespaces)")
    ap.add_argument("--merge", action="store_true", help="keep the existing results' rows of the "
                    "(strategy, role) pairs this run does not kill, and their targets")
    args = ap.parse_args()
    if args.steps < 12:
        raise SystemExit("--steps must be >= 12 (kills land after the first checkpoint)")
    import tandem
    from bench.kill_resume_netns import torchrun_kill_trial
    from bench.netns import unavailable_reason

    items = [x.strip() for x in (args.only or "").split(",") if x.strip()]
    with_torchrun = not items or "torchrun" in items
    rest = [x for x in items if x != "torchrun"]
    chosen = select(cases(), ",".join(rest)) if rest or not items else []
    b = Bench("kill_resume", ["strategy", "role", "victim", "kill_step", "outcome", "detected_s",
                              "names_first", "resumed_from", "max_param_diff"])
    why = unavailable_reason()  # None: root, the torchrun trial can run
    if args.merge:
        pairs = {(c.strategy, c.role) for c in chosen}
        b.keep_previous(lambda r: (r["strategy"], r["role"]) not in pairs
                        and not (with_torchrun and r["role"].startswith("torchrun")),
                        lambda t: not (with_torchrun and why is None
                                       and t["name"].startswith("torchrun")),
                        ", ".join(items) or "everything",
                        keep_note=lambda n: not (with_torchrun and n.startswith("torchrun"))
                        and not any(n.startswith(f"{c.strategy} {c.role}:") for c in chosen)
                        and not (chosen and n.split(" ")[0].isdigit()))
    lo, hi = BASE["checkpoint_every"] + 2, max(BASE["checkpoint_every"] + 3, args.steps * 3 // 4)
    with tempfile.TemporaryDirectory() as tmp:
        refs: dict[str, Any] = {}

        def reference(case: Case) -> Any:
            def get() -> Any:
                if case.strategy not in refs:
                    refs[case.strategy] = tandem.train(
                        dict(case.cfg, steps=args.steps, out=f"{tmp}/ref-{len(refs)}"),
                        return_results=True, timeout_s=LIMIT_S)
                return refs[case.strategy]
            return get

        for ci, case in enumerate(chosen):
            rng = random.Random(f"{case.strategy}:{case.role}")
            for t in range(args.trials):
                victim, k = rng.choice(case.victims), rng.randrange(lo, hi)
                b.row(**trial(case, victim, k, Path(tmp) / f"c{ci}t{t}", args.steps,
                              reference(case)))
        torchrun_row = None
        if with_torchrun and why is None:
            k = random.Random("torchrun").randrange(lo, hi)
            (Path(tmp) / "torchrun").mkdir()
            torchrun_row = torchrun_kill_trial(dict(BASE, strategy="allreduce",
                                                    steps=args.steps), k, Path(tmp) / "torchrun")
            b.row(**torchrun_row)
    rows = b.rows
    b.target("hangs (every strategy and role)",
             sum(r["outcome"] == "hang" for r in rows), "<= 0")
    b.target(f"trials whose end does not name the killed rank within timeout + {GRACE_S:.0f} s "
             "(or a resume that does not complete)", sum(not r["ok"] for r in rows), "<= 0")
    for name, worst in max_param_diffs(rows, [c.strategy for c in chosen if c.exact]).items():
        b.target(f"{name}: max |resumed - uninterrupted| parameter difference", worst,
                 "<= 1e-6")
    name = ("torchrun on network namespaces: a killed node's job restarts and resumes "
            "(|final test loss - uninterrupted run's|)")
    if torchrun_row is not None:
        b.target(name, torchrun_row.get("loss_diff") if torchrun_row["ok"] else None, "<= 1e-6")
        b.note(f"torchrun: {torchrun_row['role']}, 100 Mbit/s tbf links, --max-restarts 1, c10d "
               f"rendezvous; worker 1 killed at step {torchrun_row['kill_step']}: "
               f"{torchrun_row['outcome']} (resumed from step {torchrun_row.get('resumed_from')}, "
               f"{torchrun_row['run_s']} s with the restart)")
    elif with_torchrun:
        b.target(name, None, "<= 1e-6", not_run=f"needs network namespaces: {why}")
    for case in chosen:  # one line per (strategy, role): what the docs show
        mine = [r for r in rows if r["strategy"] == case.strategy and r["role"] == case.role]
        outcomes = ", ".join(f"{v} {k}" for k, v in
                             collections.Counter(r["outcome"] for r in mine).items())
        det = [r["detected_s"] for r in mine if isinstance(r.get("detected_s"), float)]
        b.note(f"{case.strategy} {case.role}: {len(mine)} kills: {outcomes}; "
               f"{sum(r['ok'] for r in mine)} as promised"
               + (f"; detected in {min(det):.2f}-{max(det):.2f} s" if det else ""))
    if not chosen:
        b.finish()
        return
    b.note(f"{args.trials} kills per (strategy, role), {args.steps} steps, checkpoint every "
           f"{BASE['checkpoint_every']} (bsp_shared: supersteps), kill steps in [{lo}, {hi}), "
           f"timeout_s {BASE['timeout_s']}; detected_s from the death the bench saw (fail: to the "
           "launcher's error; lost: to the first event recording the loss)")
    b.finish()


def max_param_diffs(rows: list[dict[str, Any]], names: list[str]) -> dict[str, float | None]:
    """Per strategy, the largest |resumed - uninterrupted| parameter difference of its trials
    (None: no trial resumed). The torchrun row compares final losses and has no such field."""
    out: dict[str, float | None] = {}
    for name in dict.fromkeys(names):
        diffs = [r["max_param_diff"] for r in rows if r["strategy"] == name
                 and isinstance(r.get("max_param_diff"), float)]
        out[name] = max(diffs) if diffs else None
    return out


if __name__ == "__main__":
    main()
