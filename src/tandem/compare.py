"""From "my model" to "what to use" in one call: ``tandem compare``.

It picks the handful of configurations most worth trying for a workload on a network
(:func:`candidates`: the fastest strategy x codec pairs that ``tandem plan`` predicts at that
worker count, plus ``allreduce`` + ``dense``, the DDP-equivalent baseline every result is read
against; a fixed short list when the plan cannot be made), trains each of them for real with the
same steps, seeds and data, and writes the comparison report (table, curves, one HTML page).

The plan ranks by step time only; compression and staleness also change how much each step
learns, which is what the real runs measure: read time-to-target in the report, not the plan's
ranking.

    from tandem.compare import compare
    result = compare({"workload": {"name": "mnist5k"}, "workers": 4, "steps": 300,
                      "net": "100mbit:1ms", "target_accuracy": 0.9}, out="runs/compare")
    print(result["table"])
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

from tandem.errors import TandemError
from tandem.job import run_job
from tandem.resolve import load_config
from tandem.telemetry.log import get_logger

log = get_logger(__name__)

BASELINE = ("allreduce", "dense")
#: what to try without a plan: the baseline, the two codecs that usually pay on slow links, and
#: the candidate parameter server
FIXED: list[tuple[str, str]] = [BASELINE, ("allreduce", "powersgd"), ("allreduce", "topk"),
                                ("param_server:candidate", "dense")]
#: options each codec is tried with (the plan measures the same)
CODEC_OPTIONS: dict[str, dict[str, Any]] = {"topk": {"ratio": 0.01, "momentum": 0.9},
                                           "randomk": {"ratio": 0.01, "momentum": 0.9},
                                           "powersgd": {"rank": 2}}


def strategy_of(method: str) -> dict[str, Any]:
    """``param_server:candidate`` -> ``{"name": "param_server", "options": {"mode": ...}}``."""
    name, _, mode = method.partition(":")
    return {"name": name, "options": {"mode": mode} if mode else {}}


def candidates(cfg: dict[str, Any], k: int = 4) -> list[tuple[str, str]]:
    """The (method, codec) pairs to try: the plan's fastest ``k`` at the run's worker count
    (``local`` left out), with the baseline first; the fixed list when no plan can be made."""
    full = load_config(cfg)
    try:
        from tandem.plan import plan
    except ImportError as err:  # pragma: no cover - a partial install
        log.warning("no plan (%s); trying the fixed short list", err)
        return list(FIXED[:k])
    net = cfg.get("net")
    if isinstance(net, dict):  # a dumped NetConfig: back to the spec string plan reads
        net = f"{net['bandwidth_bps']:g}bit:{net.get('latency_s', 0) * 1e6:g}us"
    try:
        result = plan(full.workload.name, [full.workers],
                      net=net if isinstance(net, str) else None,
                      workload_options=dict(full.workload.options),
                      batch_size=full.batch_size, seed=full.seed,
                      codec_options=CODEC_OPTIONS,
                      methods=["allreduce", "param_server:candidate", "param_server:sync",
                               "bsp_shared", "gossip:goco"])
    except TandemError as err:
        log.warning("no plan (%s); trying the fixed short list", err)
        return list(FIXED[:k])
    picks = [BASELINE]
    for p in result.at(full.workers):
        pair = (p.method, p.codec)
        if p.method != "local" and pair not in picks:
            picks.append(pair)
        if len(picks) > k:
            break
    return picks[:k + 1]


def label_of(method: str, codec: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "-", f"{method}-{codec}")


def compare(cfg: dict[str, Any], *, out: str | Path = "runs/compare", k: int = 4,
            pairs: list[tuple[str, str]] | None = None, html: bool = True,
            timeout_s: float | None = None) -> dict[str, Any]:
    """Train each candidate with ``cfg`` and report; returns ``{"table", "rows", "runs",
    "pairs", "html"}``. A candidate that fails is reported (its error's first line) and
    the others go on."""
    from tandem.telemetry.html import write_html
    from tandem.telemetry.report import build_report, format_table, save_png

    out = Path(out)
    pairs = pairs or candidates(cfg, k)
    runs, failed = [], {}
    for method, codec in pairs:
        run = out / label_of(method, codec)
        one = copy.deepcopy(cfg)
        one.update(strategy=strategy_of(method), out=str(run), name=None,
                   codec={"name": codec, "options": dict(CODEC_OPTIONS.get(codec, {}))})
        if method == "bsp_shared":  # the plan's network has one worker per node: so here
            one["strategy"]["options"]["machines"] = int(cfg.get("workers", 2))
        if codec in ("topk", "randomk") and method.startswith("allreduce"):
            one["momentum"] = 0.0  # the codec's own momentum correction replaces it
        try:
            run_job(load_config(one), timeout_s=timeout_s)
            runs.append(run)
        except TandemError as err:
            failed[run.name] = why = str(err).splitlines()[0][:300]
            log.warning("compare: %s/%s failed: %s", method, codec, why)
    if not runs:
        raise TandemError(f"compare: every candidate failed: {failed}")
    rep = build_report(runs, target_accuracy=cfg.get("target_accuracy"))
    save_png(rep, out / "compare.png")
    page = write_html(rep, out / "report.html", title="tandem compare") if html else None
    return {"table": format_table(rep.rows), "rows": rep.rows, "runs": runs, "pairs": pairs,
            "failed": failed, "html": page}
