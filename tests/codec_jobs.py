"""Helpers for the codec tests: an in-process N-worker transport on threads, synthetic gradients,
and the functions run inside spawned gloo processes (importable by name)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from tandem.codecs import make_codec
from tandem.codecs.dense import DenseCodec
from tandem.codecs.positions import positions_nbytes
from tandem.transport import costs
from tandem.transport.accounting import ByteMeter
from tandem.transport.process_group import Done
from tandem.transport.transport import Group

# ---- threads standing in for ranks -----------------------------------------------------------


class ThreadWorld:
    """N ranks as threads of this process, meeting at a barrier for every collective."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list[Any] = [None] * n
        self.transports = [ThreadTransport(self, r) for r in range(n)]


class ThreadTransport:
    """The codecs' ``Collectives`` (the Transport methods codecs use); bytes charged with the
    same formulas as the real transport."""

    def __init__(self, world: ThreadWorld, rank: int) -> None:
        self._w, self.rank, self.world = world, rank, world.n
        self.world_group = Group(None, list(range(world.n)))
        self.meter = ByteMeter()

    def _swap(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._w.slots[self.rank] = tensor.detach().clone()
        self._w.barrier.wait()
        got = list(self._w.slots)
        self._w.barrier.wait()
        return got

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", *, group: Any = None,
                   category: str = "train", caller_waits: bool = False) -> Done:
        t = costs.all_reduce(tensor.numel() * tensor.element_size(), self.world)
        self.meter.record("all_reduce", t.sent, t.recv, category=category)
        got = self._swap(tensor)
        if op == "sum":
            res = got[0].clone()
            for other in got[1:]:
                res += other
        else:
            res = torch.stack(got).amax(0) if op == "max" else torch.stack(got).amin(0)
        tensor.copy_(res)
        return Done(tensor)

    def all_gather(self, tensor: torch.Tensor, *, group: Any = None,
                   category: str = "train") -> Done:
        t = costs.all_gather(tensor.numel() * tensor.element_size(), self.world)
        self.meter.record("all_gather", t.sent, t.recv, category=category)
        return Done(self._swap(tensor))

    def broadcast(self, tensor: torch.Tensor, src: int, *, group: Any = None,
                  category: str = "train") -> Done:
        t = costs.broadcast(tensor.numel() * tensor.element_size(), self.world, self.rank == src)
        self.meter.record("broadcast", t.sent, t.recv, category=category)
        got = self._swap(tensor)
        tensor.copy_(got[src])
        return Done(tensor)

    def end_step(self) -> Any:
        return self.meter.end_step()


def run_threads(n: int, fn: Callable[[ThreadTransport], Any]) -> list[Any]:
    """Run ``fn(transport)`` on N threads; return the results by rank, re-raising any error."""
    world = ThreadWorld(n)
    out: list[Any] = [None] * n
    errors: list[BaseException] = []

    def body(r: int) -> None:
        try:
            torch.set_num_threads(1)  # per thread under OpenMP: the ranks are the parallelism
            out[r] = fn(world.transports[r])
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    before = torch.get_num_threads()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    torch.set_num_threads(before)
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return out


# ---- synthetic gradients ----------------------------------------------------------------------

SHAPES = [(16, 8), (16,), (256, 128), (256,), (128, 256), (128,), (10, 128), (10,)]


def correlated_grads(shapes: list[tuple[int, ...]], workers: int, steps: int, *, noise: float,
                     seed: int = 0) -> list[list[list[torch.Tensor]]]:
    """grads[step][worker][layer] = a_t * c + noise * n_{i,t}: a common heavy-tailed direction
    ``c`` (fixed), a per-step amplitude ``a_t`` and small independent per-worker noise."""
    gen = torch.Generator().manual_seed(seed)
    common = [torch.randn(s, generator=gen) * torch.rand(s, generator=gen).pow(4) for s in shapes]
    out = []
    for _ in range(steps):
        a = 0.5 + torch.rand((), generator=gen)
        out.append([[a * c + noise * torch.randn(s, generator=gen)
                     for c, s in zip(common, shapes, strict=True)] for _ in range(workers)])
    return out


def mean_of(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(parts).mean(0) for parts in zip(*grads, strict=True)]


def codec_exchange_steps(name: str, options: dict, grads: list[list[list[torch.Tensor]]],
                         rank: int, transport: Any) -> tuple[Any, list[list[torch.Tensor]]]:
    """Exchange ``grads[t][rank]`` for every step t; return the codec and the outputs."""
    codec = make_codec(name, options, seed=0)
    outs = [codec.exchange(step[rank], transport) for step in grads]
    return codec, outs


# ---- expected bytes -------------------------------------------------------------------------


def lgc_expected_sent(p: Any, variant: str, step: int, rank: int, n: int, warm: int,
                      ae: int, k_warm: int | None = None) -> int:
    """Bytes rank ``rank`` sends at ``step`` under M1 (plan ``p``; rotating leader); ``k_warm``:
    the warm-up's (ramped) top-k count at ``step`` (default: the plan's K)."""
    dense = 4 * sum(_numel(p.shapes[i]) for i in p.dense)
    k, z, m = p.k, p.z, p.m
    d = sum(p.sizes)
    pk, pm = positions_nbytes(k, d), positions_nbytes(m, k)
    lead = rank == step % n
    ar = costs.all_reduce(dense, n).sent
    if step < warm:
        kw = k if k_warm is None else k_warm
        return ar + costs.all_gather(4 * kw + positions_nbytes(kw, d), n).sent
    if step < warm + ae:
        return ar + costs.broadcast(pk, n, lead).sent + costs.all_gather(4 * k, n).sent
    if variant == "ps":
        return (ar + costs.broadcast(pk + 4 + 4 * z, n, lead).sent
                + costs.all_gather(4 + 4 * m + pm, n).sent)
    return (costs.broadcast(pk + 4 + pm, n, lead).sent
            + costs.all_reduce(dense + 4 * z + 4 * m, n).sent)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


# ---- spawned jobs (real gloo processes) -------------------------------------------------------

STANDARD = ["dense", "fp16", "bf16", "topk", "randomk", "qsgd", "powersgd", "signsgd"]


def codec_bytes_job(shapes: list[tuple[int, ...]], lgc_opts: dict, lgc_steps: int) -> dict:
    """One exchange per standard codec and ``lgc_steps`` of each LGC variant over the real
    transport; report the meter's bytes, each code's ``nbytes`` and result checksums."""
    from tandem.transport.env import transport_from_env

    t = transport_from_env(timeout_s=60)
    gen = torch.Generator().manual_seed(t.rank)
    g = [torch.randn(s, generator=gen) for s in shapes]
    out: dict[str, Any] = {}
    try:
        for name in STANDARD:
            nbytes = make_codec(name, {}, seed=0).encode(g).nbytes
            t.end_step()
            mean = make_codec(name, {}, seed=0).exchange(g, t)
            b = t.end_step()
            out[name] = {"sent": b.sent, "recv": b.recv, "nbytes": nbytes,
                         "result": torch.cat([x.reshape(-1) for x in mean])}
        for variant in ("rar", "ps"):
            c = make_codec("lgc", {**lgc_opts, "variant": variant}, seed=0)
            sent = []
            for step in range(lgc_steps):
                gs = [x * (1 + 0.1 * step) + 0.05 * torch.randn(x.shape, generator=gen)
                      for x in g]
                c.exchange(gs, t)
                sent.append(t.end_step().sent)
            out[f"lgc-{variant}"] = {"sent": sent, "checksum": c.ae.checksum(),
                                     "resyncs": c.resyncs, "describe": c.describe()}
    finally:
        t.close()
    return out


def ddp_job(steps: int) -> dict:
    """Plain DDP and DDP with Tandem's dense hook (small buckets: several codec instances),
    same seeds and data; also a few steps of a top-k hook."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tandem.codecs import ddp_hook
    from tandem.transport.env import transport_from_env

    t = transport_from_env(timeout_s=60)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 4))

    try:
        plain = DDP(model())
        hooked = DDP(model(), bucket_cap_mb=0.01)  # overlapped: exchanges on the hook's thread
        state, hook = ddp_hook(make_codec("dense"))
        hooked.register_comm_hook(state, hook)
        inline = DDP(model(), bucket_cap_mb=0.01)
        istate, ihook = ddp_hook(make_codec("dense"), overlap=False)
        inline.register_comm_hook(istate, ihook)
        topk = DDP(model(), bucket_cap_mb=0.01)
        tstate, thook = ddp_hook(make_codec("topk", {"ratio": 0.1}))
        topk.register_comm_hook(tstate, thook)
        models = (plain, hooked, inline, topk)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
        gen = torch.Generator().manual_seed(100 + t.rank)
        losses = []
        for _ in range(steps):
            x = torch.randn(16, 20, generator=gen)
            y = torch.randint(0, 4, (16,), generator=gen)
            for m, opt in zip(models, opts, strict=True):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(m(x), y)
                loss.backward()
                opt.step()
            losses.append(loss.item())
        return {"plain": [p.detach().clone() for p in plain.parameters()],
                "hooked": [p.detach().clone() for p in hooked.parameters()],
                "inline": [p.detach().clone() for p in inline.parameters()],
                "buckets": len(state.codecs), "topk_sent": tstate.transport.meter.sent_total(),
                "dense_sent": state.transport.meter.sent_total(), "topk_losses": losses,
                "threads": sorted({th.name.rsplit("_", 1)[0] for th in threading.enumerate()})}
    finally:
        t.close()


class _FailingDense(DenseCodec):
    """The dense codec, except that its third exchange raises (a codec or link failure)."""

    def exchange(self, grads, transport, group=None):  # noqa: ANN001, ANN201 - test double
        if self.step == 2:
            raise RuntimeError("codec failed at step 2")
        return super().exchange(grads, transport, group)


def ddp_hook_error_job(overlap: bool) -> str:
    """A failing exchange in the hook must surface from ``backward()``, with its message."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tandem.codecs import ddp_hook
    from tandem.transport.env import transport_from_env

    t = transport_from_env(timeout_s=30)
    try:
        torch.manual_seed(0)
        m = DDP(nn.Linear(8, 2))
        state, hook = ddp_hook(_FailingDense(), overlap=overlap)
        m.register_comm_hook(state, hook)
        for step in range(4):
            try:
                m(torch.randn(4, 8)).sum().backward()
            except RuntimeError as err:
                return f"step {step}: {err}"
        return "no error"
    finally:
        t.close(graceful=False)


def ddp_lgc_job(overlap: bool) -> dict:
    """DDP with an LGC hook through all three stages, inline or overlapped. DDP calls the hook
    during backward, where autograd has gradients switched off; LGC's stage-2 autoencoder
    training must still work."""
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tandem.codecs import ddp_hook
    from tandem.transport.env import transport_from_env

    t = transport_from_env(timeout_s=60)
    try:
        torch.manual_seed(0)
        m = DDP(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)))
        codec = make_codec("lgc", {"dense_first_last": False, "ratio": 0.05,
                                   "warmup_steps": 2, "ae_steps": 4}, seed=0)
        state, hook = ddp_hook(codec, total_steps=10, overlap=overlap)
        m.register_comm_hook(state, hook)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + t.rank)
        for _ in range(10):
            opt.zero_grad()
            x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 4, (16,), generator=gen)
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        info = state.describe()
        return {"params": [p.detach().clone() for p in m.parameters()],
                "ae_losses": [len(c.ae.losses) for c in state.codecs.values() if c.ae],
                "steps": [d["steps"] for d in info]}
    finally:
        t.close()
