"""``tandem``: the command line. Thin: it parses, validates through the config model, and calls
the Python API. Every flag of ``tandem train`` maps onto one field of :class:`RunConfig`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tandem.errors import TandemError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Tandem: distributed training that sends fewer bytes and never waits "
                       "for the slowest machine.")


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


Opt = typer.Option


@app.command()
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
    from tandem.config import load_config, parse_options

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
        _fail(err)
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


@app.command()
def worker(config: Annotated[Path, Opt(help="the run's YAML config")]) -> None:
    """One worker process under torchrun: `torchrun --nproc_per_node=4 -m tandem.cli worker --config run.yaml`."""
    from tandem.worker import torchrun_main

    try:
        torchrun_main(str(config))
    except TandemError as err:
        _fail(err)


@app.command()
def report(runs: Annotated[list[Path], typer.Argument(help="run directories")],
           out: Annotated[Path, Opt(help="PNG with the runs' curves overlaid")] = Path("compare.png")) -> None:
    """Compare runs: a table on stdout and one PNG of their curves overlaid."""
    from tandem.telemetry.report import compare

    try:
        table, _ = compare(list(runs), out)
    except TandemError as err:
        _fail(err)
        return
    typer.echo(table)
    typer.echo(f"curves: {out}")


@app.command()
def codecs(as_json: Annotated[bool, Opt("--json", help="machine-readable")] = False) -> None:
    """List the codecs with their options and defaults."""
    from tandem.codecs import CODECS

    rows = []
    for name, cls in sorted(CODECS.items()):
        opts = {k: {"default": f.default, "help": f.description or ""}
                for k, f in cls.Options.model_fields.items()}
        rows.append({"name": name, "transfer": cls.transfer, "options": opts,
                     "summary": (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]})
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    for r in rows:
        typer.echo(f"{r['name']:<10} [{r['transfer']}]  {r['summary']}")
        for k, o in r["options"].items():
            typer.echo(f"    {k}={o['default']!r}  {o['help']}")


@app.command()
def strategies() -> None:
    """List the strategies with their options and defaults."""
    from tandem.strategies import STRATEGIES

    for name, cls in sorted(STRATEGIES.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:<14} {doc}")
        typer.echo(f"    codecs: {_codec_support(cls)}")
        for k, f in cls.Options.model_fields.items():
            typer.echo(f"    {k}={f.default!r}  {f.description or ''}")


def _codec_support(cls: Any) -> str:
    """Which codecs a strategy takes, for ``tandem strategies``."""
    from tandem.codecs import CODECS

    if cls.exact_exchange:
        return f"dense only ({cls.exact_exchange})"
    if cls.peer_codes:
        ok = ", ".join(sorted(n for n, c in CODECS.items() if c.self_contained))
        return f"self-contained ones ({ok}): each peer decodes its neighbours' codes alone"
    return "any"


def _load_commands() -> None:
    """Each module of ``tandem.commands`` adds its commands (sweep, sim, ...) with register(app)."""
    import importlib
    import pkgutil

    import tandem.commands as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        if hasattr(module, "register"):
            module.register(app)


_load_commands()

if __name__ == "__main__":
    app()
