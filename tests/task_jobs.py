"""Jobs and workload factories for tests/test_task_contract.py (importable by worker processes:
tests/ is on their path).

``ddp_recipe_reference`` is plain PyTorch DDP with the recipe the test gives Tandem: AdamW, a
warm-up + cosine schedule, global-norm clipping and two accumulated micro-batches (``no_sync`` on
the first), on the same workload, shards, minibatch order and seeds.
"""

from __future__ import annotations

import torch
from torch import nn

import tandem
from tandem.transport.env import transport_from_env


def ddp_recipe_reference(cfg_data: dict) -> list[torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    from tandem.config import RunConfig
    from tandem.trainer import build_model
    from tandem.trainer.spec import WarmupSchedule
    from tandem.workloads import build_workload
    from tandem.workloads.base import ShardLoader, partition

    cfg = RunConfig.model_validate(cfg_data)
    t = transport_from_env(timeout_s=60)
    work = build_workload(cfg.workload, cfg.seed)
    model = DistributedDataParallel(build_model(work, cfg.seed))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    s = cfg.schedule
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, WarmupSchedule(s.name, s.warmup_steps, cfg.steps, s.min_lr_ratio))
    shards = partition(work.train.y, cfg.workers, cfg.workload.partition, seed=cfg.seed)
    loader = ShardLoader(work.train, shards[t.rank], cfg.batch_size, seed=cfg.seed * 1000 + t.rank)
    micro = cfg.accumulation
    for _ in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        for m in range(micro):
            x, y = loader.next_batch()
            if m < micro - 1:
                with model.no_sync():
                    (work.loss_fn(model(x), y) / micro).backward()
            else:
                (work.loss_fn(model(x), y) / micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        opt.step()
        sched.step()
    params = [p.detach().clone() for p in model.module.parameters()]
    t.close()
    return params


# ---- custom workloads named by import path ---------------------------------------------------
class TinySeq(nn.Module):
    """Embedding + GRU + head; returns (N, V, T), PyTorch's layout for per-position classes."""

    def __init__(self, vocab: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(x))
        return self.head(h).transpose(1, 2)


def _seq_data(n: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences where each next token is (token + 1) mod vocab: learnable by the GRU."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    seq = (start + torch.arange(length + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


def tiny_seq(vocab: int = 12, hidden: int = 16, seed: int = 0) -> tandem.Workload:
    """A sequence task by import path: ``tests.task_jobs:tiny_seq`` (``task_jobs:tiny_seq``)."""
    from tandem.workloads.base import ArrayDataset

    x, y = _seq_data(512, 8, vocab, seed)
    xt, yt = _seq_data(128, 8, vocab, seed + 1)
    return tandem.Workload.custom(
        model_fn=lambda: TinySeq(vocab, hidden), train=ArrayDataset(x, y),
        test=ArrayDataset(xt, yt), name="tiny_seq", task="classification")


def tiny_seq_model() -> nn.Module:
    return TinySeq()
