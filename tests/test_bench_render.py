"""bench.render: results tables in docs/ are rendered from bench/results/*.json.

A synthetic result renders to an exact doc snippet (rows, the targets' three states, notes, the
provenance line, escaping, idempotence), and the committed docs match what the committed results
render: every marker in docs/ has its result, and no table was edited by hand or left stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` is a package of the repository, not installed

from bench import render  # noqa: E402
from bench.harness import Bench, target_state  # noqa: E402

SYNTH = {
    "name": "toy", "date": "2026-01-02T03:04:05", "command": ".venv/bin/python -m bench.toy --fast",
    "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": True},
    "machine": {"cores": 2, "cpu_model": "Test CPU", "memory_gib": 8.0},
    "torch": "2.13.0+cpu", "python": "3.11.7", "duration_s": 125.0,
    "columns": ["config", "ms", "acc"],
    "rows": [{"config": "a|b", "ms": 12.3456, "acc": None},
             {"config": "c", "ms": 1234567.0, "acc": 0.9, "extra": 1}],
    "targets": [{"name": "speed", "value": 1.5, "goal": "<= 2", "met": True, "state": "MET"},
                {"name": "real", "value": None, "goal": ">= 1", "met": None, "state": "NOT RUN",
                 "reason": "needs root"},
                {"name": "old", "value": 3, "goal": "<= 2", "met": False}],
    "notes": ["first  note", "second"],
}
DOC = ("# Toy\n\nIntro.\n\n<!-- bench:toy -->\nstale table\n<!-- /bench:toy -->\n\nMiddle.\n\n"
       "<!-- bench:toy:targets -->\n<!-- /bench:toy:targets -->\n"
       "<!-- bench:toy:notes -->\n<!-- /bench:toy:notes -->\nEnd.\n")
HEAD = ("_Measured by `.venv/bin/python -m bench.toy --fast` at commit `0123456789` with "
        "uncommitted changes, 2026-01-02 03:04:05, on 2 cores (Test CPU), 8.0 GiB, "
        "torch 2.13.0+cpu, Python 3.11.7; took 2 min._\n")
EXPECTED = (
    "# Toy\n\nIntro.\n\n<!-- bench:toy -->\n" + HEAD + "\n"
    "| config | ms | acc |\n"
    "|---|---|---|\n"
    "| a\\|b | 12.35 | - |\n"
    "| c | 1,234,567 | 0.9 |\n"
    "\n<!-- /bench:toy -->\n\nMiddle.\n\n<!-- bench:toy:targets -->\n" + HEAD + "\n"
    "| target | value | goal | state |\n"
    "|---|---|---|---|\n"
    "| speed | 1.5 | <= 2 | MET |\n"
    "| real | - | >= 1 | NOT RUN (needs root) |\n"
    "| old | 3 | <= 2 | NOT MET |\n"
    "\n<!-- /bench:toy:targets -->\n<!-- bench:toy:notes -->\n" + HEAD + "\n"
    "- first note\n"
    "- second\n"
    "\n<!-- /bench:toy:notes -->\nEnd.\n"
)


def test_synthetic_result_renders_exactly(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy.json").write_text(json.dumps(SYNTH))
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "toy.md"
    doc.write_text(DOC)

    differ, problems = render.render_docs(tmp_path / "docs", tmp_path / "results", write=False)
    assert problems == []
    assert differ == ["toy.md: bench:toy", "toy.md: bench:toy:targets", "toy.md: bench:toy:notes"]
    assert doc.read_text() == DOC  # --check writes nothing
    assert render.main(["--check", "--docs", str(tmp_path / "docs"),
                        "--results", str(tmp_path / "results")]) == 1

    assert render.main(["--docs", str(tmp_path / "docs"),
                        "--results", str(tmp_path / "results")]) == 0
    assert doc.read_text() == EXPECTED
    # idempotent: a second pass changes nothing and --check passes
    assert render.render_docs(tmp_path / "docs", tmp_path / "results") == ([], [])
    assert render.main(["--check", "--docs", str(tmp_path / "docs"),
                        "--results", str(tmp_path / "results")]) == 0


def test_a_view_picks_rows_and_columns(monkeypatch) -> None:
    res = dict(SYNTH, rows=[{"config": "a", "ms": 1.0, "k": "x"}, {"config": "b", "ms": 2.0,
                                                                   "k": "y"}])
    monkeypatch.setitem(render.VIEWS, "toy:y", render.View(
        [render.Col("config", "what"), render.Col("ms", "time", render.ms)], where={"k": "y"}))
    body = render.render_block("toy", "y", res)
    assert body.endswith("| what | time |\n|---|---|\n| b | 2.0 |\n\n")
    empty = render.render_block("toy", "y", dict(res, rows=[]))
    assert "No rows of this kind" in empty


def test_a_table_names_the_runs_that_measured_its_rows(monkeypatch) -> None:
    """Rows kept from an earlier run (``--merge``) are never credited to the last run: a table
    whose rows one older run measured names that run, and a table of several runs lists each
    and says which row is whose. Breaks if a header names the file's last command for rows it
    did not measure."""
    res = dict(SYNTH, rows=[{"config": "a", "ms": 1.0, "k": "x", "run": "2026-01-01T10:20:30"},
                            {"config": "b", "ms": 2.0, "k": "y"},  # the file's own run
                            {"config": "c", "ms": 3.0, "k": "x"}],
               runs={"2026-01-01T10:20:30": {"date": "2026-01-01T10:20:30",
                                             "command": "old cmd",
                                             "git": {"commit": "f" * 40},
                                             "machine": SYNTH["machine"],
                                             "torch": "2.13.0+cpu", "python": "3.11.7"}})
    cols = [render.Col("config"), render.Col("ms", fmt=render.ms)]
    monkeypatch.setitem(render.VIEWS, "toy:x", render.View(cols, where={"k": "x"}))
    monkeypatch.setitem(render.VIEWS, "toy:old", render.View(cols, where={"config": "a"}))
    only_old = render.render_block("toy", "old", res)
    assert only_old.startswith("_Measured by `old cmd` at commit `ffffffffff`, "
                               "2026-01-01 10:20:30, on 2 cores (Test CPU)")
    assert "bench.toy" not in only_old
    both = render.render_block("toy", "x", res)
    assert both == (
        "_Measured in 2 runs, on 2 cores (Test CPU), 8.0 GiB, torch 2.13.0+cpu, "
        "Python 3.11.7; the `run` column names each row's:_\n\n"
        "- `01-01 10:20`: `old cmd` at commit `ffffffffff`, 2026-01-01 10:20:30\n"
        "- `01-02 03:04`: `.venv/bin/python -m bench.toy --fast` at commit `0123456789` "
        "with uncommitted changes, 2026-01-02 03:04:05; took 2 min\n\n"
        "| run | config | ms |\n|---|---|---|\n"
        "| 01-01 10:20 | a | 1.0 |\n| 01-02 03:04 | c | 3.0 |\n\n")
    assert render.render_block("toy", "targets", res).startswith(
        "_From the rows of 2 runs (each table above names its own); the last run: "
        "Measured by `.venv/bin/python -m bench.toy --fast`")


def test_problems_are_reported_not_rendered(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "x.md"
    text = ("<!-- bench:missing -->\nkept\n<!-- /bench:missing -->\n"
            "<!-- bench:toy:nosuchview -->\n<!-- /bench:toy:nosuchview -->\n"
            "<!-- bench:toy -->\nnever closed\n")
    doc.write_text(text)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "toy.json").write_text(json.dumps(SYNTH))
    differ, problems = render.render_docs(tmp_path / "docs", tmp_path / "results")
    assert len(problems) == 3, problems
    assert "missing.json does not exist" in problems[0]
    assert "no view 'toy:nosuchview'" in problems[1]
    assert "no closing <!-- /bench:toy -->" in problems[2]
    assert doc.read_text() == text
    assert render.main(["--check", "--docs", str(tmp_path / "docs"),
                        "--results", str(tmp_path / "results")]) == 1


def test_target_states(tmp_path: Path, monkeypatch) -> None:
    import bench.harness

    monkeypatch.setattr(bench.harness, "RESULTS", tmp_path)
    b = Bench("toy", ["config"])
    assert b.target("fast", 1.0, "<= 2") is True
    assert b.target("slow", 3.0, "<= 2") is False
    assert b.target("none", None, "<= 2") is False
    assert b.target("root", 1.0, "<= 2", not_run="needs root") is False
    got = json.loads(b.finish().read_text())
    assert [(t["met"], t["state"]) for t in got["targets"]] == [
        (True, "MET"), (False, "NOT MET"), (False, "NOT MET"), (None, "NOT RUN")]
    assert got["targets"][3]["reason"] == "needs root" and got["targets"][3]["value"] is None
    assert target_state({"met": True}) == "MET" and target_state({"met": None}) == "NOT RUN"
    for key in ("date", "command", "git", "machine", "torch", "python", "duration_s"):
        assert key in got, key
    assert set(got["git"]) >= {"commit", "dirty"}
    assert set(got["machine"]) >= {"cores", "cpu_model", "memory_gib"}


def test_the_headline_shows_the_best_row_and_what_it_is_compared_with() -> None:
    """The README's table: the three 10 Mbit/s CNN targets, the best row the targets named, and
    its references, under the run that measured those rows (not the file's last run). Breaks if
    the best row is not the one the note names, if another rate's row or target slips in, or if
    the header credits the rows to the wrong run."""
    run = "2026-01-01T10:20:30"
    rows = [{"rate": "10mbit", "workload": "cnn", "system": s, "time_to_target_s": t,
             "steps_to_target": 9, "step_ms": 1.0, "run": run}
            for s, t in [("ddp", 50.0), ("gossip x", 2.0), ("gossip y", 1.0),
                         ("ddp + powersgd r2", 6.0), ("local (compute only)", 0.5)]]
    rows.append({"rate": "100mbit", "workload": "cnn", "system": "gossip x",
                 "time_to_target_s": 0.1, "run": run})
    targets = [{"name": "10mbit cnn: plain DDP time to 0.95 / the best Tandem row's",
                "value": 25.0, "goal": ">= 10", "met": True},
               {"name": "100mbit cnn: the best ... / compute-only", "value": 3.0,
                "goal": "<= 1.3", "met": False},
               {"name": "emulation error, 10mbit cnn ddp", "value": 0.1, "goal": "<= 0.2",
                "met": True}]
    res = dict(SYNTH, rows=rows, targets=targets,
               notes=["best Tandem row at 10mbit cnn: gossip x (2.0 s to 0.95)"],
               runs={run: {"date": run, "command": "old cmd", "git": {"commit": "f" * 40}}})
    body = render.render_block("cluster", "headline", res)
    assert body.startswith("_Measured by `old cmd` at commit `ffffffffff`")
    assert "| 10mbit cnn: plain DDP time to 0.95 / the best Tandem row's | 25.00 | >= 10 | MET |" \
        in body
    assert "100mbit" not in body and "emulation" not in body
    systems = [line.split(" | ")[1] for line in body.splitlines() if line.startswith("| ")
               and (" | 01-01 10:20 |" in line)]
    assert systems == ["gossip x", "ddp", "ddp + powersgd r2", "local (compute only)"]
    assert "| best Tandem row | gossip x | 2.0 |" in body
    assert "Where the best row" not in body  # no avg_s recorded: no decomposition
    assert "within 20 % of the real links on 1 of the 1 rows" in body and "over:" not in body
    res["targets"].append({"name": "emulation error, 10mbit cnn gossip x", "value": 0.25,
                           "goal": "<= 0.2", "met": False})
    assert "on 1 of the 2 rows of `bench/results/cluster.json`; over: 10mbit cnn gossip x " \
        "(25.0 %)._" in render.render_block("cluster", "headline", res)


def test_the_headline_says_where_the_best_rows_time_goes() -> None:
    """Under the table, from the rows alone: the best row's time split into its steps and its
    averaging (``avg_s``), against the compute-only time (the local step x the best row's
    steps + 1, the target's definition). Breaks if a figure is taken from another row."""
    rows = [{"rate": "10mbit", "workload": "cnn", "system": "gossip x", "time_to_target_s": 2.5,
             "avg_s": 0.5, "steps_to_target": 99, "step_ms": 15.0},
            {"rate": "10mbit", "workload": "cnn", "system": "gossip y", "time_to_target_s": 9.0,
             "avg_s": 3.0, "steps_to_target": 9, "step_ms": 99.0},
            {"rate": "10mbit", "workload": "cnn", "system": "local (compute only)",
             "time_to_target_s": 2.0, "avg_s": 0.0, "steps_to_target": 199, "step_ms": 10.0}]
    res = dict(SYNTH, rows=rows, targets=[],
               notes=["best Tandem row at 10mbit cnn: gossip x (2.5 s to 0.95)"])
    body = render.render_block("cluster", "headline", res)
    assert ("_Where the best row's 2.50 s go: 2.00 s of training to step 99 (15.0 ms a step, "
            "1.50x the `local` row's 10.0 ms) and 0.50 s for the one all-reduce") in body
    assert "The compute-only time is 1.00 s (100 steps of the `local` row), so that " \
        "all-reduce alone is 0.50x of it._" in body


def test_the_readme_is_rendered_with_the_docs() -> None:
    assert render.ROOT / "README.md" in render.pages(render.DOCS)
    assert "<!-- bench:cluster:headline -->" in (render.ROOT / "README.md").read_text()


def test_committed_docs_match_committed_results() -> None:
    """What `python -m bench.render --check` checks: every table in docs/ is what its committed
    result renders; a doc with markers and no result fails."""
    marked = [d.name for d in sorted(render.DOCS.glob("*.md")) if "<!-- bench:" in d.read_text()]
    assert "cluster.md" in marked
    differ, problems = render.render_docs(render.DOCS, render.RESULTS, write=False)
    assert problems == [], problems
    assert differ == [], ("tables differ from bench/results (run `python -m bench.render`): "
                          f"{differ}")
