"""Gradient correlation across workers (the measurement LGC stands on): exact on known vectors,
recorded at the requested steps, plotted, and never charged to the method's bytes."""

from __future__ import annotations

import json

import pytest
import torch

import tandem
from tandem.strategies.correlation import layer_slices, pairwise


def test_pairwise_on_known_vectors():
    a = torch.tensor([3.0, 0.0, 1.0, 0.0])
    assert pairwise([a, a.clone(), 2 * a], ratio=0.5) == pytest.approx((1.0, 1.0))
    b = torch.tensor([0.0, 2.0, 0.0, 5.0])  # orthogonal, disjoint top-2 supports
    assert pairwise([a, b], ratio=0.5) == pytest.approx((0.0, 0.0))
    assert pairwise([a, -a], ratio=0.5)[0] == pytest.approx(-1.0)
    c = torch.tensor([3.0, 4.0, 0.0, 0.0])  # shares one of a's top-2 positions
    cos, overlap = pairwise([a, c], ratio=0.5)
    assert cos == pytest.approx(9 / (10 ** 0.5 * 5)) and overlap == pytest.approx(0.5)
    assert layer_slices([(2, 3), (4,), ()]) == [(0, 6), (6, 10), (10, 11)]


def test_a_run_records_correlation_without_charging_its_bytes(tmp_path):
    run = tmp_path / "run"
    tandem.train({"workload": {"name": "digits"}, "workers": 3, "steps": 12, "progress": False,
                  "strategy": {"name": "allreduce", "options": {"correlation_every": 5}},
                  "out": str(run)})
    steps = [json.loads(line) for line in (run / "events.rank0.jsonl").open()]
    steps = [s for s in steps if s["kind"] == "step"]
    measured = [s["step"] for s in steps if "grad_cos" in s]
    assert measured == [0, 4, 9]
    for s in steps:
        if "grad_cos" in s:
            assert set(s["grad_cos"]) == {"2.weight", "2.bias", "4.weight", "4.bias"}
            assert all(-1.0 <= v <= 1.0 for v in s["grad_cos"].values())
            assert all(0.0 <= v <= 1.0 for v in s["topk_overlap"].values())
    assert len({s["bytes_sent"] for s in steps}) == 1  # the all-gather is telemetry, not train
    assert (run / "correlation.png").is_file()
