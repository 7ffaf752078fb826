"""Evaluation of a gossip run: the network-average model, the peers' own models, and a survivor
alone after a peer was lost (:mod:`tandem.strategies.gossip`)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.nn.utils import vector_to_parameters

from tandem.trainer.context import WorkerContext
from tandem.trainer.evaluate import Evaluation, evaluate, evaluate_shard, reduce_evaluation
from tandem.trainer.evaluate import evaluate_alone as evaluate_model_alone

__all__ = ["average_parameters", "evaluate_alone", "evaluate_network", "peer_accuracy"]


def evaluate_network(ctx: WorkerContext, step: int, x: torch.Tensor, model: torch.nn.Module,
                     mparams: list[torch.Tensor], opt: torch.Tensor | None) -> dict[str, Any]:
    """Consensus error, distance to the optimum and test loss of the averaged model.

    The averaged model does not exist on any peer: a user who stops here gets it by one
    all-reduce of the parameters (what :meth:`GossipPeer.save_model` does at the end). That
    all-reduce is timed alone, after a barrier that absorbs the peers' skew, and recorded as
    ``averaging_s``; the run's time to a target adds it (:func:`tandem.telemetry.curves.time_at`)
    so that the model that reached the target is paid for."""
    tr, world = ctx.transport, ctx.world
    tr.barrier().wait()
    t0 = time.perf_counter()
    avg = average_parameters(tr, x)
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


def average_parameters(tr: Any, x: torch.Tensor) -> torch.Tensor:
    """The network average of every peer's ``x`` (one all-reduce in ``x``'s dtype, category
    eval): the model a gossip run hands over."""
    avg = x.clone()
    tr.all_reduce(avg, category="eval").wait()
    return avg.div_(tr.world)


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
