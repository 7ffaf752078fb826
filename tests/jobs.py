"""Functions run inside spawned worker processes by the tests (must be importable by name)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import torch

from tandem.config import NetConfig
from tandem.errors import WorkerFailed
from tandem.transport.env import transport_from_env


def byte_counts(world: int) -> dict:
    """all_reduce, broadcast, send/recv: return what the meter charged on this rank."""
    t = transport_from_env(timeout_s=30)
    out = {}
    x = torch.ones(1000)  # 4000 bytes
    t.all_reduce(x).wait()
    out["all_reduce"] = t.end_step()
    y = torch.ones(250, dtype=torch.float64)  # 2000 bytes
    t.broadcast(y, src=0).wait()
    out["broadcast"] = t.end_step()
    if t.rank == 0:
        t.send(torch.ones(100, dtype=torch.int32), 1).wait()  # 400 bytes
    elif t.rank == 1:
        t.recv(torch.empty(100, dtype=torch.int32), 0).wait()
    out["p2p"] = t.end_step()
    out["sum_ok"] = float(x[0]) == world
    t.close()
    return {k: (v.sent, v.recv) if hasattr(v, "sent") else v for k, v in out.items()}


def swap_in_pieces(caller_waits: bool = False) -> dict:
    """Ranks 0 and 1 swap a message of several pieces (receives posted first, one into a
    non-contiguous buffer), then a small one and an empty one: what arrived, what was metered.
    ``caller_waits``: every handle must then be waited in the caller's thread (``CallerWait``)."""
    t = transport_from_env(timeout_s=30)
    peer = 1 - t.rank

    def values(rank: int) -> torch.Tensor:  # every other of 60,000: 240,000 bytes, 4 pieces
        return (torch.arange(60_000, dtype=torch.float64) + 1e5 * rank)[::2]

    into = torch.empty(60_000, dtype=torch.float64)[::2]  # a non-contiguous buffer
    got = t.recv(into, peer, caller_waits=caller_waits)
    small = t.recv(torch.empty(100, dtype=torch.int32), peer, caller_waits=caller_waits)
    empty = t.recv(torch.empty(0), peer, caller_waits=caller_waits)
    kinds = {type(h).__name__ for h in (got, small, empty)}
    for msg in (values(t.rank), torch.full((100,), t.rank, dtype=torch.int32), torch.empty(0)):
        sent = t.send(msg, peer, caller_waits=caller_waits)
        kinds.add(type(sent).__name__)
        sent.wait()
    assert got.wait() is into
    want = values(peer)
    out = {"big_ok": bool(torch.equal(into, want)), "kinds": sorted(kinds),
           "small_ok": bool((small.wait() == peer).all()), "empty": empty.wait().numel()}
    b = t.end_step()
    out["bytes"] = (b.sent, b.recv)
    t.close()
    return out


def link_timing(net: str, sizes: list[int]) -> list[tuple[int, float, float]]:
    """Time all_reduce and send on an emulated link; return (bytes, all_reduce s, p2p s)."""
    t = transport_from_env(net=NetConfig.parse(net), timeout_s=60)
    from tandem.transport.probe import time_operations

    # the emulator only ever adds delay: the fastest rep is the cleanest
    rows = [(r["bytes"], min(r["all_reduce_s"]), min(r["send_s"]))
            for r in time_operations(t, sizes, reps=3)]
    t.close()
    return rows


def die_mid_run(victim: int, steps: int, caller_waits: bool = False) -> int:
    """Every rank all-reduces in a loop; ``victim`` kills itself with SIGKILL at step 3."""
    t = transport_from_env(timeout_s=20)
    for step in range(steps):
        if t.rank == victim and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        t.all_reduce(torch.ones(10), caller_waits=caller_waits).wait()
        time.sleep(0.05)
    t.close()
    return steps


def recv_after_the_peer_is_gone(caller_waits: bool = False) -> int:
    """Rank 1 exchanges a message with rank 0, then is SIGKILLed; rank 0 waits until gloo has
    seen its socket close and only then posts a receive from it. gloo then raises as the
    receive is *posted*, not in its wait (a gossip peer's swap met it after a neighbour died)."""
    t = transport_from_env(timeout_s=20)
    if t.rank == 1:
        t.send(torch.ones(4), 0).wait()
        os.kill(os.getpid(), signal.SIGKILL)
    t.recv(torch.empty(4), 1, caller_waits=caller_waits).wait()
    time.sleep(1.5)  # gloo's loop thread marks the pair closed
    t.recv(torch.empty(4), 1, caller_waits=caller_waits).wait()
    return 0


def peer_killed_during_a_receive(caller_waits: bool) -> int:
    """Rank 0 waits on a receive from rank 1, which SIGKILLs itself instead of sending: the
    wait must end at once (the socket closes), with an error that names rank 1."""
    t = transport_from_env(timeout_s=30)
    if t.rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    t.recv(torch.empty(4), 1, caller_waits=caller_waits).wait()
    return 0


def silent_p2p_peer(timeout_s: float, caller_waits: bool) -> int:
    """Rank 1 sends nothing (it sleeps): rank 0's receive from it must name rank 1."""
    t = transport_from_env(timeout_s=timeout_s)
    if t.rank == 1:
        time.sleep(timeout_s + 3)
        t.close(graceful=False)
        return 1
    pending = t.recv(torch.empty(4), 1, caller_waits=caller_waits)
    assert caller_waits == (type(pending).__name__ == "CallerWait")
    pending.wait()
    return 0


def silent_peer(timeout_s: float, caller_waits: bool = False) -> int:
    """Rank 1 never joins the all-reduce (it sleeps): rank 0's wait must name rank 1."""
    t = transport_from_env(timeout_s=timeout_s)
    if t.rank == 1:
        time.sleep(timeout_s + 3)  # outlasts rank 0's timeout (both left the rendezvous together)
        t.close(graceful=False)
        return 1
    pending = t.all_reduce(torch.ones(10), caller_waits=caller_waits)
    assert caller_waits == (type(pending).__name__ == "CallerWait")
    pending.wait()
    return 0


def ddp_reference(cfg_data: dict) -> list:
    """Plain PyTorch DDP on the same workload, shards, seeds and steps as Tandem's allreduce."""
    from torch.nn.parallel import DistributedDataParallel

    from tandem.config import RunConfig
    from tandem.trainer import build_model, build_optimizer
    from tandem.workloads import build_workload
    from tandem.workloads.base import ShardLoader, partition

    cfg = RunConfig.model_validate(cfg_data)
    t = transport_from_env(timeout_s=60)  # initialises the default process group
    work = build_workload(cfg.workload, cfg.seed)
    model = DistributedDataParallel(build_model(work, cfg.seed))
    opt = build_optimizer(model, cfg)
    shards = partition(work.train.y, cfg.workers, cfg.workload.partition, seed=cfg.seed)
    loader = ShardLoader(work.train, shards[t.rank], cfg.batch_size, seed=cfg.seed * 1000 + t.rank)
    for _ in range(cfg.steps):
        x, y = loader.next_batch()
        opt.zero_grad(set_to_none=True)
        work.loss_fn(model(x), y).backward()
        opt.step()
    params = [p.detach().clone() for p in model.module.parameters()]
    t.close()
    return params


def ddp_delayed_reference(cfg_data: dict) -> list:
    """PyTorch DDP, one step stale: step t's averaged gradient is applied at step t + 1, the
    last step's after it (what allreduce ``delay=1`` promises); with ``predict`` (the
    default) each gradient is computed at ``w + (w - w_prev)``, the weights restored after."""
    from torch.nn.parallel import DistributedDataParallel

    from tandem.config import RunConfig
    from tandem.trainer import build_model, build_optimizer
    from tandem.workloads import build_workload
    from tandem.workloads.base import ShardLoader, partition

    cfg = RunConfig.model_validate(cfg_data)
    t = transport_from_env(timeout_s=60)
    work = build_workload(cfg.workload, cfg.seed)
    model = DistributedDataParallel(build_model(work, cfg.seed))
    opt = build_optimizer(model, cfg)
    params = list(model.module.parameters())
    shards = partition(work.train.y, cfg.workers, cfg.workload.partition, seed=cfg.seed)
    loader = ShardLoader(work.train, shards[t.rank], cfg.batch_size, seed=cfg.seed * 1000 + t.rank)

    def step_with(grads: list) -> None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()

    predict = cfg.strategy.options.get("predict", True)
    pending, delta = None, None
    for _ in range(cfg.steps):
        x, y = loader.next_batch()
        opt.zero_grad(set_to_none=True)
        before = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, d in zip(params, delta, strict=True) if predict and delta else ():
                p.add_(d)
        work.loss_fn(model(x), y).backward()
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
        mean = [p.grad.detach().clone() for p in params]
        if pending is not None:
            step_with(pending)
        pending = mean
        delta = [p.detach() - b for p, b in zip(params, before, strict=True)]
    step_with(pending)
    out = [p.detach().clone() for p in params]
    t.close()
    return out


def raise_on_rank(bad: int) -> int:
    t = transport_from_env(timeout_s=20)
    if t.rank == bad:
        raise RuntimeError(f"boom on rank {bad}")
    t.all_reduce(torch.ones(4)).wait()
    t.close()
    return t.rank


def kill_after_checkpoint(run_dir, min_step: int, victim: int = 1):
    """``spawn`` on_start hook: SIGKILL process ``victim`` once LATEST names a step >=
    ``min_step`` (a real kill -9 at a moment a checkpoint exists)."""
    def on_start(procs, _store):
        def killer():
            latest = run_dir / "checkpoints" / "LATEST"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if latest.is_file() and json.loads(latest.read_text())["step"] >= min_step:
                    os.kill(procs[victim].pid, signal.SIGKILL)
                    return
                time.sleep(0.01)
        threading.Thread(target=killer, daemon=True).start()
    return on_start


def kill_then_resume(cfg, min_step: int) -> list:
    """Run ``cfg`` (2 workers) under the local launcher, SIGKILL worker 1 once a checkpoint at
    step >= ``min_step`` exists, check the failure names it and the checkpoint is mid-run, then
    ``--resume``: rank 0's final parameters."""
    import pytest

    import tandem
    from tandem import worker
    from tandem.api import prepare_run_dir
    from tandem.launch import spawn

    prepare_run_dir(cfg)
    with pytest.raises(WorkerFailed) as info:
        spawn(worker.main, 2, cfg.model_dump(mode="json"), None, True, timeout_s=120,
              on_start=kill_after_checkpoint(cfg.run_dir(), min_step))
    assert 1 in info.value.ranks
    latest = json.loads((cfg.run_dir() / "checkpoints" / "LATEST").read_text())
    assert min_step <= latest["step"] < cfg.steps
    resumed = tandem.train(cfg.model_copy(update={"resume": True}), return_results=True)
    return resumed["results"][0]["params"]


def allocator_state() -> tuple[bool, bool]:
    """(was this process's allocator tuned before the job ran, is it tuned when asked now)."""
    from tandem import allocator

    return allocator.APPLIED, allocator.tune_allocator()


def stuck_peer(timeout_s: float) -> int:
    """Rank 1 hangs outside any Tandem wait (as in a deadlocked data loader); rank 0's all-reduce
    times out naming it. Only the launcher can end rank 1."""
    t = transport_from_env(timeout_s=timeout_s)
    if t.rank == 1:
        time.sleep(3600)
    t.all_reduce(torch.ones(10)).wait()
    return t.rank


def session_of() -> tuple[int, int]:
    """(this worker's pid, the id of its session)."""
    return os.getpid(), os.getsid(0)


def started_from() -> tuple[int, str]:
    """(this worker's parent pid, a launcher-side variable set after the first launch)."""
    return os.getppid(), os.environ.get("TANDEM_TEST_MARK", "")


def net_string_and_failing_completion() -> dict:
    """``net`` given as a spec string works; then an error raised while completing an operation
    (here the link model, after the engine finished) reaches the caller at once."""
    t = transport_from_env(net="50mbit:2ms", timeout_s=30)
    out: dict = {"net": (t.link.net.bandwidth_bps, t.link.net.latency_s)}
    t.all_reduce(torch.ones(10)).wait()

    def broken(*args: object, **kwargs: object) -> float:
        raise RuntimeError("link model failed")

    t.link.collective_done_time = broken  # type: ignore[method-assign]
    t0 = time.monotonic()
    try:
        t.all_reduce(torch.ones(10)).wait()
        out["error"] = None
    except WorkerFailed as err:  # Pending.wait names the operation and keeps the cause
        out["error"] = str(err)
    out["seconds"] = time.monotonic() - t0
    t.close(graceful=False)
    return out


def ddp_bucket_sizes(one: bool) -> str:
    """DDP's bucket sizes (bytes, after its rebuild at the second step) on a 2.4 MB model, with
    DDP's defaults or with the cluster bench's ``one_bucket`` options."""
    import sys
    from pathlib import Path

    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.ddp_cluster_job import one_bucket

    t = transport_from_env(timeout_s=60)  # initialises the default process group
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 320))
    model = DistributedDataParallel(net, **(one_bucket(net) if one else {}))
    for _ in range(3):
        model(torch.randn(4, 256)).sum().backward()
    sizes = str(model._get_ddp_logging_data()["rebuilt_bucket_sizes"])
    t.close()
    return sizes


def join_times(net: str, late_s: float) -> dict:
    """Rank 1 joins an all-reduce ``late_s`` after the others; every rank returns the join time
    its link model was given, and the window in which it called (on the shared clock)."""
    t = transport_from_env(net=NetConfig.parse(net), timeout_s=60)
    seen: list[float] = []
    model = t.link.collective_done_time

    def spy(*args: object, joined: float, **kwargs: object) -> float:
        seen.append(joined)
        return model(*args, joined=joined, **kwargs)

    t.link.collective_done_time = spy  # type: ignore[method-assign]
    t.barrier().wait()
    if t.rank == 1:
        time.sleep(late_s)
    before = time.monotonic()
    t.all_reduce(torch.ones(1000)).wait()
    out = {"before": before, "after": time.monotonic(), "joined": seen[-1]}
    t.close()
    return out


def join_clock_groups(net: str | None) -> dict:
    """Which process group each all-reduce the transport issues runs on, for one collective on
    the world group and one on a new group: the join clock's (a float64 of one element) and the
    data's."""
    import tandem.transport.transport as tt

    t = transport_from_env(net=NetConfig.parse(net) if net else None, timeout_s=60)
    seen: list[tuple[str, object]] = []
    real = tt.dist.all_reduce

    def spy(tensor: torch.Tensor, *args: object, group: object = None, **kw: object) -> object:
        seen.append(("clock" if tensor.dtype == torch.float64 else "data", group))
        return real(tensor, *args, group=group, **kw)

    tt.dist.all_reduce = spy  # type: ignore[assignment]
    try:
        sub = t.new_group(list(range(t.world)))
        out = {}
        for name, g in (("world", t.world_group), ("sub", sub)):
            seen.clear()
            t.all_reduce(torch.ones(10), group=g).wait()
            groups = dict(seen)
            out[name] = {"clock_on_own_group": groups.get("clock") is not None
                         and groups.get("clock") is g.clock and g.clock is not g.pg,
                         "data_on_group": groups.get("data") is g.pg,
                         "clock_issued": "clock" in groups}
    finally:
        tt.dist.all_reduce = real  # type: ignore[assignment]
    t.close()
    return out


def fan_out_times(net: str, nbytes: int) -> dict:
    """Rank 0 sends ``nbytes`` to every other rank at once on an emulated link; each rank
    returns its start (rank 0) or the moment its message was complete, on the shared clock."""
    t = transport_from_env(net=NetConfig.parse(net), timeout_s=60)
    n = nbytes // 4
    t.barrier().wait()
    start = time.monotonic()
    if t.rank == 0:
        for p in [t.send(torch.zeros(n), j) for j in range(1, t.world)]:
            p.wait()
        out = {"start": start, "sent": time.monotonic()}
    else:
        t.recv(torch.empty(n), 0).wait()
        out = {"done": time.monotonic()}
    t.barrier().wait()
    t.close()
    return out


def swap_time(net: str, nbytes: int, caller_waits: bool = False) -> dict:
    """Two ranks swap ``nbytes`` (receives posted first); when this rank started and when its
    receive completed (``time.monotonic``, one clock for every process of the machine)."""
    t = transport_from_env(net=NetConfig.parse(net), timeout_s=60)
    n, peer = nbytes // 4, 1 - t.rank
    t.barrier().wait()
    start = time.monotonic()
    recv = t.recv(torch.empty(n), peer, caller_waits=caller_waits)
    assert caller_waits == (type(recv).__name__ == "CallerWait")
    send = t.send(torch.zeros(n), peer, caller_waits=caller_waits)
    recv.wait()
    received = time.monotonic()
    send.wait()
    t.barrier().wait()
    t.close()
    return {"start": start, "received": received}


def host_link_sends(net: str, nbytes: int) -> dict:
    """Four ranks on two emulated hosts (``hosts=2``: ranks 0 and 2 on host 0, 1 and 3 on host
    1). Rank 0 first sends to rank 2, on its own host; then ranks 0 and 2 send to ranks 1 and 3
    at once, out of their one shared link. Returns the host's message count after each phase
    and when each cross-host message was complete, on the shared clock."""
    t = transport_from_env(net=NetConfig.parse(net), timeout_s=60)
    n = nbytes // 4
    assert t.link.host is not None
    out: dict = {"host": t.host}

    def messages() -> int:
        with t.link.host.timelines() as tl:
            return tl.next_id

    t.barrier().wait()
    if t.rank == 0:
        t.send(torch.zeros(n), 2).wait()
    elif t.rank == 2:
        t.recv(torch.empty(n), 0).wait()
    t.barrier().wait()
    out["after_same_host"] = messages()
    t.barrier().wait()
    start = time.monotonic()
    if t.host == 0:
        t.send(torch.zeros(n), t.rank + 1).wait()
        out["sent"] = time.monotonic() - start
    else:
        t.recv(torch.empty(n), t.rank - 1).wait()
        out["received"] = time.monotonic() - start
    t.barrier().wait()
    out["after_cross_host"] = messages()
    t.close()
    return out


def half_average() -> dict:
    """Gossip's network average in float16 from a shared origin, against the exact one: the
    error, the bound, and the eval bytes each sent."""
    from tandem.strategies.gossip.evaluate import average_parameters

    t = transport_from_env(timeout_s=30)
    gen = torch.Generator().manual_seed(7)
    origin = torch.randn(5000, generator=gen)
    change = torch.randn(5000, generator=torch.Generator().manual_seed(t.rank)) * (t.rank + 1)
    change[:100] = 0.0  # parameters that did not move
    change[100] = 20000.0 * (t.rank + 1)  # float16 would overflow in sum without the scale
    x = origin + change
    exact = average_parameters(t, x)
    after_exact = t.meter.sent_total("eval")
    half = average_parameters(t, x, origin)
    peak = torch.tensor([float(change.abs().max())])
    t.all_reduce(peak, op="max").wait()
    out = {"err": float((half - exact).abs().max()), "peak": float(peak),
           "unmoved_exact": bool(torch.equal(half[:100], origin[:100])),
           "finite": bool(torch.isfinite(half).all()), "dtype": str(half.dtype),
           "exact_bytes": after_exact, "half_bytes": t.meter.sent_total("eval") - after_exact}
    t.close()
    return out
