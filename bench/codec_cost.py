"""Codec cost for :mod:`bench.codecs`: one ``exchange`` per codec against ``loss.backward()``, in
one process and one thread (like a worker), through a zero-cost stand-in transport.

:class:`IdenticalPeers` plays rank 0 of ``world`` ranks whose peers all send what this rank sends,
so ``exchange`` runs the codec's real ``world``-rank code path (every message decoded for gathered
codes, both PowerSGD rounds, LGC's leader work) without any link time.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from tandem.plan.measure import Done


class IdenticalPeers:
    """A Transport stand-in for rank 0 of ``world`` ranks whose peers all send exactly what this
    rank sends: sums are ``world`` x the input, gathers ``world`` copies, broadcasts keep ours.
    It costs no time, so timing ``exchange`` through it measures the codec's computation only."""

    def __init__(self, world: int) -> None:
        from tandem.transport.transport import Group

        self.rank, self.world = 0, world
        self.world_group = Group(None, list(range(world)))

    def all_reduce(self, t: Any, op: str = "sum", *, group: Any = None,
                   category: str = "train", caller_waits: bool = False) -> Done:
        if op == "sum":
            t.mul_(self.world)
        return Done(t)

    def all_gather(self, t: Any, *, group: Any = None, category: str = "train") -> Done:
        return Done([t.clone() for _ in range(self.world)])

    def broadcast(self, t: Any, src: int, *, group: Any = None, category: str = "train") -> Done:
        return Done(t)


def codec_costs(workload: Any, seed: int, batch: int, world: int,
                rows: list[tuple[str, str, dict[str, Any]]], momentum: float, reps: int = 20
                ) -> tuple[float, dict[str, float]]:
    """Median ``loss.backward()`` ms, and median ``exchange`` ms per ``(row, codec, options)``
    (one thread; ``momentum`` is every codec's momentum option, as in the runs)."""
    import torch

    from tandem.allocator import tune_allocator
    from tandem.codecs import make_codec
    from tandem.trainer import build_model

    torch.set_num_threads(1)
    tune_allocator()  # as in every worker process (see tandem.allocator)
    model = build_model(workload, seed)
    gen = torch.Generator().manual_seed(seed)
    back, grads = [], []
    for _ in range(reps + 3):
        idx = torch.randint(len(workload.train), (batch,), generator=gen)
        x, y = workload.train.x[idx], workload.train.y[idx]
        model.zero_grad(set_to_none=True)
        loss = workload.loss_fn(model(x), y)
        t0 = time.perf_counter()
        loss.backward()
        back.append(time.perf_counter() - t0)
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    backward_ms = 1e3 * statistics.median(back[3:])
    peers = IdenticalPeers(world)
    out: dict[str, float] = {}
    for row, name, opts in rows:
        if name == "lgc":  # reach the compressed stage quickly; rank 0 leads (the busier role)
            opts = {**opts, "warmup_steps": 2, "ae_steps": 10, "leader": "fixed"}
        codec = make_codec(name, {**opts, "momentum": momentum}, seed=seed)
        warm = 12 if name == "lgc" else 3
        times = []
        for i in range(warm + reps):
            g = [t.clone() for t in grads[i % len(grads)]]
            t0 = time.perf_counter()
            codec.exchange(g, peers)
            if i >= warm:
                times.append(time.perf_counter() - t0)
        out[row] = 1e3 * statistics.median(times)
    return backward_ms, out
