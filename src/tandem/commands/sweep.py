"""``tandem sweep``: train K variants of one config as one pipelined job (strategy ``pipeline``).

Flags are those of ``tandem train``; the sweepable ones take comma lists and every list with
more than one value becomes an axis of the grid (``--paired`` pairs them instead)::

    tandem sweep --workload digits --workers 4 --steps 300 --lr 0.01,0.03,0.1,0.3
    tandem sweep --workload mnist5k --workload-opt width=1,2 --codec dense,fp16
    tandem sweep --variant '{lr: 0.1}' --variant '{lr: 0.05, codec: topk}'

Writes one run record per variant under ``<run>/variants/``, the summary table
(``<run>/sweep.txt``) and the overlay plot (``<run>/sweep.png``). On several machines:
``--write-config job.yaml`` writes the job for ``torchrun ... -m tandem.cli worker --config
job.yaml``; afterwards ``tandem sweep --report <run dir>`` builds the table and the plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from tandem.commands.base import command
from tandem.errors import ConfigError, TandemError

Opt = typer.Option


def _values(text: str | None) -> list[Any]:
    """``"0.01,0.1"`` -> ``[0.01, 0.1]`` (each item read as a YAML scalar)."""
    if text is None:
        return []
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            out.append(yaml.safe_load(item))
        except yaml.YAMLError:
            out.append(item)
    return out


def _option_lists(pairs: list[str] | None, prefix: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"option {pair!r}: expected KEY=VALUE[,VALUE...], e.g. hidden=64,128")
        key, vals = pair.split("=", 1)
        out[f"{prefix}.{key.strip()}"] = _values(vals)
    return out


def _variant(text: str) -> dict[str, Any]:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--variant {text!r} is not YAML: {err}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--variant {text!r}: expected a mapping, "
                          "e.g. '{lr: 0.1, codec: fp16}'")
    return value


@command("sweep", rank=30)
def sweep(
    config: Annotated[Path | None, Opt(help="YAML base config; flags override it")] = None,
    lr: Annotated[str | None, Opt(help="learning rate(s), e.g. 0.01,0.1")] = None,
    momentum: Annotated[str | None, Opt(help="SGD momentum value(s)")] = None,
    weight_decay: Annotated[str | None, Opt(help="weight decay value(s)")] = None,
    batch_size: Annotated[str | None, Opt(help="per-worker minibatch size(s)")] = None,
    seed: Annotated[str | None, Opt(help="seed(s): several make an ensemble")] = None,
    workload: Annotated[str | None, Opt(help="workload name(s)")] = None,
    workload_opt: Annotated[list[str] | None, Opt(help="KEY=V1,V2 workload option(s), "
                                                         "e.g. hidden=64,256 (repeat)")] = None,
    codec: Annotated[str | None, Opt(help="codec name(s), e.g. dense,fp16")] = None,
    codec_opt: Annotated[list[str] | None, Opt(help="KEY=V1,V2 codec option(s)")] = None,
    variant: Annotated[list[str] | None, Opt(help="an explicit variant as YAML, e.g. "
                                                     "'{lr: 0.1, codec: fp16}' (repeat)")] = None,
    paired: Annotated[bool, Opt("--paired", help="pair the lists instead of their grid")] = False,
    bucket_mb: Annotated[float, Opt(help="0: exchange after backward; >0: MB per bucket "
                                         "launched during backward")] = 0.0,
    workers: Annotated[int | None, Opt(help="number of data-parallel workers")] = None,
    data_path: Annotated[Path | None, Opt(help="dataset folder (fashion)")] = None,
    partition: Annotated[str | None, Opt(help="iid | label | redundant")] = None,
    steps: Annotated[int | None, Opt(help="steps per worker (overrides --epochs)")] = None,
    epochs: Annotated[float | None, Opt(help="epochs over each worker's shard")] = None,
    net: Annotated[str | None, Opt(help="emulated link, e.g. 100mbit:1ms")] = None,
    stragglers: Annotated[str | None, Opt(help="P:FACTOR or P:exp:MEAN_S")] = None,
    target_accuracy: Annotated[float | None, Opt(help="report time to this accuracy")] = None,
    eval_every: Annotated[int | None, Opt(help="steps between evaluations (0 = auto)")] = None,
    out: Annotated[Path | None, Opt(help="run directory (default runs/<name>)")] = None,
    name: Annotated[str | None, Opt(help="run name")] = None,
    progress: Annotated[bool | None, Opt("--progress/--no-progress", help="bar")] = None,
    timeout: Annotated[float | None, Opt(help="longest any wait may last, seconds")] = None,
    nan_policy: Annotated[str | None, Opt(help="skip | stop on a NaN/Inf gradient")] = None,
    write_config: Annotated[Path | None, Opt(help="write the job's YAML (for torchrun) and "
                                                  "exit without training")] = None,
    report: Annotated[Path | None, Opt(help="only rebuild the table and plot of a finished "
                                            "sweep in this run directory")] = None,
) -> None:
    """Train several variants of one config as ONE pipelined job; one record per variant."""
    from tandem.resolve import load_config
    from tandem.sweep import expand_grid, run_sweep, summarize_sweep, sweep_config

    if report is not None:
        try:
            table, _ = summarize_sweep(report)
        except TandemError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        typer.echo(table)
        typer.echo(f"overlay plot: {report / 'sweep.png'}")
        return
    try:
        lists: dict[str, list[Any]] = {
            "lr": _values(lr), "momentum": _values(momentum),
            "weight_decay": _values(weight_decay), "batch_size": _values(batch_size),
            "seed": _values(seed), "workload.name": _values(workload),
            "codec.name": _values(codec),
            **_option_lists(workload_opt, "workload.options"),
            **_option_lists(codec_opt, "codec.options"),
        }
        overrides: dict[str, Any] = {
            "workers": workers, "workload.data_path": str(data_path) if data_path else None,
            "workload.partition": partition, "steps": steps, "epochs": epochs, "net": net,
            "stragglers": stragglers, "target_accuracy": target_accuracy,
            "eval_every": eval_every, "out": str(out) if out else None, "name": name,
            "progress": progress, "timeout_s": timeout, "nan_policy": nan_policy,
        }
        # one value: part of the base config; several: an axis of the sweep
        overrides.update({k: v[0] for k, v in lists.items() if len(v) == 1})
        axes = {k: v for k, v in lists.items() if len(v) > 1}
        variants = (expand_grid(axes, paired=paired) if axes else []) + \
            [_variant(v) for v in variant or []]
        if not variants:
            raise ConfigError("nothing to sweep: give a list (e.g. --lr 0.01,0.1) or --variant")
        base = load_config(path=config, **overrides)
        if write_config is not None:
            write_config.write_text(sweep_config(base, variants, bucket_mb=bucket_mb).to_yaml())
            typer.echo(f"wrote {write_config}: torchrun ... -m tandem.cli worker --config "
                       f"{write_config}, then tandem sweep --report <its run directory>")
            return
        result = run_sweep(base, variants, bucket_mb=bucket_mb)
    except TandemError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    run_dir = result["run_dir"]
    typer.echo(result["table"])
    typer.echo(f"job record: {run_dir}")
    typer.echo(f"variant records: {run_dir / 'variants'}")
    typer.echo(f"overlay plot: {run_dir / 'sweep.png'}")
