"""``tandem report --html``: one self-contained page holding the table, the figures, the configs
and each sweep's best variant.

Run records are built in ``tmp_path`` with the real :class:`Recorder` on a fake clock, so every
number in the page is known exactly: each run has two ranks and four steps of 1 s, rank 0
evaluates after every step, and rank 0 / rank 1 send 1000 / 3000 bytes per step unless told.
"""

from __future__ import annotations

import base64
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tandem
import tandem.telemetry.recorder as recorder_mod
from tandem.cli import app
from tandem.telemetry import Recorder, merge_events, summarize
from tandem.telemetry.html import render_html
from tandem.telemetry.report import COLUMNS, build_report


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(recorder_mod, "_now", fake)
    return fake


def make_run(run_dir: Path, clock: FakeClock, accs: list[float | None], losses: list[float], *,
             codec: dict | None = None, lr: float = 0.1, target: float | None = None,
             sent: tuple[int, int] = (1000, 3000), extra: dict | None = None) -> None:
    """A finished two-rank run record (events and summary.json) with these test metrics."""
    recs = [Recorder(run_dir, r, world=2, progress=False) for r in (0, 1)]
    for rec in recs:
        rec.start(clock.t)
    for s, (acc, loss) in enumerate(zip(accs, losses, strict=True)):
        clock.t += 1.0
        for rec, n in zip(recs, sent, strict=True):
            rec.step(s, compute_s=0.5, comm_s=0.3, idle_s=0.2, bytes_sent=n, bytes_recv=n,
                     loss=loss + 0.1)
        with recs[0].evaluating(), recs[1].evaluating():
            clock.t += 10.0
            recs[0].eval(s, accuracy=acc, loss=loss)
    for rec in recs:
        rec.close()
    merge_events(run_dir)
    config = {"strategy": {"name": "allreduce", "options": {}},
              "codec": codec or {"name": "dense", "options": {}}, "workers": 2, "lr": lr,
              "net": "1gbit:100us", "workload": {"name": "digits", "options": {}}, "steps": 4,
              "batch_size": 32, "seed": 0, "target_accuracy": target}
    summarize(run_dir, config, extra=extra)


def make_sweep(sweep_dir: Path, clock: FakeClock, finals: dict[str, tuple], *,
               accuracy: bool = True) -> None:
    """A ``tandem sweep`` directory: ``sweep.json`` and ``variants/<label>/`` run records whose
    last evaluation has the given (accuracy, loss)."""
    for label, (acc, loss) in finals.items():
        accs = [0.1, 0.2, 0.3, acc] if accuracy else [None] * 4
        make_run(sweep_dir / "variants" / label, clock, accs, [2.0, 1.5, 1.2, loss],
                 lr=float(label.split("=")[1]), extra={"variant": label})
    rows = ",".join(f'{{"variant": "{label}", "run": "{label}"}}' for label in finals)
    (sweep_dir / "sweep.json").write_text(f"[{rows}]\n")


class Page(HTMLParser):
    """Collects what the checks need: tags, attributes, tables (rows of cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, list[dict]] = {}
        self.title = ""
        self._table: str | None = None
        self._row: dict | None = None
        self._cell: list[str] | None = None
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attr = dict(attrs)
        self.tags.append((tag, attr))
        if tag == "table":
            self._table = attr.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self._row = {"class": attr.get("class", ""), "cells": []}
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title:
            self.title += data


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def by_run(page: Page, table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    header, *rows = page.tables[table]
    names = header["cells"]
    return names, {r["cells"][0]: dict(zip(names, r["cells"], strict=True)) for r in rows}


def test_html_page_is_self_contained_and_holds_every_run(tmp_path: Path, clock: FakeClock,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path / "a", clock, [0.5, 0.8, 0.7, 0.9], [1.0, 0.6, 0.5, 0.4],
             codec={"name": "topk", "options": {"ratio": 0.05}}, target=0.75)
    make_run(tmp_path / "b", clock, [0.1, 0.2, 0.3, 0.4], [2.0, 1.9, 1.8, 1.7], target=0.75,
             sent=(100, 100))
    make_sweep(tmp_path / "s", clock, {"lr=0.05": (0.6, 0.9), "lr=0.1": (0.95, 0.2),
                                       "lr=0.2": (0.8, 0.5)})
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["report", "a", "b", "s", "--html", "out/report.html"])
    assert res.exit_code == 0, res.output
    assert "sweep s: best variant lr=0.1" in res.output
    assert not (tmp_path / "compare.png").exists()  # --html alone writes only the page
    text = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    page = parse(text)

    # nothing to fetch: no script, no stylesheet link, no frame, no http(s) or //host reference
    assert not {t for t, _ in page.tags} & {"script", "link", "iframe", "object", "embed"}
    for _, attrs in page.tags:
        for key in ("src", "href", "action", "srcset", "data"):
            value = (attrs.get(key) or "").strip().lower()
            assert not value.startswith(("http:", "https:", "//")), (key, value[:80])
    # the figures are in the file: accuracy and loss, each an SVG data URI
    images = [a["src"] for t, a in page.tags if t == "img"]
    assert len(images) == 2 and all(s.startswith("data:image/svg+xml;base64,") for s in images)
    svgs = [base64.b64decode(s.split(",", 1)[1]).decode() for s in images]
    assert all("<svg" in s and "DOCTYPE" not in s for s in svgs)
    assert "log scale" in text and "wall time" in text

    # one row per run (a sweep counts its variants), with the numbers of the records
    names, rows = by_run(page, "runs")
    assert names == list(COLUMNS)
    assert list(rows) == ["a", "b", "s/lr=0.05", "s/lr=0.1", "s/lr=0.2"]
    a, b = rows["a"], rows["b"]
    assert (a["codec"], a["workers"], a["steps"]) == ("topk", "2", "4")
    assert (a["final acc"], a["final loss"], a["bytes/worker/step"]) == ("0.9000", "0.4", "2.00 kB")
    # target 0.75 first met by the evaluation after step 1: wall 2 s, 2 steps x (1000 + 3000) B
    assert (a["target"], a["time-to-target s"], a["bytes-to-target"]) == ("acc>=0.75", "2.00",
                                                                          "8.00 kB")
    assert (a["comm fraction"], a["idle fraction"]) == ("0.300", "0.200")
    assert b["time-to-target s"] == b["bytes-to-target"] == "not reached"
    assert (b["final acc"], b["bytes/worker/step"]) == ("0.4000", "100 B")
    assert rows["s/lr=0.1"]["final acc"] == "0.9500" and rows["s/lr=0.1"]["target"] == "-"

    # the sweep: its own table, exactly one row marked best, the highest final accuracy
    sweep = page.tables["sweep-s"]
    best = [r for r in sweep[1:] if "best" in r["class"]]
    assert len(best) == 1 and best[0]["cells"][:2] == ["★ best", "lr=0.1"]
    assert [r["cells"][1] for r in sweep[1:]] == ["lr=0.05", "lr=0.1", "lr=0.2"]

    # key config of each run, the version and the date
    _, configs = by_run(page, "configs")
    assert list(configs) == list(rows)
    assert configs["a"]["codec"] == "topk(ratio=0.05)" and configs["a"]["lr"] == "0.1"
    assert configs["a"]["workload"] == "digits" and configs["a"]["net (emulated link)"] \
        == "1gbit:100us"
    assert configs["s/lr=0.2"]["lr"] == "0.2"
    assert page.title == "Tandem report: a, b, s"
    assert f"Tandem {tandem.__version__}" in text and "Generated 20" in text


def test_a_loss_only_sweep_marks_the_lowest_loss(tmp_path: Path, clock: FakeClock) -> None:
    make_sweep(tmp_path / "reg", clock, {"lr=0.1": (None, 0.5), "lr=0.3": (None, 0.25),
                                         "lr=1.0": (None, 0.75)}, accuracy=False)
    report = build_report([tmp_path / "reg"], target_loss=0.3)
    text = render_html(report, title="regression sweep", version="9.9")
    page = parse(text)
    best = [r for r in page.tables["sweep-reg"][1:] if "best" in r["class"]]
    assert [r["cells"][1] for r in best] == ["lr=0.3"]
    _, rows = by_run(page, "runs")
    assert rows["reg/lr=0.3"]["final acc"] == "-" and rows["reg/lr=0.3"]["final loss"] == "0.25"
    assert rows["reg/lr=0.3"]["target"] == "loss<=0.3"
    assert rows["reg/lr=0.3"]["time-to-target s"] == "4.00"
    assert rows["reg/lr=0.1"]["time-to-target s"] == "not reached"
    # without accuracy there is one figure (test loss), still embedded
    images = [a["src"] for t, a in page.tags if t == "img"]
    assert len(images) == 1 and images[0].startswith("data:image/svg+xml;base64,")
    assert page.title == "regression sweep" and "Tandem 9.9" in text
    assert "lowest final test loss" in text


def test_png_output_keeps_working_beside_the_page(tmp_path: Path, clock: FakeClock,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    make_run(tmp_path / "a", clock, [0.5, 0.8, 0.7, 0.9], [1.0, 0.6, 0.5, 0.4])
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["report", "a", "--target-accuracy", "0.95"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not reached" in res.output  # 0.95 was never reached
    res = CliRunner().invoke(app, ["report", "a", "--out", "c.png", "--html", "p.html"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "p.html").is_file()
