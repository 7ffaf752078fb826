"""The DDP rows of :mod:`bench.cluster`: torch ``DistributedDataParallel`` on the same job as a
Tandem run, one process per host under ``torchrun``::

    torchrun --nnodes 4 --node_rank I --nproc_per_node 1 --master_addr 10.213.8.1 \\
        --master_port 29500 bench/ddp_cluster_job.py --config cfg.yaml --hook powersgd

``--hook none`` is plain DDP (its own C++ all-reduce of fp32 buckets), ``fp16`` torch's
``fp16_compress_hook``, ``powersgd`` torch's ``powerSGD_hook`` at ``--rank`` (default 2) with
``start_powerSGD_iter=2`` (torch's default, 1000, would keep a short run on plain all-reduce; 2 is
the smallest it accepts with error feedback and warm start, both left on), with all gradients in
one DDP bucket (:func:`one_bucket`: with several, torch's hook can issue its all-reduces in a
different order on different ranks, which gloo cannot match).

It trains what ``tandem worker --config cfg.yaml`` trains with the ``allreduce`` strategy: the same
model and initial weights (seed), the same shards and batch order, the optimizer, schedule and
clipping of the run's :class:`~tandem.trainer.TrainSpec`, for ``cfg.steps`` steps, evaluated on
the whole test set every ``cfg.eval_every`` steps with Tandem's exact sharded evaluation. Events go
through Tandem's Recorder and rank 0 writes ``summary.json`` with ``finalize_run``, so time per
step, time to target and bytes mean exactly what they mean in a Tandem run record (evaluation time
excluded). ``compute_s`` is the whole step here: DDP's communication runs inside ``backward``.

Bytes per step: the all-reduce payloads DDP launches, charged as Tandem charges a ring all-reduce
(``2(N-1)/N`` of the payload sent per rank): torch's hooks' ``dist.all_reduce`` calls are counted as
they are made; plain DDP reduces every gradient once per step in fp32.

Emulated twin (``cfg.net`` set, one machine): torch's hooks bypass Tandem's link emulator, so the
job routes DDP's buckets through :func:`tandem.codecs.ddp_hook` with the matching Tandem codec
(``dense``, ``fp16``, ``powersgd`` at the same rank and with as many dense first steps as
torch's ``start_powerSGD_iter``) over an emulated Transport; its run can also be
started with :func:`job` under Tandem's launcher.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

HOOKS = ("none", "fp16", "powersgd")
#: the Tandem codec that stands for each DDP hook on an emulated link
EMULATED_CODEC = {"none": ("dense", {}), "fp16": ("fp16", {}), "powersgd": ("powersgd", {})}
#: torch's ``start_powerSGD_iter`` for the hook row (its default, 1000, would keep a short run on
#: plain all-reduce); the emulated twin's Tandem codec starts with as many dense steps
START_POWERSGD_ITER = 2


class _AllReduceCounter:
    """Counts the payload of every ``torch.distributed.all_reduce`` this process makes."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.nbytes = 0
        self._dist = dist
        self._orig = dist.all_reduce

        def counted(tensor: Any, *args: Any, **kw: Any) -> Any:
            self.nbytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *args, **kw)

        dist.all_reduce = counted

    def take(self) -> int:
        n, self.nbytes = self.nbytes, 0
        return n

    def close(self) -> None:
        self._dist.all_reduce = self._orig


def one_bucket(net: Any) -> dict[str, int]:
    """DDP options that put every gradient of ``net`` in one bucket (the first bucket too: an
    explicit ``bucket_cap_mb`` replaces DDP's 1 MiB first bucket).

    Why the PowerSGD hook row needs it: torch's ``powerSGD_hook`` issues a bucket's next
    all-reduce (its Ps, then its Qs) from the callback of the one before, on whichever thread
    completed it, while DDP issues the next bucket's first all-reduce from the backward pass.
    With two buckets in flight the ranks can enqueue these in different orders, and gloo
    matches collectives by order: a size mismatch (``op.preamble.length <= op.nbytes``) or a
    hang. On ``textlm`` (3.5 MB of gradients: two buckets by default), 4 ranks on loopback
    failed 3 of 3 runs with DDP's default buckets and passed 6 of 6 with one bucket. One bucket
    costs the hook its overlap with backward; Tandem's own ``allreduce`` rows exchange after
    backward too."""
    nbytes = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return {"bucket_cap_mb": nbytes // (1 << 20) + 1}


def job(cfg_data: dict[str, Any], hook: str, rank_r: int = 2) -> dict[str, Any]:
    """One rank's DDP run of ``cfg_data`` (a RunConfig dump) with ``hook``; rank 0 returns the
    summary."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel

    from tandem.codecs import ddp_hook, make_codec
    from tandem.config import RunConfig
    from tandem.telemetry.recorder import Recorder
    from tandem.telemetry.summary import finalize_run
    from tandem.trainer import (
        apply_workload_defaults,
        build_model,
        evaluate,
        is_eval_step,
        training_spec,
    )
    from tandem.transport import costs
    from tandem.transport.env import transport_from_env
    from tandem.workloads import build_workload
    from tandem.workloads.base import partition
    from tandem.workloads.loader import shard_loader, targets_of

    if hook not in HOOKS:
        raise SystemExit(f"--hook {hook!r}: one of {', '.join(HOOKS)}")
    cfg = RunConfig.model_validate(cfg_data)
    torch.set_num_threads(cfg.threads_per_worker)
    transport = transport_from_env(net=cfg.net, timeout_s=cfg.timeout_s, seed=cfg.seed)
    rank, world, ok = transport.rank, transport.world, False
    counter = None
    summary: dict[str, Any] = {}
    try:
        work = build_workload(cfg.workload, cfg.seed)
        cfg = apply_workload_defaults(cfg, work)
        spec = training_spec(cfg, work)
        net = build_model(work, cfg.seed)
        model = DistributedDataParallel(net, **one_bucket(net) if hook == "powersgd" else {})
        emulated = cfg.net is not None
        state: Any = None
        if emulated:
            name, opts = EMULATED_CODEC[hook]
            if name == "powersgd":
                opts = {"rank": rank_r, "dense_steps": START_POWERSGD_ITER}
            state, fn = ddp_hook(make_codec(name, opts, seed=cfg.seed), transport=transport,
                                 total_steps=cfg.steps)
            model.register_comm_hook(state, fn)
        elif hook == "fp16":
            model.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif hook == "powersgd":
            state = powerSGD_hook.PowerSGDState(process_group=None,
                                                matrix_approximation_rank=rank_r,
                                                start_powerSGD_iter=START_POWERSGD_ITER,
                                                random_seed=cfg.seed)
            model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        if not emulated and hook != "none":
            counter = _AllReduceCounter()
        grad_bytes = sum(p.numel() * p.element_size() for p in net.parameters()
                         if p.requires_grad)
        opt = spec.make_optimizer(net)
        total = int(cfg.steps or 1)
        sched = spec.make_scheduler(opt, total)
        w = cfg.workload
        shard = partition(targets_of(work.train), cfg.workers, w.partition,
                          redundancy=w.redundancy, labels_per_worker=w.labels_per_worker,
                          seed=cfg.seed)[rank]
        loader = shard_loader(work.train, shard, cfg.batch_size, seed=cfg.seed * 1000 + rank,
                              loader=work.loader)
        run_dir = cfg.run_dir()
        rec = Recorder(run_dir, rank, world=world, progress=False)
        rec.info(ddp_hook=hook, emulated_with=EMULATED_CODEC[hook][0] if emulated else None,
                 parameters=grad_bytes // 4,
                 timing="compute_s is the whole step: DDP communicates inside backward")
        every = cfg.eval_every or max(1, total // 20)
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # lazy imports, off clock
        transport.barrier().wait()
        rec.start()
        for step in range(total):
            t0 = time.perf_counter()
            model.train()
            x, y = loader.next_batch()
            opt.zero_grad(set_to_none=True)
            loss = work.loss_fn(model(x), y)
            loss.backward()  # DDP's all-reduce (or the hook) runs inside backward
            if spec.clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), spec.clip)
            opt.step()
            if sched is not None:
                sched.step()
            spent = time.perf_counter() - t0
            if emulated:
                b = transport.end_step()
                sent, recv = b.sent, b.recv
            else:
                payload = counter.take() if counter is not None else grad_bytes
                traffic = costs.all_reduce(payload, world)
                sent, recv = traffic.sent, traffic.recv
            rec.step(step, compute_s=spent, comm_s=0.0, idle_s=0.0, bytes_sent=sent,
                     bytes_recv=recv, loss=float(loss.detach()))
            if is_eval_step(step, every, total):
                with rec.evaluating():
                    ev = evaluate(net, work, transport)
                rec.eval(step, **ev.record())
        rec.close()
        transport.barrier().wait()
        if rank == 0:
            summary = finalize_run(run_dir, cfg.model_dump(mode="json"),
                                   target_accuracy=cfg.target_accuracy)
        ok = True
    finally:
        if counter is not None:
            counter.close()
        transport.close(graceful=ok)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="the run's YAML config (as for tandem worker)")
    ap.add_argument("--hook", default="none", choices=HOOKS)
    ap.add_argument("--rank", type=int, default=2, help="PowerSGD's matrix approximation rank")
    args = ap.parse_args()
    import yaml

    from tandem.config import load_config

    raw = yaml.safe_load(Path(args.config).read_text()) or {}
    cfg = load_config(raw)  # checked here; the job gets the fields as written, so that the
    if os.environ.get("RANK") == "0":  # workload's defaults fill the ones left out
        cfg.run_dir().mkdir(parents=True, exist_ok=True)
        (cfg.run_dir() / "config.yaml").write_text(cfg.to_yaml())
    job(raw, args.hook, args.rank)


if __name__ == "__main__":
    main()
