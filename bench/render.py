"""The results tables in ``docs/*.md`` and the README, rendered from the committed
``bench/results/*.json``.

    python -m bench.render            # rewrite every table in place
    python -m bench.render --check    # exit 1 listing the tables that differ (tests, CI)

A table lives between two markers in a doc; everything between them is generated::

    <!-- bench:NAME[:VIEW] -->
    ...
    <!-- /bench:NAME[:VIEW] -->

``NAME`` names a result (``bench/results/NAME.json``). ``VIEW`` picks rows and columns: the views
of each benchmark are declared in :data:`VIEWS` (one place for every benchmark's column choices);
without one, every row with the result's own columns. Every benchmark also has the views
``targets`` (name, value, goal, MET / NOT MET / NOT RUN) and ``notes``; ``bench/cluster``'s
results also ``headline`` (the three headline targets and the rows they compare: the README's
table). The first line of each block states the command, commit, date and machine of the run
that measured its rows, so a table always says where its figures come from; where ``--merge``
left rows of several runs in one table, it lists each run and adds a ``run`` column
(``bench/runs.py``). A doc with a marker whose result is missing fails ``--check``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import runs
from bench.cluster_targets import EMULATION, LOCAL, best_of_notes, compute_only_s
from bench.harness import target_state

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"
_OPEN = re.compile(r"<!-- bench:([\w.-]+)(?::([\w.-]+))? -->")


@dataclass(frozen=True)
class Col:
    """A column: the row field it shows, its header, and how a value is written."""

    key: str
    header: str | None = None
    fmt: Callable[[Any], str] | None = None

    @property
    def title(self) -> str:
        return self.header or self.key


@dataclass(frozen=True)
class View:
    """Which rows (those whose fields equal ``where``, or pass it where it is a function) and
    which columns of a result."""

    columns: list[Col]
    where: dict[str, Any] = field(default_factory=dict)  # field -> value, or a test of it

    def keeps(self, row: dict[str, Any]) -> bool:
        return all(want(row.get(k)) if callable(want) else row.get(k) == want
                   for k, want in self.where.items())


def ms(v: Any) -> str:
    return "-" if v is None else f"{float(v):,.1f}"


def pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f} %"


def times(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2f}x"


def seconds(v: Any) -> str:
    return "-" if v is None else f"{float(v):,.1f}"


def count(v: Any) -> str:
    return "-" if v is None else f"{round(float(v)):,}"


def acc(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def sig(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3g}"


def two(v: Any) -> str:
    return "-" if v is None else f"{float(v):.2f}"


def per_stage(v: Any) -> str:
    """A list of per-stage figures as ``a / b / c`` (``-`` for a stage not measured)."""
    if v is None:
        return "-"
    return " / ".join("-" if x is None else f"{float(x):,.1f}" for x in v)


def yes(v: Any) -> str:
    return "-" if v is None else ("yes" if v else "no")


def status(v: Any) -> str:
    """A row's status, a failure cut to its innermost error and 160 characters (gloo wraps
    the same error once per callback layer)."""
    text = "-" if v is None else str(v)
    wrapper = "Got the following error when running the callback: "
    if wrapper in text:
        head = text.split(":", 1)[0]
        text = f"{head}: {text.rsplit(wrapper, 1)[1]}"
    return text if len(text) <= 160 else text[:157] + "..."


def _cluster_cols(to_target: bool) -> list[Col]:
    cols = [Col("system"), Col("status", fmt=status), Col("steps"), Col("step_ms", "ms/step", ms),
            Col("emu_step_ms", "emulated ms/step", ms), Col("emu_err", "emulation error", pct),
            Col("comm_ms", "comm ms/step", ms), Col("emu_comm_ms", "emulated comm ms/step", ms)]
    if to_target:
        cols += [Col("steps_to_target", "steps to 0.95"),
                 Col("time_to_target_s", "s to 0.95", seconds)]
    return cols + [Col("final", "final test acc", acc), Col("bytes/step", "bytes/step", count),
                   Col("wire/step", "wire bytes/step", count), Col("drops", "tbf drops", count),
                   Col("vs_ddp", "DDP ms/step ÷ this", times)]


_PS_COLS = [Col("workload"), Col("net"), Col("row"), Col("steps"),
            Col("time_to_target_s", "to target s", sig),
            Col("steps_to_target", "steps to target"), Col("speedup", "vs sync", times),
            Col("final_acc", "final acc", acc), Col("final_loss", "final loss", acc),
            Col("idle_frac", "idle", pct), Col("steps_per_push", "steps/push", ms),
            Col("cap_mean", "cap", ms), Col("push_MB/step", "push MB/step", sig),
            Col("pull_MB/step", "pull MB/step", sig)]


def _is_sim(config: Any) -> bool:
    return str(config).startswith("sim ")


#: every benchmark's views, "NAME:VIEW" -> View
VIEWS: dict[str, View] = {
    **{f"cluster:{wl}{r}": View(_cluster_cols(wl == "cnn"),
                                where={"rate": f"{r}mbit", "workload": wl})
       for wl in ("cnn", "textlm") for r in (10, 100)},
    "cluster:cnn_unshaped": View(_cluster_cols(True), where={"rate": "unshaped",
                                                             "workload": "cnn"}),
    **{f"cluster_2hosts_pinned:{wl}{r}": View(_cluster_cols(wl == "cnn"),
                                               where={"rate": f"{r}mbit", "workload": wl})
       for wl in ("cnn", "textlm") for r in (10, 100)},
    **{f"param_server:{s}": View(_PS_COLS, where={"section": s})
       for s in ("links", "latency", "modes", "tuning")},
    "plan:validation": View(
        [Col("config"), Col("N"), Col("meas_ms", "measured ms/step", ms),
         Col("pred_ms", "predicted ms/step", ms), Col("err", "error", pct),
         Col("meas_bytes", "measured B/step", count), Col("pred_bytes", "predicted B/step", count),
         Col("exact_bytes_ok", "bytes exact", yes), Col("bytes_err", "B/step error", pct),
         Col("compute_ms", "calibrated compute ms", ms)],
        where={"config": lambda c: not _is_sim(c)}),
    "plan:sim": View(
        [Col("config", "comparison"), Col("N", "peers"),
         Col("meas_opt_error", "real run's error"), Col("pred_opt_error", "simulated error"),
         Col("err", "relative difference"), Col("worst_step_err", "worst step's difference"),
         Col("same_stragglers", "same straggler draws", yes)],
        where={"config": _is_sim}),
    **{f"{name}:seeds": View(
        [Col("row"), Col("acc_mean", "test acc (mean)", acc), Col("acc_sd", "s.d. (seeds)", acc),
         Col("accs", "each seed"), Col("sent_B/step", "bytes/worker/step", count),
         Col("vs_dense_push", "÷ dense push", sig), Col("vs_lgc_ps", "÷ LGC-PS", two),
         Col("detail")]) for name in ("lgc", "lgc_long")},
    **{f"{name}:cost": View(
        [Col("row"), Col("codec_ms/step", "codec ms/step (whole run)", two),
         Col("stage_ms", "ms/step: warm-up / AE training / compressed", per_stage),
         Col("stage_B/step", "bytes/worker/step: warm-up / AE training / compressed",
             per_stage)],
        where={"codec_ms/step": lambda v: v is not None}) for name in ("lgc", "lgc_long")},
    "correlation:summary": View(
        [Col("workload"), Col("partition"), Col("cos early", fmt=two), Col("cos late", fmt=two),
         Col("overlap early", fmt=two), Col("overlap late", fmt=two),
         Col("most alike layer (late)")]),
}


# ---- rendering -----------------------------------------------------------------------------
def cell(v: Any) -> str:
    """A value as table text: ``-`` for missing, 4 significant digits, ``|`` escaped."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        text = f"{v:,.0f}" if abs(v) >= 1e5 else f"{v:.4g}"
    elif isinstance(v, int):
        text = f"{v:,}" if abs(v) >= 1e5 else str(v)
    else:
        text = str(v)
    return " ".join(text.split()).replace("|", "\\|")


def table(columns: list[Col], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| " + " | ".join(c.title for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_show(c, r.get(c.key)) for c in columns) + " |")
    return lines


def _show(col: Col, v: Any) -> str:
    return col.fmt(v).replace("|", "\\|") if col.fmt else cell(v)


#: the rows the headline targets compare with the best Tandem row (``bench/cluster_targets``)
HEADLINE_REFS = {"ddp": "plain DDP", "ddp + powersgd r2": "DDP + torch's PowerSGD hook",
                 LOCAL: "compute only"}


def headline(res: dict[str, Any], name: str = "cluster") -> list[str]:
    """``bench/cluster``'s headline (view ``headline``), under the provenance of the runs that
    measured its rows: the three 10 Mbit/s CNN targets, then the best Tandem row and the rows
    they compare it with (from those rows alone). The best row is the one
    the targets named in their note (``best Tandem row at 10mbit cnn: ...``)."""
    best = best_of_notes(res.get("notes", []))
    roles = ({best: "best Tandem row"} if best else {}) | HEADLINE_REFS
    found = {r.get("system"): r for r in res.get("rows", [])
             if r.get("rate") == "10mbit" and r.get("workload") == "cnn"}
    rows = [{**found[s], "role": role} for s, role in roles.items() if s in found]
    used = runs.used_runs(res, rows)
    lines = [runs.runs_header(used) if len(used) > 1 else runs.header(used[0][1] if used else res),
             ""]
    ts = [{**t, "state": target_state(t)} for t in res.get("targets", [])
          if str(t.get("name")).startswith("10mbit cnn: ") and "param_server" not in t["name"]]
    lines += table([Col("name", "target"), Col("value", fmt=two), Col("goal"), Col("state")], ts)
    own = runs.run_id(res)
    cols = [Col("role"), Col("system"), Col("time_to_target_s", "s to 0.95", seconds),
            Col("steps_to_target", "steps to 0.95"), Col("step_ms", "ms/step", ms),
            Col("final", "final test acc", acc), Col("bytes/step", "bytes/step", count),
            Col(runs.RUN, fmt=runs.label)]
    lines += [""] + table(cols, [{**r, runs.RUN: r.get(runs.RUN) or own} for r in rows])
    bound = headline_bound(found.get(best or ""), found.get(LOCAL))
    for line in (bound, twins_line(res, name)):
        lines += ["", line] if line else []
    return lines


def twins_line(res: dict[str, Any], name: str) -> str:
    """How many rows of the results file ``name`` ran within 20 % on the emulated link (their
    emulation-error targets), and which did not, with their errors."""
    ts = [t for t in res.get("targets", []) if str(t.get("name")).startswith(EMULATION)
          and t.get("value") is not None]
    over = [f"{t['name'][len(EMULATION):]} ({t['value'] * 100:.1f} %)" for t in ts
            if not t.get("met")]
    return (f"_The emulated twins (`--net`, the same config on one machine) were within 20 % of "
            f"the real links on {len(ts) - len(over)} of the {len(ts)} rows of "
            f"`bench/results/{name}.json`" + (f"; over: {', '.join(over)}._" if over else "._"))


def headline_bound(best: dict[str, Any] | None, local: dict[str, Any] | None) -> str | None:
    """Where the best row's time to the target goes, against the compute-only time (the
    ``local`` row's step x the best row's steps, as ``bench/cluster_targets`` defines it):
    its steps and the averaging that assembles its evaluated model (``avg_s``). None when a
    figure is missing (results measured before ``avg_s`` was recorded)."""
    if not best or not local:
        return None
    t, a, n = best.get("time_to_target_s"), best.get("avg_s"), best.get("steps_to_target")
    step, loc = best.get("step_ms"), local.get("step_ms")
    if None in (t, a, n, step, loc) or not loc:
        return None
    compute = compute_only_s(loc, n)
    return (f"_Where the best row's {t:.2f} s go: {t - a:.2f} s of training to step {n} "
            f"({step:.1f} ms a step, {step / loc:.2f}x the `local` row's {loc:.1f} ms) and "
            f"{a:.2f} s for the one all-reduce that assembles the evaluated model from the "
            f"peers'. The compute-only time is {compute:.2f} s "
            f"({n + 1} steps of the `local` row), so that all-reduce alone is "
            f"{a / compute:.2f}x of it._")


def render_block(name: str, view: str | None, res: dict[str, Any]) -> str:
    """The text between the markers of ``bench:NAME[:VIEW]`` (without the markers)."""
    if view == "headline" and name.startswith("cluster"):
        return "\n".join(headline(res, name)) + "\n\n"
    lines = [runs.targets_header(res), ""]
    if view == "targets":
        rows = [{"name": t.get("name"), "value": t.get("value"), "goal": t.get("goal"),
                 "state": target_state(t) + (f" ({t['reason']})" if t.get("reason") else "")}
                for t in res.get("targets", [])]
        lines += table([Col("name", "target"), Col("value"), Col("goal"), Col("state")], rows)
    elif view == "notes":
        lines += [f"- {' '.join(str(n).split())}" for n in res.get("notes", [])] or ["- none"]
    else:
        key = f"{name}:{view}" if view else name
        if view and key not in VIEWS:
            raise KeyError(f"no view {key!r} in bench/render.py VIEWS")
        spec = VIEWS.get(key)
        rows = res.get("rows", [])
        if spec is None:
            cols = res.get("columns") or list(dict.fromkeys(
                k for r in rows for k in r if k != runs.RUN))
            spec = View([Col(c) for c in cols])
        rows = [r for r in rows if spec.keeps(r)]
        used = runs.used_runs(res, rows)
        if len(used) > 1:
            lines[0] = runs.runs_header(used)
            own = runs.run_id(res)
            rows = [{**r, runs.RUN: r.get(runs.RUN) or own} for r in rows]
        elif used:
            lines[0] = runs.header(used[0][1])
        if rows:  # a column no row of this result has (an older result) is left out
            cols = [c for c in spec.columns if any(c.key in r for r in rows)]
            if len(used) > 1:
                cols = [Col(runs.RUN, fmt=runs.label), *cols]
            lines += table(cols, rows)
        else:
            lines.append("No rows of this kind in the result (not measured in that run).")
    return "\n".join(lines) + "\n\n"


def render_text(text: str, load: Callable[[str], dict[str, Any]]) -> tuple[str, list[str]]:
    """``text`` with every marked block regenerated, and the problems met (a missing result, an
    unknown view, a marker left open). A block with a problem is left as it was."""
    out, problems, pos = [], [], 0
    for m in _OPEN.finditer(text):
        if m.start() < pos:
            continue  # an opening marker inside a block already handled
        name, view = m.group(1), m.group(2)
        tag = f"bench:{name}" + (f":{view}" if view else "")
        close = f"<!-- /{tag} -->"
        end = text.find(close, m.end())
        if end < 0:
            problems.append(f"{tag}: no closing {close}")
            continue
        out.append(text[pos:m.end()] + "\n")
        try:
            out.append(render_block(name, view, load(name)))
        except (OSError, KeyError, ValueError, TypeError) as err:
            problems.append(f"{tag}: {err}")
            out.append(text[m.end():end].lstrip("\n"))
        pos = end
    out.append(text[pos:])
    return "".join(out), problems


def loader(results: Path) -> Callable[[str], dict[str, Any]]:
    def load(name: str) -> dict[str, Any]:
        path = results / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run `python -m bench.{name}` "
                                    "and commit its result")
        return json.loads(path.read_text())
    return load


def pages(docs: Path) -> list[Path]:
    """The pages whose tables are rendered: ``docs/*.md``, and the README beside the committed
    docs (its headline table)."""
    found = sorted(docs.glob("*.md"))
    readme = docs.parent / "README.md"
    return found + [readme] if docs.resolve() == DOCS and readme.is_file() else found


def render_docs(docs: Path = DOCS, results: Path = RESULTS, *, write: bool = True
                ) -> tuple[list[str], list[str]]:
    """Regenerate every marked table under ``docs``; returns (tables that differed, problems).
    With ``write=False`` nothing is written (``--check``)."""
    load = loader(results)
    differ: list[str] = []
    problems: list[str] = []
    for doc in pages(docs):
        text = doc.read_text()
        new, probs = render_text(text, load)
        problems += [f"{doc.name}: {p}" for p in probs]
        if new != text:
            old_blocks = dict(_blocks(text))
            differ += [f"{doc.name}: {tag}" for tag, body in _blocks(new)
                       if old_blocks.get(tag) != body]
            if write:
                doc.write_text(new)
    return differ, problems


def _blocks(text: str) -> list[tuple[str, str]]:
    found = []
    for m in _OPEN.finditer(text):
        tag = m.group(0)[len("<!-- "):-len(" -->")]
        end = text.find(f"<!-- /{tag} -->", m.end())
        if end >= 0:
            found.append((tag, text[m.end():end]))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 listing the "
                    "tables that differ from what the results render")
    ap.add_argument("--docs", type=Path, default=DOCS)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    differ, problems = render_docs(args.docs, args.results, write=not args.check)
    for p in problems:
        print(f"problem: {p}")
    verb = "differs from its result" if args.check else "rewritten"
    for d in differ:
        print(f"{d}: {verb}")
    if args.check and not differ and not problems:
        print("every table matches its result")
    return 1 if problems or (args.check and differ) else 0


if __name__ == "__main__":
    sys.exit(main())
