"""The DDP row of :mod:`bench.codecs`: torch ``DistributedDataParallel`` with Tandem's dense codec
as its communication hook, recorded like a Tandem strategy (runs in the spawned workers).

The hook routes DDP's buckets through a Tandem Transport, so DDP pays the same emulated link and
byte meter as the Tandem rows; its time inside the hook is the row's communication time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def _timed_hook(state, bucket):  # no annotations: DDP checks the hook's signature
    from tandem.codecs.ddp_hook import codec_hook

    t0 = time.perf_counter()
    fut = codec_hook(state, bucket)
    state.comm_s = getattr(state, "comm_s", 0.0) + time.perf_counter() - t0
    return fut


def ddp_job(cfg_data: dict[str, Any], run_dir: str, momentum: float) -> dict[str, Any]:
    """One rank of torch DDP + the dense codec hook through a Tandem Transport, recorded with
    Tandem's Recorder exactly like a strategy (same model, optimizer, shard and batch order)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from tandem.codecs import ddp_hook, make_codec
    from tandem.config import RunConfig
    from tandem.telemetry.recorder import Recorder
    from tandem.trainer import build_model, build_optimizer, evaluate, is_eval_step
    from tandem.transport.env import transport_from_env
    from tandem.workloads import build_workload
    from tandem.workloads.base import ShardLoader, partition

    cfg = RunConfig.model_validate(cfg_data)
    torch.set_num_threads(cfg.threads_per_worker)
    transport = transport_from_env(net=cfg.net, timeout_s=cfg.timeout_s, seed=cfg.seed)
    rank, ok = transport.rank, False
    try:
        work = build_workload(cfg.workload, cfg.seed)
        model = DistributedDataParallel(build_model(work, cfg.seed))
        # inline (overlap=False), so the time inside the hook is the communication time; the
        # CNN fits DDP's first bucket, so overlapping would have nothing to hide behind
        state, _ = ddp_hook(make_codec("dense", {"momentum": momentum}, seed=cfg.seed),
                            transport=transport, total_steps=cfg.steps, overlap=False)
        model.register_comm_hook(state, _timed_hook)
        opt = build_optimizer(model, cfg)
        w = cfg.workload
        shard = partition(work.train.y, cfg.workers, w.partition, redundancy=w.redundancy,
                          labels_per_worker=w.labels_per_worker, seed=cfg.seed)[rank]
        loader = ShardLoader(work.train, shard, cfg.batch_size, seed=cfg.seed * 1000 + rank)
        rec = Recorder(Path(run_dir), rank, world=transport.world, progress=False)
        total, every = int(cfg.steps or 1), cfg.eval_every or max(1, int(cfg.steps or 1) // 20)
        transport.barrier().wait()
        rec.start()
        for step in range(total):
            t0 = time.perf_counter()
            state.comm_s = 0.0
            x, y = loader.next_batch()
            opt.zero_grad(set_to_none=True)
            loss = work.loss_fn(model(x), y)
            loss.backward()  # the hook (and the emulated link) runs inside backward
            opt.step()
            spent = time.perf_counter() - t0
            b = transport.end_step()
            rec.step(step, compute_s=spent - state.comm_s, comm_s=state.comm_s, idle_s=0.0,
                     bytes_sent=b.sent, bytes_recv=b.recv, loss=float(loss.detach()))
            if is_eval_step(step, every, total):
                with rec.evaluating():
                    ev = evaluate(model.module, work, transport)
                    acc, tloss = ev.accuracy, ev.loss
                rec.eval(step, accuracy=acc, loss=tloss)
        rec.close()
        transport.barrier().wait()
        ok = True
    finally:
        transport.close(graceful=ok)
    return {"rank": rank}
