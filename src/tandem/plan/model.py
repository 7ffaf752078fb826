"""Per-strategy predictions: step time, bytes per worker per step, compute / comm / idle split.

Every prediction is built from three things: the compute distribution
(:class:`~tandem.plan.delays.ComputeTime`: ``X``, its mean ``X̄``, its expected maximum), the
codec's recorded messages (:mod:`tandem.plan.measure`) and the network's collective costs
(:mod:`tandem.plan.network`). "Step" means: the time in which each worker contributes one
gradient (for ``pipeline``, one step of one of its K models).

* ``allreduce``: ``E[max_N X] + exchange`` (the codec's collectives in order, plus its own
  computation, timed here and scaled by ``cpu_scale``); idle is the wait for the slowest,
  ``E[max_N X] - X̄``. A codec whose early rounds differ (LGC's warm-up and autoencoder
  training, :mod:`.stages`) is costed stage by stage, and the step is their mean weighed by
  each stage's share of the run (``allreduce`` and ``pipeline``; ``bsp_shared`` runs LGC only
  with a superstep count the plan does not model, :func:`accepted_codecs`); its bytes are the
  steady stage's.
* ``pipeline`` (K models, each this workload): a round takes ``max(K E[max_N X], K A)``, A one
  model's exchange (the exchanges of one model hide behind the others' compute); per model step
  ``max(E[max_N X], A)``.
* ``param_server`` (S servers): a push of ``p`` and a pull of ``q`` bytes per worker; every push
  and pull passes the server's own link, so its share of a round takes ``N p / S`` and
  ``N q / S`` over ``B``, one after the other: the pulls a server sends at once share its link
  (every worker has its pull when the last has), so no push overlaps them
  (``R = 2L + max(N p_s/B_s, p/B_w) + max(N q_s/B_s, q/B_w) + aggregation``), plus the wait for
  the round's slowest push. ``sync`` waits every step: ``E[max X] + R``.
  ``candidate`` never waits: it notices the pull after ``j = ceil(R/X̄)`` steps and pushes the
  next step, so it pushes every ``j + 1`` steps at ``X̄`` per step, unless ``R`` exceeds
  ``(cap - 1) X̄``: then it waits at the cap, ``(R + X̄) / cap`` per step.
* ``bsp_shared``: workers add into shared memory at memory speed and never wait, so throughput
  is the sum of their speeds: ``X̄ + 2D/adds`` per gradient. One agent per node exchanges per
  superstep (``period_s`` + the agents' exchange); its bytes are shared by the gradients made
  meanwhile.
* ``gossip``: ``rounds x (deg m / B + L)`` to mix (the busiest node's NIC across two tiers).
  ``goco`` waits only for its neighbours (who wait for theirs: simulated, ``coupled_step``), and a
  straggler's step ends at its deadline (``deadline_s``, or ``deadline_factor`` x its compute),
  so it costs at most the deadline. ``wait`` waits for everyone: a barrier and ``E[max_N X]``.
* ``coded_ps`` (s stragglers tolerated, d = s+1 partitions per worker): the server decodes from
  the first ``N - s`` coded gradients and sends those workers the new parameters at once (a late
  worker gets them when its stale answer comes in, behind the round), so ``R`` carries
  ``N - s`` pushes and pulls: ``E[(N-s)-th of d X] + R``.
* ``local``: ``X̄``, nothing sent (the floor).

Tune what the model assumes with :class:`PlanOptions` (servers, cap, topology, K, period,
deadline, s); CPU work timed on this machine is scaled by ``cpu_scale`` (the target's compute
over the compute measured here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from tandem.plan.delays import ComputeTime, coupled_step
from tandem.plan.measure import Profile, gossip_message_bytes, pull_bytes, push_bytes
from tandem.plan.network import Network
from tandem.plan.stages import codec_stages

_STATS_BYTES = 48  # bsp_shared's per-superstep all-reduce of 6 float64 counters


@dataclass(frozen=True)
class PlanOptions:
    """The strategy options a plan assumes (each the strategy's own default)."""

    servers: int = 1
    #: candidate's cap on local steps between merges; None: ``auto`` (the strategy keeps it just
    #: above round trip / compute, so it never binds below ``max_staleness``)
    cap: int | None = None
    max_staleness: int = 64
    pull_fp16: bool = False
    topology: str = "ring"
    gossip_rounds: int = 1
    #: GOCO: a real deadline per step (seconds after the step began); None: an injected
    #: straggler's step ends at ``deadline_factor`` x its normal compute (the strategy's rule)
    deadline_s: float | None = None
    deadline_factor: float = 1.5
    models: int = 2
    period_s: float = 0.05
    coded_s: int = 1


@dataclass
class Prediction:
    """One method x codec at N workers."""

    method: str
    strategy: str
    codec: str
    workers: int
    step_s: float
    compute_s: float
    comm_s: float
    idle_s: float
    bytes_per_step: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def split(self) -> tuple[float, float, float]:
        total = self.compute_s + self.comm_s + self.idle_s
        if total <= 0:
            return (1.0, 0.0, 0.0)
        return (self.compute_s / total, self.comm_s / total, self.idle_s / total)

    def as_dict(self) -> dict[str, Any]:
        c, m, i = self.split
        return {"method": self.method, "strategy": self.strategy, "codec": self.codec,
                "workers": self.workers, "step_s": self.step_s, "compute_s": self.compute_s,
                "comm_s": self.comm_s, "idle_s": self.idle_s,
                "bytes_per_step": self.bytes_per_step, "compute_fraction": c,
                "comm_fraction": m, "idle_fraction": i, **self.extra}


@dataclass
class Context:
    profile: Profile
    net: Network
    compute: ComputeTime
    opts: PlanOptions
    #: how much slower CPU work runs than where the codecs were timed (compute given / measured)
    cpu_scale: float = 1.0

    def cpu(self, seconds: float) -> float:
        return seconds * self.cpu_scale

    def adds(self, elements: float) -> float:
        """Seconds of element-wise memory work (adds, copies) on the workers' CPUs."""
        return self.cpu(elements / self.net.adds_per_s)

    def codec_s(self, codec: str, n: int) -> float:
        """The codec's own computation in one exchange at ``n`` ranks."""
        return self.cpu(self.profile.codecs[codec].exchange_seconds(n))

    def exchanges(self, codec: str, n: int, net: Network | None = None
                  ) -> tuple[list[tuple[str, float, float]], float]:
        """One exchange at ``n`` ranks over ``net`` (default the plan's) in each stage of the
        codec's run: ``[(stage, share of the steps, seconds: collectives + the codec's own
        computation)]`` (one steady stage for most codecs; LGC's warm-up and autoencoder
        training first, :mod:`.stages`), and the steady stage's bytes sent per rank."""
        net = net or self.net
        cp = self.profile.codecs[codec]
        ex = net.exchange(cp.exchange_ops, n)
        out = []
        for st in codec_stages(self.profile, codec, n):
            wire = sum(net.exchange(list(r), n).seconds for r in st.rounds) / len(st.rounds)
            out.append((st.name, st.share, wire + self.cpu(st.compute_s)))
        rest = max(0.0, 1.0 - sum(share for _, share, _ in out))
        out.append(("steady", rest, ex.seconds + self.codec_s(codec, n)))
        return out, ex.sent


def _mean(stages: list[tuple[str, float, float]], step: Callable[[float], float]
          ) -> tuple[float, dict[str, Any]]:
    """The mean of ``step(exchange seconds)`` over a run's stages, and (with several stages)
    the prediction's ``stages`` entry: each stage's share and step time."""
    mean = sum(share * step(secs) for _, share, secs in stages)
    if len(stages) == 1:
        return mean, {}
    return mean, {"stages": [{"stage": name, "share": share, "step_s": step(secs)}
                             for name, share, secs in stages]}


Predictor = Callable[[Context, str, int], Prediction]


def _pred(method: str, codec: str, n: int, step: float, compute: float, comm: float,
          idle: float, sent: float, **extra: Any) -> Prediction:
    return Prediction(method, method.split(":")[0], codec, n, step, compute, comm,
                      max(0.0, idle), float(sent), extra)


def _allreduce(c: Context, codec: str, n: int) -> Prediction:
    stages, sent = c.exchanges(codec, n)
    xmax, xbar = c.compute.expected_max(n), c.compute.mean()
    step, extra = _mean(stages, lambda secs: xmax + secs)
    return _pred("allreduce", codec, n, step, xbar, step - xmax, xmax - xbar, sent, **extra)


def _pipeline(c: Context, codec: str, n: int) -> Prediction:
    k = c.opts.models
    stages, sent = c.exchanges(codec, n)
    xmax, xbar = c.compute.expected_max(n), c.compute.mean()
    step, extra = _mean(stages, lambda a: max(xmax, a))
    return _pred("pipeline", codec, n, step, xbar, step - xmax, xmax - xbar, sent,
                 models=k, round_s=k * step, **extra)


def _server_round(c: Context, push: list[int], pull: list[int], n: int, *,
                  answers: int | None = None, push_hops: int = 3, decode_s: float = 0.0
                  ) -> float:
    """Communication of one parameter-server round as the slowest worker sees it (module doc):
    pushes into and pulls out of the servers' links, the worker's own link, the servers' work.
    ``answers``: the pushes a round waits for, and the pulls it sends at once (default all
    ``n``; ``coded_ps`` answers its first ``n - s`` and hands the late ones theirs as their
    stale answers come in, behind the round). ``push_hops``: messages per push the server
    receives one after the other (a ``send_message`` is a length, a header and the payload)."""
    net = c.net
    srv = net.nic  # a server is a process of its own (its own node across two tiers)
    share = min(net.per_node, n) if net.two_tier(n) else 1  # workers sharing a NIC
    wlink = net.nic if net.inter is not None else net.link
    p, q = sum(push), sum(pull)
    k = n if answers is None else answers
    in_srv, out_srv = k * max(push) / srv.bytes_per_s, k * max(pull) / srv.bytes_per_s
    p_w, q_w = share * p / wlink.bytes_per_s, share * q / wlink.bytes_per_s
    servers = max(1, len(push))
    work = k * decode_s / servers + c.adds((k + 3) * c.profile.params / servers)
    # the server's sends of one round share its link (transport.shaping.SharedEgress, as TCP
    # flows do): every worker has its pull when the last has, so pushes do not overlap pulls
    return (2 * srv.latency_s + (push_hops + 1) * net.overhead_s
            + max(in_srv, p_w) + max(out_srv, q_w) + work)


def _param_server(mode: str) -> Predictor:
    def predict(c: Context, codec: str, n: int) -> Prediction:
        o, d = c.opts, c.profile.params
        cp = c.profile.codecs[codec]
        push = push_bytes(c.profile, codec, o.servers)
        pull = pull_bytes(c.profile, o.servers, o.pull_fp16)
        comm = _server_round(c, push, pull, n, decode_s=c.cpu(cp.decode_s))
        xmax, xbar = c.compute.expected_max(n), c.compute.mean()
        rt = comm + (xmax - xbar)  # the round also waits for its slowest push
        cap = (o.cap or o.max_staleness) if mode == "candidate" else 1
        local = c.adds(3 * d)  # the candidate's own SGD step and its bookkeeping
        # encode a push (3 messages), merge a pull (1)
        per_round = c.cpu(cp.encode_s) + c.adds(2 * d) + 4 * c.net.overhead_s
        j = max(1, math.ceil(rt / xbar)) if xbar > 0 else 1
        if cap > 1 and j <= cap - 1:
            per_push = j + 1
            step = xbar + local + per_round / per_push
        else:
            per_push = cap
            step = (rt + xbar) / cap + local + per_round / cap
        busy = local + per_round / per_push
        wait = step - xbar - busy  # exposed: the round trip and the wait for the slowest
        idle = min(wait, xmax - xbar) if cap == 1 else wait
        return _pred(f"param_server:{mode}", codec, n, step, xbar, busy + wait - idle, idle,
                     sum(push) / per_push, round_trip_s=rt, steps_per_push=per_push,
                     push_bytes=sum(push), pull_bytes=sum(pull),
                     staleness_steps=per_push if cap > 1 else 0)

    return predict


@lru_cache(maxsize=64)
def _neighbours(topology: str, n: int) -> tuple[tuple[int, ...], ...]:
    """Each peer's neighbours on ``topology`` (built once per size)."""
    from tandem.topology import make_topology

    topo = make_topology(topology, n, seed=0)
    return tuple(tuple(topo.neighbors(i)) for i in range(n))


def _mix_seconds(c: Context, n: int, m: int, codec: str) -> tuple[float, float]:
    """(one gossip round's time, mean neighbours per peer) on ``opts.topology``: every
    neighbour's message over the busiest link, one hop, and the peer's own work (encoding once,
    decoding each neighbour's message, the weighted sum)."""
    net, nbrs = c.net, _neighbours(c.opts.topology, n)
    degrees = [len(x) for x in nbrs]
    deg, mean_deg = max(degrees), sum(degrees) / n
    cp = c.profile.codecs.get(codec)
    if codec != "dense" and cp is not None:  # the CHOCO round, timed (measure._gossip_time)
        work = c.cpu(cp.gossip_seconds(deg))
    else:  # a copy per neighbour sent, the weighted sum of the received ones
        work = c.adds((2 * deg + 1) * c.profile.params)
    if not net.two_tier(n):
        t = net.nic if net.inter is not None and net.per_node == 1 else net.link
        return deg * m / t.bytes_per_s + net.p2p_hop(t) + work, mean_deg
    per, worst_nic, worst_in = net.per_node, 0, 0
    for node in range(net.nodes(n)):
        members = range(node * per, min(n, (node + 1) * per))
        out = sum(1 for i in members for j in nbrs[i] if j // per != node)
        worst_nic = max(worst_nic, out)
        worst_in = max(worst_in, max(sum(1 for j in nbrs[i] if j // per == node)
                                     for i in members))
    ti, te = net.link, net.nic
    nic = worst_nic * m / te.bytes_per_s + net.p2p_hop(te) if worst_nic else 0.0
    inside = worst_in * m / ti.bytes_per_s + net.p2p_hop(ti) if worst_in else 0.0
    return max(nic, inside) + work, mean_deg


def _gossip(mode: str) -> Predictor:
    def predict(c: Context, codec: str, n: int) -> Prediction:
        o = c.opts
        m = gossip_message_bytes(c.profile, codec)
        mix, mean_deg = _mix_seconds(c, n, m, codec)
        mix *= o.gossip_rounds
        if mode == "goco":  # waits for its neighbours, and they for theirs (coupled_step)
            ct = c.compute.deadline(o.deadline_s, o.deadline_factor)
            xmax, xbar, wait = coupled_step(ct, _neighbours(o.topology, n), 0.0), ct.mean(), 0.0
        else:
            xmax, xbar = c.compute.expected_max(n), c.compute.mean()
            wait = c.net.barrier(n).seconds
        return _pred(f"gossip:{mode}", codec, n, xmax + wait + mix, xbar, mix + wait,
                     xmax - xbar, o.gossip_rounds * mean_deg * m, neighbours=mean_deg)

    return predict


def _bsp_shared(c: Context, codec: str, n: int) -> Prediction:
    net, d = c.net, c.profile.params
    machines = net.nodes(n) if net.inter is not None else n
    agents = replace(net, link=net.nic, inter=None, per_node=1)
    stats = agents.all_reduce(_STATS_BYTES, machines)
    stages, ex_sent = c.exchanges(codec, machines, agents)
    # the exchange (collectives + the codec's own work) over the run's stages; swap-and-zero,
    # the optimizer step, the publication
    exchange = sum(share * secs for _, share, secs in stages) if machines > 1 else 0.0
    superstep = c.opts.period_s + stats.seconds + exchange + c.adds(3 * d)
    adds = c.adds(2 * d)  # read the published model, add into the accumulator
    step = c.compute.mean() + adds
    grads = n * superstep / step
    sent = machines * (stats.sent + ex_sent) / grads if machines > 1 else 0.0
    return _pred("bsp_shared", codec, n, step, c.compute.mean(), adds, 0.0, sent,
                 machines=machines, superstep_s=superstep, grads_per_update=grads,
                 superstep_bytes=stats.sent + ex_sent, staleness_steps=superstep / step)


def _coded_ps(c: Context, codec: str, n: int) -> Prediction:
    s = min(c.opts.coded_s, n - 1)
    coded = c.compute.scaled(s + 1)
    msg = [4 * (c.profile.params + 1)]  # parameters / a coded gradient, with the step tag
    comm = _server_round(c, msg, msg, n, answers=n - s, push_hops=1)
    wait = coded.expected_order(n - s, n)
    busy = min(coded.mean(), wait)
    return _pred("coded_ps", codec, n, wait + comm, busy, comm, wait - busy, msg[0],
                 partitions=s + 1)


def _local(c: Context, codec: str, n: int) -> Prediction:
    x = c.compute.mean()
    return _pred("local", codec, n, x, x, 0.0, 0.0, 0.0)


#: method label -> (registered strategy, predictor); labels with ':' name a mode
METHODS: dict[str, tuple[str, Predictor]] = {
    "allreduce": ("allreduce", _allreduce),
    "pipeline": ("pipeline", _pipeline),
    "param_server:candidate": ("param_server", _param_server("candidate")),
    "param_server:sync": ("param_server", _param_server("sync")),
    "bsp_shared": ("bsp_shared", _bsp_shared),
    "gossip:goco": ("gossip", _gossip("goco")),
    "gossip:wait": ("gossip", _gossip("wait")),
    "coded_ps": ("coded_ps", _coded_ps),
    "local": ("local", _local),
}


def accepted_codecs(strategy: str, codecs: list[str]) -> list[str]:
    """The codecs ``strategy`` runs with and the plan models (its ``exact_exchange`` /
    ``peer_codes`` / ``push_codes`` / ``exchanges_by_time`` flags). A parameter server's push of
    LGC (LGC-PS, its own path: a leader's latent and every worker's innovations) is not
    modelled, so not predicted; neither are codecs that need a collective among the workers,
    which it refuses, nor LGC under ``bsp_shared``, whose supersteps the plan ends by time."""
    from tandem.codecs.base import CODECS
    from tandem.strategies.base import STRATEGIES

    cls = STRATEGIES[strategy]
    if cls.exact_exchange:
        return [c for c in codecs if c == "dense"]
    if cls.peer_codes or cls.push_codes:
        return [c for c in codecs if CODECS[c].self_contained]
    if cls.exchanges_by_time:  # bsp_shared's supersteps, which the plan ends by time
        return [c for c in codecs if not CODECS[c].counts_exchanges]
    return list(codecs)


def predict(profile: Profile, net: Network, compute: ComputeTime, workers: list[int],
            opts: PlanOptions | None = None, methods: list[str] | None = None,
            cpu_scale: float = 1.0) -> list[Prediction]:
    """Every method x accepted codec x N in ``workers``."""
    ctx = Context(profile, net, compute, opts or PlanOptions(), cpu_scale)
    out = []
    for label in methods or list(METHODS):
        strategy, fn = METHODS[label]
        for codec in accepted_codecs(strategy, list(profile.codecs)):
            out += [fn(ctx, codec, n) for n in workers]
    return out


def predict_one(profile: Profile, net: Network, compute: ComputeTime, method: str, codec: str,
                n: int, opts: PlanOptions | None = None, cpu_scale: float = 1.0
                ) -> Prediction:
    """One method x codec at N workers (what ``bench/plan.py`` compares with a run)."""
    ctx = Context(profile, net, compute, opts or PlanOptions(), cpu_scale)
    return METHODS[method][1](ctx, codec, n)
