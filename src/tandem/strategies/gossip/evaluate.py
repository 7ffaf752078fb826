"""Evaluation of a gossip run: the network-average model, the peers' own models, and a survivor
alone after a peer was lost (:mod:`tandem.strategies.gossip`)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch.nn.utils import vector_to_parameters

from tandem.trainer.context import WorkerContext
from tandem.trainer.evaluate import Evaluation, evaluate, evaluate_shard, reduce_evaluation
from tandem.trainer.evaluate import evaluate_alone as evaluate_model_alone

__all__ = ["average_parameters", "evaluate_alone", "evaluate_network", "half_scale",
           "peer_accuracy"]


def evaluate_network(ctx: WorkerContext, step: int, x: torch.Tensor, model: torch.nn.Module,
                     mparams: list[torch.Tensor], opt: torch.Tensor | None,
                     origin: torch.Tensor | None = None) -> dict[str, Any]:
    """Consensus error, distance to the optimum and test loss of the averaged model.

    The averaged model does not exist on any peer: a user who stops here gets it by one
    all-reduce of the parameters (what :meth:`GossipPeer.save_model` does at the end; in
    float16 from ``origin`` with ``average_dtype=float16``: :func:`average_parameters`). That
    all-reduce is timed alone, after a barrier that absorbs the peers' skew, and recorded as
    ``averaging_s``; the run's time to a target adds it (:func:`tandem.telemetry.curves.time_at`)
    so that the model that reached the target is paid for."""
    tr, world = ctx.transport, ctx.world
    tr.barrier().wait()
    t0 = time.perf_counter()
    avg = average_parameters(tr, x, origin)
    averaging_s = time.perf_counter() - t0
    mean = avg.double()
    stats = torch.tensor([float(((x.double() - mean) ** 2).sum()),
                          float(((x.double() - opt.double()) ** 2).sum()) if opt is not None
                          else 0.0], dtype=torch.float64)
    tr.all_reduce(stats, category="eval").wait()
    out: dict[str, Any] = {"consensus_error": float(stats[0]) / world,
                           "averaging_s": averaging_s}
    if "accuracy" in ctx.workload.metric_fns():
        out.update(peer_accuracy(ctx, x, model, mparams))
    with torch.no_grad():
        vector_to_parameters(avg, mparams)
    ev = evaluate(model, ctx.workload, tr)
    if opt is not None:
        out["opt_error"] = float(stats[1]) / world
        out["avg_opt_error"] = float(((mean - opt.double()) ** 2).sum())
    fields = {**ev.record(), **out}
    ctx.recorder.eval(step, **fields)
    return {"step": step, "wall": ctx.recorder.wall(), "test_loss": ev.loss, **fields}


def average_parameters(tr: Any, x: torch.Tensor,
                       origin: torch.Tensor | None = None) -> torch.Tensor:
    """The network average of every peer's ``x`` (category eval): the model a gossip run hands
    over.

    Without ``origin``: one all-reduce of ``x`` in its dtype, exact. With ``origin`` (the
    initial model, the same on every peer: ``average_dtype=float16``): the mean is
    ``origin + mean(x - origin)`` and the changes travel in float16, half the bytes. A scalar
    all-reduce first agrees on the largest change, and every peer scales its change by the same
    power of two so that the sum of ``world`` of them stays below 2**14 (no overflow, and the
    largest entries use float16's full precision). Error of the mean: at most about
    ``world * 2**-10`` times the largest change, on the largest entries; a parameter that did
    not move comes back exactly."""
    if origin is None:
        avg = x.clone()
        tr.all_reduce(avg, category="eval").wait()
        return avg.div_(tr.world)
    change = x.float() - origin.float()
    peak = change.abs().max().reshape(1).double() if change.numel() else torch.zeros(1).double()
    tr.all_reduce(peak, op="max", category="eval").wait()
    scale = half_scale(float(peak), tr.world)
    half = (change * scale).to(torch.float16)
    tr.all_reduce(half, category="eval").wait()
    return (origin.float() + half.float() / (scale * tr.world)).to(x.dtype)


def half_scale(peak: float, world: int) -> float:
    """The power of two that puts ``world`` changes of at most ``peak`` below 2**14 in sum
    (float16's largest finite value is 65504); 1 for a zero or non-finite peak (nothing moved,
    or the model is already broken and the mean will say so)."""
    if not math.isfinite(peak) or peak <= 0:
        return 1.0
    return 2.0 ** math.floor(math.log2(2.0 ** 14 / (world * peak)))


def peer_accuracy(ctx: WorkerContext, x: torch.Tensor, model: torch.nn.Module,
                  mparams: list[torch.Tensor]) -> dict[str, float]:
    """Each peer's own model on its shard of the test set (peer i: samples i, i+N, ...), the
    worst and the mean over peers. The average model's accuracy hides how far the peers are
    from it (compressed gossip keeps the average exactly while the peers may still disagree);
    a deployed peer is one of them. Sharded so that it costs 1/N of a test-set pass per peer
    (it used to cost a whole pass each, more than the training on small models): the mean is an
    unbiased estimate of the peers' mean accuracy, the minimum a slightly noisier one. Two
    scalar all-reduces (category eval)."""
    tr = ctx.transport
    with torch.no_grad():
        vector_to_parameters(x, mparams)
    shard = reduce_evaluation(evaluate_shard(model, ctx.workload, tr.rank, tr.world, tr.device),
                              ctx.workload)
    mine = shard.accuracy or 0.0
    total, worst = (torch.tensor([mine], dtype=torch.float64) for _ in range(2))
    tr.all_reduce(total, category="eval").wait()
    tr.all_reduce(worst, op="min", category="eval").wait()
    return {"peer_accuracy_min": float(worst), "peer_accuracy_mean": float(total) / tr.world}


def evaluate_alone(ctx: WorkerContext, step: int, x: torch.Tensor, model: torch.nn.Module,
                   mparams: list[torch.Tensor], opt: torch.Tensor | None,
                   survivors: int) -> dict[str, Any]:
    """After a loss: this peer's own model on the whole test set, no collective."""
    ev = _own_model_on_test_set(ctx, x, model, mparams)
    out: dict[str, Any] = {"local": True, "survivors": survivors}
    if opt is not None:
        out["opt_error"] = float(((x.double() - opt.double()) ** 2).sum())
    fields = {**ev.record(), **out}
    ctx.recorder.eval(step, **fields)
    return {"step": step, "wall": ctx.recorder.wall(), "test_loss": ev.loss, **fields}


def _own_model_on_test_set(ctx: WorkerContext, x: torch.Tensor, model: torch.nn.Module,
                           mparams: list[torch.Tensor]) -> Evaluation:
    """This peer's parameters ``x`` on the whole test set."""
    with torch.no_grad():
        vector_to_parameters(x, mparams)
    return evaluate_model_alone(model, ctx.workload, ctx.transport.device)
