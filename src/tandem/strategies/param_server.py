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
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field

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
POLL_S = 1.0


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
    Options = ParamServerOptions

    @classmethod
    def processes(cls, cfg: Any) -> int:
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
