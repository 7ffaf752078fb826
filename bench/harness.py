"""The benchmark harness every ``bench/NAME.py`` uses.

A benchmark measures its rows side by side in one run (never against a number from another run),
prints a table, checks its targets and writes ``bench/results/NAME.json``::

    {"name": ..., "date": "2026-12-02T10:21:57", "duration_s": ..., "command": "...",
     "git": {"commit": "<40 hex>", "dirty": true, "dirty_paths": [...]},
     "machine": {"cores": 2, "cpu_model": ..., "memory_gib": ..., "platform": ...},
     "torch": "2.13.0+cpu", "python": "3.11.7",
     "rows": [{"config": ..., <measured columns>}, ...],
     "targets": [{"name": ..., "value": ..., "goal": "<= 1.05", "met": true, "state": "MET"},
                 ...],
     "notes": [...]}

A target is in one of three states: ``MET`` (``met: true``), ``NOT MET`` (``met: false``: it was
measured and missed, or the measurement failed) and ``NOT RUN`` (``met: null``, with a
``reason``: the benchmark could not run it here, e.g. it needs root). A missing value is never MET.
The committed results are what ``python -m bench.render`` turns into the tables in ``docs/``.

A benchmark whose full run is too long for one sitting measures part of its plan and keeps the
rest of the existing file (:meth:`Bench.keep_previous`, its ``--merge``): the kept rows and
targets are named in a ``kept:`` note with the date, commit and command they came from, and every
row names the run that measured it (``"run"``, described under ``"runs"``: ``bench/runs.py``).
"""

from __future__ import annotations

import json
import operator
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import runs

ROOT = Path(__file__).resolve().parent.parent
#: what a process the bench starts must import: this checkout's tandem (its src/, ahead of any
#: installed copy, so that a run from a clone measures the clone) and the bench package
CHILD_PYTHONPATH = f"{ROOT / 'src'}{os.pathsep}{ROOT}"
RESULTS = Path(__file__).resolve().parent / "results"
_PROCESS_STARTED = time.time()  # benchmarks import this first: their whole run is timed
_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
MET, NOT_MET, NOT_RUN = "MET", "NOT MET", "NOT RUN"


def goal_met(value: float | None, goal: str) -> bool:
    """``goal`` is ``"<= 1.05"``-style text; a missing value never meets it."""
    op, _, bound = goal.strip().partition(" ")
    if value is None or op not in _OPS:
        return False
    return bool(_OPS[op](float(value), float(bound)))


def target_state(t: dict[str, Any]) -> str:
    """MET / NOT MET / NOT RUN of a target record (also of results written before ``state``)."""
    if t.get("state") in (MET, NOT_MET, NOT_RUN):
        return str(t["state"])
    return MET if t.get("met") is True else NOT_RUN if t.get("met") is None else NOT_MET


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """The commit the tree is at and whether tracked files differ from it (and which)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty_paths = [ln[3:] for ln in (status or "").splitlines() if ln.strip()]
    return {"commit": commit.strip() if commit else None,
            "dirty": bool(dirty_paths) if status is not None else None,
            "dirty_paths": dirty_paths[:20]}


_START_GIT = git_state()  # the tree the benchmark started from (see provenance)


def machine() -> dict[str, Any]:
    """Cores, CPU model (``/proc/cpuinfo``), memory (``/proc/meminfo``) and platform."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    except (OSError, ValueError, IndexError):
        pass
    return {"cores": os.cpu_count(), "cpu_model": model or platform.processor() or None,
            "memory_gib": mem_gib, "platform": platform.platform()}


def command() -> str:
    """The exact command line that ran this process (interpreter relative to the repo)."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    exe = Path(argv[0])
    try:
        argv[0] = str(exe.resolve().relative_to(ROOT)) if exe.is_absolute() else argv[0]
    except ValueError:
        argv[0] = exe.name
    if Path(sys.executable).parent.name == "bin" and \
            Path(sys.executable).parent.parent == ROOT / ".venv":
        argv[0] = ".venv/bin/python"
    return shlex.join(argv)


def torch_version() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return str(torch.__version__)


def provenance() -> dict[str, Any]:
    """Everything a result records about where and how it was measured: the date and the tree
    of the process's start (``_START_GIT``, read when a benchmark imports this module), not of
    the moment a benchmark builds its :class:`Bench`, which some do after measuring."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(_PROCESS_STARTED)),
            "command": command(), "git": _START_GIT, "machine": machine(),
            "torch": torch_version(), "python": platform.python_version()}


class Bench:
    """Collect rows and targets, then :meth:`finish` prints and writes the JSON."""

    def __init__(self, name: str, columns: list[str]) -> None:
        self.name = name
        self.columns = columns
        self.rows: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.kept_targets: list[dict[str, Any]] = []  # see keep_previous
        self.kept_runs: dict[str, dict[str, Any]] = {}  # the kept rows' runs (bench/runs.py)
        self.duration_s: float | None = None  # set by adopt; else the process's run time
        self.started = _PROCESS_STARTED
        self.provenance = provenance()  # at the start: the commit and tree that were measured

    def row(self, **cols: Any) -> None:
        self.rows.append(cols)
        print(f"[{self.name}] " + ", ".join(f"{k}={_fmt(v)}" for k, v in cols.items()), flush=True)

    def target(self, name: str, value: float | None, goal: str, *,
               not_run: str | None = None) -> bool:
        """Record a target; ``not_run`` (the reason) marks one this run could not measure.
        Returns whether it was met."""
        if not_run:
            rec = {"name": name, "value": None, "goal": goal, "met": None, "state": NOT_RUN,
                   "reason": not_run}
        else:
            met = goal_met(value, goal)
            rec = {"name": name, "value": value, "goal": goal, "met": met,
                   "state": MET if met else NOT_MET}
        self.targets.append(rec)
        return bool(rec["met"])

    def note(self, text: str) -> None:
        self.notes.append(text)

    #: a note written into a results file by hand (a relabelling, a correction) starts with
    #: this; every merge keeps it, since no run writes it again
    HAND_NOTE = "by hand: "

    def keep_previous(self, keep_row: Callable[[dict[str, Any]], bool],
                      keep_target: Callable[[dict[str, Any]], bool], measured_now: str,
                      keep_note: Callable[[str], bool] = lambda n: False) -> None:
        """``--merge``: take the rows and targets of the existing results file that this run
        does not measure (and its ``kept:`` notes, its :attr:`HAND_NOTE` notes, and the notes
        ``keep_note`` picks: those describing what was kept). A target this run records as NOT
        RUN under a kept target's name leaves the kept (measured) one in place; any other target
        of this run replaces it."""
        path = RESULTS / f"{self.name}.json"
        if not path.is_file():
            return
        old = json.loads(path.read_text())
        rows = runs.stamp([r for r in old.get("rows", []) if keep_row(r)], runs.run_id(old))
        self.kept_runs.update(runs.runs_of_file(old))
        self.rows = rows + self.rows
        self.kept_targets = [t for t in old.get("targets", []) if keep_target(t)]
        self.notes += [n for n in old.get("notes", [])
                       if n.startswith(("kept:", self.HAND_NOTE)) or keep_note(n)]
        commit = ((old.get("git") or {}).get("commit") or "?")[:10]
        if rows:
            self.note(f"kept: {len(rows)} rows and {len(self.kept_targets)} targets from the "
                      f"run of {old.get('date') or old.get('when')} (commit {commit}, "
                      f"`{old.get('command')}`); measured in this run: {measured_now}")

    def adopt_results(self, stale_notes: tuple[str, ...] = ()) -> None:
        """``--rescore``: :meth:`adopt` this benchmark's results file, without an earlier
        rescore's note or the notes starting with ``stale_notes`` (those the new targets
        replace). Exits with a message when there is no file to rescore."""
        path = RESULTS / f"{self.name}.json"
        if not path.is_file():
            raise SystemExit(f"error: --rescore needs {path}, which does not exist")
        old = json.loads(path.read_text())
        old["notes"] = [n for n in old.get("notes", [])
                        if not n.startswith(("targets recomputed", *stale_notes))]
        self.adopt(old)

    def adopt(self, old: dict[str, Any]) -> None:
        """Take a results document's rows, notes and measurement provenance (commit, date,
        machine, command, duration), for a pass that recomputes its targets from those rows and
        measures nothing; a note says which pass did that, and when."""
        now = self.provenance
        self.provenance = {k: old.get(k) for k in now}
        self.duration_s = old.get("duration_s")
        self.rows = runs.stamp(list(old.get("rows", [])), runs.run_id(old))
        self.kept_runs = runs.runs_of_file(old)
        self.notes = list(old.get("notes", []))
        commit = ((now.get("git") or {}).get("commit") or "?")[:10]
        self.note(f"targets recomputed from these rows by `{now['command']}` at commit "
                  f"{commit}, {now['date']} (it measured nothing)")

    def table(self) -> str:
        cols = self.columns
        cells = [[_fmt(r.get(c)) for c in cols] for r in self.rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
                  for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """The results document (what :meth:`finish` writes): this run's rows stamped with its
        id, and the runs of every row it holds."""
        prov = self.provenance
        took = (self.duration_s if self.duration_s is not None
                else round(time.time() - self.started, 1))
        rid = runs.run_id(prov)
        rows = runs.stamp(self.rows, rid)
        known = {**self.kept_runs, rid: runs.entry(prov, took)}
        used = {i: known.get(i, {"date": i}) for i in dict.fromkeys(r[runs.RUN] for r in rows)}
        return {"name": self.name, "when": prov["date"], **prov, "duration_s": took,
                "columns": self.columns, "rows": rows, "runs": used,
                "targets": self.merged_targets(), "notes": self.notes}

    def merged_targets(self) -> list[dict[str, Any]]:
        """This run's targets, with the kept ones (:meth:`keep_previous`) first; a kept
        measured target wins over this run's NOT RUN of the same name."""
        kept = {t["name"]: t for t in self.kept_targets}
        out = list(self.kept_targets)
        for t in self.targets:
            old = kept.get(t["name"])
            if old is None:
                out.append(t)
            elif not (t.get("state") == NOT_RUN and target_state(old) != NOT_RUN):
                out[out.index(old)] = t
        return out

    def finish(self) -> Path:
        print()
        print(f"== {self.name} ==")
        print(self.table())
        for t in self.merged_targets():
            print(format_target(t))
        for n in self.notes:
            print(f"note: {n}")
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{self.name}.json"
        out.write_text(json.dumps(self.record(), indent=2, default=str) + "\n")
        print(f"wrote {out}")
        return out


def format_target(t: dict[str, Any], prefix: str = "target ") -> str:
    """One line: name, value, goal and state (and why, when NOT RUN)."""
    state = target_state(t)
    why = f": {t['reason']}" if state == NOT_RUN and t.get("reason") else ""
    return f"{prefix}{t['name']}: {_fmt(t.get('value'))} (goal {t['goal']}) {state}{why}"


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
