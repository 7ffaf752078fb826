"""What a plan measures on this machine: one worker's compute, and every codec's exact messages.

Compute: the workload's model on one worker's batch (``batch_size`` samples; the workload's
accumulation micro-batches and bf16 autocast when it asks for them), forward + backward +
an SGD step, in one thread as a worker runs (``threads``), the median of ``reps`` after
``warmup`` steps. Give ``compute_s`` instead when the target machine differs (a GPU).

Messages: nothing is estimated. Each codec runs its real ``exchange`` on a gradient of the
model's shapes through :class:`RecordingPeers`, a stand-in for rank 0 of ``world`` ranks whose
peers send what it sends, and every collective it issues is recorded as an :class:`Op` (kind and
tensor bytes), so PowerSGD's two all-reduces and LGC's leader broadcast come out as they are on
the wire. Control traffic (LGC's one-off autoencoder check) is left out. The exchange is taken in
its steady state: top-k's warm-up ramp and LGC's warm-up and autoencoder-training stages are
skipped (``steady_options``), since they last a fixed share of a run. The point-to-point code
(a parameter-server push, a gossip message) is ``encode(grads)``'s ``nbytes`` plus the framing
the transport adds (:func:`push_bytes`, :func:`pull_bytes`).

Assumption: a codec's message size does not depend on N (true of every codec here: per-layer
``k``, packed positions of ``ceil(log2 D)`` bits, latents); the recording runs at ``world = 4``.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tandem.codecs.base import CODECS, Codec, make_codec
from tandem.config import WorkloadConfig
from tandem.strategies.param_server.sharding import plan_shards, split
from tandem.strategies.param_server.wire import PULL_HEADER, PUSH_HEADER
from tandem.trainer import build_model
from tandem.transport.packing import header_of
from tandem.workloads import build_workload

#: world size the exchanges are recorded at (message sizes do not depend on it)
RECORD_WORLD = 4


@dataclass(frozen=True)
class Op:
    """One collective of an exchange: ``kind`` and the tensor's bytes (per rank for a gather)."""

    kind: str
    nbytes: int


@dataclass
class CodecProfile:
    """A codec's traffic on one model: its exchange's collectives and its point-to-point code."""

    name: str
    options: dict[str, Any]
    transfer: str
    self_contained: bool
    ops: list[Op]
    message_nbytes: int
    specs: list[Any] = field(repr=False, default_factory=list)
    #: seconds of computation (this machine, one thread): ``encode`` of one message, ``decode``
    #: of one, and a whole ``exchange`` at :data:`RECORD_WORLD` ranks (no link time)
    encode_s: float = 0.0
    decode_s: float = 0.0
    exchange_s: float = 0.0
    #: one compressed-gossip (CHOCO) round's computation with 1 and with 2 neighbours
    gossip_s: tuple[float, float] = (0.0, 0.0)

    @property
    def exchange_ops(self) -> list[tuple[str, int]]:
        return [(o.kind, o.nbytes) for o in self.ops]

    def exchange_seconds(self, n: int) -> float:
        """The exchange's computation at ``n`` ranks: gathered codes are decoded one per rank
        (the recorded time plus one ``decode`` per further rank); summed codes cost the same at
        any N."""
        if n <= 1:
            return 0.0
        if any(o.kind == "all_gather" for o in self.ops):
            return max(self.encode_s, self.exchange_s + (n - RECORD_WORLD) * self.decode_s)
        return self.exchange_s

    def gossip_seconds(self, degree: int) -> float:
        """A CHOCO round's computation with ``degree`` neighbours (linear in the degree)."""
        a, b = self.gossip_s
        return max(0.0, a + (degree - 1) * (b - a))


@dataclass
class Profile:
    """One workload as a plan sees it."""

    workload: str
    params: int
    shapes: list[tuple[int, ...]]
    batch_size: int
    #: forward + backward + SGD step of one worker's batch, measured here (one thread): the
    #: median, and the fastest (on the scale of the codecs' timings, also the fastest)
    compute_s: float
    measured: bool
    codecs: dict[str, CodecProfile]
    grads: list[torch.Tensor] = field(repr=False, default_factory=list)
    memo: dict[Any, Any] = field(repr=False, default_factory=dict)
    compute_min_s: float = 0.0

    @property
    def dense_nbytes(self) -> int:
        return 4 * self.params


class Done:
    """A handle whose work is already done: what a stand-in transport returns from a collective."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def wait(self, timeout: float | None = None) -> Any:
        return self.value


class RecordingPeers:
    """A :class:`~tandem.codecs.collectives.Collectives` for rank 0 of ``world`` ranks whose
    peers all send what this rank sends; it records every collective (:class:`Op`)."""

    def __init__(self, world: int = RECORD_WORLD) -> None:
        from tandem.transport.transport import Group

        self.rank, self.world = 0, world
        self.world_group = Group(None, list(range(world)))
        self.ops: list[Op] = []

    def _note(self, kind: str, t: torch.Tensor, category: str) -> None:
        if category == "train":
            self.ops.append(Op(kind, t.numel() * t.element_size()))

    def all_reduce(self, t: torch.Tensor, op: str = "sum", *, group: Any = None,
                   category: str = "train", caller_waits: bool = False) -> Done:
        self._note("all_reduce", t, category)
        if op == "sum":
            t.mul_(self.world)
        return Done(t)

    def all_gather(self, t: torch.Tensor, *, group: Any = None, category: str = "train"
                   ) -> Done:
        self._note("all_gather", t, category)
        return Done([t.clone() for _ in range(self.world)])

    def broadcast(self, t: torch.Tensor, src: int, *, group: Any = None,
                  category: str = "train") -> Done:
        self._note("broadcast", t, category)
        return Done(t)


def steady_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with the warm-up stages skipped, so one exchange shows the steady state."""
    fields = CODECS[name].Options.model_fields
    out = dict(options)
    if name == "lgc":
        out.update(warmup_steps=0, ae_steps=1, leader="fixed")
    elif "warmup_steps" in fields:
        out["warmup_steps"] = 0
    return out


def _best_time(fn: Any, reps: int) -> float:
    """The fastest of ``reps`` calls: what the work costs when nothing else competes for the
    CPU (a shared machine's hiccups only ever add)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _exchange_time(name: str, options: dict[str, Any], grads: list[torch.Tensor], world: int,
                   seed: int, reps: int) -> tuple[float, list[Op]]:
    """Seconds of a steady-state exchange at ``world`` ranks (the fastest of ``reps``), and its
    collectives."""
    codec: Codec = make_codec(name, steady_options(name, options), seed=seed)
    codec.set_total_steps(1000)
    peers = RecordingPeers(world)
    for _ in range(2 if name == "lgc" else 1):  # LGC: an autoencoder round, then compressed
        codec.exchange([g.clone() for g in grads], peers)
    copies = [[g.clone() for g in grads] for _ in range(reps)]
    times = []
    for c in copies:
        peers.ops.clear()
        t0 = time.perf_counter()
        codec.exchange(c, peers)
        times.append(time.perf_counter() - t0)
    return min(times), list(peers.ops)


class _Loopback:
    """A transport and a peer view for :class:`~tandem.strategies.gossip.choco.ChocoMixer`
    whose ``degree`` neighbours all send back what this peer sent (no link time)."""

    def __init__(self, degree: int) -> None:
        self.rank, self.degree = 0, degree
        self.size = degree + 1  # the graph: this peer and its neighbours 1..degree
        self.last: torch.Tensor | None = None

    def send(self, t: torch.Tensor, dst: int, **_: Any) -> Done:
        self.last = t
        return Done(None)

    def recv_packed(self, specs: Any, src: int, **_: Any) -> _Echo:
        return _Echo(self, specs)  # posted before this peer's send, as the mixer does

    def row(self) -> tuple[list[int], float, dict[int, float]]:
        w = 1.0 / (self.degree + 1)
        return list(range(1, self.degree + 1)), w, {j: w for j in range(1, self.degree + 1)}


class _Echo:
    """The answer of a :class:`_Loopback` neighbour: what this peer sent, once it has sent."""

    def __init__(self, loop: _Loopback, specs: Any) -> None:
        self.loop, self.specs = loop, specs

    def wait(self, timeout: float | None = None) -> list[torch.Tensor]:
        from tandem.transport.packing import unpack

        assert self.loop.last is not None, "the mixer waited for a receive before it sent"
        return unpack(self.loop.last.clone(), self.specs)


def _gossip_time(name: str, options: dict[str, Any], grads: list[torch.Tensor], degree: int,
                 seed: int, reps: int) -> float:
    """Seconds of one real CHOCO round (the gossip strategy's own mixer; the fastest of
    ``reps``)."""
    from tandem.flat import flatten
    from tandem.strategies.gossip.choco import ChocoMixer, default_consensus_step

    codec = make_codec(name, steady_options(name, options), seed=seed)
    loop = _Loopback(degree)
    x = flatten([g.float() for g in grads])
    mixer = ChocoMixer(codec, x, [tuple(g.shape) for g in grads],
                       default_consensus_step(codec), loop, loop)
    y = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    mixer.mix(y.clone(), 1, 0)
    return _best_time(lambda: mixer.mix(y.clone(), 1, 1), reps)


def codec_profile(name: str, options: dict[str, Any] | None, grads: list[torch.Tensor],
                  seed: int = 0, reps: int = 5) -> CodecProfile:
    """Record ``name``'s steady-state exchange, its message size and its computation on
    ``grads`` (one thread, as a worker runs)."""
    options = dict(options or {})
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t, ops = _exchange_time(name, options, grads, RECORD_WORLD, seed, reps)
        codec = make_codec(name, steady_options(name, options), seed=seed)
        codec.set_total_steps(1000)
        msg = codec.encode([g.clone() for g in grads])
        enc = _best_time(lambda: codec.encode([g.clone() for g in grads]), reps)
        dec = _best_time(lambda: codec.decode(msg), reps)
        gossip = (0.0, 0.0)
        if codec.self_contained and name != "dense":
            gossip = (_gossip_time(name, options, grads, 1, seed, reps),
                      _gossip_time(name, options, grads, 2, seed, reps))
    finally:
        torch.set_num_threads(old)
    return CodecProfile(name, options, codec.transfer, codec.self_contained, ops,
                        msg.nbytes, msg.specs(), enc, dec, t, gossip)


def push_bytes(profile: Profile, name: str, servers: int = 1) -> list[int]:
    """Bytes of one parameter-server push to each server: the codec's message of that server's
    shard plus the framing of ``Transport.send_message`` (a length, the tensor-spec header, the
    push header). The codec metadata sent with the first push only is left out."""
    key = ("push", name, servers)
    if key in profile.memo:
        return profile.memo[key]
    cp = profile.codecs[name]
    if servers == 1:
        parts: list[list[torch.Tensor]] = [profile.grads]
    else:
        parts = split(profile.grads, plan_shards(profile.shapes, servers))
    out = []
    for part in parts:
        msg = make_codec(name, steady_options(name, cp.options)).encode([g.clone() for g in part])
        specs = [(torch.int64, (PUSH_HEADER,)), *msg.specs()]
        out.append(8 + header_of(specs).numel() * 8 + PUSH_HEADER * 8 + msg.nbytes)
    profile.memo[key] = out
    return out


def pull_bytes(profile: Profile, servers: int = 1, fp16: bool = False) -> list[int]:
    """Bytes of one pull from each server: its header and its shard's parameters."""
    loads = plan_shards(profile.shapes, servers).loads()
    return [PULL_HEADER * 8 + n * (2 if fp16 else 4) for n in loads]


def gossip_message_bytes(profile: Profile, name: str) -> int:
    """What a gossip peer sends each neighbour per round: its parameters (dense, fp32) or the
    codec's message of its difference (CHOCO; packed, no header)."""
    return profile.dense_nbytes if name == "dense" else profile.codecs[name].message_nbytes


def _batch(dataset: Any, idx: torch.Tensor) -> tuple[Any, Any]:
    if hasattr(dataset, "x") and hasattr(dataset, "y"):
        return dataset.x[idx], dataset.y[idx]
    return torch.utils.data.default_collate([dataset[int(i)] for i in idx])


def measure_compute(workload: Any, batch_size: int, seed: int = 0, *, reps: int = 5,
                    warmup: int = 2, threads: int = 1
                    ) -> tuple[float, list[torch.Tensor], float]:
    """Median seconds of forward + backward + SGD step on one worker's batch, the last
    step's gradients (the shapes every codec is profiled on) and the fastest step."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(workload, seed)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        micro = int(workload.accumulation or 1)
        bf16 = workload.precision == "bf16"
        times: list[float] = []
        for i in range(warmup + reps):
            batches = [_batch(workload.train, torch.randint(len(workload.train), (batch_size,),
                                                            generator=gen)) for _ in range(micro)]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            for x, y in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = workload.loss_fn(model(x), y) / micro
                loss.backward()
            opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for p in params]
        return statistics.median(times), grads, min(times)
    finally:
        torch.set_num_threads(old)


def profile(workload: str = "mnist5k", *, workload_options: dict[str, Any] | None = None,
            batch_size: int | None = None, seed: int = 0, codecs: list[str] | None = None,
            codec_options: dict[str, dict[str, Any]] | None = None, reps: int = 5,
            warmup: int = 2) -> Profile:
    """Build the workload, measure its compute here and profile every codec (``codecs``: a
    subset by name; ``codec_options``: name -> options) on its gradient."""
    work = build_workload(WorkloadConfig(name=workload, options=workload_options or {}), seed)
    bs = int(batch_size or work.defaults.get("batch_size", 32))
    measured, grads, fastest = measure_compute(work, bs, seed, reps=reps, warmup=warmup)
    names = list(codecs) if codecs else sorted(CODECS.names())
    profiles = {n: codec_profile(n, (codec_options or {}).get(n), grads, seed, reps)
                for n in names}
    shapes = [tuple(g.shape) for g in grads]
    return Profile(workload, sum(math.prod(s) for s in shapes), shapes, bs, measured, True,
                   profiles, grads, compute_min_s=fastest)
