"""After a run: merge the per-rank event logs, summarise them, plot the curves.

The launcher calls :func:`finalize_run` once every worker has exited (or been killed)::

    summary = finalize_run(run_dir, cfg.model_dump(mode="json"), target_accuracy=0.95)

It leaves three files next to the per-rank logs:

* ``events.jsonl``: every record of every rank, sorted by ``(wall, rank)``;
* ``summary.json``: the numbers a comparison reads (see :func:`summarize`);
* ``curves.png``: training loss and test accuracy (or test loss) against wall time and against
  cumulative train bytes sent by all ranks.

Each function also works on its own, e.g. to re-summarise a run with another target.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from tandem.errors import TandemError
from tandem.telemetry.correlation import plot_correlation
from tandem.telemetry.curves import (
    ByteIndex,
    eval_curve,
    first_reaching,
    load_events,
    rank_files,
    read_jsonl,
    sort_records,
    time_at,
    train_curve,
)
from tandem.telemetry.recorder import STEP_TIMES, dumps

#: Roles whose step records are not "training steps of a worker" (they still count for bytes/time).
NON_WORKER_ROLES = ("server", "controller")
_RESERVED = ("kind", "rank", "wall")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def merge_events(run_dir: Path) -> list[dict]:
    """Merge ``events.rank*.jsonl`` into ``events.jsonl`` sorted by ``(wall, rank)``; return them.

    A truncated last line (a worker killed mid-write) is dropped. The
    ``events.rank<R>.rolled_back.jsonl`` files (records of steps a resumed run did again, see
    :meth:`Recorder.resume_from`) are not merged: each step counts once. When there are no per-rank
    files but an ``events.jsonl`` exists, it is read back as is. Raises :class:`TandemError` when
    the directory holds no events at all.
    """
    run_dir = Path(run_dir)
    files = rank_files(run_dir)
    merged_path = run_dir / "events.jsonl"
    if not files:
        if merged_path.is_file():
            return read_jsonl(merged_path)
        raise TandemError(f"no events.rank*.jsonl in {run_dir}: did the run start? "
                          "(each worker's Recorder writes one)")
    records = sort_records([rec for _, p in files for rec in read_jsonl(p)])
    _atomic_write(merged_path, "".join(dumps(r) + "\n" for r in records))
    return records


def _name(entry: Any) -> str | None:
    if isinstance(entry, dict):
        return entry.get("name")
    return entry if isinstance(entry, str) else None


def _count_steps(steps: list[dict]) -> int:
    per_rank: dict[int, int] = defaultdict(int)
    worker_ranks = set()
    for r in steps:
        rank = int(r.get("rank", 0))
        per_rank[rank] += 1
        if r.get("role", "worker") not in NON_WORKER_ROLES:
            worker_ranks.add(rank)
    counted = worker_ranks or set(per_rank)
    return max((per_rank[r] for r in counted), default=0)


def _collect_info(records: list[dict]) -> tuple[dict, dict[str, dict]]:
    """Info fields: the lowest rank's value wins; per-rank values too when ranks disagree."""
    by_rank: dict[int, dict] = defaultdict(dict)
    for r in records:
        if r.get("kind") == "info":
            fields = {k: v for k, v in r.items() if k not in _RESERVED}
            by_rank[int(r.get("rank", 0))].update(fields)
    merged: dict[str, Any] = {}
    for rank in sorted(by_rank, reverse=True):
        merged.update(by_rank[rank])
    differs = any(by_rank[rank].get(k, merged[k]) != merged[k] for rank in by_rank for k in merged)
    return merged, ({str(k): v for k, v in sorted(by_rank.items())} if differs else {})


def summarize(run_dir: Path, config: dict, *, target_accuracy: float | None = None,
              extra: dict | None = None) -> dict:
    """Compute the run's headline numbers and write them to ``<run_dir>/summary.json``.

    ``config`` is ``RunConfig.model_dump(mode="json")``. ``target_accuracy`` defaults to the
    config's; for regression workloads (no accuracy) pass ``extra={"target_loss": x}`` to get a
    time-to-target on the test loss. Everything in ``extra`` is copied into the summary.

    Definitions: ``steps`` is the largest number of step records of one worker rank;
    ``bytes_sent_per_worker_per_step = bytes_sent_total / (workers * steps)``; each ``*_fraction``
    is that time summed over all step records divided by compute+comm+idle summed likewise;
    ``wall_time_s`` is the latest wall of any step or eval record (evaluation time excluded);
    ``excluded_time_s`` is what that leaves out: the most any rank spent evaluating and writing
    checkpoints (from the ranks' ``end`` records; None when no rank closed its record);
    ``time_to_target_s`` / ``steps_to_target`` come from the first evaluation reaching the target
    (None when none did); ``averaging_to_target_s`` is the part of that time spent assembling
    the evaluated model where no worker holds it (gossip's averaging; 0 elsewhere).
    ``resumes`` / ``resumed_at_steps`` / ``lost_wall_s``: the lowest resumed
    rank's ``resume`` records (the wall lost is not in ``wall_time_s``). Several ranks evaluating
    the same step count as one evaluation with their mean metrics (see
    :mod:`tandem.telemetry.curves`).
    """
    run_dir = Path(run_dir)
    config = dict(config or {})
    extra = dict(extra or {})
    records = load_events(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    index = ByteIndex(records)
    evals = eval_curve(records, index)
    train = train_curve(records, index)

    n_steps = _count_steps(steps)
    ranks = sorted({int(r.get("rank", 0)) for r in records if "rank" in r})
    workers = int(config.get("workers") or len(ranks) or 1)
    sent = sum(int(r.get("bytes_sent") or 0) for r in steps)
    recv = sum(int(r.get("bytes_recv") or 0) for r in steps)
    times = {k: sum(float(r.get(k) or 0.0) for r in steps) for k in STEP_TIMES}
    busy = sum(times.values())
    walls = [float(r["wall"]) for r in records
             if r.get("kind") in ("step", "eval") and r.get("wall") is not None]

    if target_accuracy is None:
        target_accuracy = config.get("target_accuracy")
    target_loss = extra.get("target_loss")
    has_accuracy = any(p["accuracy"] is not None for p in evals)
    if has_accuracy:
        hit = first_reaching(evals, accuracy=target_accuracy) if target_accuracy else None
    else:
        hit = first_reaching(evals, loss=float(target_loss)) if target_loss is not None else None
    last = evals[-1] if evals else None
    info, info_by_rank = _collect_info(records)
    resumes = [r for r in records if r.get("kind") == "resume"]
    first = min((int(r.get("rank", 0)) for r in resumes), default=0)
    resumes = [r for r in resumes if int(r.get("rank", 0)) == first]

    summary: dict[str, Any] = {
        "run": config.get("name") or run_dir.name,
        "strategy": _name(config.get("strategy")),
        "codec": _name(config.get("codec")),
        "workload": _name(config.get("workload")),
        "workers": workers,
        "ranks": len(ranks),
        "steps": n_steps,
        "wall_time_s": max(walls, default=0.0),
        "excluded_time_s": max((float(r["excluded_s"]) for r in records
                                if r.get("kind") == "end" and r.get("excluded_s") is not None),
                               default=None),
        "final_test_accuracy": last["accuracy"] if last else None,
        "final_test_loss": last["loss"] if last else None,
        "final_train_loss": train[-1]["loss"] if train else None,
        "metric": "accuracy" if has_accuracy else "loss",
        "evaluations": len(evals),
        "bytes_sent_total": sent,
        "bytes_recv_total": recv,
        "bytes_sent_per_worker_per_step": sent / (workers * n_steps) if n_steps else None,
        "compute_s_total": times["compute_s"],
        "comm_s_total": times["comm_s"],
        "idle_s_total": times["idle_s"],
        "compute_fraction": times["compute_s"] / busy if busy > 0 else None,
        "comm_fraction": times["comm_s"] / busy if busy > 0 else None,
        "idle_fraction": times["idle_s"] / busy if busy > 0 else None,
        "target_accuracy": target_accuracy,
        "target_loss": target_loss,
        "time_to_target_s": time_at(hit) if hit else None,
        "steps_to_target": hit["step"] if hit else None,
        "averaging_to_target_s": float(hit.get("averaging_s") or 0.0) if hit else None,
        "bytes_to_target": hit["bytes"] if hit else None,
        "resumes": len(resumes),
        "resumed_at_steps": [int(r.get("step", 0)) for r in resumes],
        "lost_wall_s": sum(float(r.get("lost_wall_s") or 0.0) for r in resumes),
        "info": info,
    }
    if info_by_rank:
        summary["info_by_rank"] = info_by_rank
    summary.update(extra)
    summary["config"] = config
    _atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _plot_or_note(ax: Any, xs: list[float], ys: list[float], **kw: Any) -> None:
    if xs:
        ax.plot(xs, ys, **kw)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_curves(run_dir: Path) -> Path:
    """Draw ``<run_dir>/curves.png`` (2x2): training loss and test accuracy (test loss for
    regression) against wall time and against cumulative train MB sent by all ranks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = load_events(run_dir)
    index = ByteIndex(records)
    train = train_curve(records, index)
    evals = eval_curve(records, index)
    use_acc = any(p["accuracy"] is not None for p in evals)
    metric = "accuracy" if use_acc else "loss"
    evals = [p for p in evals if p[metric] is not None]

    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0][0], train, "wall", "loss", "training loss vs wall time"),
        (axes[0][1], train, "bytes", "loss", "training loss vs bytes sent"),
        (axes[1][0], evals, "wall", metric, f"test {metric} vs wall time"),
        (axes[1][1], evals, "bytes", metric, f"test {metric} vs bytes sent"),
    ]
    for ax, points, xkey, ykey, title in panels:
        xs = [p[xkey] / 1e6 if xkey == "bytes" else p[xkey] for p in points]
        ys = [p[ykey] for p in points]
        _plot_or_note(ax, xs, ys, marker="o" if points is evals else None,
                      markersize=3, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("train MB sent (all ranks)" if xkey == "bytes" else "wall time (s)")
        ax.set_ylabel(f"test {metric}" if points is evals else "training loss")
        ax.grid(True, alpha=0.3)
    fig.suptitle(run_dir.name)
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    return out


def finalize_run(run_dir: Path, config: dict, *, target_accuracy: float | None = None,
                 extra: dict | None = None) -> dict:
    """Merge, summarise and plot a finished run; returns the summary dict."""
    merge_events(run_dir)
    summary = summarize(run_dir, config, target_accuracy=target_accuracy, extra=extra)
    plot_curves(run_dir)
    plot_correlation(run_dir)
    return summary
