"""Keep your DistributedDataParallel loop; let a Tandem codec move its gradients.

    .venv/bin/python examples/ddp_hook.py --codec powersgd --codec-opt rank=2 --workers 2
    torchrun --nproc_per_node 2 examples/ddp_hook.py --codec topk --codec-opt ratio=0.01

The only Tandem lines are ``ddp_hook`` and ``register_comm_hook``: the loop below is plain DDP.
Without ``torchrun`` the script starts ``--workers`` local processes itself. ``--net
100mbit:1ms`` sends the hook's traffic through Tandem's transport with an emulated link (the
bytes are metered either way); ``--no-overlap`` runs each exchange inside the hook instead of
on its background thread, to see what overlapping communication with backward buys on your
model (``--model resnet18`` has several buckets; the small CNN fits one, so nothing overlaps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from tandem.codecs import ddp_hook, make_codec
from tandem.config import WorkloadConfig
from tandem.transport.env import transport_from_env
from tandem.workloads import build_workload


def parse_opts(pairs: list[str]) -> dict[str, Any]:
    """``["ratio=0.01", "rank=2"]`` -> options (numbers where they parse as numbers)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def train(args: argparse.Namespace) -> dict[str, Any]:
    """One rank: an ordinary DDP training loop with a Tandem codec as its comm hook."""
    torch.set_num_threads(args.threads)
    transport = transport_from_env(net=args.net, timeout_s=120)  # joins torch.distributed
    try:
        work = build_workload(WorkloadConfig(name=args.model, options=args.model_options), 0)
        torch.manual_seed(0)
        model = DDP(work.model_fn())
        codec = make_codec(args.codec, parse_opts(args.codec_opt), seed=0)
        state, hook = ddp_hook(codec, transport=transport if args.net else None,
                               total_steps=args.steps, overlap=not args.no_overlap)
        model.register_comm_hook(state, hook)  # <- the one change to a DDP loop
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(1000 + transport.rank)
        times, losses = [], []
        for _ in range(args.steps):
            idx = torch.randint(len(work.train), (args.batch,), generator=gen)
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = work.loss_fn(model(work.train.x[idx]), work.train.y[idx])
            loss.backward()  # the hook runs here, per bucket
            opt.step()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            acc = float((model(work.test.x).argmax(1) == work.test.y).float().mean())
        return {"rank": transport.rank, "step_ms": 1e3 * statistics.median(times[2:] or times),
                "first_loss": losses[0], "last_loss": losses[-1], "test_accuracy": acc,
                "sent_bytes": state.transport.meter.sent_total(), "codecs": len(state.codecs)}
    finally:
        transport.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codec", default="powersgd")
    ap.add_argument("--codec-opt", action="append", default=[], metavar="K=V")
    ap.add_argument("--workers", type=int, default=2, help="local processes (without torchrun)")
    ap.add_argument("--model", default="digits", help="a Tandem workload: digits, mnist5k, "
                    "fashion, resnet18")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--net", default=None, help="emulated link, e.g. 100mbit:1ms")
    ap.add_argument("--no-overlap", action="store_true", help="exchange inside the hook call")
    args = ap.parse_args()
    args.model_options = {"n_train": 512, "n_test": 128} if args.model == "resnet18" else {}
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        results = [train(args)]
    else:
        from tandem.launch import spawn

        results = spawn(train, args.workers, args, timeout_s=1800)
    for r in results:
        print(f"rank {r['rank']}: {r['step_ms']:.1f} ms/step (median), loss "
              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}, test accuracy "
              f"{r['test_accuracy']:.3f}, {r['sent_bytes'] / args.steps:,.0f} bytes sent per "
              f"step, {r['codecs']} codec instance(s) (one per bucket layout)")


if __name__ == "__main__":
    main()
