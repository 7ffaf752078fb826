"""Compressed gossip: the same GOCO run with each self-contained codec, on slow emulated links.

4 peers on a ring train the mnist5k small CNN by gossip (GOCO mode, no stragglers), every link
emulated (``--net``, default 10mbit:1ms: a slow shared link, where exact gossip's whole parameter
vectors dominate the step; at 100mbit the compute of 4 processes on 2 cores does).

Rows, side by side in one run: exact gossip (``dense``: whole parameter vectors) and
CHOCO-gossip with fp16, QSGD, signSGD, top-k at 10 % and 1 %, and random-k at 10 %, each at its
default consensus step (``tandem.strategies.gossip.choco.default_consensus_step``).
Columns: test accuracy of the network-average model and of the worst peer's own model, bytes
per peer per step and the ratio to exact gossip, the final consensus error (mean
||x_i - mean x||^2), time to the target accuracy (rank 0's clock, evaluation excluded) and the
speed-up over exact gossip.

    .venv/bin/python -m bench.gossip_codecs [--steps N] [--net 100mbit:1ms]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import tandem
from bench.harness import Bench
from tandem.telemetry.curves import time_at

NET = "10mbit:1ms"
TARGET = 0.85  # test accuracy of the network-average model
ROWS: list[tuple[str, str, dict[str, Any]]] = [
    ("exact (dense)", "dense", {}), ("fp16", "fp16", {}), ("qsgd", "qsgd", {}),
    ("signsgd", "signsgd", {}), ("topk 0.1", "topk", {"ratio": 0.1}),
    ("topk 0.01", "topk", {"ratio": 0.01}), ("randomk 0.1", "randomk", {"ratio": 0.1}),
]


def run_row(label: str, codec: str, opts: dict[str, Any], steps: int, net: str, out: Path
            ) -> dict[str, Any]:
    cfg = {"strategy": {"name": "gossip", "options": {"mode": "goco", "topology": "ring"}},
           "codec": {"name": codec, "options": opts}, "workload": {"name": "mnist5k"},
           "workers": 4, "steps": steps, "lr": 0.05, "momentum": 0.0, "batch_size": 32,
           "seed": 0, "eval_every": max(1, steps // 20), "net": net, "progress": False,
           "out": str(out / label.replace(" ", "_").replace("(", "").replace(")", ""))}
    s = tandem.train(cfg, timeout_s=1800)
    evals = s["results"][0]["evals"]
    hit = next((e for e in evals if (e.get("accuracy") or 0) >= TARGET), None)
    last = evals[-1]
    return {"config": label, "consensus_step": s["info"].get("consensus_step") or 1.0,
            "final_accuracy": last["accuracy"], "worst_peer_accuracy": last["peer_accuracy_min"],
            "consensus_error": last["consensus_error"],
            "bytes_per_step": s["bytes_sent_per_worker_per_step"],
            "time_to_target_s": round(time_at(hit), 2) if hit else None,
            "steps_to_target": hit["step"] + 1 if hit else None,
            "s_per_step": round(last["wall"] / steps, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--net", default=NET, help="emulated link of every peer")
    args = ap.parse_args()
    bench = Bench("gossip_codecs", ["config", "consensus_step", "final_accuracy",
                                    "worst_peer_accuracy",
                                    "consensus_error", "bytes_per_step", "bytes_vs_exact",
                                    "time_to_target_s", "steps_to_target", "s_per_step",
                                    "speedup"])
    with tempfile.TemporaryDirectory(prefix="bench-gossip-codecs-") as tmp:
        rows = [run_row(label, codec, opts, args.steps, args.net, Path(tmp))
                for label, codec, opts in ROWS]
    exact = rows[0]
    for r in rows:
        r["bytes_vs_exact"] = round(r["bytes_per_step"] / exact["bytes_per_step"], 5)
        t, t0 = r["time_to_target_s"], exact["time_to_target_s"]
        r["speedup"] = round(t0 / t, 2) if t and t0 else None
        bench.row(**r)
    compressed = [r for r in rows[1:] if r["bytes_vs_exact"] <= 0.1]
    best = max(compressed, key=lambda r: r["speedup"] or 0.0)
    bench.target(f"speed-up to {TARGET} over exact gossip, best codec at <= 1/10 of its bytes "
                 f"({best['config']})", best["speedup"], ">= 2")
    bench.target(f"accuracy gap to exact gossip ({best['config']}), points",
                 round(100 * (exact["final_accuracy"] - best["final_accuracy"]), 2), "<= 1")
    bench.note(f"4 peers, ring (Metropolis), GOCO mode without stragglers, mnist5k small CNN, "
               f"batch 32, lr 0.05, {args.steps} steps, links {args.net}; compressed rows are "
               "CHOCO-gossip at the codec's default consensus step")
    bench.finish()


if __name__ == "__main__":
    main()
