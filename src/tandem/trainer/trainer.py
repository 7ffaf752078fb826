"""Loop pieces every strategy shares: a worker's model, optimizer, data and evaluation.

Keeping these in one place is what makes strategies comparable: the same seeds give the same
initial model and the same minibatch sequence whatever the strategy, so differences in a
comparison come from the synchronisation method alone.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import TYPE_CHECKING

import torch

from tandem.errors import DataError
from tandem.trainer.precision import Precision, step_optimizer
from tandem.trainer.spec import training_spec
from tandem.workloads.base import partition
from tandem.workloads.loader import shard_loader, targets_of

if TYPE_CHECKING:
    from tandem.config import RunConfig
    from tandem.trainer.context import WorkerContext
    from tandem.workloads.base import Workload


def build_model(
    workload: Workload, seed: int, device: torch.device | None = None
) -> torch.nn.Module:
    """The initial model: identical on every rank for the same seed."""
    torch.manual_seed(seed)
    model = workload.model_fn()
    return model.to(device) if device is not None else model


def build_optimizer(model: torch.nn.Module, cfg: RunConfig,
                    workload: Workload | None = None) -> torch.optim.Optimizer:
    """The run's optimizer over ``model`` (the workload's recipe when given, else the config's;
    plain SGD by default)."""
    from tandem.workloads.base import Workload as _Workload

    work = workload or _Workload("config", lambda: model, None, None, None,  # type: ignore[arg-type]
                                 "regression", None)
    return training_spec(cfg, work).make_optimizer(model)


def total_steps(cfg: RunConfig, train_size: int) -> int:
    """Steps per worker: ``steps``, or ``epochs`` over this worker's shard."""
    if cfg.steps is not None:
        return cfg.steps
    epochs = cfg.epochs if cfg.epochs is not None else 1.0
    shard = max(1, train_size // max(1, cfg.workers))
    return max(1, math.ceil(epochs * shard / cfg.batch_size))


def shard_indices(ctx: WorkerContext, worker: int, parts: int | None = None) -> torch.Tensor:
    """Indices of the training samples worker ``worker`` holds (the config's partition scheme)."""
    cfg = ctx.cfg
    parts = parts or cfg.workers
    labels = targets_of(ctx.workload.train)
    if cfg.workload.partition != "iid" and bool((labels == -1).all()):
        raise DataError(f"partition {cfg.workload.partition!r} needs the training targets: give "
                        "the dataset a `targets` attribute (or use partition=iid)")
    shards = partition(
        labels,
        parts,
        cfg.workload.partition,
        redundancy=cfg.workload.redundancy,
        labels_per_worker=cfg.workload.labels_per_worker,
        seed=cfg.seed,
    )
    return shards[worker]


class LocalTrainer:
    """One worker's model, optimizer, schedule and shard; computes gradients (micro-batches,
    mixed precision) and applies updates (clipping, optimizer step, schedule step).

    ``total``: the run's steps, which a schedule needs (the strategy knows it).
    """

    def __init__(
        self, ctx: WorkerContext, worker: int | None = None, *,
        model: torch.nn.Module | None = None, total: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.worker = ctx.rank if worker is None else worker
        self.device = ctx.transport.device
        self.spec = training_spec(ctx.cfg, ctx.workload)
        self.model = model or build_model(ctx.workload, ctx.cfg.seed, self.device)
        self.optimizer = self.spec.make_optimizer(self.model)
        self.total = total or total_steps(ctx.cfg, len(ctx.workload.train))
        self.scheduler = self.spec.make_scheduler(self.optimizer, self.total)
        self.precision = Precision(self.spec.precision, self.device)
        self.loader = shard_loader(
            ctx.workload.train,
            shard_indices(ctx, self.worker),
            ctx.cfg.batch_size,
            seed=ctx.cfg.seed * 1000 + self.worker,
            loader=ctx.workload.loader,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._nan_steps = {tuple(x) for x in ctx.cfg.inject_nan}
        self._crash_steps = {tuple(x) for x in ctx.cfg.inject_crash}
        self.flat_grad: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step (the schedule's current value)."""
        return float(self.optimizer.param_groups[0]["lr"])

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
        self.model.train()
        self._reset_gradients()
        micro = self.spec.accumulation
        loss_fn = self.ctx.workload.loss_fn
        total_loss = 0.0
        for _ in range(micro):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device), y.to(self.device)
            with self.precision.autocast():
                loss = loss_fn(self.model(x), y)
            if micro > 1:
                loss = loss / micro  # the step's gradient is the mean over its micro-batches
            self.precision.backward(loss)
            total_loss += float(loss.detach())
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
        return total_loss, grads, compute_s, straggled

    def state_dict(self) -> dict:
        """Model, optimizer, schedule and data position: what a checkpoint needs from this
        worker."""
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "loader": self.loader.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.precision.scaler is not None:
            state["scaler"] = self.precision.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and "scaler" in state:
            self.precision.scaler.load_state_dict(state["scaler"])

    def apply(self, grads: list[torch.Tensor]) -> None:
        """Set ``p.grad`` to the synchronised gradient and take one optimizer step: clip the
        aggregated gradient's global norm (``clip_grad_norm``), step, advance the schedule."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g.to(p.dtype).view_as(p)
        step_optimizer(self.optimizer, self.params, self.spec.clip, self.scheduler,
                       self.precision)
