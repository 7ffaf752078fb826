"""``tandem plan``: predict step time, bytes and the compute / comm / idle split of every
strategy x codec at 2 to 1,024 workers, before renting them.

The model (:mod:`.model`) combines three inputs: one worker's compute, measured here on the
workload's model (or given, ``compute_s``) with a noise and straggler model (:mod:`.delays`);
each codec's exact messages, recorded from its real ``exchange`` (:mod:`.measure`); and the
network's tiers and collective algorithms (:mod:`.network`). :mod:`.report` ranks, plots and
recommends. ``bench/plan.py`` checks the predictions against real runs (docs/scaling.md).

    from tandem.plan import plan
    result = plan("mnist5k", [2, 8, 64, 1024], net="1gbit:50us")
    print(result.table()); print(result.recommendation()); result.plot("plan.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tandem.config import StragglerConfig
from tandem.errors import ConfigError
from tandem.plan.delays import ComputeTime
from tandem.plan.measure import Profile, profile
from tandem.plan.model import METHODS, PlanOptions, Prediction, predict, predict_one
from tandem.plan.network import BACKENDS, Network, Tier
from tandem.plan.report import PlanResult

#: N the plan predicts by default: powers of two from 2 to 1,024
DEFAULT_WORKERS = tuple(2**k for k in range(1, 11))

__all__ = ["BACKENDS", "DEFAULT_WORKERS", "METHODS", "ComputeTime", "Network", "PlanOptions",
           "PlanResult", "Prediction", "Profile", "Tier", "plan", "predict", "predict_one",
           "profile"]


def _stragglers(text: str | StragglerConfig | None) -> StragglerConfig | None:
    if text is None or isinstance(text, StragglerConfig):
        return text
    try:
        return StragglerConfig.parse(text)
    except ValueError as err:
        raise ConfigError(f"--stragglers {text!r}: {' '.join(str(err).split())[:200]}") from None


def plan(workload: str = "mnist5k", workers: Sequence[int] = DEFAULT_WORKERS, *,
         net: str | None = None, net_inter: str | None = None, per_node: int = 1,
         backend: str = "nccl", overhead_s: float = 0.0,
         stragglers: str | StragglerConfig | None = None, jitter_s: float = 0.0,
         compute_s: float | None = None, batch_size: int | None = None,
         workload_options: dict[str, Any] | None = None, codecs: Sequence[str] | None = None,
         codec_options: dict[str, dict[str, Any]] | None = None,
         methods: Sequence[str] | None = None, options: PlanOptions | None = None,
         rank_at: int | None = None, seed: int = 0) -> PlanResult:
    """Predict every method x accepted codec at each N in ``workers``.

    ``net`` is each process's link (``"1gbit:50us"``, the default), or the link inside a node
    when ``net_inter`` (the node's NIC) is given with ``per_node`` processes per node.
    ``compute_s`` replaces the measured compute (e.g. the GPU you will rent); the codecs' own
    computation is then scaled by the same factor. ``stragglers``: ``"P:FACTOR"`` or
    ``"P:exp:MEAN_S"``; ``jitter_s``: mean of exponential noise on every step's compute.
    ``methods``: labels of :data:`~tandem.plan.model.METHODS` or strategy names.
    """
    ns = sorted({int(n) for n in workers})
    if not ns or ns[0] < 1:
        raise ConfigError(f"--workers {list(workers)}: give worker counts of at least 1")
    if rank_at is not None and rank_at not in ns:
        raise ConfigError(f"--rank-at {rank_at}: not one of --workers {ns}")
    if compute_s is not None and not compute_s > 0:
        raise ConfigError(f"--compute-s {compute_s}: must be > 0 seconds")
    chosen = list(methods) if methods else list(METHODS)
    labels = [m for m in METHODS if m in chosen or m.split(":")[0] in chosen]
    unknown = [m for m in chosen if m not in METHODS and m not in {k.split(":")[0]
                                                                   for k in METHODS}]
    if unknown or not labels:
        raise ConfigError(f"--strategies {unknown or chosen}: choose from {list(METHODS)}")
    network = Network.parse(net, net_inter, per_node, backend=backend, overhead_s=overhead_s)
    strag = _stragglers(stragglers)
    quick = compute_s is not None  # only the codecs' scale needs the local measurement
    prof = profile(workload, workload_options=workload_options, batch_size=batch_size,
                   seed=seed, codecs=list(codecs) if codecs else None,
                   codec_options=codec_options, reps=3 if quick else 5, warmup=1 if quick else 2)
    base = compute_s if compute_s is not None else prof.compute_s
    prof.measured = compute_s is None
    compute = ComputeTime.of(base, strag, jitter_s)
    opts = options or PlanOptions()
    preds = predict(prof, network, compute, ns, opts, labels,
                    cpu_scale=base / prof.compute_min_s)
    if not preds:
        raise ConfigError(f"--codecs {sorted(prof.codecs)}: none of them runs with --strategies "
                          f"{labels} (which codecs each strategy takes: docs/scaling.md); add a "
                          "codec or a strategy")
    notes = [f"compute {'given' if quick else 'measured here'}: {compute.describe()}; measured "
             f"here {prof.compute_s * 1e3:.3g} ms (batch {prof.batch_size}, one thread)"]
    notes += _stage_notes(preds, rank_at or ns[-1])
    return PlanResult(preds, prof, network, compute, opts, ns, rank_at or ns[-1], notes)


def _stage_notes(preds: list[Any], n: int) -> list[str]:
    """One note per codec costed stage by stage (LGC): its stages' share and step at ``n``."""
    out, seen = [], set()
    for p in preds:
        stages = p.extra.get("stages")
        if not stages or p.workers != n or p.codec in seen:
            continue
        seen.add(p.codec)
        parts = ", ".join(f"{s['stage']} {100 * s['share']:.0f} % of the steps at "
                          f"{s['step_s'] * 1e3:.3g} ms" for s in stages)
        out.append(f"{p.codec}: its step is the mean over its stages ({p.method} at N={n}: "
                   f"{parts}); its bytes are the steady stage's")
    return out
