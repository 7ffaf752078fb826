"""bench.lgc's byte budget: the references it sizes to LGC-PS's whole-run bytes must send what
it predicts, byte for byte, or "top-k at LGC's bytes" is a claim nobody checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` is a package of the repository, not installed

from bench import lgc  # noqa: E402

STEPS, WARMUP = 12, 4


def _pushed(tmp_path: Path, codec: dict) -> tuple[float, list[int], int]:
    """Mean bytes a worker pushed over a short digits run on the server, the model's
    parameter sizes, and the bytes of the metadata its first push carried."""
    import tandem
    from tandem.codecs import make_codec
    from tandem.config import WorkloadConfig
    from tandem.strategies.param_server.wire import meta_to_bytes
    from tandem.workloads import build_workload

    s = tandem.train({"workload": {"name": "digits"}, "workers": 3, "steps": STEPS,
                      "batch_size": 16, "lr": 0.05, "seed": 0, "progress": False,
                      "timeout_s": 120, "codec": codec, "out": str(tmp_path / "run"),
                      "strategy": {"name": "param_server", "options": {"mode": "sync"}}})
    workers = [r for r in s["results"] if r.get("role", "worker") == "worker"]
    model = build_workload(WorkloadConfig(name="digits"), 0).model_fn()
    grads = [p.detach().clone() for p in model.parameters()]
    meta = meta_to_bytes(make_codec(codec["name"], codec["options"]).encode(grads).meta)
    return (sum(w["push_bytes"] for w in workers) / len(workers),
            [g.numel() for g in grads], 24 + len(meta))


@pytest.mark.parametrize("ratio", [0.004, 0.02])
def test_topk_reference_sends_exactly_the_predicted_bytes(tmp_path, ratio):
    """Breaks if the packed top-k reference's metered push bytes differ from
    ``topk_push_bytes`` (plus the one-off metadata), so its budget would not be LGC's."""
    codec = {"name": "topk", "options": {"ratio": ratio, "warmup_steps": WARMUP,
                                         "warmup_start": lgc.WARMUP_START,
                                         "positions": "packed"}}
    pushed, sizes, meta = _pushed(tmp_path, codec)
    assert pushed == lgc.topk_push_bytes(sizes, ratio, WARMUP, STEPS) + meta


def test_randomk_reference_sends_exactly_the_predicted_bytes(tmp_path):
    """Breaks if random-k's push is not ``header + framing + 4k`` bytes per step, or a dense
    push not ``header + framing + 4D``."""
    pushed0, sizes, meta0 = _pushed(tmp_path, {"name": "dense", "options": {}})
    dim = sum(sizes)
    # dense, the unit the benchmark divides by: 4 bytes a parameter, header and framing
    assert pushed0 == STEPS * (4 * dim + lgc.PUSH_HEADER_B + lgc.framing([(5,), (dim,)])) + meta0
    budget = 900.0 * STEPS
    ratio = lgc.solve_randomk_ratio(dim, budget, STEPS)
    pushed, _, meta = _pushed(tmp_path / "r", {"name": "randomk", "options": {"ratio": ratio}})
    k = round(ratio * dim)
    per_push = lgc.PUSH_HEADER_B + lgc.framing([(5,), (k,)]) + 4 * k
    assert pushed == STEPS * per_push + meta <= budget + meta
    assert budget - STEPS * per_push < 4 * STEPS  # the largest k that fits


def test_topk_ratio_solver_stays_within_the_budget_and_fills_it():
    """Breaks if the solved density overshoots the budget or leaves a whole step's worth
    of entries unspent."""
    sizes = [640, 64, 1280, 10]
    budget = 2.0e4
    r = lgc.solve_topk_ratio(sizes, budget, WARMUP, STEPS)
    spent = lgc.topk_push_bytes(sizes, r, WARMUP, STEPS)
    assert spent <= budget
    assert lgc.topk_push_bytes(sizes, r * 1.05, WARMUP, STEPS) > budget or r * 1.05 > 0.05


def test_topk_gather_form_matches_the_meter_under_allreduce(tmp_path):
    """Breaks if ``topk_push_bytes(..., gather_world=N)`` (bench/codecs.py sizes its top-k
    reference with it) differs from what the meter counts for packed top-k under all-reduce."""
    import tandem
    from tandem.config import WorkloadConfig
    from tandem.workloads import build_workload

    ratio = 0.01
    s = tandem.train({"workload": {"name": "digits"}, "workers": 3, "steps": STEPS,
                      "batch_size": 16, "lr": 0.05, "seed": 0, "progress": False,
                      "timeout_s": 120, "out": str(tmp_path / "run"),
                      "codec": {"name": "topk", "options": {
                          "ratio": ratio, "warmup_steps": WARMUP,
                          "warmup_start": lgc.WARMUP_START, "positions": "packed"}}})
    sizes = [p.numel() for p in build_workload(WorkloadConfig(name="digits"), 0)
             .model_fn().parameters()]
    want = lgc.topk_push_bytes(sizes, ratio, WARMUP, STEPS, gather_world=3)
    assert s["bytes_sent_per_worker_per_step"] * STEPS == pytest.approx(want, abs=1e-6)
