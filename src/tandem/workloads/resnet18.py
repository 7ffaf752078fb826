"""``resnet18``: CIFAR-style ResNet-18 (11.2M parameters) on seeded random 3x32x32 data.

No CIFAR-10 is available offline, and this workload exists for throughput, not accuracy: it gives
a realistic gradient size (44.7 MB in fp32) and compute time per step, so communication savings
can be measured on a model of the size people train. Labels are random; accuracy stays at chance.

Options: ``n_train`` (default 512), ``n_test`` (default 128), ``num_classes`` (default 10).
Tune: steps, not epochs, matter here; keep ``n_train`` small (memory is 12 KiB per sample).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field

from tandem.config import WorkloadConfig
from tandem.workloads.base import ArrayDataset, Options, Workload, parse_options, register_workload
from tandem.workloads.models import ResNet18


class ResNetOptions(Options):
    n_train: int = Field(default=512, ge=1, description="random training images (12 KiB "
                         "each; steps, not epochs, matter here)")
    n_test: int = Field(default=128, ge=1, description="random test images")
    num_classes: int = Field(default=10, ge=2, description="random labels, so accuracy "
                             "stays at chance")


@register_workload("resnet18", options=ResNetOptions)
def build(cfg: WorkloadConfig, seed: int = 0) -> Workload:
    opts = parse_options(ResNetOptions, cfg.options, "resnet18")
    gen = torch.Generator().manual_seed(seed)

    def sample(n: int) -> ArrayDataset:
        x = torch.randn(n, 3, 32, 32, generator=gen)
        return ArrayDataset(x, torch.randint(0, opts.num_classes, (n,), generator=gen))

    train, test = sample(opts.n_train), sample(opts.n_test)
    return Workload(
        name="resnet18", model_fn=partial(ResNet18, opts.num_classes), train=train, test=test,
        loss_fn=F.cross_entropy, task="classification", num_classes=opts.num_classes,
        meta={"input_shape": (3, 32, 32), "source": "random", "options": opts.model_dump()},
    )
