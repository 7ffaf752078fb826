"""Bring your own training job: your model, optimizer, schedule, metrics, data and callbacks, on
any Tandem strategy, and the trained model back at the end.

    python examples/own_training_job.py                         # allreduce, 4 workers
    python examples/own_training_job.py --strategy gossip --codec topk --codec-opt ratio=0.1
    python examples/own_training_job.py --strategy param_server --steps 300

Everything here is plain PyTorch; Tandem only needs it gathered in one ``tandem.Workload``.
The functions and classes of this script travel to the worker processes by value, so a notebook
works the same way. To re-run the job from a YAML config or under ``torchrun``, put the factory
``make_job`` in an importable module and name it: ``--workload mypackage.jobs:make_job``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

import tandem
from tandem.workloads.digits import load_arrays


class ShiftedDigits(torch.utils.data.Dataset):
    """8x8 digit images with a random one-pixel shift each time an item is read: a transform
    that runs every epoch (Tandem reads a plain Dataset through a DataLoader)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool) -> None:
        self.x = torch.as_tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        self.y = torch.as_tensor(labels, dtype=torch.long)
        self.targets = self.y  # lets Tandem split by label (partition=label)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.augment:
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(1, 2))
        return x, self.y[i]


def make_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 64, 64), nn.ReLU(), nn.Linear(64, 10))


def adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Parameter groups: no weight decay on biases. (``lr`` comes from the run's config.)"""
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


def top2(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A metric: (sum, count) per batch, reduced exactly over the test shards."""
    return (output.topk(2, dim=1).indices == target[:, None]).any(1).sum(), target.numel()


class PrintEvaluations(tandem.Callback):
    def on_eval(self, step: int, metrics: dict) -> None:
        if metrics["rank"] == 0 and metrics.get("accuracy") is not None:
            print(f"  step {step + 1}: test accuracy {metrics['accuracy']:.3f}, "
                  f"top-2 {metrics['top2']:.3f}", flush=True)


def make_job() -> tandem.Workload:
    images, labels = load_arrays()
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:1400], order[1400:]
    return tandem.Workload.custom(
        make_net, ShiftedDigits(images[train], labels[train], augment=True),
        ShiftedDigits(images[test], labels[test], augment=False), materialize=False,
        name="shifted-digits",
        optimizer=adamw,
        scheduler=tandem.recipes.warmup_cosine,       # warm-up, then cosine to 10 % of lr
        clip_grad_norm=1.0, accumulation=2,
        metrics={"accuracy": tandem.metrics.accuracy, "top2": top2},
        callbacks=[PrintEvaluations()],
        defaults={"lr": 3e-3, "batch_size": 16},      # unless the config says otherwise
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="allreduce")
    ap.add_argument("--codec", default="dense")
    ap.add_argument("--codec-opt", action="append", default=[])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default="runs/own-training-job")
    args = ap.parse_args()
    opts = dict(kv.split("=", 1) for kv in args.codec_opt)
    codec_opts = {k: float(v) for k, v in opts.items()}
    summary = tandem.train({"strategy": args.strategy,
                            "codec": {"name": args.codec, "options": codec_opts},
                            "workers": args.workers, "steps": args.steps, "eval_every": 50,
                            "progress": False, "out": args.out}, workload=make_job())
    model = tandem.load_model(args.out)  # the trained nn.Module (model.pt)
    print(f"final test accuracy {summary['final_test_accuracy']:.3f}, loss "
          f"{summary['final_test_loss']:.3f}; {type(model).__name__} with "
          f"{sum(p.numel() for p in model.parameters())} parameters in {args.out}/model.pt")


if __name__ == "__main__":
    main()
