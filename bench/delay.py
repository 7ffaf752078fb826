"""allreduce ``delay=1``: does one-step-stale SGD still train, and what makes it train?

``delay=1`` hides an exchange behind the next step's compute (its speed on real links is in
``docs/cluster.md``); what it costs is accuracy, since every gradient is applied one update after
the weights it was computed on. This benchmark measures that cost on the cluster benchmark's
CNN, where plain ``delay=1`` ended at chance (0.10), and the two remedies Tandem offers:

* ``predict`` (``--strategy-opt predict=true``, the default with ``delay=1``): each gradient
  computed at ``w + (w - w_prev)``, the weights it will be applied near
  (:mod:`tandem.strategies.allreduce.prediction`);
* Nesterov momentum (``--optimizer sgd --optimizer-opt nesterov=true``): for a delay of one
  step it is the spike compensation of Kosson et al. (2021): the update ``lr (g + m v)`` gives a
  gradient the weight ``1 + m`` on the step it arrives, what heavy-ball momentum would have
  given it over that step and the one it missed, and the same weights after.

Rows, per codec (dense, PowerSGD rank 1, top-k 1 %: the cluster's delayed rows): ``delay=0``
with heavy-ball and with Nesterov momentum (the references), ``delay=1`` plain (heavy-ball, no
prediction: what ``delay=1`` was before), and ``delay=1`` with Nesterov and prediction; for the
dense codec also each remedy alone. mnist5k's CNN with ``hidden=360`` (201,538 parameters), 4
workers on one machine with no link limit (accuracy per step is the question, not speed),
batch 32, SGD lr 0.05, momentum 0.9, 200 steps, seed 0, evaluated every 10 steps on 1,000 test
images (standard error about 0.006 near 0.96). One seed: a row's final accuracy moves by about
a point between seeds, more where training is unstable.

Targets (per codec): the delayed run with both remedies reaches 0.95 within the 200 steps, and
ends within 1 point of ``delay=0`` with the same (Nesterov) optimizer: where it must not lose.

    .venv/bin/python -m bench.delay [--quick]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import Bench

CODECS = {"dense": {"name": "dense"}, "powersgd r1": {"name": "powersgd", "options": {"rank": 1}},
          "topk 0.01": {"name": "topk", "options": {"ratio": 0.01}}}
#: row -> (allreduce options, SGD options)
VARIANTS = {
    "delay=0": ({}, {}),
    "delay=0 nesterov": ({}, {"nesterov": True}),
    "delay=1 plain": ({"delay": 1, "predict": False}, {}),
    "delay=1 predict": ({"delay": 1}, {}),
    "delay=1 nesterov": ({"delay": 1, "predict": False}, {"nesterov": True}),
    "delay=1 nesterov predict": ({"delay": 1}, {"nesterov": True}),
}
#: the remedies one at a time only for the dense codec
ALONE = ("delay=1 predict", "delay=1 nesterov")
TARGET, TEST_N = 0.95, 1000  # mnist5k test_fraction 0.2


def plan(quick: bool) -> list[tuple[str, str]]:
    """(codec, variant) rows in the order they run."""
    codecs = ["dense"] if quick else list(CODECS)
    return [(c, v) for c in codecs for v in VARIANTS if c == "dense" or v not in ALONE]


def run_row(codec: str, variant: str, steps: int, out: Path) -> dict[str, Any]:
    import tandem

    strategy, sgd = VARIANTS[variant]
    s = tandem.train({
        "workload": {"name": "mnist5k", "options": {"hidden": 360}}, "batch_size": 32,
        "lr": 0.05, "momentum": 0.9, "eval_every": 10, "target_accuracy": TARGET,
        "workers": 4, "steps": steps, "seed": 0, "progress": False, "timeout_s": 300,
        "strategy": {"name": "allreduce", "options": strategy}, "codec": CODECS[codec],
        "optimizer": {"name": "sgd", "options": sgd}, "out": str(out)})
    acc = s["final_test_accuracy"]
    return {"final_acc": acc, "acc_se": math.sqrt(acc * (1 - acc) / TEST_N),
            "steps_to_target": s["steps_to_target"], "final_loss": s["final_test_loss"],
            "train_s": s["wall_time_s"] - (s.get("excluded_time_s") or 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the dense codec only, 60 steps")
    args = ap.parse_args()
    steps = 60 if args.quick else 200
    bench = Bench("delay_quick" if args.quick else "delay",
                  ["codec", "variant", "final_acc", "acc_se", "steps_to_target", "final_loss",
                   "train_s"])
    got: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-delay-") as tmp:
        for i, (codec, variant) in enumerate(plan(args.quick)):
            got[codec, variant] = m = run_row(codec, variant, steps, Path(tmp) / str(i))
            print(f"[delay] {codec} {variant}: {m}", flush=True)
            bench.row(codec=codec, variant=variant, steps=steps, **m)
    for codec in dict.fromkeys(c for c, _ in got):
        both, ref = got[codec, "delay=1 nesterov predict"], got[codec, "delay=0 nesterov"]
        bench.target(f"{codec}: delay=1 with nesterov and predict, steps to {TARGET}",
                     both["steps_to_target"], f"<= {steps}")
        bench.target(f"{codec}: delay=1 with nesterov and predict, final accuracy - delay=0 "
                     "nesterov's", both["final_acc"] - ref["final_acc"], ">= -0.01")
    bench.note(f"mnist5k hidden=360, 4 workers, batch 32, SGD lr 0.05 momentum 0.9, {steps} "
               f"steps, seed 0, no link limit; {TEST_N} test images; train_s: training wall "
               "time, evaluation excluded (2 cores shared by 4 workers: not a speed result)")
    bench.finish()


if __name__ == "__main__":
    main()
