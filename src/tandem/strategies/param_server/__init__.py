"""Parameter server whose workers never wait: the candidate model (method M3), with baselines.

Roles: workers hold data and compute gradients; servers each hold a balanced shard of the
parameters (:mod:`.sharding`) and run the optimizer on it. Under ``tandem train`` ranks
``0 .. workers-1`` are workers and the servers follow; under torchrun every node gets a server by
default (:mod:`.placement`). A worker *pushes* its accumulated gradient (through the run's codec;
LGC-PS through :mod:`.lgc`) to every server and *pulls* the new parameters back: the whole
shard in fp32 or fp16, or a code of its change with error feedback on the server (:mod:`.pull`).
``cap=auto`` tunes the candidate's cap from measured round trips (:mod:`.cap`).

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
  - ``compensated`` (``local_step=sgd`` only): like delay-corrected, but U is first corrected
    for having been computed on the candidate instead of theta_g:
    U <- U + lambda * sum(g*g) * (theta_g - theta_cand), the first-order Taylor correction
    with a diagonal Hessian estimate of DC-ASGD, which is the local compensation LOSP applies
    to stale updates (see docs/param_server.md).

Local steps (option ``local_step``): ``sgd`` is the form above, the servers' optimizer applying
the pushed gradients; ``optimizer`` runs the run's optimizer on each worker and pushes its
parameter change, which the servers average (an outer step of rate 1); ``auto`` (default) picks
``sgd`` for SGD and ``optimizer`` for Adam, AdamW or a workload's own optimizer, whose steps a
pushed sum of gradients does not reproduce (:func:`.options.local_step_of`).

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

from typing import TYPE_CHECKING, Any

from tandem.errors import ConfigError
from tandem.strategies.base import Strategy, register
from tandem.strategies.param_server.options import ParamServerOptions, local_step_of
from tandem.strategies.param_server.placement import (
    local_servers,
    placement_for,
    under_torchrun,
)
from tandem.strategies.param_server.pull import check_pull
from tandem.telemetry.log import get_logger

if TYPE_CHECKING:
    from tandem.strategies.param_server.server import PSServer
    from tandem.strategies.param_server.worker import PSWorker

log = get_logger(__name__)


@register
class ParamServerStrategy(Strategy):
    name = "param_server"
    tolerates_lost_workers = True
    supports_checkpoints = True
    push_codes = True  # LGC-PS aside (lgc.check_codec)
    needs_identical_start = False  # the workers train what the server sends
    Options = ParamServerOptions

    @classmethod
    def processes(cls, cfg: Any) -> int:
        """Under the local launcher: the workers, then the servers (see :mod:`.placement`)."""
        return cfg.workers + local_servers(cls.options_of(cfg))

    @classmethod
    def check_world(cls, cfg: Any, world: int) -> None:
        """Under torchrun the servers sit on the nodes (one per node by default) and
        ``workers`` must be ``world - servers``; :mod:`.placement` says what fits."""
        placement_for(cfg.workers, cls.options_of(cfg), world)

    @classmethod
    def check(cls, cfg: Any, options: Any) -> None:
        """Refuse before start: min_workers, the pull codec, LGC-PS's needs, and under
        torchrun a ``workers`` that does not match world - servers."""
        if options.min_workers is not None and options.min_workers > cfg.workers:
            raise ConfigError(f"strategy.options.min_workers: {options.min_workers} exceeds "
                              f"workers={cfg.workers}")
        check_pull(options)
        if options.local_step == "optimizer" and options.mode != "candidate":
            raise ConfigError(f"strategy.options.local_step=optimizer: only mode=candidate takes "
                              f"local steps; mode={options.mode} pushes each gradient")
        from tandem.strategies.param_server.lgc import check_codec

        check_codec(cfg, options)
        placement_for(cfg.workers, options)  # torchrun's nodes, or the local launcher's tail

    @classmethod
    def check_training(cls, cfg: Any, options: Any, spec: Any) -> None:
        servers = len(placement_for(cfg.workers, options).server_ranks) if under_torchrun() \
            else local_servers(options)
        deltas = local_step_of(options, spec) == "optimizer"
        if deltas and options.merge == "compensated":
            raise ConfigError("merge=compensated corrects local SGD steps (lambda*g*g); with "
                              f"local_step=optimizer (local_step={options.local_step}, optimizer "
                              f"{spec.optimizer_name or 'from the workload'}) use "
                              "merge=delay-corrected, or set local_step=sgd")
        # local_step=optimizer: the workers run the optimizer and clip; the servers only average
        if servers > 1 and not spec.elementwise and not deltas:
            raise ConfigError("optimizer: the workload's optimizer factory needs the whole model, "
                              "which only one parameter server holds; use servers=1 or a "
                              "built-in optimizer (--optimizer sgd|adam|adamw)")
        if servers > 1 and spec.clip is not None and not deltas:
            raise ConfigError("clip_grad_norm: clipping the aggregated gradient's global norm "
                              "needs one server to see it whole; use servers=1")
        adaptive = spec.optimizer_factory is not None or spec.optimizer_name != "sgd"
        if options.pull in ("topk", "randomk") and adaptive:
            log.warning("pull=%s with an adaptive optimizer: Adam-like steps move every "
                        "coordinate, so the server's change is dense and sparse pulls lag it "
                        "(the final model, the server's, can be far from what the workers "
                        "trained on); prefer pull=bf16 (docs/param_server.md)", options.pull)

    def setup(self) -> None:
        from tandem.strategies.param_server.server import PSServer
        from tandem.strategies.param_server.worker import PSWorker

        opts, cfg = self.opts, self.ctx.cfg
        self.placement = placement_for(cfg.workers, opts, self.ctx.world)
        self.ctx.recorder.info(**self.placement.describe())
        self.role: PSWorker | PSServer
        self.role = PSServer(self) if self.placement.is_server(self.ctx.rank) else PSWorker(self)
        self.ctx.recorder.info(ps_local_step="optimizer" if self.role.deltas else "sgd")

    def lgc_worker(self, worker: PSWorker) -> Any:
        """LGC-PS's worker half when the run's codec is ``lgc`` (else None)."""
        if self.ctx.cfg.codec.name != "lgc":
            return None
        from tandem.strategies.param_server.lgc import LGCWorkerSide

        return LGCWorkerSide(worker)

    def lgc_server(self, server: PSServer) -> Any:
        """LGC-PS's server half when the run's codec is ``lgc`` (else None)."""
        if self.ctx.cfg.codec.name != "lgc":
            return None
        from tandem.strategies.param_server.lgc import LGCServerSide

        return LGCServerSide(server)

    def run(self) -> dict[str, Any]:
        if not hasattr(self, "role"):
            self.setup()
        return self.role.run()
