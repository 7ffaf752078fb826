"""Golden fingerprints: what a refactor must not change.

For every strategy (and every codec under ``allreduce``) a short fixed-seed run on ``digits``;
its fingerprint is a SHA-256 of the final parameters (where the method is deterministic) and the
bytes rank 0 sent and received at each step. ``tests/golden_fingerprints.json`` holds the values
recorded before the house-plan refactor; ``tests/test_golden.py`` checks that they still hold.

Re-record (only when a change is *meant* to alter the numbers, and say so in the commit)::

    python -m tests.golden --write
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
FILE = HERE / "golden_fingerprints.json"

_BASE: dict[str, Any] = {"workload": {"name": "digits", "options": {"hidden": 32}},
                         "workers": 2, "steps": 12, "batch_size": 16, "lr": 0.1, "seed": 3,
                         "eval_every": 100, "progress": False, "timeout_s": 60}

#: name -> (config overrides, whether the final parameters are a deterministic function of it)
CASES: dict[str, tuple[dict[str, Any], bool]] = {
    **{f"allreduce-{c}": ({"codec": c}, True)
       for c in ("dense", "fp16", "bf16", "qsgd", "signsgd", "powersgd")},
    "allreduce-topk": ({"codec": {"name": "topk", "options": {"ratio": 0.1}}}, True),
    "allreduce-randomk": ({"codec": {"name": "randomk", "options": {"ratio": 0.1}}}, True),
    "allreduce-lgc": ({"codec": {"name": "lgc", "options": {"dense_first_last": False,
                                                             "ratio": 0.05}}}, True),
    "allreduce-dense-momentum": ({"momentum": 0.9, "weight_decay": 1e-3}, True),
    "allreduce-overlap": ({"strategy": {"name": "allreduce", "options": {"overlap": True}}},
                          True),
    "local": ({"strategy": "local"}, True),
    "param_server-sync": ({"strategy": {"name": "param_server",
                                        "options": {"mode": "sync"}}}, True),
    "param_server-sync-topk": ({"strategy": {"name": "param_server", "options": {"mode": "sync"}},
                                "codec": {"name": "topk", "options": {"ratio": 0.1}}}, True),
    "pipeline": ({"strategy": {"name": "pipeline",
                               "options": {"models": [{"lr": 0.05}, {"lr": 0.2}],
                                           "variant_records": False}}}, True),
    "gossip-goco": ({"strategy": {"name": "gossip", "options": {"topology": "ring"}},
                     "workers": 3, "workload": {"name": "digits", "options": {"hidden": 32},
                                                "redundancy": 2}}, True),
    "gossip-choco-topk": ({"strategy": "gossip", "workers": 3,
                           "codec": {"name": "topk", "options": {"ratio": 0.2}}}, True),
    "coded_ps": ({"strategy": {"name": "coded_ps", "options": {"s": 0}}}, True),
    # timing decides which gradient lands in which superstep / round: bytes of rank 0's steps only
    "bsp_shared": ({"strategy": {"name": "bsp_shared",
                                 "options": {"machines": 2, "grads_per_superstep": 2}}}, False),
}


def config(name: str, out: Path) -> dict[str, Any]:
    over, _ = CASES[name]
    cfg = json.loads(json.dumps(_BASE))
    cfg.update(over)
    cfg["out"] = str(out / name)
    return cfg


def params_digest(results: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for res in results:
        for p in res.get("params") or []:
            h.update(p.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def step_bytes(run_dir: Path, rank: int = 0) -> list[list[int]]:
    rows = []
    for line in (run_dir / f"events.rank{rank}.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e.get("kind") == "step":
            rows.append([int(e["bytes_sent"]), int(e["bytes_recv"])])
    return rows


def fingerprint(name: str, out: Path) -> dict[str, Any]:
    import tandem

    cfg = config(name, out)
    summary = tandem.train(cfg, return_results=True)
    _, deterministic = CASES[name]
    fp: dict[str, Any] = {}
    if deterministic:
        fp["params"] = params_digest(summary["results"])
        fp["bytes"] = step_bytes(Path(cfg["out"]))
        if name == "pipeline":  # exchanges finish on their own threads: which step's record
            fp["bytes"] = [[sum(b[i] for b in fp["bytes"]) for i in (0, 1)]]  # holds them varies
    else:
        fp["bytes"] = sorted({tuple(b) for b in step_bytes(Path(cfg["out"]), rank=2)})
        fp["bytes"] = [list(b) for b in fp["bytes"]]
    return fp


def main(argv: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        got = {name: fingerprint(name, Path(tmp)) for name in CASES}
    if "--write" in argv:
        FILE.write_text(json.dumps(got, indent=1) + "\n")
        print(f"wrote {FILE}")
    else:
        print(json.dumps(got, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
