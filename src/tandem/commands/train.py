"""``tandem train``: N local worker processes, one run record."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.base import Opt, command, fail
from tandem.errors import TandemError


@command("train", rank=10)
def train(
    config: Annotated[Path | None, Opt(help="YAML config file; flags override it")] = None,
    strategy: Annotated[str | None, Opt(help="allreduce | local | ... (`tandem strategies`)")] = None,
    strategy_opt: Annotated[list[str] | None, Opt(help="strategy option KEY=VALUE (repeat)")] = None,
    codec: Annotated[str | None, Opt(help="dense | fp16 | topk | ... (`tandem codecs`)")] = None,
    codec_opt: Annotated[list[str] | None, Opt(help="codec option KEY=VALUE, e.g. ratio=0.01")] = None,
    workers: Annotated[int | None, Opt(help="number of data-parallel workers")] = None,
    workload: Annotated[str | None, Opt(help="digits | mnist5k | fashion | regression | resnet18")] = None,
    data_path: Annotated[Path | None, Opt(help="dataset folder (fashion: the IDX .gz files)")] = None,
    partition: Annotated[str | None, Opt(help="iid | label | redundant")] = None,
    redundancy: Annotated[int | None, Opt(help="d: workers holding each partition")] = None,
    steps: Annotated[int | None, Opt(help="steps per worker (overrides --epochs)")] = None,
    epochs: Annotated[float | None, Opt(help="epochs over each worker's shard")] = None,
    batch_size: Annotated[int | None, Opt(help="per-worker minibatch size")] = None,
    lr: Annotated[float | None, Opt(help="learning rate")] = None,
    momentum: Annotated[float | None, Opt(help="SGD momentum")] = None,
    seed: Annotated[int | None, Opt(help="seed for model, data order, stragglers")] = None,
    net: Annotated[str | None, Opt(help="emulated link BANDWIDTH:LATENCY[:JITTER], e.g. 100mbit:1ms")] = None,
    stragglers: Annotated[str | None, Opt(help="P:FACTOR (0.2:5) or P:exp:MEAN_S")] = None,
    slow_worker: Annotated[list[str] | None, Opt(help="RANK:FACTOR, a fixed slow worker (repeat)")] = None,
    target_accuracy: Annotated[float | None, Opt(help="report time to this test accuracy")] = None,
    eval_every: Annotated[int | None, Opt(help="steps between evaluations (0 = auto)")] = None,
    out: Annotated[Path | None, Opt(help="run directory (default runs/<name>)")] = None,
    name: Annotated[str | None, Opt(help="run name")] = None,
    tensorboard: Annotated[bool | None, Opt("--tensorboard/--no-tensorboard", help="write TensorBoard scalars")] = None,
    progress: Annotated[bool | None, Opt("--progress/--no-progress", help="progress bar")] = None,
    timeout: Annotated[float | None, Opt(help="longest any wait may last, seconds")] = None,
    nan_policy: Annotated[str | None, Opt(help="skip | stop on a NaN/Inf gradient")] = None,
    checkpoint_every: Annotated[int | None, Opt(help="save a checkpoint every N steps")] = None,
    resume: Annotated[Path | None, Opt(help="continue the run in this directory from its last checkpoint")] = None,
) -> None:
    """Train with N local worker processes and write the run record (config, events, summary, curves)."""
    from tandem.api import train as api_train
    from tandem.config import parse_options
    from tandem.resolve import load_config

    try:
        overrides = {
            "strategy.name": strategy, "codec.name": codec, "workers": workers,
            "workload.name": workload, "workload.data_path": str(data_path) if data_path else None,
            "workload.partition": partition, "workload.redundancy": redundancy, "steps": steps,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
            "seed": seed, "net": net, "stragglers": stragglers, "slow_workers": slow_worker or None,
            "target_accuracy": target_accuracy, "eval_every": eval_every,
            "out": str(out) if out else None, "name": name, "tensorboard": tensorboard,
            "progress": progress, "timeout_s": timeout, "nan_policy": nan_policy,
            "checkpoint_every": checkpoint_every,
        }
        if resume is not None:
            if config is None:
                config = resume / "config.yaml"
            overrides.update({"resume": True, "out": str(resume)})
        for k, v in parse_options(codec_opt).items():
            overrides[f"codec.options.{k}"] = v
        for k, v in parse_options(strategy_opt).items():
            overrides[f"strategy.options.{k}"] = v
        cfg = load_config(path=config, **overrides)
        summary = api_train(cfg)
    except TandemError as err:
        fail(err)
        return
    _print_summary(summary, cfg.run_dir())


def _print_summary(summary: dict, run_dir: Path) -> None:
    keys = ["strategy", "codec", "workers", "steps", "wall_time_s", "final_test_accuracy",
            "final_test_loss", "bytes_sent_per_worker_per_step", "comm_fraction", "idle_fraction",
            "time_to_target_s"]
    for k in keys:
        if k in summary:
            v = summary[k]
            typer.echo(f"{k:>32}: {v:.4g}" if isinstance(v, float) else f"{k:>32}: {v}")
    typer.echo(f"{'run record':>32}: {run_dir}")
