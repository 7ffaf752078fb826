"""Which run measured each row of a results file.

A benchmark too long for one sitting measures part of its plan and keeps the rest of the file
(``--merge``), so one results file can hold rows from many runs: different commits, commands and
dates. Its top-level provenance names only the last run. So that a table never attributes a row
to a run that did not measure it, every row carries the id of its run (``"run"``), and the file
keeps each referenced run's provenance under ``"runs"``::

    "runs": {"2026-12-05T01:59:41": {"date": ..., "command": ..., "git": {...}, "machine": {...},
                                     "torch": ..., "python": ..., "duration_s": ...}, ...}

A run's id is its start date (the harness's ``date``, to the second). A row without ``"run"``
(a file written before this existed) belongs to the file's own top-level run. ``bench.render``
names one run in a table's header when all its rows share it, and otherwise lists every run and
adds a ``run`` column; :func:`header` and :func:`runs_header` write those lines.
"""

from __future__ import annotations

from typing import Any

#: the row field that names the run that measured the row
RUN = "run"
#: what a run's entry in ``"runs"`` records (the harness's provenance, and how long it took)
FIELDS = ("date", "command", "git", "machine", "torch", "python", "duration_s")


def run_id(prov: dict[str, Any]) -> str:
    """The id of the run described by ``prov`` (a results document or a run entry)."""
    return str(prov.get("date") or prov.get("when") or "an unknown date")


def entry(prov: dict[str, Any], duration_s: float | None = None) -> dict[str, Any]:
    """A run's entry for ``"runs"``: the provenance fields of ``prov``; ``duration_s`` wins over
    the document's own when given."""
    out = {k: prov.get(k) for k in FIELDS}
    if duration_s is not None:
        out["duration_s"] = duration_s
    return out


def stamp(rows: list[dict[str, Any]], rid: str) -> list[dict[str, Any]]:
    """``rows`` with every row that names no run given ``rid`` (new dicts for those)."""
    return [r if r.get(RUN) else {**r, RUN: rid} for r in rows]


def runs_of_file(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A results document's runs: its ``"runs"`` and its own top-level run."""
    runs = dict(doc.get("runs") or {})
    runs.setdefault(run_id(doc), entry(doc))
    return runs


def used_runs(doc: dict[str, Any], rows: list[dict[str, Any]]
              ) -> list[tuple[str, dict[str, Any]]]:
    """The runs that measured ``rows`` (rows of ``doc``), oldest first, as (id, entry); an id
    the file does not describe gets an entry that says only its date."""
    runs = runs_of_file(doc)
    own = run_id(doc)
    ids = dict.fromkeys(str(r.get(RUN) or own) for r in rows)
    return sorted(((i, runs.get(i) or {"date": i}) for i in ids), key=lambda p: p[0])


def label(rid: Any) -> str:
    """A run's short name in a table: ``2026-12-05T01:59:41`` -> ``12-05 01:59``."""
    text = str(rid or "")
    if len(text) >= 16 and text[4] == "-" and text[10] in "T ":
        return f"{text[5:10]} {text[11:16]}"
    return text or "-"


# ---- the provenance lines of a rendered table ----------------------------------------------
def _where(res: dict[str, Any]) -> str:
    git = res.get("git") or {}
    commit = git.get("commit")
    where = f"commit `{commit[:10]}`" if commit else "an unknown commit"
    return where + (" with uncommitted changes" if git.get("dirty") else "")


def _box(res: dict[str, Any]) -> str:
    """The machine and the versions: ``2 cores (AMD EPYC), 23.5 GiB, torch ..., Python ...``."""
    m = res.get("machine") or {}
    cores = m.get("cores") or m.get("cpus")
    box = f"{cores} cores" if cores else "an unknown machine"
    if m.get("cpu_model"):
        box += f" ({m['cpu_model']})"
    if m.get("memory_gib"):
        box += f", {m['memory_gib']} GiB"
    versions = ", ".join(x for x in (f"torch {res['torch']}" if res.get("torch") else None,
                                     f"Python {res['python']}" if res.get("python") else None)
                         if x)
    return box + (f", {versions}" if versions else "")


def _took(res: dict[str, Any]) -> str:
    return f"; took {res['duration_s'] / 60:.0f} min" if res.get("duration_s") else ""


def _date(res: dict[str, Any]) -> str:
    return str(res.get("date") or res.get("when") or "an unknown date").replace("T", " ")


def header(res: dict[str, Any]) -> str:
    """One line: command, commit (and whether the tree had changes), date, machine, versions."""
    cmd = res.get("command") or "an unknown command"
    return f"_Measured by `{cmd}` at {_where(res)}, {_date(res)}, on {_box(res)}{_took(res)}._"


def runs_header(used: list[tuple[str, dict[str, Any]]]) -> str:
    """The header of a table whose rows several runs measured (``--merge``): each run, named
    by its label in the table's ``run`` column; the machine once when every run shares it."""
    boxes = {_box(e) for _, e in used}
    same = len(boxes) == 1 and "an unknown machine" not in next(iter(boxes))
    lines = [f"_Measured in {len(used)} runs" + (f", on {boxes.pop()}" if same else "")
             + "; the `run` column names each row's:_", ""]
    for rid, e in used:
        cmd = e.get("command") or "an unknown command"
        lines.append(f"- `{label(rid)}`: `{cmd}` at {_where(e)}, {_date(e)}"
                     + ("" if same else f", on {_box(e)}") + _took(e))
    return "\n".join(lines)


def targets_header(res: dict[str, Any]) -> str:
    """A targets or notes block's header: the file's last run, and how many runs its rows
    come from when there are several (each table then names its own)."""
    n = len(used_runs(res, res.get("rows", [])))
    if n <= 1:
        return header(res)
    return (f"_From the rows of {n} runs (each table above names its own); the last run: "
            + header(res)[len("_"):])
