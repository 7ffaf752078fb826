"""Train a LightningModule with a Tandem codec moving its gradients, through Lightning's DDP.

    .venv/bin/pip install -e '.[lightning]'
    .venv/bin/python examples/lightning_codec.py --codec powersgd --codec-opt rank=2
    .venv/bin/python examples/lightning_codec.py --codec topk --codec-opt ratio=0.1 --steps 200
    .venv/bin/python examples/lightning_codec.py --codec none    # Lightning's own all-reduce

A small MLP on scikit-learn's bundled digits (no download), 2 CPU processes over gloo. The only
Tandem lines are the strategy and the callback: ``CodecDDPStrategy`` is Lightning's
``DDPStrategy`` with the codec registered as DDP's comm hook (Lightning's own ``ddp_comm_hook``
argument is ignored on CPU), and ``CodecBytesLogger`` logs the bytes the codec sent as
``tandem/bytes_sent`` (here to a CSV file under ``--out``). Lightning starts the other processes
by running this script again, so everything below runs in each of them.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tandem.integrations.lightning import CodecBytesLogger, CodecDDPStrategy


class DigitsMLP(L.LightningModule):
    """An ordinary LightningModule: nothing in it knows about Tandem."""

    def __init__(self, lr: float = 0.1, hidden: int = 64) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.first_loss: float | None = None
        self.last_loss = float("nan")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        self.last_loss = float(loss.detach())
        if self.first_loss is None:
            self.first_loss = self.last_loss
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits() -> tuple[TensorDataset, TensorDataset]:
    """Scikit-learn's 1,797 8x8 digits, scaled to [0, 1]; a fixed 1,497 / 300 split."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return TensorDataset(x[300:], y[300:]), TensorDataset(x[:300], y[:300])


def say(line: str) -> None:
    """Print ``line`` in one write, so the processes' reports never interleave mid-line."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def parse_opts(pairs: list[str]) -> dict[str, Any]:
    """``["ratio=0.01", "rank=2"]`` -> options (numbers where they parse as numbers)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                continue
        else:
            out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", default="powersgd", help="a Tandem codec, or 'none' for "
                    "Lightning's plain DDPStrategy")
    ap.add_argument("--codec-opt", action="append", default=[], metavar="K=V")
    ap.add_argument("--workers", type=int, default=2, help="processes (devices=)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps (max_steps=)")
    ap.add_argument("--batch", type=int, default=32, help="batch size per process")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--no-overlap", action="store_true", help="exchange inside the hook call")
    ap.add_argument("--out", default="runs/lightning", help="where the CSV logger writes")
    ap.add_argument("--save", default=None, help="rank 0 saves the final parameters here")
    args = ap.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    train, test = digits()
    model = DigitsMLP(lr=args.lr)
    if args.codec == "none":
        strategy: DDPStrategy = DDPStrategy(process_group_backend="gloo")
    else:
        strategy = CodecDDPStrategy(args.codec, parse_opts(args.codec_opt), seed=0,
                                    overlap=not args.no_overlap, process_group_backend="gloo")
    trainer = L.Trainer(accelerator="cpu", devices=args.workers, strategy=strategy,
                        max_steps=args.steps, callbacks=[CodecBytesLogger()],
                        logger=CSVLogger(args.out, name="", version=""), log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, DataLoader(train, batch_size=args.batch, shuffle=True))

    model.eval()
    with torch.no_grad():
        x, y = test.tensors
        acc = float((model(x).argmax(1) == y).float().mean())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    digest = hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]
    sent = strategy.bytes_sent() if isinstance(strategy, CodecDDPStrategy) else 0
    logged = trainer.callback_metrics.get("tandem/bytes_sent")
    rank = trainer.global_rank
    line = (f"rank {rank}: {trainer.global_step} steps, loss {model.first_loss:.3f} -> "
            f"{model.last_loss:.3f}, test accuracy {acc:.3f}, {sent} bytes sent "
            f"({sent / max(trainer.global_step, 1):,.0f} per step), logged "
            f"{'-' if logged is None else int(logged)}, parameters {digest}")
    say(line)
    if args.save and rank == 0:
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, args.save)
    # Lightning keeps its process group after fit; end it here, in every process, once what
    # fit left behind (the unwrapped DDP wrapper and its reducer) is collected. Left to the
    # interpreter's teardown, a finished process can abort at exit ("terminate called without
    # an active exception", exit code -6): this script did once in the test suite, and the
    # Accelerate example in 3 of 48 runs under load, none of 96 with the same remedy.
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
