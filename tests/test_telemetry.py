"""Telemetry: event records, merging, summaries, plots and comparisons (one process, fast).

Most tests drive :class:`Recorder` with a fake clock so that every wall time, and therefore every
summary number, is known exactly.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tandem.telemetry.log as log_mod
import tandem.telemetry.recorder as recorder_mod
from tandem.errors import ConfigError, TandemError
from tandem.telemetry import (
    Recorder,
    compare,
    finalize_run,
    get_logger,
    merge_events,
    plot_curves,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(recorder_mod, "_now", fake)
    return fake


def config(codec: str = "topk", workers: int = 2, **kw) -> dict:
    cfg = {"name": None, "strategy": {"name": "allreduce", "options": {}},
           "codec": {"name": codec, "options": {}}, "workers": workers, "target_accuracy": None}
    cfg.update(kw)
    return cfg


def fake_run(run_dir: Path, clock: FakeClock, *, accs=(0.5, 0.8, 0.7, 0.9),
             losses=(1.0, 0.6, 0.5, 0.4), sent=(1000, 3000)) -> None:
    """Two ranks, 4 steps, 1 s of training per step, 10 s of evaluation after every step.

    Rank 0: compute .3, comm .1, idle .1 per step; rank 1: compute .2, comm .2, idle 0.
    Rank 0 evaluates after every step (wall s+1); both ranks wrap the evaluation phase.
    """
    recs = [Recorder(run_dir, r, world=2, progress=False) for r in (0, 1)]
    for rec in recs:
        rec.start(100.0)
    recs[0].info(params=1234, codec_cost=0.5)
    recs[1].info(params=1234, codec_cost=0.7)
    for s in range(4):
        clock.t += 1.0
        recs[0].step(s, compute_s=0.3, comm_s=0.1, idle_s=0.1, bytes_sent=sent[0],
                     bytes_recv=2000, loss=2.0 / (s + 1))
        recs[1].step(s, compute_s=0.2, comm_s=0.2, idle_s=0.0, bytes_sent=sent[1],
                     bytes_recv=500, loss=4.0 / (s + 1), straggled=(s == 2))
        with recs[0].evaluating(), recs[1].evaluating():
            clock.t += 10.0
            recs[0].eval(s, accuracy=accs[s], loss=losses[s])
    for rec in recs:
        rec.close()


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- Recorder -----------------------------------------------------------------------------------
def test_records_have_the_interface_fields(tmp_path: Path, clock: FakeClock) -> None:
    fake_run(tmp_path, clock)
    r0 = read(tmp_path / "events.rank0.jsonl")
    steps = [r for r in r0 if r["kind"] == "step"]
    evals = [r for r in r0 if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert steps[1]["wall"] == pytest.approx(2.0)  # 10 s evaluations are not training time
    assert steps[1]["compute_s"] == 0.3 and steps[1]["bytes_sent"] == 1000
    assert steps[1]["loss"] == pytest.approx(1.0)
    assert evals[2]["test_accuracy"] == 0.7 and evals[2]["test_loss"] == 0.5
    assert evals[2]["wall"] == pytest.approx(3.0)
    assert evals[2]["bytes_sent_cum"] == 3000  # rank 0's train bytes through step 2
    r1 = read(tmp_path / "events.rank1.jsonl")
    assert [r["straggled"] for r in r1 if r["kind"] == "step"] == [False, False, True, False]
    end = r1[-1]
    assert end["kind"] == "end" and end["bytes_sent_total"] == 12000 and end["steps"] == 4


def test_wall_excludes_real_evaluation_time(tmp_path: Path) -> None:
    rec = Recorder(tmp_path, 0, world=1, progress=False)
    rec.start()
    time.sleep(0.05)
    with rec.evaluating():
        time.sleep(0.4)
        rec.eval(0, accuracy=0.5, loss=1.0)
        inside = rec.wall()
    after = rec.wall()
    rec.step(1, compute_s=0.0, comm_s=0.0, idle_s=0.0, bytes_sent=0, bytes_recv=0, loss=None)
    rec.close()
    assert 0.05 <= after < 0.3, after
    assert inside <= after
    eval_rec, step_rec = [r for r in read(rec.path) if r["kind"] in ("eval", "step")]
    assert 0.04 <= eval_rec["wall"] < 0.3
    assert 0.05 <= step_rec["wall"] < 0.3


def test_extra_fields_accept_numpy_and_torch_values(tmp_path: Path) -> None:
    with Recorder(tmp_path, 3, world=4, progress=False) as rec:
        rec.step(0, compute_s=np.float32(0.5), comm_s=0.1, idle_s=0.0, bytes_sent=np.int64(7),
                 bytes_recv=0, loss=torch.tensor(1.5), staleness=np.int64(2),
                 consensus_error=torch.tensor(0.25), per_peer=np.array([1, 2]))
        assert rec.bytes_sent_total == 7
    (step,) = [r for r in read(tmp_path / "events.rank3.jsonl") if r["kind"] == "step"]
    assert step["rank"] == 3 and step["loss"] == 1.5 and step["compute_s"] == 0.5
    assert step["staleness"] == 2 and step["consensus_error"] == 0.25
    assert step["per_peer"] == [1, 2]


def test_progress_bar_only_on_rank_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for rank in (1, 0):
        rec = Recorder(tmp_path / str(rank), rank, world=2, progress_total=3)
        rec.step(0, compute_s=0.1, comm_s=0.0, idle_s=0.0, bytes_sent=2_500_000, bytes_recv=0,
                 loss=0.75)
        rec.close()
        err = capsys.readouterr().err
        if rank == 1:
            assert err == ""
        else:
            assert "MB sent=2.50" in err and "loss=0.75" in err


def test_tensorboard_scalars_on_rank_zero(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    rec = Recorder(tmp_path, 0, world=1, tensorboard=True, progress=False)
    rec.step(0, compute_s=0.1, comm_s=0.0, idle_s=0.0, bytes_sent=10, bytes_recv=0, loss=0.5)
    rec.eval(0, accuracy=0.5, loss=0.7)
    rec.close()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0


def test_tensorboard_missing_is_a_config_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="pip install"):
        Recorder(tmp_path, 0, world=1, tensorboard=True, progress=False)
    # other ranks never touch tensorboard
    Recorder(tmp_path, 1, world=2, tensorboard=True, progress=False).close()


# ---- merge / summary / plot ----------------------------------------------------------------------
def test_finalize_summary_numbers(tmp_path: Path, clock: FakeClock) -> None:
    fake_run(tmp_path, clock)
    s = finalize_run(tmp_path, config(), target_accuracy=0.75, extra={"note": "x"})
    assert s["strategy"] == "allreduce" and s["codec"] == "topk" and s["workers"] == 2
    assert s["steps"] == 4
    assert s["bytes_sent_total"] == 4 * 1000 + 4 * 3000
    assert s["bytes_sent_per_worker_per_step"] == pytest.approx(16000 / (2 * 4))
    busy = 4 * 0.5 + 4 * 0.4
    assert s["compute_fraction"] == pytest.approx((4 * 0.3 + 4 * 0.2) / busy)
    assert s["comm_fraction"] == pytest.approx((4 * 0.1 + 4 * 0.2) / busy)
    assert s["idle_fraction"] == pytest.approx(4 * 0.1 / busy)
    assert s["wall_time_s"] == pytest.approx(4.0)  # 40 s of evaluation excluded
    assert s["excluded_time_s"] == pytest.approx(40.0)  # ... and reported as such
    assert s["final_test_accuracy"] == 0.9 and s["final_test_loss"] == 0.4
    # accuracies 0.5, 0.8, 0.7, 0.9: the first to reach 0.75 is step 1 at wall 2.0
    assert s["time_to_target_s"] == pytest.approx(2.0)
    assert s["steps_to_target"] == 1
    assert s["bytes_to_target"] == 2 * 1000 + 2 * 3000
    assert s["info"]["params"] == 1234 and s["info"]["codec_cost"] == 0.5
    assert s["info_by_rank"]["1"]["codec_cost"] == 0.7
    assert s["note"] == "x"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["time_to_target_s"] == s["time_to_target_s"]
    assert on_disk["config"]["codec"]["name"] == "topk"


def test_target_never_reached_and_config_target(tmp_path: Path, clock: FakeClock) -> None:
    fake_run(tmp_path, clock)
    s = summarize(tmp_path, config(target_accuracy=0.95))
    assert s["target_accuracy"] == 0.95
    assert s["time_to_target_s"] is None and s["steps_to_target"] is None
    s = summarize(tmp_path, config(target_accuracy=0.95), target_accuracy=0.85)
    assert s["steps_to_target"] == 3 and s["time_to_target_s"] == pytest.approx(4.0)


def test_regression_uses_test_loss(tmp_path: Path, clock: FakeClock) -> None:
    fake_run(tmp_path, clock, accs=(None,) * 4, losses=(1.0, 0.5, 0.3, 0.2))
    s = finalize_run(tmp_path, config(), extra={"target_loss": 0.4})
    assert s["metric"] == "loss"
    assert s["final_test_accuracy"] is None and s["final_test_loss"] == 0.2
    assert s["steps_to_target"] == 2 and s["time_to_target_s"] == pytest.approx(3.0)
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_several_ranks_evaluating_a_step_are_averaged(tmp_path: Path, clock: FakeClock) -> None:
    recs = [Recorder(tmp_path, r, world=2, progress=False) for r in (0, 1)]
    for rec, acc, sent in zip(recs, (0.6, 0.8), (10, 30), strict=True):
        rec.start(100.0)
        rec.step(0, compute_s=1, comm_s=0, idle_s=0, bytes_sent=sent, bytes_recv=0, loss=1.0)
        rec.eval(0, accuracy=acc, loss=1.0)
        rec.close()
    s = finalize_run(tmp_path, config(workers=2), target_accuracy=0.65)
    assert s["final_test_accuracy"] == pytest.approx(0.7)
    assert s["evaluations"] == 1 and s["steps_to_target"] == 0
    assert s["bytes_to_target"] == 40  # both ranks' step-0 bytes


def test_curves_png_is_valid(tmp_path: Path, clock: FakeClock) -> None:
    fake_run(tmp_path, clock)
    merge_events(tmp_path)
    out = plot_curves(tmp_path)
    assert out == tmp_path / "curves.png"
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_merge_sorts_and_tolerates_truncated_line(tmp_path: Path, clock: FakeClock) -> None:
    fake_run(tmp_path, clock)
    n0 = len(read(tmp_path / "events.rank0.jsonl"))
    n1 = len(read(tmp_path / "events.rank1.jsonl"))
    with open(tmp_path / "events.rank1.jsonl", "a") as f:
        f.write('{"kind": "step", "rank": 1, "step": 4, "wall": 5.')  # killed mid-write
    records = merge_events(tmp_path)
    assert len(records) == n0 + n1
    merged = read(tmp_path / "events.jsonl")
    assert merged == records
    keys = [(r["wall"], r["rank"]) for r in merged]
    assert keys == sorted(keys)
    assert {r["rank"] for r in merged} == {0, 1}
    s = summarize(tmp_path, config())
    assert s["steps"] == 4  # the truncated step 4 is not counted


def test_merge_without_events_raises(tmp_path: Path) -> None:
    with pytest.raises(TandemError, match="no events"):
        merge_events(tmp_path)


# ---- compare ------------------------------------------------------------------------------------
def test_compare_two_runs(tmp_path: Path, clock: FakeClock) -> None:
    a, b = tmp_path / "run-a", tmp_path / "run-b"
    fake_run(a, clock)
    finalize_run(a, config(codec="topk"), target_accuracy=0.75)
    fake_run(b, clock, sent=(100, 100), accs=(0.1, 0.2, 0.3, 0.4))
    finalize_run(b, config(codec="dense"), target_accuracy=0.75)
    table, rows = compare([a, b], out_png=tmp_path / "cmp" / "compare.png")
    lines = table.splitlines()
    assert "run-a" in table and "run-b" in table
    assert lines[0].split()[:3] == ["run", "strategy", "codec"]
    line_a = next(line for line in lines if line.startswith("run-a"))
    line_b = next(line for line in lines if line.startswith("run-b"))
    assert "topk" in line_a and "2.00 kB" in line_a and "0.9000" in line_a
    assert "dense" in line_b and "100 B" in line_b
    assert [r["run"] for r in rows] == ["run-a", "run-b"]
    assert rows[0]["bytes_sent_per_worker_per_step"] == pytest.approx(2000)
    assert rows[0]["time_to_target_s"] == pytest.approx(2.0)
    assert rows[1]["time_to_target_s"] is None
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000


def test_compare_without_summary_raises(tmp_path: Path, clock: FakeClock) -> None:
    a = tmp_path / "done"
    fake_run(a, clock)
    finalize_run(a, config())
    missing = tmp_path / "unfinished"
    missing.mkdir()
    with pytest.raises(TandemError, match="unfinished.*summary.json"):
        compare([a, missing])


# ---- logging ------------------------------------------------------------------------------------
def test_logger_format_includes_rank(monkeypatch, capsys: pytest.CaptureFixture) -> None:
    log = get_logger("telemetry-test")
    assert log.name == "tandem.telemetry-test"
    monkeypatch.setenv("RANK", "3")
    log.warning("hello %d", 5)
    monkeypatch.delenv("RANK")
    log.warning("bye")
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("WARNING tandem.telemetry-test [rank 3]: hello 5")
    assert err[1].endswith("WARNING tandem.telemetry-test: bye")
    get_logger("tandem.other")
    ours = [h for h in logging.getLogger("tandem").handlers if isinstance(h, log_mod._TqdmHandler)]
    assert len(ours) == 1


def test_bytes_axis_counts_lockstep_peers_and_steps_exclude_server(tmp_path: Path,
                                                                   clock: FakeClock) -> None:
    w0, w1 = (Recorder(tmp_path, r, world=3, progress=False) for r in (0, 1))
    ps = Recorder(tmp_path, 2, world=3, progress=False, role="server")
    for rec in (w0, w1, ps):
        rec.start(100.0)
    clock.t = 101.0
    w0.step(0, compute_s=1, comm_s=0, idle_s=0, bytes_sent=10, bytes_recv=0, loss=1.0)
    w0.eval(0, accuracy=0.5, loss=1.0)
    clock.t = 101.5  # rank 1 writes its step-0 line after rank 0 evaluated: still paid for
    w1.step(0, compute_s=1, comm_s=0, idle_s=0, bytes_sent=30, bytes_recv=0, loss=1.0)
    for k in range(3):  # a server's later updates are neither worker steps nor earlier bytes
        ps.step(k, compute_s=0, comm_s=1, idle_s=0, bytes_sent=100, bytes_recv=0, loss=None)
    for rec in (w0, w1, ps):
        rec.close()
    s = finalize_run(tmp_path, config(workers=3), target_accuracy=0.4)
    assert s["steps"] == 1
    assert s["bytes_sent_total"] == 340
    assert s["bytes_to_target"] == 40
    assert s["bytes_sent_per_worker_per_step"] == pytest.approx(340 / 3)
