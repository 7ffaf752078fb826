"""``tandem train``: N local worker processes, one run record.

Flags override the ``--config`` file field by field. ``--codec``/``--strategy``/``--workload``
naming another plugin than the file's replace it together with its options; ``--codec-opt``/
``--strategy-opt``/``--workload-opt`` alone set options of the file's plugin (or the default).
A bad value exits with status 2 and one line naming the flag, before any worker starts
(:func:`~tandem.commands.base.load_flags`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tandem.commands.base import Opt, command, fail, load_flags, option_flags
from tandem.errors import TandemError

RUN, DATA, STEP, NET, FAULTS, OUT = ("Run", "Model and data", "Optimizer step", "Network",
                                     "Faults", "Output")


@command("train", rank=10)
def train(
    config: Annotated[Path | None, Opt(help="YAML config file; flags override it", rich_help_panel=RUN)] = None,
    strategy: Annotated[str | None, Opt(help="allreduce | local | gossip | ... (`tandem strategies`); another than the config's drops its options", rich_help_panel=RUN)] = None,
    strategy_opt: Annotated[list[str] | None, Opt(help="strategy option KEY=VALUE (repeat), for --strategy or the config's strategy", rich_help_panel=RUN)] = None,
    codec: Annotated[str | None, Opt(help="dense | fp16 | topk | ... (`tandem codecs`); another than the config's drops its options", rich_help_panel=RUN)] = None,
    codec_opt: Annotated[list[str] | None, Opt(help="codec option KEY=VALUE, e.g. ratio=0.01 (repeat), for --codec or the config's codec", rich_help_panel=RUN)] = None,
    workers: Annotated[int | None, Opt(help="number of data-parallel workers (1 to 1024)", rich_help_panel=RUN)] = None,
    steps: Annotated[int | None, Opt(help="steps per worker (overrides --epochs)", rich_help_panel=RUN)] = None,
    epochs: Annotated[float | None, Opt(help="epochs over each worker's shard", rich_help_panel=RUN)] = None,
    seed: Annotated[int | None, Opt(help="seed for model, data order, stragglers (0 to 2^63-1)", rich_help_panel=RUN)] = None,
    timeout: Annotated[float | None, Opt(help="longest any wait may last, seconds", rich_help_panel=RUN)] = None,
    workload: Annotated[str | None, Opt(help="a registered workload (`tandem workloads`: digits, mnist5k, ...) or package.module:function", rich_help_panel=DATA)] = None,
    workload_opt: Annotated[list[str] | None, Opt(help="workload option KEY=VALUE, e.g. hidden=64 (repeat; `tandem workloads` lists them)", rich_help_panel=DATA)] = None,
    data_path: Annotated[Path | None, Opt(help="dataset folder (fashion: the IDX .gz files)", rich_help_panel=DATA)] = None,
    partition: Annotated[str | None, Opt(help="iid | label | redundant: how the training set is split over workers", rich_help_panel=DATA)] = None,
    redundancy: Annotated[int | None, Opt(help="d: workers holding each partition (1 to --workers)", rich_help_panel=DATA)] = None,
    batch_size: Annotated[int | None, Opt(help="per-worker minibatch size", rich_help_panel=DATA)] = None,
    lr: Annotated[float | None, Opt(help="learning rate (> 0)", rich_help_panel=STEP)] = None,
    momentum: Annotated[float | None, Opt(help="SGD momentum in [0, 1)", rich_help_panel=STEP)] = None,
    weight_decay: Annotated[float | None, Opt(help="weight decay (decoupled for adamw)", rich_help_panel=STEP)] = None,
    optimizer: Annotated[str | None, Opt(help="sgd | adam | adamw (default: the workload's own, else sgd)", rich_help_panel=STEP)] = None,
    optimizer_opt: Annotated[list[str] | None, Opt(help="option KEY=VALUE of the built-in --optimizer, e.g. nesterov=true (repeat)", rich_help_panel=STEP)] = None,
    schedule: Annotated[str | None, Opt(help="constant | cosine | linear, optionally :WARMUP_STEPS, e.g. cosine:100 (default: the workload's own)", rich_help_panel=STEP)] = None,
    clip_grad_norm: Annotated[float | None, Opt(help="clip the aggregated gradient's global norm to this", rich_help_panel=STEP)] = None,
    accumulation: Annotated[int | None, Opt(help="micro-batches per optimizer step (each of --batch-size)", rich_help_panel=STEP)] = None,
    precision: Annotated[str | None, Opt(help="fp32 | bf16 (autocast, CPU or GPU) | fp16 (GPU, grad scaler)", rich_help_panel=STEP)] = None,
    net: Annotated[str | None, Opt(help="emulated link BANDWIDTH[:LATENCY[:JITTER]][,hosts=N][,duplex=X][,duplex_after=T][,collective=Y], units required, e.g. 100mbit:1ms or 1gbit:200us:50us; hosts=N: the processes share N hosts' links; duplex=X: what comes in while the link sends takes X times longer, once it has sent for T; collective=Y: an all-reduce likewise Y times", rich_help_panel=NET)] = None,
    stragglers: Annotated[str | None, Opt(help="random stragglers P:FACTOR (0.2:5 = 6x slower steps) or P:exp:MEAN_S", rich_help_panel=FAULTS)] = None,
    slow_worker: Annotated[list[str] | None, Opt(help="RANK:FACTOR, a fixed slow worker (repeat)", rich_help_panel=FAULTS)] = None,
    nan_policy: Annotated[str | None, Opt(help="skip | stop on a NaN/Inf gradient", rich_help_panel=FAULTS)] = None,
    stop_on_divergence: Annotated[bool | None, Opt("--stop-on-divergence/--no-stop-on-divergence", help="end the run with an error when the loss turns non-finite or grows 10x past its best (default: warn once)", rich_help_panel=FAULTS)] = None,
    checkpoint_every: Annotated[int | None, Opt(help="save a checkpoint every N steps (0 = off)", rich_help_panel=FAULTS)] = None,
    resume: Annotated[Path | None, Opt(help="continue the run in this directory from its last checkpoint", rich_help_panel=FAULTS)] = None,
    out: Annotated[Path | None, Opt(help="run directory (default runs/<name>)", rich_help_panel=OUT)] = None,
    name: Annotated[str | None, Opt(help="run name", rich_help_panel=OUT)] = None,
    target_accuracy: Annotated[float | None, Opt(help="report time to this test accuracy, in (0, 1]", rich_help_panel=OUT)] = None,
    eval_every: Annotated[int | None, Opt(help="steps between evaluations (0 = auto)", rich_help_panel=OUT)] = None,
    tensorboard: Annotated[bool | None, Opt("--tensorboard/--no-tensorboard", help="write TensorBoard scalars", rich_help_panel=OUT)] = None,
    progress: Annotated[bool | None, Opt("--progress/--no-progress", help="progress bar", rich_help_panel=OUT)] = None,
) -> None:
    """Train with N local worker processes and write the run record (config, events, summary, curves)."""
    from tandem.api import train as api_train
    from tandem.resolve import load_config

    def flag(text: str, value: object, key: str) -> tuple[str, dict]:
        return (f"--{text} {value}", {key: value})

    try:
        flags = [
            flag("strategy", strategy, "strategy.name"), flag("codec", codec, "codec.name"),
            *option_flags("--strategy-opt", strategy_opt, "strategy.options"),
            *option_flags("--codec-opt", codec_opt, "codec.options"),
            flag("workers", workers, "workers"), flag("steps", steps, "steps"),
            flag("epochs", epochs, "epochs"), flag("seed", seed, "seed"),
            flag("timeout", timeout, "timeout_s"), flag("workload", workload, "workload.name"),
            *option_flags("--workload-opt", workload_opt, "workload.options"),
            flag("data-path", str(data_path) if data_path else None, "workload.data_path"),
            flag("partition", partition, "workload.partition"),
            flag("redundancy", redundancy, "workload.redundancy"),
            flag("batch-size", batch_size, "batch_size"), flag("lr", lr, "lr"),
            flag("momentum", momentum, "momentum"), flag("net", net, "net"),
            flag("weight-decay", weight_decay, "weight_decay"),
            flag("optimizer", optimizer, "optimizer.name"),
            *option_flags("--optimizer-opt", optimizer_opt, "optimizer.options"),
            flag("schedule", schedule, "schedule"),
            flag("clip-grad-norm", clip_grad_norm, "clip_grad_norm"),
            flag("accumulation", accumulation, "accumulation"),
            flag("precision", precision, "precision"),
            flag("stragglers", stragglers, "stragglers"),
            (f"--slow-worker {' '.join(slow_worker or [])}", {"slow_workers": slow_worker or None}),
            flag("nan-policy", nan_policy, "nan_policy"),
            flag("stop-on-divergence", stop_on_divergence, "stop_on_divergence"),
            flag("checkpoint-every", checkpoint_every, "checkpoint_every"),
            flag("out", str(out) if out else None, "out"), flag("name", name, "name"),
            flag("target-accuracy", target_accuracy, "target_accuracy"),
            flag("eval-every", eval_every, "eval_every"),
            flag("tensorboard", tensorboard, "tensorboard"),
            flag("progress", progress, "progress"),
        ]
        if resume is not None:
            if config is None:
                config = resume / "config.yaml"
            flags.append((f"--resume {resume}", {"resume": True, "out": str(resume)}))
        cfg = load_flags(load_config, config, flags)
        summary = api_train(cfg)
    except TandemError as err:
        fail(err)
    print_summary(summary, cfg.run_dir())


def print_summary(summary: dict, run_dir: Path) -> None:
    """The end-of-run lines ``tandem train`` prints (``tandem worker`` too, on rank 0)."""
    keys = ["strategy", "codec", "workers", "steps", "wall_time_s", "excluded_time_s",
            "final_test_accuracy", "final_test_loss", "bytes_sent_per_worker_per_step", "comm_fraction", "idle_fraction",
            "time_to_target_s"]
    for k in keys + [k for k in ("lost_ranks", "skipped_steps") if summary.get(k)]:
        if k in summary:
            v = summary[k]
            typer.echo(f"{k:>32}: {v:.4g}" if isinstance(v, float) else f"{k:>32}: {v}")
    typer.echo(f"{'run record':>32}: {run_dir}")
