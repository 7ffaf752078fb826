"""The allreduce strategy is the DDP-equivalent baseline: same seeds, same parameters as DDP."""

from __future__ import annotations

import torch

import jobs
import tandem
from tandem.launch import spawn


def test_allreduce_equals_torch_ddp(tmp_path):
    cfg = {
        "workload": {"name": "digits"},
        "strategy": "allreduce",
        "codec": "dense",
        "workers": 2,
        "steps": 20,
        "batch_size": 16,
        "lr": 0.1,
        "momentum": 0.9,
        "seed": 3,
        "progress": False,
        "out": str(tmp_path / "run"),
    }
    summary = tandem.train(cfg, return_results=True)
    ours = summary["results"][0]["params"]
    # both ranks hold the same model
    for a, b in zip(ours, summary["results"][1]["params"], strict=True):
        assert torch.equal(a, b)
    full = tandem.load_config(cfg).model_dump(mode="json")
    ddp = spawn(jobs.ddp_reference, 2, full, timeout_s=120)[0]
    for a, b in zip(ours, ddp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # training actually moved the parameters away from their initial values
    from tandem.strategies.training import build_model
    from tandem.workloads import build_workload

    init = list(build_model(build_workload(tandem.load_config(cfg).workload, 3), 3).parameters())
    moved = max(
        float((a - b).abs().max()) for a, b in zip(ours, [p.detach() for p in init], strict=True)
    )
    assert summary["steps"] == 20 and moved > 1e-3


def test_run_record_is_complete(tmp_path):
    out = tmp_path / "rec"
    summary = tandem.train(
        {
            "workload": {"name": "digits"},
            "workers": 2,
            "steps": 30,
            "lr": 0.1,
            "progress": False,
            "out": str(out),
            "target_accuracy": 0.5,
            "net": "1gbit:100us",
        }
    )
    for name in ("config.yaml", "events.jsonl", "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    for key in (
        "strategy",
        "codec",
        "workers",
        "steps",
        "wall_time_s",
        "final_test_accuracy",
        "final_test_loss",
        "bytes_sent_total",
        "bytes_sent_per_worker_per_step",
        "compute_fraction",
        "comm_fraction",
        "idle_fraction",
        "time_to_target_s",
    ):
        assert key in summary, key
    # dense digits MLP: 64*128+128+128*10+10 = 9610 floats; ring all-reduce at N=2 sends s each way
    assert summary["bytes_sent_per_worker_per_step"] == 9610 * 4
    assert summary["final_test_accuracy"] > 0.5
    lines = (out / "events.jsonl").read_text().splitlines()
    assert sum('"kind": "step"' in ln or '"kind":"step"' in ln for ln in lines) == 2 * 30
