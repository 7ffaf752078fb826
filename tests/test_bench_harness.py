"""bench.harness's --merge: a partial run keeps what it did not measure, and never replaces a
measured target with a NOT RUN one."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` is a package of the repository, not installed

from bench import harness  # noqa: E402


def test_keep_previous_keeps_unmeasured_rows_and_measured_targets(tmp_path, monkeypatch):
    """Breaks if a merged file loses a kept row or a note written by hand, keeps a row this run
    re-measured, lets a NOT RUN target overwrite a measured one, or keeps an old target this run
    measured again."""
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    old = {"date": "then", "command": "old cmd", "git": {"commit": "a" * 40},
           "rows": [{"rate": "10mbit", "system": "ddp", "v": 1},
                    {"rate": "100mbit", "system": "ddp", "v": 2}],
           "targets": [{"name": "headline", "value": 3.0, "goal": ">= 2", "met": True,
                        "state": "MET"},
                       {"name": "err 100mbit ddp", "value": 0.5, "goal": "<= 0.2",
                        "met": False, "state": "NOT MET"}],
           "notes": ["kept: from an older merge", "a note of that run",
                     "100mbit: how that rate's links were built",
                     "by hand: a row relabelled after its run"]}
    (tmp_path / "x.json").write_text(json.dumps(old))
    b = harness.Bench("x", ["rate", "system", "v"])
    b.keep_previous(lambda r: r["rate"] != "100mbit", lambda t: True, "100mbit ddp",
                    keep_note=lambda n: n.startswith("100mbit:"))
    b.row(rate="100mbit", system="ddp", v=20)
    b.target("headline", None, ">= 2", not_run="this run left out 10mbit")
    b.target("err 100mbit ddp", 0.1, "<= 0.2")
    rec = b.record()
    assert [(r["rate"], r["v"]) for r in rec["rows"]] == [("10mbit", 1), ("100mbit", 20)]
    by = {t["name"]: t for t in rec["targets"]}
    assert len(rec["targets"]) == 2
    assert by["headline"]["state"] == "MET" and by["headline"]["value"] == 3.0
    assert by["err 100mbit ddp"]["state"] == "MET" and by["err 100mbit ddp"]["value"] == 0.1
    assert "kept: from an older merge" in rec["notes"]
    assert "a note of that run" not in rec["notes"]
    assert "100mbit: how that rate's links were built" in rec["notes"]  # keep_note picked it
    assert "by hand: a row relabelled after its run" in rec["notes"]  # no run writes it again
    assert any(n.startswith("kept: 1 rows") and "old cmd" in n for n in rec["notes"])


def test_every_row_of_a_merged_file_names_the_run_that_measured_it(tmp_path, monkeypatch):
    """Breaks if a kept row loses its run (or takes the new run's), if a row the old file
    already attributed to an older run is re-attributed, if a run's command is lost, or if a
    run no row refers to any more is kept."""
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    monkeypatch.setattr(harness, "provenance", lambda: {
        "date": "2026-12-05T09:00:00", "command": "new cmd", "git": {"commit": "c" * 40},
        "machine": {"cores": 2}, "torch": "t", "python": "p"})
    old = {"date": "2026-12-04T08:00:00", "command": "mid cmd", "git": {"commit": "b" * 40},
           "duration_s": 60.0,
           "rows": [{"system": "ddp", "v": 1},  # measured by the file's own run
                    {"system": "topk", "v": 2, "run": "2026-12-03T07:00:00"},
                    {"system": "fp16", "v": 3, "run": "2026-12-02T06:00:00"}],
           "runs": {"2026-12-03T07:00:00": {"date": "2026-12-03T07:00:00",
                                            "command": "first cmd"},
                    "2026-12-02T06:00:00": {"date": "2026-12-02T06:00:00",
                                            "command": "replaced cmd"}},
           "targets": [], "notes": []}
    (tmp_path / "x.json").write_text(json.dumps(old))
    b = harness.Bench("x", ["system", "v"])
    b.keep_previous(lambda r: r["system"] != "fp16", lambda t: True, "fp16")
    b.row(system="fp16", v=30)
    rec = b.record()
    assert [(r["system"], r["run"]) for r in rec["rows"]] == [
        ("ddp", "2026-12-04T08:00:00"), ("topk", "2026-12-03T07:00:00"),
        ("fp16", "2026-12-05T09:00:00")]
    assert {i: e["command"] for i, e in rec["runs"].items()} == {
        "2026-12-04T08:00:00": "mid cmd", "2026-12-03T07:00:00": "first cmd",
        "2026-12-05T09:00:00": "new cmd"}
    assert rec["runs"]["2026-12-04T08:00:00"]["duration_s"] == 60.0
    assert rec["runs"]["2026-12-05T09:00:00"]["git"]["commit"] == "c" * 40


def test_cluster_targets_rank_the_best_row_among_kept_and_new_rows():
    """bench.cluster's headline targets come from every row of the results, kept ones included:
    breaks if the best Tandem row is taken from this run's rows alone, if a FAILED row can be
    the best, or if compute-only is not the local step time x the best row's steps + 1."""
    from bench import cluster, cluster_targets

    b = harness.Bench("c", cluster.COLUMNS)
    common = {"rate": "10mbit", "workload": "cnn", "status": "ok", "emu_err": 0.1}
    b.rows = [  # as keep_previous leaves them: kept rows first
        dict(common, system="ddp", time_to_target_s=100.0),
        dict(common, system="ddp + powersgd r2", time_to_target_s=30.0),
        dict(common, system="local (compute only)", step_ms=20.0, emu_err=None),
        dict(common, system="allreduce powersgd r2", time_to_target_s=5.0, steps_to_target=99),
        dict(common, system="allreduce qsgd", time_to_target_s=40.0, steps_to_target=90),
        dict(common, system="allreduce topk 0.01", status="FAILED: boom", time_to_target_s=1.0),
    ]
    cluster_targets.targets(b, 4, None, quick=False)
    by = {t["name"]: t["value"] for t in b.targets}
    head = [v for n, v in by.items() if n.startswith("10mbit cnn:") and "param_server" not in n]
    assert head == [100.0 / 5.0, 30.0 / 5.0, 5.0 / (0.020 * 100)]
    assert "best Tandem row at 10mbit cnn: allreduce powersgd r2 (5.0 s to 0.95)" in b.notes
    assert by["emulation error, 10mbit cnn allreduce qsgd"] == 0.1
    assert not any(n.startswith("emulation") and "local" in n for n in by)  # it sends nothing
    # no candidate rows: its M3 target says NOT RUN, never a ratio of other runs' rows
    m3 = next(t for t in b.targets if "param_server candidate (4x steps)" in t["name"])
    assert m3["met"] is None and "side by side" in m3["reason"]
    b.rows += [dict(common, system="param_server sync", time_to_target_s=200.0),
               dict(common, system="param_server candidate, 4x steps", time_to_target_s=20.0)]
    b.targets = []
    cluster_targets.targets(b, 4, None, quick=False)
    m3 = next(t for t in b.targets if "param_server candidate (4x steps)" in t["name"])
    assert (m3["value"], m3["state"]) == (0.1, "MET")


def test_a_headline_ratio_is_taken_between_rows_of_one_run():
    """A ratio against DDP, the hook or compute alone compares rows measured side by side, not
    a row of another run (another day's load, another commit). Breaks if the best row of the
    whole file stands in for the best of the reference's run, or if a reference whose run has no
    Tandem row at the target gets a value."""
    from bench import cluster, cluster_targets

    b = harness.Bench("c", cluster.COLUMNS)
    old = {"rate": "10mbit", "workload": "cnn", "status": "ok", "run": "2026-12-03T13:34:04"}
    new = {"rate": "10mbit", "workload": "cnn", "status": "ok"}  # this run's: stamped later
    b.rows = [
        dict(old, system="ddp", time_to_target_s=120.0),
        dict(old, system="allreduce qsgd", time_to_target_s=40.0, steps_to_target=90),
        dict(new, system="ddp + powersgd r2", time_to_target_s=30.0),
        dict(new, system="local (compute only)", step_ms=20.0),
        dict(new, system="allreduce powersgd r2", time_to_target_s=5.0, steps_to_target=99),
        dict(new, rate="100mbit", system="local (compute only)", step_ms=20.0,
             run="2026-12-04T00:00:00"),
        dict(new, rate="100mbit", system="allreduce powersgd r2", time_to_target_s=3.0,
             steps_to_target=99),
    ]
    cluster_targets.targets(b, 4, None, quick=False)
    by = {t["name"]: t for t in b.targets}
    assert by["10mbit cnn: plain DDP time to 0.95 / the best Tandem row's"]["value"] == 3.0
    assert by["10mbit cnn: DDP + PowerSGD hook time to 0.95 / the best Tandem row's"][
        "value"] == 6.0
    assert "best Tandem row at 10mbit cnn: allreduce powersgd r2 (5.0 s to 0.95)" in b.notes
    # what bench/render reads back for the README, a label with parentheses of its own too
    assert cluster_targets.best_of_notes(["x", *b.notes]) == "allreduce powersgd r2"
    assert cluster_targets.best_of_notes([cluster_targets.BEST_NOTE + "ps (3 + 1) (2.0 s to 0.95)"]
                                         ) == "ps (3 + 1)"
    assert cluster_targets.best_of_notes(["x"]) is None
    parted = [n for n in b.notes if "is compared with its own run's best" in n]
    assert len(parted) == 1 and "the ddp row (2026-12-03T13:34:04)" in parted[0], b.notes
    assert "allreduce qsgd (40.0 s)" in parted[0]  # the hook's run holds the best: no note
    other = by["100mbit cnn: the best Tandem row's time to 0.95 / compute-only time "
               "(local step time x its steps to target)"]
    assert other["value"] is None and other["state"] == "NOT RUN"
    assert "no Tandem row reached the target in the run of the local" in other["reason"]


def test_the_compute_only_row_measured_once_is_reported_at_every_rate_of_the_run():
    """Breaks if a run over two rates reports its compute-only row at the first rate alone (a
    merge then keeps the second rate's old row from another run and machine load), or if a
    rate's other rows are touched."""
    from bench import cluster

    row = ("local row", {"summary": {"steps": 20, "wall_time_s": 4.1}}, None)
    found = {("10mbit", "textlm"): {"rows": {"local": row}},
             ("100mbit", "textlm"): {"rows": {"ddp": ("ddp row", {}, None)}}}
    cluster.share_local(found, "10mbit", "100mbit", "textlm")
    assert found[("100mbit", "textlm")]["rows"] == {"ddp": ("ddp row", {}, None), "local": row}
    found[("100mbit", "cnn")] = {"rows": {}}
    cluster.share_local(found, "10mbit", "100mbit", "cnn")  # none measured for the cnn
    assert found[("100mbit", "cnn")]["rows"] == {}


def test_the_quick_run_measures_the_rows_of_the_headline_targets():
    """make bench's cluster --quick checks the headline claim: its rows are real row keys, and
    they hold the three references and the full run's best rows (gossip, top-k 0.1 %, float16
    average, mixing every step and every 4th). Breaks if a key is misspelt or the best row is
    left out (the quick run's hook ratio then compares the hook with all-reduce rows only:
    1.82x at 574bffc)."""
    from bench import cluster
    from bench.cluster_run import rows_for

    keys = {r.key: r for r in rows_for(4, "cnn")}
    assert set(cluster.QUICK_ROWS) <= set(keys)
    assert {"local", "ddp", "ddp-powersgd"} <= set(cluster.QUICK_ROWS)
    for key in ("gossip-topk0.001-avg16", "gossip-topk0.001-avg16-mix4"):
        best = keys[key]
        assert best.key in cluster.QUICK_ROWS and best.strategy == "gossip"
    assert keys["gossip-topk0.001-avg16-mix4"].strategy_opts == {"average_dtype": "float16",
                                                                 "mix_every": 4}


def test_a_benchmark_without_its_dataset_stops_before_training_and_names_it(monkeypatch):
    """bench/codecs and bench/correlation on a machine without Fashion-MNIST: refused at once
    with the dataset's error, never run on another workload (codecs used to fall back to
    mnist5k under fashion's targets) nor after the rows before it (correlation lost its mnist5k
    rows in a clean-clone make bench)."""
    from bench import codecs, correlation

    from tandem.errors import DataError
    from tandem.workloads import fashion

    monkeypatch.setattr(fashion, "debian_dirs", lambda: [])
    monkeypatch.setattr(fashion, "DEBIAN_DIR", Path("/nonexistent/fashion-mnist"))
    with pytest.raises(DataError, match="Fashion-MNIST not found.*make bench-data"):
        codecs.pick_workload("fashion", 100, 64)
    with pytest.raises(DataError, match="Fashion-MNIST not found"):
        correlation.check_data()


def test_a_bsp_shared_row_is_reported_per_superstep_and_per_agent():
    """bsp_shared's summary counts a step per worker gradient (300 here in 5 s: the CPU's speed,
    whatever the link). Breaks if its row divides by those instead of by its 4 supersteps (its
    updates and exchanges), or charges its agents' bytes and communication to all 8 ranks; an
    all-reduce row must keep its steps and ranks."""
    from bench import cluster
    from bench.cluster_run import Row

    bsp = {"summary": {"steps": 300, "wall_time_s": 5.0, "ranks": 8, "workers": 4,
                       "comm_s_total": 4.0, "bytes_sent_total": 16_000_000,
                       "bytes_sent_per_worker_per_step": 13_333.0,
                       "info": {"bsp_supersteps": 4, "bsp_machines": 4}},
           "tx_bytes": 17_600_000}
    dense = {"summary": {"steps": 200, "wall_time_s": 5.0, "ranks": 4, "comm_s_total": 2.0,
                         "bytes_sent_per_worker_per_step": 1000.0}}
    row_b = Row("bsp_shared", "bsp_shared", "tandem", strategy="bsp_shared")
    row_d = Row("dense", "allreduce dense", "tandem")
    assert cluster.step_s(bsp) == 5.0 / 4
    assert cluster.comm_s(bsp, row_b) == 4.0 / (4 * 4)
    assert cluster.step_s(dense) == 5.0 / 200
    assert cluster.comm_s(dense, row_d) == 2.0 / (4 * 200)
    b = harness.Bench("c", cluster.COLUMNS)
    cluster.report(b, {("10mbit", "cnn"): {"rows": {"bsp_shared": (row_b, bsp, None),
                                                    "dense": (row_d, dense, None)}}}, 4)
    got = {r["system"]: r for r in b.rows}
    assert got["bsp_shared"]["steps"] == 4
    assert got["bsp_shared"]["bytes/step"] == 16_000_000 / (4 * 4)
    assert got["bsp_shared"]["wire/step"] == 17_600_000 / 4 / 4
    assert got["bsp_shared"]["step_ms"] == 1250.0
    assert got["allreduce dense"]["steps"] == 200
    assert got["allreduce dense"]["bytes/step"] == 1000.0


def test_rescore_keeps_the_measured_provenance_and_recomputes_the_targets(tmp_path, monkeypatch):
    """`bench.cluster --rescore` measures nothing: breaks if the file's commit, command or
    duration become the rescore's, if a row is lost, if a stale best-row note survives, or if
    a row on another optimizer than DDP's is ranked as the best."""
    from bench import cluster

    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    rows = [{"rate": "10mbit", "workload": "cnn", "system": "ddp", "status": "ok",
             "time_to_target_s": 60.0, "emu_err": 0.1},
            {"rate": "10mbit", "workload": "cnn", "system": "allreduce fp16", "status": "ok",
             "time_to_target_s": 6.0, "steps_to_target": 9, "emu_err": 0.3},
            # another optimizer than DDP's recipe (Nesterov): never the best row
            {"rate": "10mbit", "workload": "cnn", "system": "allreduce powersgd r1 nesterov",
             "status": "ok", "time_to_target_s": 2.0, "steps_to_target": 9, "emu_err": 0.1}]
    old = {"date": "then", "command": "the measuring command", "git": {"commit": "b" * 40},
           "duration_s": 1234.5, "rows": rows, "targets": [],
           "notes": ["best Tandem row at 10mbit cnn: stale (1.0 s to 0.95)", "a link note"]}
    (tmp_path / "cluster.json").write_text(json.dumps(old))
    cluster.rescore(harness.Bench("cluster", cluster.COLUMNS), 4)
    rec = json.loads((tmp_path / "cluster.json").read_text())
    assert (rec["command"], rec["git"]["commit"], rec["duration_s"]) == \
        ("the measuring command", "b" * 40, 1234.5)
    assert rec["rows"] == [{**r, "run": "then"} for r in rows]  # the run that measured them
    assert rec["runs"]["then"]["command"] == "the measuring command"
    assert "a link note" in rec["notes"] and not any("stale" in n for n in rec["notes"])
    by = {t["name"]: t for t in rec["targets"]}
    assert by["10mbit cnn: plain DDP time to 0.95 / the best Tandem row's"]["value"] == 10.0
    assert by["emulation error, 10mbit cnn allreduce fp16"]["state"] == "NOT MET"


def test_param_server_rescore_scores_where_the_candidate_must_win_and_must_not_lose(
        tmp_path, monkeypatch):
    """`bench.param_server --rescore` measures nothing: breaks if the provenance or a row is
    lost, if the final-model margin compares the wrong rows or takes the wrong sign, or if
    textlm is scored by accuracy instead of its test loss."""
    from bench import param_server

    monkeypatch.setattr(harness, "RESULTS", tmp_path)

    def row(workload, name, t, acc, loss, idle=0.01):
        return {"section": "links", "workload": workload, "net": "10mbit:1ms", "row": name,
                "time_to_target_s": t, "final_acc": acc, "final_loss": loss, "idle_frac": idle}

    rows = [row("cnn", "candidate", None, 0.955, 0.2), row("cnn", "sync PS", 10.0, 0.969, 0.1),
            row("cnn", param_server.BUDGET_ROW, 5.0, 0.96, 0.2),
            row("textlm", "candidate", None, 0.30, 3.26), row("textlm", "sync PS", 8.0, 0.28, 3.23)]
    old = {"date": "then", "command": "the measuring command", "git": {"commit": "c" * 40},
           "duration_s": 99.0, "rows": rows, "targets": [], "notes": ["a note"]}
    (tmp_path / "param_server.json").write_text(json.dumps(old))
    param_server._rescore(harness.Bench("param_server", ["row"]))
    rec = json.loads((tmp_path / "param_server.json").read_text())
    assert (rec["command"], rec["git"]["commit"], rec["rows"]) == \
        ("the measuring command", "c" * 40, [{**r, "run": "then"} for r in rows])
    by = {t["name"]: t for t in rec["targets"]}
    cnn, lm = "links cnn 10mbit:1ms: candidate ", "links textlm 10mbit:1ms: candidate "
    # the time comes from the row run in sync PS's time, the final model's margin from the
    # equal-steps row
    assert by[cnn + "time to target / sync PS's"]["value"] == 0.5
    assert by[cnn + "final test accuracy - sync PS's"]["state"] == "NOT MET"  # -1.4 points
    assert abs(by[cnn + "final test accuracy - sync PS's"]["value"] + 0.014) < 1e-9
    # and after its run in sync PS's time (0.96 against 0.969): within the point
    assert by[cnn + "in sync's time final test accuracy - sync PS's"]["state"] == "MET"
    assert not any(n.startswith(lm + "in sync's time") for n in by)  # no such row there
    assert by[lm + "final test loss - sync PS's"]["state"] == "MET"  # +0.03 nats
    assert by[lm + "time to target / sync PS's"]["state"] == "NOT MET"  # never reached it
    assert not any(n.startswith(lm + "final test accuracy") for n in by)


def test_param_server_budget_row_runs_the_candidate_for_sync_ps_time():
    """Breaks if the candidate's run in sync PS's time is sized from the wrong time (sync's
    time to target first, its whole training time where it never got there), or escapes its
    floor (the section's steps) or its cap."""
    from bench.param_server import BUDGET_CAP, budget_steps

    cand = {"train_s": 10.0}  # 400 steps: 25 ms a step
    assert budget_steps(400, cand, {"time_to_target_s": 45.0, "train_s": 100.0}) == 1800
    assert budget_steps(400, cand, {"time_to_target_s": None, "train_s": 60.0}) == 2400
    assert budget_steps(400, cand, {"time_to_target_s": 2.0, "train_s": 9.0}) == 400
    assert budget_steps(400, cand, {"time_to_target_s": None, "train_s": 1e4}) == \
        BUDGET_CAP * 400


def test_first_error_names_a_cpp_abort_and_never_a_banner():
    """A row that aborted in gloo (no Python traceback) once read 'FAILED: ====' (torchrun's
    banner): breaks if the enforce line is not picked, or a line without words can be."""
    from bench.cluster_run import first_error

    log = ("starting\nterminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
           "  what():  [enforce fail at pair.cc:446] op.preamble.length <= op.nbytes. 2432 vs "
           "1536\n" + "=" * 40 + "\n")
    assert first_error(log).startswith("what():  [enforce fail at pair.cc:446]")
    assert first_error("hosts up\n" + "=" * 40 + "\n-----\n") == "hosts up"
    assert first_error("x\nerror: config invalid\nRuntimeError: later") == "config invalid"


def test_make_bench_runs_only_modules_that_are_benchmarks():
    """Breaks when a helper module is added to bench/ without joining run_all.SKIP: `make bench`
    would run it as a benchmark (and fail, or wait for input)."""
    from bench import run_all

    bench_dir = Path(run_all.__file__).parent
    runnable = {p.stem for p in bench_dir.glob("*.py")
                if '__name__ == "__main__"' in p.read_text()}
    chosen = {p.stem for p in bench_dir.glob("*.py")} - run_all.SKIP
    assert chosen <= runnable, f"helpers run by make bench: {sorted(chosen - runnable)}"


def test_make_bench_never_lists_an_earlier_runs_targets_for_a_failed_benchmark(
        tmp_path, monkeypatch, capsys):
    """A clean clone holds the committed results: when a benchmark fails, its file is an earlier
    run's. Breaks if the closing list prints those targets as this run's, or if make bench's
    status hides the failure."""
    from bench import run_all

    (tmp_path / "results").mkdir()
    for name in ("good", "bad"):
        (tmp_path / "results" / f"{name}.json").write_text(json.dumps({"targets": [
            {"name": f"{name} target", "value": 1.0, "goal": "<= 2", "met": True}]}))
    monkeypatch.setattr(run_all, "HERE", tmp_path)
    monkeypatch.setattr(run_all.subprocess, "call",
                        lambda cmd, cwd: 1 if cmd[-1] == "bench.bad" else 0)
    assert run_all.main(["good", "bad"]) == 1
    closing = capsys.readouterr().out.split("##### targets")[1]
    assert "good target" in closing and "bad target" not in closing
    assert "bad: FAILED in this run" in closing


def test_p2p_rows_time_a_pattern_from_its_first_start_to_its_last_end():
    """Breaks if a swap's time is one rank's (a swap ends when the last rank is done), if a
    fan-out receiver is timed from its own start rather than its sender's (ranks leave a barrier
    apart), or if one receiver's time is mixed with another's."""
    from bench.p2p import MODEL_MESSAGES, by_pattern

    def rank(swap: list[list[float]], fan_out: list[list[float]], fan_in: list[list[float]]):
        return {"swap, receives first": swap,
                "swap, sends first": [[a, a + 2 * (b - a)] for a, b in swap],
                "swap, one way at a time": [[a, a + 0.5 * (b - a)] for a, b in swap],
                "fan-out": fan_out, "fan-in": fan_in, "all-to-all": swap,
                "all-to-all after idle": [[a, a + 3 * (b - a)] for a, b in swap],
                "all-reduce": [[a, a + 4 * (b - a)] for a, b in swap]}

    # rep 0 starts at t=0 and rep 1 at t=10 on the shared clock; ranks start a little apart
    rows = by_pattern([rank([[0.0, 0.10], [10.0, 10.30]], [[0.0, 0.01], [10.0, 10.01]],
                            [[0.0, 0.40], [10.0, 10.20]]),
                       rank([[0.05, 0.20], [10.0, 10.12]], [[0.02, 0.07], [10.01, 10.05]],
                            [[0.05, 0.06], [10.02, 10.03]]),
                       rank([[0.0, 0.11], [10.0, 10.11]], [[0.04, 0.15], [10.03, 10.13]],
                            [[0.0, 0.01], [10.01, 10.02]]),
                       rank([[0.0, 0.10], [10.0, 10.10]], [[0.0, 0.21], [10.0, 10.19]],
                            [[0.0, 0.01], [10.01, 10.02]])])
    # each row holds every rep's span; bench.p2p reports the best and the median
    assert rows["swap, receives first"] == pytest.approx([0.20, 0.30])  # from the first start
    # sends first: each rank's span doubled: rep 0 ends at 0.35 (rank 1), rep 1 at 10.60
    assert rows["swap, sends first"] == pytest.approx([0.35, 0.60])
    assert rows["swap, one way at a time"] == pytest.approx([0.125, 0.15])
    fan_out = [min(rows[f"fan-out, receiver {j}"]) for j in (1, 2, 3)]
    assert fan_out == pytest.approx([0.05, 0.13, 0.19])
    assert rows["fan-out, all received"] == pytest.approx([0.21, 0.19])  # rep 1's is best
    assert rows["fan-in, receiver"] == pytest.approx([0.40, 0.19])  # rep 1: first sender at 10.01
    assert rows["all-to-all"] == rows["swap, receives first"]  # everyone's first start to end
    assert rows["all-to-all after idle"] == pytest.approx([0.50, 0.90])  # rank 1, rank 0
    assert rows["all-reduce"] == pytest.approx([0.60, 1.20])  # from the last join: rank 1's
    assert set(rows) == set(MODEL_MESSAGES)
    assert MODEL_MESSAGES["all-reduce"] == 1.5  # the ring: 2(N-1)/N messages each way, N = 4


def test_the_powersgd_hook_row_puts_every_gradient_in_one_ddp_bucket():
    """Breaks if ``one_bucket`` leaves DDP's 1 MiB first bucket in place: with two buckets in
    flight torch's PowerSGD hook can issue its all-reduces in a different order on each rank
    (a gloo size mismatch; textlm's rows failed so). Checked against DDP's defaults, which make
    two buckets of this 2.4 MB model once they are rebuilt."""
    import jobs
    from tandem.launch import spawn

    default = spawn(jobs.ddp_bucket_sizes, 2, False, timeout_s=120)[0]
    one = spawn(jobs.ddp_bucket_sizes, 2, True, timeout_s=120)[0]
    nbytes = (256 * 1024 + 1024 + 1024 * 320 + 320) * 4
    assert len(default.split(", ")) >= 2, default
    assert one.split(", ") == [str(nbytes)], one


def test_cluster_refuses_a_partial_run_that_would_replace_the_whole_results_file(
        monkeypatch, capsys):
    """`--only` without `--merge` (or a trial `--results` directory) would write a results file
    holding only the rows it measured, losing every other committed row. Breaks if it starts."""
    from bench import cluster

    monkeypatch.setattr(sys, "argv", ["bench.cluster", "--only", "topk"])
    monkeypatch.setattr(cluster, "measure", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit) as info:
        cluster.main()
    assert info.value.code == 2
    assert "--merge" in capsys.readouterr().err


def test_the_cluster_twins_duplex_is_the_p2p_measurement_at_its_rate(tmp_path, monkeypatch):
    """The median of the bidirectional patterns' real median/model; one-way patterns (a fan-in)
    do not count; no measurement at a rate: an ideal link (1.0), said so. The twin's
    ``collective`` is the all-reduce row's, likewise."""
    from bench import cluster_run

    rows = [{"pattern": "swap, receives first", "real median/model": 1.6},
            {"pattern": "swap, one way at a time", "real median/model": 1.4},
            {"pattern": "all-to-all", "real median/model": 1.5},
            {"pattern": "fan-in, receiver", "real median/model": 9.0},
            {"pattern": "all-to-all after idle", "real median/model": 9.0},
            {"pattern": "all-reduce", "real median/model": 1.137}]
    (tmp_path / "p2p_10mbit.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "p2p.json").write_text(json.dumps({"rows": [dict(r, **{"real median/model": None})
                                                            for r in rows]}))
    monkeypatch.setattr(cluster_run, "P2P_RESULTS", tmp_path)
    value, source = cluster_run.measured_duplex("10mbit")
    assert value == 1.5 and "p2p_10mbit.json" in source
    assert cluster_run.measured_duplex("100mbit")[0] == 1.0  # not run on real links
    value, source = cluster_run.measured_duplex("1gbit")
    assert value == 1.0 and "no bench/p2p result" in source
    # the collective's factor is the all-reduce row alone (not in duplex's median above)
    value, source = cluster_run.measured_collective("10mbit")
    assert value == 1.14 and "all-reduce" in source and "p2p_10mbit.json" in source
    assert cluster_run.measured_collective("100mbit")[0] == 1.0


def test_p2p_on_two_hosts_models_one_neighbour_and_feeds_the_two_host_twins(tmp_path,
                                                                              monkeypatch):
    """bench/p2p --hosts 2: the ring has one neighbour, so a swap, a fan-out, a fan-in and an
    all-to-all are one message each way (breaks if the four hosts' counts are kept, which would
    halve the measured factors), it writes a file of its own, and bench/cluster --hosts 2 takes
    its twins' factors from that file, or from the four hosts' file saying so."""
    from bench import cluster_run
    from bench.p2p import MODEL_MESSAGES, model_messages, result_name, ring_neighbours

    assert ring_neighbours(0, 2) == [1] and ring_neighbours(1, 2) == [0]
    assert ring_neighbours(0, 4) == [3, 1]
    two = model_messages(2)
    assert two["swap, receives first"] == two["fan-out, all received"] == 1
    assert two["all-to-all"] == two["fan-in, receiver"] == two["all-reduce"] == 1
    assert "fan-out, receiver 2" not in two
    assert MODEL_MESSAGES == model_messages(4)
    assert MODEL_MESSAGES["swap, receives first"] == 2 and MODEL_MESSAGES["all-to-all"] == 3
    assert MODEL_MESSAGES["all-reduce"] == 1.5
    assert result_name("10mbit", 2) == "p2p_10mbit_2hosts"
    assert result_name("100mbit", 2) == "p2p_2hosts" and result_name("100mbit") == "p2p"
    rows = [{"pattern": "swap, receives first", "real median/model": 1.3},
            {"pattern": "all-reduce", "real median/model": 1.1}]
    (tmp_path / "p2p_10mbit.json").write_text(json.dumps({"rows": [
        {"pattern": "swap, receives first", "real median/model": 1.44}]}))
    monkeypatch.setattr(cluster_run, "P2P_RESULTS", tmp_path)
    value, source = cluster_run.measured_duplex("10mbit", 2)
    assert value == 1.44 and "measured with 4 hosts, not 2" in source
    (tmp_path / "p2p_10mbit_2hosts.json").write_text(json.dumps({"rows": rows}))
    value, source = cluster_run.measured_duplex("10mbit", 2)
    assert value == 1.3 and "p2p_10mbit_2hosts.json" in source and "4 hosts" not in source
    assert cluster_run.measured_collective("10mbit", 2)[0] == 1.1
    assert cluster_run.measured_duplex("10mbit")[0] == 1.44  # four hosts: their own file


def test_a_result_records_the_tree_it_started_from_not_the_one_it_ended_in(monkeypatch):
    """bench/p2p builds its Bench after measuring: a file edited meanwhile must not appear as
    the measured tree's. Breaks if provenance reads git when the Bench is built."""
    started = {"commit": "a" * 40, "dirty": False, "dirty_paths": []}
    monkeypatch.setattr(harness, "_START_GIT", started)
    monkeypatch.setattr(harness, "git_state", lambda *a, **k: {"commit": "b" * 40, "dirty": True,
                                                               "dirty_paths": ["edited.py"]})
    b = harness.Bench("x", ["a"])
    assert b.provenance["git"] == started
    assert b.provenance["date"] == time.strftime("%Y-%m-%dT%H:%M:%S",
                                                 time.localtime(harness._PROCESS_STARTED))


def test_cluster_rows_carry_the_machine_cpu_of_each_run_per_step():
    """The real and emulated runs' CPU comes from /proc/stat's counters around each run: breaks
    if a kind is dropped or mixed up (irq goes with softirq, nice with user, iowait with idle)
    or if per-step values use another unit than ms."""
    import os

    from bench.cluster import cpu_columns
    from bench.cluster_run import cpu_spent, cpu_ticks

    hz = os.sysconf("SC_CLK_TCK")
    before = {k: 0 for k in ("user", "nice", "system", "idle", "iowait", "irq", "softirq")}
    after = {"user": 3 * hz, "nice": hz, "system": 2 * hz, "idle": 5 * hz, "iowait": hz,
             "irq": hz, "softirq": hz}
    spent = cpu_spent(before, after)
    assert spent == {"user": 4.0, "system": 2.0, "softirq": 2.0, "idle": 6.0}
    cols = cpu_columns({"cpu_s": spent, "steps_cpu": {"ms_per_step": 12.3456, "busy": 1.5}},
                       {"cpu_s": dict(spent, softirq=0.5)}, 100)
    assert cols == {"cpu_ms": 80.0, "emu_cpu_ms": 65.0, "softirq_ms": 20.0,
                    "emu_softirq_ms": 5.0, "steps_cpu_ms": 12.35, "emu_steps_cpu_ms": None,
                    "steps_busy": 1.5, "emu_steps_busy": None}
    assert cpu_columns({"error": "boom"}, None, 100)["cpu_ms"] is None
    now = cpu_ticks()
    assert set(now) == set(before) and all(v >= 0 for v in now.values())


def test_delay_rows_summarize_every_seed_and_fail_the_step_target_on_any_miss():
    """bench.delay's row over seeds: breaks if the mean or spread is wrong, if a seed that
    never reached the target counts as reached, or if the worst seed's steps are not the
    ones the target reads."""
    from bench.delay import summarize

    row = summarize([{"acc": 0.96, "steps": 139}, {"acc": 0.97, "steps": 179},
                     {"acc": 0.95, "steps": 149}])
    assert row["final_acc"] == pytest.approx(0.96) and row["sd"] == pytest.approx(0.01)
    assert (row["each"], row["steps"], row["reached"], row["worst_steps"]) == \
        ("0.960 0.970 0.950", "139 179 149", 3, 179)
    missed = summarize([{"acc": 0.96, "steps": 139}, {"acc": 0.90, "steps": None}])
    assert (missed["steps"], missed["reached"], missed["worst_steps"]) == ("139 -", 1, None)
