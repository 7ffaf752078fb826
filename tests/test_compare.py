"""``tandem compare``: the candidates come from the plan with the baseline first, each one is
trained for real with the same config, and one report covers them all."""

from __future__ import annotations

import json
from html.parser import HTMLParser

from typer.testing import CliRunner

from tandem.cli import app
from tandem.compare import BASELINE, candidates, strategy_of


def test_strategy_of_methods():
    assert strategy_of("param_server:candidate") == {"name": "param_server",
                                                     "options": {"mode": "candidate"}}
    assert strategy_of("allreduce") == {"name": "allreduce", "options": {}}


def test_candidates_start_with_the_baseline_and_hold_no_duplicates():
    picks = candidates({"workload": {"name": "digits"}, "workers": 2, "net": "10mbit:1ms"}, k=3)
    assert picks[0] == BASELINE and len(picks) == len(set(picks)) == 4
    assert all(m != "local" for m, _ in picks)


def test_compare_command_trains_each_candidate_and_writes_one_report(tmp_path):
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", "--workload", "digits", "--workers", "2",
                                   "--steps", "8", "--net", "100mbit:1ms", "--candidates", "1",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    tried = next(line for line in res.output.splitlines() if line.startswith("tried: "))
    pairs = tried.removeprefix("tried: ").split(", ")
    assert pairs[0] == "allreduce/dense" and len(pairs) == 2
    runs = [d for d in out.iterdir() if (d / "summary.json").is_file()]
    assert len(runs) == 2
    for d in runs:
        assert json.loads((d / "summary.json").read_text())["steps"] >= 8

    class Rows(HTMLParser):
        rows = 0

        def handle_starttag(self, tag, attrs):
            self.rows += tag == "tr"

    page = Rows()
    page.feed((out / "report.html").read_text())
    assert page.rows >= 3  # header + one row per run (plus config tables)


def test_compare_refuses_bad_input_in_one_line(tmp_path):
    res = CliRunner().invoke(app, ["compare", "--workers", "0", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--workers 0" in res.output
