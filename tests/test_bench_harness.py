"""bench.harness's --merge: a partial run keeps what it did not measure, and never replaces a
measured target with a NOT RUN one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` is a package of the repository, not installed

from bench import harness  # noqa: E402


def test_keep_previous_keeps_unmeasured_rows_and_measured_targets(tmp_path, monkeypatch):
    """Breaks if a merged file loses a kept row, keeps a row this run re-measured, lets a NOT
    RUN target overwrite a measured one, or keeps an old target this run measured again."""
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    old = {"date": "then", "command": "old cmd", "git": {"commit": "a" * 40},
           "rows": [{"rate": "10mbit", "system": "ddp", "v": 1},
                    {"rate": "100mbit", "system": "ddp", "v": 2}],
           "targets": [{"name": "headline", "value": 3.0, "goal": ">= 2", "met": True,
                        "state": "MET"},
                       {"name": "err 100mbit ddp", "value": 0.5, "goal": "<= 0.2",
                        "met": False, "state": "NOT MET"}],
           "notes": ["kept: from an older merge", "a note of that run",
                     "100mbit: how that rate's links were built"]}
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
    assert any(n.startswith("kept: 1 rows") and "old cmd" in n for n in rec["notes"])
