"""Train your own model and dataset with any Tandem strategy and codec.

    .venv/bin/python examples/own_model.py --strategy allreduce --codec topk --workers 4

The model factory is a module-level function so that the worker processes (started with the
``spawn`` method) can import it. Any map-style ``torch.utils.data.Dataset`` of ``(x, y)`` pairs
works; here a small synthetic two-moons-like problem stands in for your data.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

import tandem


def make_net() -> nn.Module:
    """Your model: built fresh in every worker, from the same seed."""
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, 2))


def make_data(n: int, seed: int) -> TensorDataset:
    """Two concentric rings: a problem a linear model cannot solve."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    label = torch.randint(0, 2, (n,), generator=g)
    radius = 0.5 + 0.5 * label.float() + 0.1 * torch.randn(n, generator=g)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    return TensorDataset(x, label)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="allreduce")
    ap.add_argument("--codec", default="dense")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    work = tandem.Workload.custom(make_net, make_data(4000, 0), make_data(1000, 1), name="rings")
    summary = tandem.train({"strategy": args.strategy, "codec": args.codec, "workers": args.workers,
                            "steps": args.steps, "lr": 0.1, "momentum": 0.9, "batch_size": 32,
                            "name": f"rings-{args.strategy}-{args.codec}", "progress": True},
                           workload=work)
    print(f"test accuracy {summary['final_test_accuracy']:.3f}, "
          f"{summary['bytes_sent_per_worker_per_step']:.0f} bytes per worker per step, "
          f"run record in runs/rings-{args.strategy}-{args.codec}")


if __name__ == "__main__":
    main()
