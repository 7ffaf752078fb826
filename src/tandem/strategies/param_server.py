"""Parameter server whose workers never wait: the candidate model (method M3), with baselines.

Roles: ranks ``0 .. workers-1`` are workers (they hold data and compute gradients), ranks
``workers .. workers+servers-1`` are servers (each holds a balanced shard of the parameters, see
:mod:`.sharding`, and runs the optimizer on it). A worker *pushes* its accumulated gradient
(through the run's codec) to every server and *pulls* the new parameters back (fp32 or fp16).

Modes (option ``mode``):

* ``sync``: every round the servers wait for a push from every live worker, apply the mean, and
  answer; a worker waits for the answer before its next step (classic BSP parameter server; with
  dense pushes it computes exactly what ``allreduce`` computes).
* ``ssp``: stale synchronous parallel with bound ``staleness`` (s): each push is applied on
  arrival; the answer to a worker's k-th push is held back until every live worker has pushed at
  least k - s times.
* ``async``: each push is applied on arrival and answered at once.
* ``candidate`` (the method, default): a worker pushes and, instead of waiting, trains on from the
  candidate model theta - lr*g; it checks for the new global model at the end of each of its own
  compute periods, and only waits once it has taken ``cap`` steps since its last merge. The
  servers run synchronous rounds. Gradients computed meanwhile accumulate for the next push;
  on arrival the global model is merged per ``merge``:

  - ``overwrite``: theta <- theta_g (local progress is dropped locally, still pushed next round);
  - ``delay-corrected`` (default): theta <- theta_g + (theta_local - theta_cand) = theta_g - lr*U,
    U the gradients not yet pushed; each local update enters the global model exactly once;
  - ``compensated``: like delay-corrected, but U is first corrected for having been computed on
    the candidate instead of theta_g: U <- U + lambda * sum(g*g) * (theta_g - theta_cand), the
    first-order Taylor correction with a diagonal Hessian estimate of DC-ASGD, which is the
    local compensation LOSP applies to stale updates (see docs/param_server.md).

Every gradient enters the global model with weight 1/N (N = live workers) in every mode: sync and
candidate rounds divide the sum by N, async and ssp apply each push scaled by 1/N. So all modes
move the model the same distance per gradient and differ only in waiting and staleness.

Never-blocking receive: the pull's receive is posted right after the push; the transport's waiter
thread completes it, and the worker polls :meth:`Pending.done` (an event) between steps.

Checkpoints (``--checkpoint-every N``, N counted in *worker steps*): after step N, 2N, ... every
process saves its state at one consistent point, a checkpoint barrier. The workers agree (through
the rendezvous store) on the highest push count T among them; a worker behind pushes what it has
(in candidate mode at most one extra round, possibly an empty push), and every worker waits for
its pull, so no message is in flight and the servers have applied exactly T rounds (sync,
candidate) or every push made so far (async, ssp). Each worker then sends the servers a
checkpoint mark; a server saves once every live worker's mark has arrived. Workers save model,
local/candidate state (unpushed sum U, base model, version), codec memory, data position and RNG;
servers save their shard, optimizer, version, clocks and codec state. The barrier runs on the
store and skips dead ranks' marks, so a lost worker abandons that checkpoint (``LATEST`` keeps
naming the last complete set) instead of failing the run. ``--resume`` restarts every process
from ``LATEST``: in ``sync`` mode the result equals an uninterrupted run to the last bit; in the
other modes the restored state is exact and the rest of the run is as timing-dependent as any.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field

from tandem.checkpoint import check_resume
from tandem.errors import ConfigError, PeerTimeout, WorkerFailed
from tandem.strategies.base import Strategy, StrategyOptions
from tandem.strategies.registry import register
from tandem.transport.liveness import Pending
from tandem.transport.packing import TensorSpec

# ---- wire format shared by workers and servers ------------------------------------------------
#: push header (int64): [push index, oldest base version, local steps, flags, codec step]
PUSH_HEADER = 5
#: pull header (int64): [global version, flags, 0, 0]
PULL_HEADER = 4
FLAG_FINAL = 1
FLAG_META = 2
FLAG_CKPT = 4   # a worker's checkpoint mark: no gradient, "I have stopped for the checkpoint"
POLL_S = 1.0


def meta_to_bytes(meta: dict[str, Any]) -> bytes:
    """A codec message's metadata (shapes, sizes: JSON types) as compact JSON bytes. JSON, not
    pickle: a server never unpickles what arrives from the network."""
    return json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()


def meta_from_bytes(data: bytes) -> dict[str, Any]:
    """The inverse of :func:`meta_to_bytes`; layer shapes come back as tuples."""
    meta = json.loads(data.decode())
    if not isinstance(meta, dict):
        raise ValueError("codec metadata must be a JSON object")
    if "shapes" in meta:
        meta["shapes"] = [tuple(s) for s in meta["shapes"]]
    return meta


class CheckpointAbandoned(Exception):
    """A rank of the checkpoint died before reaching it: the set stays incomplete."""


def store_gather(transport: Any, tag: str, value: int, ranks: Iterable[int],
                 timeout_s: float, complete: bool = True) -> dict[int, int]:
    """Publish ``value`` under ``tag`` and collect the values ``ranks`` publish: a barrier on the
    rendezvous store that tolerates dead ranks (a collective would fail on them).

    Returns the values of every rank that arrived. A rank marked dead before arriving is left out;
    with ``complete`` :class:`CheckpointAbandoned` is then raised once everyone else has arrived,
    so that every survivor abandons the same checkpoint. A live rank silent past ``timeout_s``
    raises :class:`PeerTimeout` naming it.
    """
    store, live = transport.store, transport.liveness
    lock = live.store_lock  # the heartbeat thread shares this process's store client

    def arrived(r: int) -> int | None:
        with lock:
            key = f"ckpt/{tag}/{r}"
            return int(store.get(key).decode()) if store.check([key]) else None

    with lock:
        store.set(f"ckpt/{tag}/{transport.rank}", str(value))
    ranks = list(ranks)
    got: dict[int, int] = {}
    deadline = time.monotonic() + timeout_s
    while True:
        for r in ranks:
            if r not in got and (v := arrived(r)) is not None:
                got[r] = v
        missing = [r for r in ranks if r not in got]
        if not missing:
            return got
        dead = live.dead_ranks(missing)
        if dead:  # arrival keys are set before death, so re-read before trusting the mark
            dead = [r for r in dead if arrived(r) is None]
        if dead and len(dead) == len(missing):
            if not complete:
                return got
            raise CheckpointAbandoned(f"checkpoint {tag}: rank(s) {dead} died before it")
        if time.monotonic() > deadline:
            raise PeerTimeout(f"checkpoint {tag}: rank(s) {missing} did not reach it within "
                              f"{timeout_s:.0f}s", ranks=missing)
        time.sleep(0.01)


class ParamServerOptions(StrategyOptions):
    """Options of ``param_server`` (``--strategy-opt key=value``)."""

    mode: Literal["sync", "ssp", "async", "candidate"] = "candidate"
    merge: Literal["overwrite", "delay-corrected", "compensated"] = "delay-corrected"
    servers: int = Field(default=1, ge=1, description="parameter server processes")
    cap: int = Field(default=32, ge=1, description="candidate: most steps between merges")
    staleness: int = Field(default=3, ge=0, description="ssp: bound s in pushes")
    pull: Literal["dense", "fp16"] = "dense"
    min_workers: int | None = Field(default=None, ge=1,
                                    description="go on while this many workers live (default all)")
    compensation: float = Field(default=0.5, ge=0, description="compensated: lambda")


def pull_specs(shapes: list[tuple[int, ...]], dtype: torch.dtype) -> list[TensorSpec]:
    return [(torch.int64, (PULL_HEADER,))] + [(dtype, s) for s in shapes]


def pull_dtype(opts: ParamServerOptions) -> torch.dtype:
    return torch.float16 if opts.pull == "fp16" else torch.float32


def wait_on(pending: Pending, transport: Any, peer: int, limit_s: float | None,
            stop: Any = None) -> Any:
    """Wait for ``pending`` while ``peer`` is alive: a slow peer is waited for (up to ``limit_s``;
    ``None`` = as long as it lives), a dead or silent one raises at once."""
    start = time.monotonic()
    while True:
        try:
            return pending.wait(timeout=POLL_S)
        except PeerTimeout:
            if stop is not None and stop.is_set():
                raise
            suspects = transport.liveness.suspects([peer])
            if suspects:
                raise WorkerFailed(f"{pending.what}: rank {peer} stopped answering "
                                   f"({transport.liveness.describe(suspects)})",
                                   ranks=suspects) from None
            if limit_s is not None and time.monotonic() - start > limit_s:
                raise PeerTimeout(f"{pending.what}: no answer within {limit_s:.0f}s from rank "
                                  f"{peer}; raise timeout_s if the link is slow",
                                  ranks=[peer]) from None


@register
class ParamServerStrategy(Strategy):
    name = "param_server"
    tolerates_lost_workers = True
    supports_checkpoints = True
    Options = ParamServerOptions

    @classmethod
    def processes(cls, cfg: Any) -> int:
        check_resume(cfg)  # a mismatched --resume fails here, before any process starts
        return cfg.workers + cfg.strategy_options().servers

    def setup(self) -> None:
        from tandem.strategies.ps_server import PSServer
        from tandem.strategies.ps_worker import PSWorker

        opts, cfg = self.opts, self.ctx.cfg
        if opts.min_workers is not None and opts.min_workers > cfg.workers:
            raise ConfigError(f"param_server: min_workers={opts.min_workers} exceeds workers="
                              f"{cfg.workers}")
        if self.ctx.world != cfg.workers + opts.servers:
            raise ConfigError(f"param_server needs {cfg.workers} workers + {opts.servers} "
                              f"servers = {cfg.workers + opts.servers} processes, got "
                              f"{self.ctx.world}")
        self.role: PSWorker | PSServer
        self.role = PSWorker(self) if self.ctx.rank < cfg.workers else PSServer(self)

    def run(self) -> dict[str, Any]:
        if not hasattr(self, "role"):
            self.setup()
        return self.role.run()
