"""Functions run inside spawned processes by ``tests/test_bsp_shared.py`` (importable by name)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch


def train_job(cfg: dict[str, Any]) -> dict[str, Any]:
    """One process of a whole ``bsp_shared`` run; tensors come back as lists.

    The launcher's pipe pickles tensors by sharing their memory with the parent, which fails once
    the child has exited; lists travel by value. The caller merges the events once every process
    has ended (rank 0 is a worker here, which may end before the others wrote their last record).
    """
    from tandem import worker

    out = worker.main(cfg, None, True)
    if "params" in out:
        out["params"] = [p.reshape(-1).tolist() for p in out["params"]]
    out.pop("summary", None)
    return out


def stress_job(path: str, numel: int, adds: int, seconds: float) -> dict[str, Any]:
    """Rank 0 publishes models as fast as it can (every element = the version) and swaps the
    accumulator; ranks 1.. read models (checking for torn reads) and add ``adds`` ones-gradients.
    """
    from tandem.strategies.bsp_shared.segment import MachineSegment

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    seg = MachineSegment.attach(path, numel, world - 1)
    if rank == 0:
        version, base = 0, 0
        total, sums, per_worker = 0, torch.zeros(numel, dtype=torch.float64), [0] * (world - 1)
        model = torch.zeros(numel)
        deadline = time.monotonic() + seconds
        end = time.monotonic() + 60
        while ((time.monotonic() < deadline or total < adds * (world - 1))
               and time.monotonic() < end):
            version += 1
            model.fill_(float(version))
            seg.publish(model, version)
            if version % 20 == 0:
                base += 1
                out = seg.swap(base)
                total += out["count"]
                sums += out["sum"].double()
                per_worker = [a + b for a, b in zip(per_worker, out["per_worker"], strict=True)]
        out = seg.swap(base + 1, stop=True)
        total += out["count"]
        sums += out["sum"].double()
        return {"versions": version, "count": total, "sum_min": float(sums.min()),
                "sum_max": float(sums.max()),
                "per_worker": [a + b for a, b in zip(per_worker, out["per_worker"], strict=True)]}
    buf = torch.empty(numel)
    ones = torch.ones(numel)
    reads = torn = backwards = added = 0
    last = -1
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or added < adds:
        v = seg.read_model(buf, timeout_s=10)
        lo, hi = float(buf.min()), float(buf.max())
        torn += lo != hi or lo != float(v)
        backwards += v < last
        last = v
        reads += 1
        if added < adds:
            status, _ = seg.add(ones, v, rank - 1)
            added += status == "added"
    return {"reads": reads, "torn": torn, "backwards": backwards, "added": added}


def quadratic_job(centers: list[float], numel: int, lr: float, budget: int,
                  delays: list[float], normalize: str) -> dict[str, Any]:
    """Two machines with one worker each on f_i(x) = |x - c_i|^2 / 2 (gradient x - c_i).

    Ranks 0, 1 are the workers, ranks 2, 3 their agents. ``max_staleness=0``, so every applied
    gradient was computed on the model it updates, and the update of each superstep must be
    ``x - lr * sum_i n_i (x - c_i) / sum_i n_i`` exactly (``normalize=mean``).
    """
    from tandem.codecs import make_codec
    from tandem.strategies.bsp_shared.agent import Agent, AgentConfig, WorkerLoop
    from tandem.strategies.bsp_shared.segment import MachineSegment
    from tandem.transport.env import transport_from_env

    t = transport_from_env(timeout_s=30)
    group = t.new_group([2, 3])
    machine = t.rank % 2
    key = f"quad/{machine}"
    seg = None
    try:
        if t.rank >= 2:
            seg = MachineSegment.create(numel, 1)
            t.store.set(key, str(seg.path))
        else:
            seg = MachineSegment.attach(t.store.get(key).decode(), numel, 1)
        t.barrier().wait()
        if t.rank < 2:
            c = torch.full((numel,), centers[t.rank])

            def compute(flat: torch.Tensor, version: int, step: int):
                time.sleep(delays[t.rank])
                return float(((flat - c) ** 2).sum() / 2), flat - c, delays[t.rank], False

            out = WorkerLoop(seg, 0, compute, max_staleness=0, stall_timeout_s=20).run()
            out["rank"] = t.rank
        else:
            x = torch.zeros(numel, requires_grad=True)
            trajectory = [x.detach().clone().tolist()]

            class Recording(Agent):
                def _apply(self, direction: torch.Tensor) -> None:
                    super()._apply(direction)
                    trajectory.append(x.detach().clone().tolist())

            cfg = AgentConfig(budget=budget, period_s=0.02, normalize=normalize,
                              stall_timeout_s=20, worker_ids=[machine])
            agent = Recording(seg, [x], torch.optim.SGD([x], lr=lr), cfg, transport=t,
                              group=group, codec=make_codec("dense"))
            out = agent.run()
            out.update(rank=t.rank, trajectory=trajectory, history=agent.history)
        t.barrier().wait()
    finally:
        if seg is not None:
            seg.unlink()
    t.close()
    return out


def torn_add_job(path: str, numel: int, complete: int) -> None:
    """Local worker 0 of the segment at ``path``: ``complete`` whole adds of ones, then one add
    during which it SIGKILLs itself (the ``die_midway`` hook), holding the lock. Never returns."""
    from tandem.strategies.bsp_shared.segment import MachineSegment

    seg = MachineSegment.attach(path, numel, 2)
    ones = torch.ones(numel)
    for _ in range(complete):
        assert seg.add(ones, 0, 0)[0] == "added"
    seg.add(ones, 0, 0, die_midway=True)
    raise AssertionError("die_midway returned")
