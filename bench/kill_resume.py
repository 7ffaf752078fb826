"""Repeated kill -9 and resume: no hang, and the resumed run equals the uninterrupted one.

Each trial starts a fresh ``allreduce`` run with checkpoints, SIGKILLs one worker at a seeded
random step (injected, so the moment is reproducible), checks that the launcher reports the dead
rank within the timeout (a hang would exceed it), resumes from the last checkpoint, and compares
the final parameters with an uninterrupted reference run of the same config.

A trial fails when the run hangs (the launcher's deadline, not the dead rank, ended it), when the
run does not die at all (it finished although a worker was killed: the injection did not work, so
nothing was tested), or when it fails with anything but the launcher's ``WorkerFailed``. Such a
trial is not resumed; the target counts it.

    python -m bench.kill_resume [--trials 20] [--codec dense]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from bench.harness import Bench


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--codec", default="dense")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    import tandem
    from tandem.errors import WorkerFailed

    rng = random.Random(0)
    base = {"workload": {"name": "digits"}, "strategy": "allreduce", "codec": args.codec,
            "workers": args.workers, "steps": args.steps, "batch_size": 16, "lr": 0.1,
            "momentum": 0.9, "seed": 1, "progress": False, "checkpoint_every": 5,
            "timeout_s": 30}
    b = Bench("kill_resume", ["trial", "victim", "kill_step", "outcome", "detected_s",
                              "resumed_from", "max_param_diff"])
    failures, worst = 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        ref = tandem.train(dict(base, out=f"{tmp}/ref"), return_results=True)
        ref_params = ref["results"][0]["params"]
        for trial in range(args.trials):
            victim = rng.randrange(args.workers)
            kill_step = rng.randrange(6, args.steps - 1)
            out = Path(tmp) / f"t{trial}"
            cfg = dict(base, out=str(out), inject_crash=[f"{victim}:{kill_step}"])
            t0 = time.monotonic()
            detected = None
            try:
                tandem.train(cfg, timeout_s=base["timeout_s"] + 60)
                outcome = "did not die"  # a killed worker and a run that went on: a failure
            except WorkerFailed as err:
                detected = time.monotonic() - t0
                outcome = "hang" if "exceeded" in str(err) else "detected"
            except Exception as err:  # noqa: BLE001 - any other end is a failed trial
                outcome = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            if outcome != "detected":
                failures += 1
                b.row(trial=trial, victim=victim, kill_step=kill_step, outcome=outcome,
                      detected_s=detected, resumed_from=None, max_param_diff=None)
                continue
            resumed_from = int((out / "checkpoints" / "LATEST").read_text().split('"step": ')[1]
                               .split(",")[0])
            try:
                res = tandem.train(dict(cfg, resume=True), return_results=True,
                                   timeout_s=base["timeout_s"] + 60)
            except Exception as err:  # noqa: BLE001 - a resume that fails is a failed trial
                failures += 1
                b.row(trial=trial, victim=victim, kill_step=kill_step,
                      outcome=f"resume failed: {type(err).__name__}: "
                              f"{str(err).splitlines()[0][:120]}",
                      detected_s=detected, resumed_from=resumed_from, max_param_diff=None)
                continue
            diff = max(float((a - c).abs().max()) for a, c in
                       zip(ref_params, res["results"][0]["params"], strict=True))
            worst = max(worst, diff)
            b.row(trial=trial, victim=victim, kill_step=kill_step, outcome=outcome,
                  detected_s=detected, resumed_from=resumed_from, max_param_diff=diff)
    b.target("failed trials (a hang, a run that did not die, any other error)", failures,
             "<= 0")
    b.target("max |resumed - uninterrupted| parameter difference",
             worst if failures < args.trials else None, "<= 1e-6")
    b.note(f"{args.trials} kills, {args.workers} workers, codec {args.codec}, "
           f"checkpoint every 5 of {args.steps} steps; detected_s includes process start-up")
    b.finish()


if __name__ == "__main__":
    main()
