"""``regression``: synthetic linear least squares with a known optimum.

``X ~ N(0, 1)`` of shape (n, dim), ``y = X w* + noise * N(0, 1)`` of shape (n, 1), model
``Linear(dim, 1, bias=False)``, MSE loss. ``Workload.optimum`` is the exact least-squares solution
on the *training* set (not ``w*``, which differs by the noise), so a run's distance to it goes to
zero for a method that converges, and measures the bias of one that does not (stale or compressed
updates). ``meta["w_true"]`` holds ``w*``.

Options: ``n`` (training samples, default 2048), ``n_test`` (default 512), ``dim`` (default 20),
``noise`` (standard deviation, default 0.1; 0 makes the optimum interpolate exactly).
Tune: the loss Hessian is ~2I, so full-batch GD is stable below lr ~1; SGD's distance floor
shrinks with lr/batch (measured, dim 20, 600 steps: lr 0.1 batch 32 -> 0.02, lr 0.01 -> 0.004).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tandem.config import WorkloadConfig
from tandem.workloads.base import ArrayDataset, Options, Workload, parse_options, register_workload


class RegressionOptions(Options):
    n: int = Field(default=2048, ge=1, description="training samples (at least dim)")
    n_test: int = Field(default=512, ge=1, description="test samples")
    dim: int = Field(default=20, ge=1, description="features = parameters of Linear(dim, 1)")
    noise: float = Field(default=0.1, ge=0, description="label noise std; 0 makes the "
                         "optimum interpolate exactly")

    @model_validator(mode="after")
    def _enough(self) -> RegressionOptions:
        if self.n < self.dim:
            raise ValueError(f"n ({self.n}) must be at least dim ({self.dim}) for a unique optimum")
        return self


@register_workload("regression", options=RegressionOptions)
def build(cfg: WorkloadConfig, seed: int = 0) -> Workload:
    opts = parse_options(RegressionOptions, cfg.options, "regression")
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(opts.dim, 1, generator=gen, dtype=torch.float64)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, opts.dim, generator=gen, dtype=torch.float64)
        return x, x @ w_true + opts.noise * torch.randn(n, 1, generator=gen, dtype=torch.float64)

    x_tr, y_tr = sample(opts.n)
    x_te, y_te = sample(opts.n_test)
    # float64 solve, so the float32 optimum has a gradient at float32 rounding level
    optimum = torch.linalg.lstsq(x_tr, y_tr).solution.flatten().to(torch.float32)
    return Workload(
        name="regression", model_fn=partial(nn.Linear, opts.dim, 1, bias=False),
        train=ArrayDataset(x_tr.float(), y_tr.float()),
        test=ArrayDataset(x_te.float(), y_te.float()),
        loss_fn=F.mse_loss, task="regression", num_classes=None, optimum=optimum,
        meta={"input_shape": (opts.dim,), "source": "synthetic", "w_true": w_true.flatten().float(),
              "options": opts.model_dump()},
    )
