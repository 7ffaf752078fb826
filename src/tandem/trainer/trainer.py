"""Loop pieces every strategy shares: a worker's model, optimizer, data and evaluation.

Keeping these in one place is what makes strategies comparable: the same seeds give the same
initial model and the same minibatch sequence whatever the strategy, so differences in a
comparison come from the synchronisation method alone.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import torch

from tandem.workloads.base import ShardLoader, partition

if TYPE_CHECKING:
    from tandem.trainer.context import WorkerContext
    from tandem.workloads.base import Workload


def build_model(
    workload: Workload, seed: int, device: torch.device | None = None
) -> torch.nn.Module:
    """The initial model: identical on every rank for the same seed."""
    torch.manual_seed(seed)
    model = workload.model_fn()
    return model.to(device) if device is not None else model


def build_optimizer(model: torch.nn.Module, cfg: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,  # type: ignore[attr-defined]
        weight_decay=cfg.weight_decay,
    )  # type: ignore[attr-defined]


def shard_indices(ctx: WorkerContext, worker: int, parts: int | None = None) -> torch.Tensor:
    """Indices of the training samples worker ``worker`` holds (the config's partition scheme)."""
    cfg = ctx.cfg
    parts = parts or cfg.workers
    shards = partition(
        ctx.workload.train.y,
        parts,
        cfg.workload.partition,
        redundancy=cfg.workload.redundancy,
        labels_per_worker=cfg.workload.labels_per_worker,
        seed=cfg.seed,
    )
    return shards[worker]


class LocalTrainer:
    """One worker's model, optimizer and shard; computes gradients and applies updates."""

    def __init__(
        self, ctx: WorkerContext, worker: int | None = None, *, model: torch.nn.Module | None = None
    ) -> None:
        self.ctx = ctx
        self.worker = ctx.rank if worker is None else worker
        self.device = ctx.transport.device
        self.model = model or build_model(ctx.workload, ctx.cfg.seed, self.device)
        self.optimizer = build_optimizer(self.model, ctx.cfg)
        self.loader = ShardLoader(
            ctx.workload.train,
            shard_indices(ctx, self.worker),
            ctx.cfg.batch_size,
            seed=ctx.cfg.seed * 1000 + self.worker,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._nan_steps = {tuple(x) for x in ctx.cfg.inject_nan}
        self._crash_steps = {tuple(x) for x in ctx.cfg.inject_crash}
        self.flat_grad: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []

    def use_flat_gradients(self) -> bool:
        """Make every ``p.grad`` a view of one flat buffer that backward accumulates into.

        This is DDP's ``gradient_as_bucket_view``: no gradient tensors are allocated per step,
        and a codec that reduces the whole gradient (``dense``) sends this buffer as it is,
        without concatenating the layers first. The price: the gradients :meth:`compute`
        returns are overwritten by the next :meth:`compute`, so only a strategy that is done
        with them within the step (``allreduce``) may turn this on. Returns False (and changes
        nothing) when the parameters do not share one dtype.
        """
        if not self.params or len({p.dtype for p in self.params}) != 1:
            return False
        first = self.params[0]
        self.flat_grad = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype,
                                     device=first.device)
        self._grad_views, offset = [], 0
        for p in self.params:
            self._grad_views.append(self.flat_grad[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        return True

    def _reset_gradients(self) -> None:
        if self.flat_grad is None:
            self.model.zero_grad(set_to_none=True)
            return
        self.flat_grad.zero_()
        for p, view in zip(self.params, self._grad_views, strict=True):
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                p.grad = view  # backward then adds into the buffer in place

    def compute(self, step: int) -> tuple[float, list[torch.Tensor], float, bool]:
        """Forward/backward on the next minibatch. Returns (loss, grads, compute_s, straggled).

        The compute time includes any injected straggler or slow-worker delay.
        """
        t0 = time.perf_counter()
        x, y = self.loader.next_batch()
        x, y = x.to(self.device), y.to(self.device)
        self.model.train()
        self._reset_gradients()
        loss = self.ctx.workload.loss_fn(self.model(x), y)
        loss.backward()
        # No copy: the next compute() drops p.grad (set_to_none) instead of zeroing it in place,
        # and apply() installs a new tensor, so these gradients stay ours (unless
        # use_flat_gradients() was called: then they live until the next compute()).
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                 for p in self.params]
        if (self.worker, step) in self._crash_steps and not self.ctx.cfg.resume:
            os.kill(os.getpid(), signal.SIGKILL)  # injected crash (tests, kill benchmark)
        if (self.worker, step) in self._nan_steps:
            grads[0].fill_(float("nan"))
        compute_s, straggled = self.ctx.faults.apply(step, time.perf_counter() - t0)
        return float(loss.detach()), grads, compute_s, straggled

    def state_dict(self) -> dict:
        """Model, optimizer and data position: what a checkpoint needs from this worker."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])

    def apply(self, grads: list[torch.Tensor]) -> None:
        """Set ``p.grad`` to the synchronised gradient and take one optimizer step."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g.to(p.dtype).view_as(p)
        self.optimizer.step()
