"""``coded_ps``: a parameter server with classic gradient coding (Tandon et al., ICML 2017).

The n workers (ranks 0..n-1) hold data partitions with redundancy d = s + 1 (cyclic or fractional
repetition, :mod:`tandem.coding`); one extra process (rank n) is the server. Every step the server
sends the current parameters to the idle workers; worker i computes the gradient of each partition
it holds and returns ``c_i = sum_k B[i, k] g_k``; the server waits for the *first* n - s coded
gradients computed at the current parameters, decodes ``sum_k g_k`` exactly with the decoding
vector of that survivor set, and takes an SGD step with the mean gradient ``sum_k g_k / n``.
The late workers' answers are dropped when they arrive and those workers get the newest parameters,
so a straggler never falls further behind than one step.

Unlike GOCO the result is exact (no variance from stragglers) but at most s stragglers per step are
tolerated, each worker computes d partition gradients, and the server is a single hot spot.

Options: ``s`` (stragglers tolerated; default ``redundancy - 1``, and ``redundancy`` must then be
``s + 1`` or 1), ``scheme`` (``cyclic`` | ``fractional``, the latter needs (s+1) | n),
``full_batch`` (whole-partition gradients), ``compute_floor_s`` (pad each gradient computation,
for meaningful timing with many processes per core), ``code_seed``.
Tune: s = the number of stragglers you expect per step; each extra unit costs one more partition
gradient per worker per step.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
from pydantic import Field
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from tandem.coding import gradient_code
from tandem.errors import ConfigError, PeerTimeout
from tandem.strategies.base import Strategy, StrategyOptions
from tandem.strategies.gossip import PartitionGradients
from tandem.strategies.registry import register
from tandem.strategies.training import build_model, evaluate_shard, is_eval_step

STOP = -1.0


class CodedPSOptions(StrategyOptions):
    s: int | None = Field(default=None, ge=0)
    scheme: Literal["cyclic", "fractional"] = "cyclic"
    full_batch: bool = False
    compute_floor_s: float = Field(default=0.0, ge=0)
    code_seed: int = 0


@register
class CodedPSStrategy(Strategy):
    name = "coded_ps"
    Options = CodedPSOptions

    @classmethod
    def processes(cls, cfg: Any) -> int:
        return cfg.workers + 1

    def _code(self) -> Any:
        cfg, o = self.ctx.cfg, self.opts
        assert isinstance(o, CodedPSOptions)
        s = o.s if o.s is not None else cfg.workload.redundancy - 1
        if s >= cfg.workers:
            raise ConfigError(f"coded_ps: s={s} must be below workers ({cfg.workers})")
        return gradient_code(cfg.workers, s, o.scheme, seed=o.code_seed)

    def run(self) -> dict[str, Any]:
        self.code = self._code()
        if self.ctx.rank == self.ctx.cfg.workers:
            self.ctx.recorder.role = "server"
            return self._server()
        return self._worker()

    # ---- worker --------------------------------------------------------------------------------
    def _worker(self) -> dict[str, Any]:
        ctx, o = self.ctx, self.opts
        assert isinstance(o, CodedPSOptions)
        tr, rec, server, i = ctx.transport, ctx.recorder, ctx.cfg.workers, ctx.rank
        held = list(self.code.alloc.held[i])
        grads = PartitionGradients(ctx, i, held, o.full_batch, o.compute_floor_s)
        n_params = sum(p.numel() for p in grads.params)
        buf = torch.empty(n_params + 1)
        done = 0
        while True:
            t0 = time.perf_counter()
            tr.recv(buf, server).wait()
            idle_s = time.perf_counter() - t0
            step = int(buf[0])
            if buf[0] == STOP:
                break
            loss, gs, spent = grads.compute(buf[1:].clone())
            compute_s, straggled = ctx.faults.apply(done, spent)
            coded = self.code.encode(i, gs)
            t1 = time.perf_counter()
            tr.send(torch.cat([torch.tensor([float(step)]), coded]), server).wait()
            b = tr.end_step()
            rec.step(done, compute_s=compute_s, comm_s=time.perf_counter() - t1, idle_s=idle_s,
                     bytes_sent=b.sent, bytes_recv=b.recv, loss=loss, straggled=straggled,
                     server_step=step)
            done += 1
        return {"steps": done}

    # ---- server --------------------------------------------------------------------------------
    def _server(self) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.ctx.cfg
        tr, rec, n = ctx.transport, ctx.recorder, cfg.workers
        model = build_model(ctx.workload, cfg.seed, tr.device)
        params = [p for p in model.parameters() if p.requires_grad]
        x = parameters_to_vector(params).detach().clone()
        opt = ctx.workload.optimum
        opt = opt.double() if opt is not None and opt.numel() == x.numel() else None
        total = self.total_steps(cfg, len(ctx.workload.train))
        every = self.eval_every(total)
        inbox: dict[int, tuple[torch.Tensor, Any]] = {}

        def dispatch(j: int, step: float) -> None:
            tr.send(torch.cat([torch.tensor([step]), x]), j)
            if step != STOP:
                b = torch.empty(x.numel() + 1)
                inbox[j] = (b, tr.recv(b, j))

        for j in range(n):
            dispatch(j, 0.0)
        used = [0] * n
        trajectory: list[float] = []
        for step in range(total):
            t0 = time.perf_counter()
            got = self._collect(step, inbox, dispatch, t0)
            wait_s = time.perf_counter() - t0
            full = self.code.decode(got)
            x -= cfg.lr * full / n
            for j in got:
                used[j] += 1
                if step + 1 < total:
                    dispatch(j, float(step + 1))
            b = tr.end_step()
            extra: dict[str, Any] = {"survivors": sorted(got)}
            if opt is not None:
                extra["opt_error"] = float(((x.double() - opt) ** 2).sum())
                trajectory.append(extra["opt_error"])
            rec.step(step, compute_s=0.0, comm_s=0.0, idle_s=wait_s, bytes_sent=b.sent,
                     bytes_recv=b.recv, loss=None, **extra)
            if is_eval_step(step, every, total):
                with rec.evaluating():
                    with torch.no_grad():
                        vector_to_parameters(x, params)
                    correct, loss_sum, count = evaluate_shard(model, ctx.workload, 0, 1,
                                                              tr.device).tolist()
                    acc = correct / count if ctx.workload.task == "classification" else None
                    rec.eval(step, accuracy=acc, loss=loss_sum / max(count, 1.0),
                             **({"opt_error": trajectory[-1]} if trajectory else {}))
        for j in range(n):  # let every worker finish its last job, then stop it
            if j in inbox:
                inbox.pop(j)[1].wait()
            dispatch(j, STOP)
        with torch.no_grad():
            vector_to_parameters(x, params)
        return {"steps": total, "used_per_worker": used, "trajectory": trajectory,
                "params": [p.detach().clone() for p in params]}

    def _collect(self, step: int, inbox: dict[int, tuple[torch.Tensor, Any]], dispatch: Any,
                 t0: float) -> dict[int, torch.Tensor]:
        """The first n - s coded gradients computed at this step's parameters."""
        n, s = self.ctx.cfg.workers, self.code.s
        got: dict[int, torch.Tensor] = {}
        deadline = t0 + self.ctx.cfg.timeout_s
        while len(got) < n - s:
            progressed = False
            for j, (buf, pend) in list(inbox.items()):
                if not pend.done():
                    continue
                pend.wait(0)
                del inbox[j]
                progressed = True
                if int(buf[0]) == step:
                    got[j] = buf[1:].clone()
                else:  # a late answer to an old step: hand this worker the newest parameters
                    dispatch(j, float(step))
            if not progressed:
                if time.perf_counter() > deadline:
                    missing = sorted(set(range(n)) - set(got))
                    raise PeerTimeout(f"coded_ps server: step {step} has {len(got)} of the "
                                      f"{n - s} coded gradients it needs after "
                                      f"{self.ctx.cfg.timeout_s:.0f}s; workers {missing} are "
                                      "silent", ranks=missing)
                time.sleep(0.0005)
        return got
